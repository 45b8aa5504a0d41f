"""The RFC 5280 certificate profile securethread issues under, as small policy objects.

One :class:`CertificateProfile` per kind of certificate.  A profile decides the complete
extension set (nothing is copied from a request), checks the subject key, and checks an
existing certificate against itself during validation.  Rules applied to every kind:

* basicConstraints present and critical (RFC 5280 §4.2.1.9: MUST be critical in CA
  certificates; we mark it critical with cA=FALSE in end-entity ones too);
* keyUsage present and critical (§4.2.1.3), the minimum each kind needs;
* subjectKeyIdentifier, non-critical, method (1) = SHA-1 of the subjectPublicKey (§4.2.1.2),
  which equals the CKA_ID of the key in its token;
* authorityKeyIdentifier, non-critical, keyIdentifier = the issuer's SKI (§4.2.1.1);
* extendedKeyUsage, non-critical, exactly one key purpose from the project arc
  (§4.2.1.12) -- except on the root, which is a trust anchor for all of them;
* no other extension (the verifier below refuses unknown ones).
"""

from __future__ import annotations

import enum

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from ..keys.policy import Curve
from . import oids
from ._errors import (
    CARequestError,
    NameNotAllowedError,
    UnexpectedExtensionError,
    WrongKeyTypeError,
    WrongPurposeError,
)
from ._names import check_device_id, check_enclave_name, check_job_id, check_role

ORGANIZATION = "securethread"
PRODUCTION_CA_CN = "securethread production CA"


class EnclavePurpose(enum.Enum):
    """What an enclave certificate certifies its key for."""

    IDENTITY = "identity"
    KEY_AGREEMENT = "key-agreement"
    LICENSE_SIGNING = "license-signing"
    LEDGER_SIGNING = "ledger-signing"


def _key_usage(
    *, digital_signature: bool = False, key_agreement: bool = False, key_cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_CURVE_NAMES = {Curve.P256: "P-256", Curve.P384: "P-384"}


@attrs.frozen(kw_only=True)
class CertificateProfile:
    """One kind of certificate: key curve, CA-ness, key usage and key purpose."""

    name: str
    curve: Curve
    ca: bool
    path_length: int | None
    key_usage: x509.KeyUsage
    purpose: x509.ObjectIdentifier | None

    @property
    def expected_extensions(self) -> frozenset[x509.ObjectIdentifier]:
        exts = {
            ExtensionOID.BASIC_CONSTRAINTS,
            ExtensionOID.KEY_USAGE,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        }
        if self.purpose is not None:
            exts.add(ExtensionOID.EXTENDED_KEY_USAGE)
        return frozenset(exts)

    def check_subject_key(self, key: object, *, what: str) -> ec.EllipticCurvePublicKey:
        """The key must be EC on this profile's curve (NIST SP 800-57 strength pairing)."""
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise WrongKeyTypeError(
                f"{what}: {self.name} needs an EC {_CURVE_NAMES[self.curve]} key, "
                f"got {type(key).__name__}"
            )
        if key.curve.name != self.curve.value:
            raise WrongKeyTypeError(
                f"{what}: {self.name} needs a {_CURVE_NAMES[self.curve]} key, got {key.curve.name}"
            )
        return key

    def extensions(
        self, subject_key: ec.EllipticCurvePublicKey, issuer_ski: bytes
    ) -> list[tuple[x509.ExtensionType, bool]]:
        """The complete extension list, with criticality, in a fixed order."""
        out: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=self.ca, path_length=self.path_length), True),
            (self.key_usage, True),
            (x509.SubjectKeyIdentifier.from_public_key(subject_key), False),
            (
                x509.AuthorityKeyIdentifier(
                    key_identifier=issuer_ski,
                    authority_cert_issuer=None,
                    authority_cert_serial_number=None,
                ),
                False,
            ),
        ]
        if self.purpose is not None:
            out.append((x509.ExtendedKeyUsage([self.purpose]), False))
        return out

    def check_request(self, csr: x509.CertificateSigningRequest) -> None:
        """Refuse requested extensions: the profile sets every extension itself."""
        for ext in csr.extensions:
            if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca and not self.ca:
                raise CARequestError(f"{self.name} profile cannot issue a CA certificate")
            raise UnexpectedExtensionError(
                f"CSR requests extension {ext.oid.dotted_string}; the {self.name} profile "
                "sets extensions itself"
            )

    def check_certificate(self, cert: x509.Certificate, *, what: str) -> None:
        """Check an issued certificate against the profile (purpose first, for clear errors)."""
        exts = cert.extensions
        if self.purpose is not None:
            try:
                eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                raise WrongPurposeError(f"{what}: has no key purpose, needs {self.name}") from None
            if list(eku) != [self.purpose]:
                raise WrongPurposeError(
                    f"{what}: key purpose {[o.dotted_string for o in eku]} is not {self.name}"
                )
        seen = {e.oid for e in exts}
        if seen != self.expected_extensions or len(seen) != len(exts):
            extra = sorted(o.dotted_string for o in seen - self.expected_extensions)
            missing = sorted(o.dotted_string for o in self.expected_extensions - seen)
            raise UnexpectedExtensionError(
                f"{what}: extensions outside the {self.name} profile "
                f"(unexpected {extra}, missing {missing})"
            )
        bc = exts.get_extension_for_class(x509.BasicConstraints)
        if not bc.critical or bc.value.ca != self.ca or bc.value.path_length != self.path_length:
            if bc.value.ca and not self.ca:
                raise WrongPurposeError(f"{what}: is a CA certificate, {self.name} is not")
            raise UnexpectedExtensionError(f"{what}: basicConstraints not as {self.name} requires")
        ku = exts.get_extension_for_class(x509.KeyUsage)
        if not ku.critical or ku.value != self.key_usage:
            raise UnexpectedExtensionError(f"{what}: keyUsage not as {self.name} requires")
        ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier)
        key = self.check_subject_key(cert.public_key(), what=what)
        if ski.critical or ski.value != x509.SubjectKeyIdentifier.from_public_key(key):
            raise UnexpectedExtensionError(f"{what}: subjectKeyIdentifier is not method (1)")
        if exts.get_extension_for_class(x509.AuthorityKeyIdentifier).critical:
            raise UnexpectedExtensionError(f"{what}: authorityKeyIdentifier must not be critical")


