"""Device identification: a fresh challenge, the device's answer, and its verification.

The programmer sends a random challenge; the device answers (canonical CBOR, versioned)::

    {"v": 2, "challenge": bstr, "device_id": "<16 hex>", "public_key": SPKI DER,
     "vendor_certificate": DER, "sig": DER ECDSA-P256-SHA256,
     ? "device_certificate": DER, ? "production_ca_certificate": DER}

where the signature covers ``CBOR(["securethread-device-identification", v, challenge,
device_id, public_key])`` (domain separation: no other securethread signature has this shape).
The two optional fields come together or not at all: a chip provisioned earlier (at a fab)
adds the OEM device certificate and production-CA certificate from its OTP, and a
*programming* job identifies it by them (:class:`ProvisionedIdentityVerifier`) instead of by
its vendor CA; the vendor certificate stays, so a line that provisions still identifies it.

:class:`IdentityVerifier` runs per device on the programmer, so it does the smallest complete
set of checks instead of a general path builder (RFC 5280 §6.1 reduced to a one-level chain
under a pinned vendor root): issuer name = a trusted root's subject, the vendor's signature (one
ECDSA verify), validity period, key usage digitalSignature and not a CA, the subject CN binds
the device id, the certified key is the answering key, then proof of possession over the
programmer's challenge (the second ECDSA verify).  Each failure is its own
:class:`DeviceRefusedError` subclass.  What it proved includes *which* vendor CA certified
the chip (:attr:`DeviceIdentity.vendor_ca`), which the ledger records.

Which vendor roots are trusted is the OEM's decision, not the line's: a job names its vendor
CAs by :func:`vendor_ca_id` (SHA-256 of the CA's SubjectPublicKeyInfo) inside what the
officers sign, and :func:`check_vendor_cas` admits exactly those certificates.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
from collections.abc import Collection, Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from securethread.errors import DeviceRefusedError, Error, FormatError, JobError
from securethread.formats import cbor, fields
from securethread.keys.ecutil import fingerprint, spki_der
from securethread.keys.policy import Curve
from securethread.pki import untrusted

__all__ = [
    "CHALLENGE_SIZE",
    "ChallengeMismatchError",
    "DeviceIdentity",
    "DeviceIdMismatchError",
    "IdentificationFormatError",
    "IdentificationResponse",
    "IdentityVerifier",
    "DeviceCertificateError",
    "KeyMismatchError",
    "NotProvisionedChipError",
    "ProofOfPossessionError",
    "ProvisionedIdentity",
    "ProvisionedIdentityVerifier",
    "UnknownProductionCAError",
    "UnknownVendorError",
    "VendorCAError",
    "VendorCertificateError",
    "check_device_id",
    "check_vendor_cas",
    "new_challenge",
    "pop_payload",
    "verify_proof_of_possession",
    "production_ca_id",
    "vendor_ca_id",
    "verify_identification",
]

VERSION = 2
CHALLENGE_SIZE = 32
MAX_RESPONSE_SIZE = 8192  # vendor, device and production-CA certificates
_DOMAIN = "securethread-device-identification"
#: A device id: 16 lowercase hex digits, a 64-bit chip UID.
DEVICE_ID_RE = re.compile(r"[0-9a-f]{16}")
_DEVICE_ID_RE = DEVICE_ID_RE
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_SIG_HASHES: dict[x509.ObjectIdentifier, hashes.HashAlgorithm] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: hashes.SHA256(),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: hashes.SHA384(),
}


class IdentificationFormatError(DeviceRefusedError, FormatError):
    """The identification response is malformed, oversized or of an unknown version."""


class ChallengeMismatchError(DeviceRefusedError):
    """The response answers another (stale or replayed) challenge."""


class UnknownVendorError(DeviceRefusedError):
    """The vendor certificate is not issued by a vendor CA the job names."""


class VendorCAError(JobError):
    """Vendor CA certificates are not exactly the ones the job names (one is missing,
    another CA's, named twice, or not a CA certificate)."""


class VendorCertificateError(DeviceRefusedError):
    """The vendor certificate's signature, validity or key usage is wrong."""


class DeviceIdMismatchError(DeviceRefusedError):
    """The vendor certificate does not name the device id the device claims."""


class KeyMismatchError(DeviceRefusedError):
    """The answering key is not the key the vendor certified."""


class ProofOfPossessionError(DeviceRefusedError):
    """The device's signature over the challenge does not verify."""


class NotProvisionedChipError(DeviceRefusedError):
    """A programming job met a chip that carries no OEM device certificate."""


class UnknownProductionCAError(DeviceRefusedError):
    """The chip's OEM device certificate is from a production CA the programming job does not
    name (provisioned under another job, or a CA the OEM root never certified)."""


class DeviceCertificateError(DeviceRefusedError):
    """The chip's OEM device certificate does not validate under its production CA."""


def check_device_id(device_id: object) -> str:
    """Device ids are exactly 16 lowercase hex digits (a 64-bit chip UID)."""
    if type(device_id) is not str or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise IdentificationFormatError(
            f"device id {device_id!r} is not 16 lowercase hex digits (a 64-bit chip UID)"
        )
    return device_id


def new_challenge() -> bytes:
    """A fresh 256-bit challenge from the OS CSPRNG."""
    return os.urandom(CHALLENGE_SIZE)


def pop_payload(challenge: bytes, device_id: str, public_key_der: bytes) -> bytes:
    """The exact bytes the device signs to prove possession of its key."""
    return cbor.encode([_DOMAIN, VERSION, challenge, device_id, public_key_der])


def verify_proof_of_possession(
    r: IdentificationResponse, key: ec.EllipticCurvePublicKey, challenge: bytes
) -> None:
    """The answer's signature over :func:`pop_payload` verifies under ``key``, the key the
    caller trusts for this chip and found equal to the answering key; else
    :class:`ProofOfPossessionError`."""
    try:
        key.verify(r.signature, pop_payload(challenge, r.device_id, r.public_key), _ECDSA_SHA256)
    except InvalidSignature:
        raise ProofOfPossessionError(
            f"device {r.device_id}: proof of possession does not verify"
        ) from None


@fields.body("identification response", error=IdentificationFormatError)
@attrs.frozen(kw_only=True)
class IdentificationResponse:
    """The device's answer to a challenge (wire format, validated on construction)."""

    challenge: bytes = fields.byte_string("challenge", min_len=16, max_len=64)
    device_id: str = fields.text("device_id", min_len=16, max_len=16, pattern=DEVICE_ID_RE)
    public_key: bytes = fields.byte_string("public_key", min_len=32, max_len=200)  # DER SPKI
    vendor_certificate: bytes = fields.byte_string(
        "vendor_certificate", min_len=64, max_len=2048
    )  # DER
    signature: bytes = fields.byte_string("sig", min_len=8, max_len=80)  # DER ECDSA
    # A chip provisioned earlier: its OEM device certificate and production CA (DER, from OTP).
    device_certificate: bytes | None = fields.byte_string(
        "device_certificate", min_len=64, max_len=2048, absent=fields.Absent.OMIT
    )
    production_ca_certificate: bytes | None = fields.byte_string(
        "production_ca_certificate", min_len=64, max_len=2048, absent=fields.Absent.OMIT
    )
    version: int = fields.version(VERSION)

    def __attrs_post_init__(self) -> None:
        if (self.device_certificate is None) != (self.production_ca_certificate is None):
            raise IdentificationFormatError(
                "identification response: device_certificate and production_ca_certificate "
                "come together or not at all"
            )

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentificationResponse:
        try:
            d = cbor.decode(data, what="identification response", max_size=MAX_RESPONSE_SIZE)
        except FormatError as exc:
            raise IdentificationFormatError(str(exc)) from None
        return fields.decode(cls, d)


def vendor_ca_id(cert: x509.Certificate) -> bytes:
    """A vendor CA's identity in jobs and ledgers: SHA-256 of its DER SubjectPublicKeyInfo.

    The key, not the certificate: the key is what verifies a chip's certificate, and a
    vendor that re-issues its root certificate (new validity, same key) stays the same CA."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise VendorCAError("a vendor CA certificate must hold an EC key")
    return fingerprint(key)


def check_vendor_cas(
    certificates: Sequence[bytes], *, named: Collection[bytes], what: str
) -> tuple[x509.Certificate, ...]:
    """Parse vendor CA certificates (DER, hardened loader) and return them once they are
    exactly the CAs ``named`` (a job's ``vendors``): each named CA once, nothing else.

    The certificates travel and are stored beside the job; only the job's hashes, which
    the officers signed, decide that they are trusted."""
    found: dict[bytes, x509.Certificate] = {}
    for i, der in enumerate(certificates):
        try:
            cert, key = untrusted.load_certificate_with_key(der, what=f"{what} {i}")
        except FormatError as exc:
            raise VendorCAError(str(exc)) from None
        ca_id = fingerprint(key)  # vendor_ca_id, of the key the loader checked
        who = f"{what} {i} ({cert.subject.rfc4514_string()}, key {ca_id.hex()[:16]})"
        if ca_id not in named:
            raise VendorCAError(f"{who} is not a vendor CA the job names")
        if ca_id in found:
            raise VendorCAError(f"{who} is given twice")
        _check_ca_profile(cert, who)
        found[ca_id] = cert
    missing = sorted(set(named) - set(found))
    if missing:
        raise VendorCAError(
            f"{what}: no certificate for the job's vendor CA {missing[0].hex()[:16]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return tuple(found[n] for n in sorted(named))


def _check_ca_profile(cert: x509.Certificate, who: str) -> None:
    """A vendor CA certifies chips: basicConstraints cA and keyCertSign (RFC 5280 §4.2.1.9,
    §4.2.1.3), so a chip's own certificate cannot be named in its place by mistake."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise VendorCAError(f"{who} lacks {exc.oid.dotted_string}: not a CA certificate") from None
    if not bc.ca or not ku.key_cert_sign:
        raise VendorCAError(f"{who} is not a CA certificate (cA and keyCertSign)")


@attrs.frozen
class DeviceIdentity:
    """A device that proved its identity: what the programmer acts on next.

    ``vendor_ca`` is :func:`vendor_ca_id` of the vendor CA whose signature on
    ``vendor_certificate`` verified."""

    device_id: str
    public_key: ec.EllipticCurvePublicKey
    vendor_certificate: x509.Certificate
    vendor_ca: bytes


class IdentityVerifier:
    """Verifies identification responses under a fixed set of vendor roots (built once).

    The roots are the ones the job names (:func:`check_vendor_cas`); two roots may share a
    subject name (a re-keyed fab): each is tried, the one whose signature verifies is the
    chip's vendor CA."""

    def __init__(self, vendor_roots: Iterable[x509.Certificate]) -> None:
        self._roots: dict[bytes, list[tuple[ec.EllipticCurvePublicKey, bytes]]] = {}
        for root in vendor_roots:
            key = root.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ValueError("vendor roots must have EC keys")
            self._roots.setdefault(root.subject.public_bytes(), []).append(
                (key, fingerprint(key))
            )
        if not self._roots:
            raise ValueError("at least one vendor root is needed")

    def verify(
        self, response: bytes, *, challenge: bytes, at: datetime.datetime | None = None
    ) -> DeviceIdentity:
        """Check one response against the challenge we sent; raise a DeviceRefusedError."""
        r = IdentificationResponse.from_bytes(response)
        if not hmac.compare_digest(r.challenge, challenge):
            raise ChallengeMismatchError(
                f"device {r.device_id}: response answers another challenge (stale or replayed)"
            )
        try:
            # Every field read below (issuer, key, extensions, subject CN) is parsed here;
            # the key comes back as the loader checked it (P-256).
            cert, key = untrusted.load_certificate_with_key(
                r.vendor_certificate,
                what=f"device {r.device_id}: vendor certificate",
                curves=(Curve.P256,),
            )
        except FormatError as exc:
            raise IdentificationFormatError(str(exc)) from None
        candidates = self._roots.get(cert.issuer.public_bytes())
        if candidates is None:
            raise UnknownVendorError(
                f"device {r.device_id}: vendor certificate issued by "
                f"{cert.issuer.rfc4514_string()!r}, not a vendor CA this job names"
            )
        vendor_ca = self._check_vendor_cert(cert, candidates, r.device_id, at)
        # The answering key must be the certified key byte for byte; the certificate's
        # parsed key is then the one to verify with (no second parse of the same SPKI).
        if spki_der(key) != r.public_key:
            self._check_answering_key(r)  # a malformed or non-P-256 key is reported as such
            raise KeyMismatchError(
                f"device {r.device_id}: answering key is not the vendor-certified key"
            )
        verify_proof_of_possession(r, key, challenge)
        return DeviceIdentity(r.device_id, key, cert, vendor_ca)

    @staticmethod
    def _check_answering_key(r: IdentificationResponse) -> None:
        try:
            untrusted.load_public_key(
                r.public_key, what=f"device {r.device_id}: public key", curves=(Curve.P256,)
            )
        except FormatError as exc:
            raise IdentificationFormatError(str(exc)) from None

    @staticmethod
    def _check_vendor_cert(
        cert: x509.Certificate,
        candidates: Sequence[tuple[ec.EllipticCurvePublicKey, bytes]],
        device_id: str,
        at: datetime.datetime | None,
    ) -> bytes:
        """Check the chip's vendor certificate; return the id of the CA that signed it."""
        who = f"device {device_id}"
        algorithm = _SIG_HASHES.get(cert.signature_algorithm_oid)
        if algorithm is None:
            raise VendorCertificateError(f"{who}: vendor certificate uses an unexpected algorithm")
        vendor_ca = None
        for root_key, ca_id in candidates:
            try:
                root_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
            except InvalidSignature:
                continue
            vendor_ca = ca_id
            break
        if vendor_ca is None:
            raise VendorCertificateError(
                f"{who}: vendor certificate signature does not verify under the vendor CA "
                f"{cert.issuer.rfc4514_string()!r} this job names (another fab of that name?)"
            )
        now = at or datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise VendorCertificateError(f"{who}: vendor certificate is outside its validity")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound as exc:
            raise VendorCertificateError(f"{who}: vendor certificate lacks {exc.oid}") from None
        if not ku.digital_signature or bc.ca:
            raise VendorCertificateError(
                f"{who}: vendor certificate is not a digitalSignature end-entity certificate"
            )
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != device_id:
            raise DeviceIdMismatchError(f"{who}: vendor certificate is for another device id")
        return vendor_ca


def verify_identification(
    response: bytes,
    *,
    challenge: bytes,
    vendor_roots: list[x509.Certificate],
    at: datetime.datetime | None = None,
) -> DeviceIdentity:
    """One-shot :meth:`IdentityVerifier.verify`; build an :class:`IdentityVerifier` per job."""
    return IdentityVerifier(vendor_roots).verify(response, challenge=challenge, at=at)


def production_ca_id(certificate_der: bytes) -> bytes:
    """A production CA's identity in a programming job's ``provisioned_by``: SHA-256 of its
    DER certificate (the certificate the OEM root signed for one provisioning job)."""
    return hashlib.sha256(certificate_der).digest()


@attrs.frozen
class ProvisionedIdentity:
    """A chip that proved its identity by the OEM device certificate it was provisioned with.

    ``production_ca`` is :func:`production_ca_id` of the CA that issued ``device_certificate``
    (DER, byte for byte what the chip carries); ``certificate_sha256`` names it in a ledger."""

    device_id: str
    public_key: ec.EllipticCurvePublicKey
    device_certificate: bytes
    production_ca: bytes

    @property
    def certificate_sha256(self) -> bytes:
        return hashlib.sha256(self.device_certificate).digest()


class ProvisionedIdentityVerifier:
    """Identifies chips provisioned under named production CAs (a programming job's
    ``provisioned_by``), built once per job.

    Each CA is validated under the OEM root here (validity, profile, signature: RFC 5280
    §6.1.3 (a)); per chip: the challenge, the production CA by the hash of the certificate the
    chip shows (a lookup, so an unnamed or forged CA is refused before any verification), the
    device certificate under that CA (path, profile, job binding; X.520 serialNumber = the
    claimed device id), the certified key = the answering key byte for byte, then proof of
    possession.  Each failure is its own :class:`DeviceRefusedError` subclass."""

    def __init__(
        self,
        production_cas: Iterable[x509.Certificate],
        oem_root: x509.Certificate,
        *,
        at: datetime.datetime | None = None,
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        from securethread.pki.validate import DeviceChainValidator

        self._validators: dict[bytes, DeviceChainValidator] = {}
        for ca in production_cas:
            der = ca.public_bytes(serialization.Encoding.DER)
            self._validators[production_ca_id(der)] = DeviceChainValidator(ca, oem_root, at=at)
        if not self._validators:
            raise ValueError("at least one production CA is needed")

    def verify(self, response: bytes, *, challenge: bytes) -> ProvisionedIdentity:
        """Check one response against the challenge we sent; raise a DeviceRefusedError."""
        r = IdentificationResponse.from_bytes(response)
        who = f"device {r.device_id}"
        if not hmac.compare_digest(r.challenge, challenge):
            raise ChallengeMismatchError(f"{who}: response answers another challenge")
        if r.device_certificate is None or r.production_ca_certificate is None:
            raise NotProvisionedChipError(
                f"{who} carries no OEM device certificate (not provisioned at a fab)"
            )
        ca_id = production_ca_id(r.production_ca_certificate)
        validator = self._validators.get(ca_id)
        if validator is None:
            raise UnknownProductionCAError(
                f"{who} was provisioned under production CA {ca_id.hex()[:16]}, which this "
                "programming job does not name"
            )
        try:
            cert, key = untrusted.load_certificate_with_key(
                r.device_certificate, what=f"{who}: device certificate", curves=(Curve.P256,)
            )
        except FormatError as exc:
            raise IdentificationFormatError(str(exc)) from None
        try:
            validator.validate(cert)
        except Error as exc:
            raise DeviceCertificateError(f"{who}: OEM device certificate: {exc}") from None
        ids = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if len(ids) != 1 or ids[0].value != r.device_id:
            raise DeviceIdMismatchError(f"{who}: OEM device certificate is for another device id")
        if spki_der(key) != r.public_key:
            IdentityVerifier._check_answering_key(r)
            raise KeyMismatchError(
                f"{who}: answering key is not the key its OEM device certificate certifies "
                "(a certificate replayed from another chip)"
            )
        verify_proof_of_possession(r, key, challenge)
        return ProvisionedIdentity(r.device_id, key, r.device_certificate, ca_id)
