"""The PKI: OEM root, enclave certificates, per-job production CAs and device certificates.

See docs/pki.md for the OID arc, the profiles and the serial encoding.
"""

from ._errors import (
    BadRequestSignatureError,
    CARequestError,
    CertificateExpiredError,
    CertificateNotYetValidError,
    ChainValidationError,
    IssuerError,
    IssuerKeyMismatchError,
    IssuerNotValidError,
    JobMismatchError,
    NameNotAllowedError,
    SerialNumberError,
    UnexpectedExtensionError,
    ValidityBeyondIssuerError,
    WrongKeyTypeError,
    WrongPurposeError,
)
from .encoding import cert_fingerprint, from_pem, load_csr, load_der, to_der, to_pem
from .issue import (
    DeviceCertificateIssuer,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    install_certificate,
)
from .profile import EnclavePurpose
from .serial import DeviceSerial, device_serial, job_tag, parse_device_serial
from .validate import (
    DeviceChainValidator,
    build_verifier,
    device_id_of,
    job_id_of,
    validate_device_chain,
    validate_enclave_certificate,
)

__all__ = [
    "BadRequestSignatureError",
    "CARequestError",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "ChainValidationError",
    "DeviceCertificateIssuer",
    "DeviceChainValidator",
    "DeviceSerial",
    "EnclavePurpose",
    "IssuerError",
    "IssuerKeyMismatchError",
    "IssuerNotValidError",
    "JobMismatchError",
    "NameNotAllowedError",
    "SerialNumberError",
    "UnexpectedExtensionError",
    "ValidityBeyondIssuerError",
    "WrongKeyTypeError",
    "WrongPurposeError",
    "build_verifier",
    "cert_fingerprint",
    "certify_enclave",
    "certify_production_ca",
    "create_enclave_csr",
    "create_production_ca_csr",
    "create_root_ca",
    "device_id_of",
    "device_serial",
    "from_pem",
    "install_certificate",
    "job_id_of",
    "job_tag",
    "load_csr",
    "load_der",
    "parse_device_serial",
    "to_der",
    "to_pem",
    "validate_device_chain",
    "validate_enclave_certificate",
]