ROOT_CA = CertificateProfile(
    name="OEM root CA",
    curve=Curve.P384,
    ca=True,
    path_length=None,  # root -> production CA -> device needs depth 1 below the root
    key_usage=_key_usage(key_cert_sign=True),
    purpose=None,
)
PRODUCTION_CA = CertificateProfile(
    name="production CA",
    curve=Curve.P256,
    ca=True,
    path_length=0,  # RFC 5280 §4.2.1.9: may certify end entities only
    key_usage=_key_usage(key_cert_sign=True),
    purpose=oids.EKU_PRODUCTION_CA,
)
DEVICE = CertificateProfile(
    name="device",
    curve=Curve.P256,
    ca=False,
    path_length=None,
    # the device key signs (proof of possession, boot confirmation) and agrees (licenses)
    key_usage=_key_usage(digital_signature=True, key_agreement=True),
    purpose=oids.EKU_DEVICE,
)
ENCLAVE_PROFILES: dict[EnclavePurpose, CertificateProfile] = {
    EnclavePurpose.IDENTITY: CertificateProfile(
        name="enclave identity",
        curve=Curve.P384,
        ca=False,
        path_length=None,
        key_usage=_key_usage(digital_signature=True),
        purpose=oids.EKU_ENCLAVE_IDENTITY,
    ),
    EnclavePurpose.KEY_AGREEMENT: CertificateProfile(
        name="enclave key agreement",
        curve=Curve.P256,
        ca=False,
        path_length=None,
        key_usage=_key_usage(key_agreement=True),
        purpose=oids.EKU_ENCLAVE_KEY_AGREEMENT,
    ),
    EnclavePurpose.LICENSE_SIGNING: CertificateProfile(
        name="license signing",
        curve=Curve.P256,
        ca=False,
        path_length=None,
        key_usage=_key_usage(digital_signature=True),
        purpose=oids.EKU_LICENSE_SIGNING,
    ),
    EnclavePurpose.LEDGER_SIGNING: CertificateProfile(
        name="ledger signing",
        curve=Curve.P256,
        ca=False,
        path_length=None,
        key_usage=_key_usage(digital_signature=True),
        purpose=oids.EKU_LEDGER_SIGNING,
    ),
}


def enclave_profile(purpose: object) -> CertificateProfile:
    if not isinstance(purpose, EnclavePurpose):
        raise WrongPurposeError(f"{purpose!r} is not an EnclavePurpose")
    return ENCLAVE_PROFILES[purpose]


# --- subject names (RFC 5280 §4.1.2.6) ----------------------------------------------------------


def _attr(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(oid, value)


def root_subject(common_name: str) -> x509.Name:
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= 64:
        # X.520 ub-common-name = 64 (RFC 5280 Appendix A.1)
        raise NameNotAllowedError(f"root common name {common_name!r} must be 1..64 characters")
    return x509.Name(
        [_attr(NameOID.ORGANIZATION_NAME, ORGANIZATION), _attr(NameOID.COMMON_NAME, common_name)]
    )


def enclave_request_subject(enclave_name: str) -> x509.Name:
    """The name an enclave puts in its CSR; the OEM adds the role it certifies."""
    check_enclave_name(enclave_name)
    return x509.Name(
        [_attr(NameOID.ORGANIZATION_NAME, ORGANIZATION), _attr(NameOID.COMMON_NAME, enclave_name)]
    )


def enclave_subject(enclave_name: str, role: str) -> x509.Name:
    check_enclave_name(enclave_name)
    check_role(role)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            _attr(oids.ATTR_ENCLAVE_ROLE, role),
            _attr(NameOID.COMMON_NAME, enclave_name),
        ]
    )


def production_ca_subject(job_id: str) -> x509.Name:
    check_job_id(job_id)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            _attr(oids.ATTR_JOB_ID, job_id),
            _attr(NameOID.COMMON_NAME, PRODUCTION_CA_CN),
        ]
    )


def device_subject(job_id: str, device_id: str) -> x509.Name:
    check_job_id(job_id)
    check_device_id(device_id)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            _attr(oids.ATTR_JOB_ID, job_id),
            _attr(NameOID.COMMON_NAME, device_id),
        ]
    )


def single_attribute(name: x509.Name, oid: x509.ObjectIdentifier, *, what: str) -> str:
    """The one value of ``oid`` in ``name``; NameNotAllowedError if absent or repeated."""
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise NameNotAllowedError(f"{what}: subject must carry exactly one {oid.dotted_string}")
    return values[0].value
