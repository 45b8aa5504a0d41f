"""Delegated OCSP responder certificates (RFC 6960 §4.2.2.2).

A relying party accepts an OCSP response about a device certificate only if it is signed by
the device's issuer -- the job's production CA, whose key lives in the programmer's token --
or by a responder the issuer certified for that purpose.  So the production CA certifies,
once per job at open-job, a key the OEM generated in its own token: the OEM then answers
for the job's devices from its registry without the programmer.  Likewise the OEM root
certifies an OEM key that answers for the production CAs (``nginx ssl_ocsp on`` asks about
every certificate of the chain but the root).

The profile (end entity, nothing else):

* basicConstraints cA=FALSE, critical; keyUsage digitalSignature, critical (§4.2.2.2: the
  responder signs responses);
* extendedKeyUsage id-kp-OCSPSigning, the one key purpose (§4.2.2.2: MUST);
* id-pkix-ocsp-nocheck, non-critical (§4.2.2.2.1): a client does not ask about the
  responder's own status.  §4.2.2.2.1 advises a short lifetime for such a certificate; the
  issuer here is a production CA whose key may be gone when the job is closed, so the
  certificate lives as long as the CA (the devices' lifetime).  The compensating control is
  the issuer's: the responder key is non-extractable in the OEM's token, and a compromise is
  answered by revoking the production CA in the root's CRL (docs/pki.md, "Relying parties");
* subjectKeyIdentifier (method 1) and authorityKeyIdentifier = the issuer's SKI.

The subject names the OEM (O, from the issuer), the role (OU ``OCSP responder``) and the job
(CN, the job id; the root's responder has the root's CN).  Everything is set here: nothing
is copied from the request but its key.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securethread.keys.protocol import PrivateKey

from ._errors import (
    BadRequestSignatureError,
    ChainValidationError,
    UnexpectedExtensionError,
    WrongKeyTypeError,
    WrongPurposeError,
)
from ._names import check_job_id
from .issue import _check_issuer, _hash, _now
from .serial import random_serial

__all__ = [
    "RESPONDER_OU",
    "certify_responder",
    "check_responder_certificate",
    "responder_csr",
]

RESPONDER_OU = "OCSP responder"
#: The request carries a placeholder subject: the issuer decides the subject.
_REQUEST_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RESPONDER_OU)])


def responder_csr(key: PrivateKey) -> x509.CertificateSigningRequest:
    """A PKCS#10 request (RFC 2986) for ``key`` (P-256): proof of possession only."""
    if key.public_key().curve.name != "secp256r1":
        raise WrongKeyTypeError("an OCSP responder key must be a P-256 key")
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_REQUEST_SUBJECT)
        .sign(key.as_cryptography(), hashes.SHA256())
    )


def _subject(issuer: x509.Certificate, common_name: str) -> x509.Name:
    attrs: list[x509.NameAttribute[str]] = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(a.value))
        for a in issuer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    ]
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, RESPONDER_OU))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _request_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    if not isinstance(csr, x509.CertificateSigningRequest):
        raise BadRequestSignatureError(f"request is a {type(csr).__name__}, not a CSR")
    if not csr.is_signature_valid:
        raise BadRequestSignatureError("OCSP responder CSR: signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise WrongKeyTypeError("OCSP responder CSR: the key must be a P-256 EC key")
    if len(csr.extensions):
        raise UnexpectedExtensionError(
            "OCSP responder CSR requests extensions; the profile sets them itself"
        )
    return key


def certify_responder(
    issuer_key: PrivateKey,
    issuer_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    job_id: str | None,
    at: datetime.datetime | None = None,
) -> x509.Certificate:
    """Certify the key of ``csr`` as ``issuer_cert``'s delegated OCSP responder.

    ``job_id`` names the job (a production CA's responder) or is None (the root's).  The
    certificate is valid from the issuer's notBefore (or ``at``, if later) to the issuer's
    notAfter.  Checks run before the issuer key signs anything.
    """
    now = _now() if at is None else at.astimezone(datetime.UTC).replace(microsecond=0)
    ski = _check_issuer(issuer_key, issuer_cert, at=now, what="certify OCSP responder")
    key = _request_key(csr)
    if job_id is None:
        cn = issuer_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(cn[0].value) if cn else RESPONDER_OU
    else:
        common_name = check_job_id(job_id)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(issuer_cert, common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(key)
        .serial_number(random_serial())
        .not_valid_before(issuer_cert.not_valid_before_utc)
        .not_valid_after(issuer_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=ski, authority_cert_issuer=None, authority_cert_serial_number=None
            ),
            critical=False,
        )
    )
    return builder.sign(issuer_key.as_cryptography(), _hash(issuer_key.curve))


def check_responder_certificate(
    cert: x509.Certificate, issuer: x509.Certificate, *, key: ec.EllipticCurvePublicKey
) -> x509.Certificate:
    """``cert`` is ``issuer``'s delegated OCSP responder certificate for ``key`` (what
    :func:`certify_responder` issues); raise naming the first failed check."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise ChainValidationError(
            f"OCSP responder certificate is not issued by {issuer.subject.rfc4514_string()}"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_bytes(der, spki):
        raise WrongKeyTypeError("OCSP responder certificate certifies another key")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    except x509.ExtensionNotFound as exc:
        raise WrongPurposeError(
            f"OCSP responder certificate lacks {exc.oid.dotted_string} (RFC 6960 §4.2.2.2)"
        ) from None
    if list(eku) != [ExtendedKeyUsageOID.OCSP_SIGNING] or not ku.digital_signature or bc.ca:
        raise WrongPurposeError(
            "OCSP responder certificate is not an id-kp-OCSPSigning end-entity certificate"
        )
    return cert
