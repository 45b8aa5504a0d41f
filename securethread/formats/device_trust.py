"""The OEM's device-trust statement: what a chip may trust beyond its OEM root.

An ordered chip carries, burnt at the fab, the SHA-256 of its OEM root's SubjectPublicKeyInfo
(:func:`oem_root_hash`).  Everything else it needs -- which key signs its firmware, its device
class, its rollback floor and the job it is provisioned under -- reaches it in provisioning data
that crosses the untrusted line.  So the OEM signs those values with its root key, once per job
when it issues the job (envelope kind ``"device-trust"``); the programmer copies the statement
unchanged into every device's provisioning data; the SBM verifies it under the pinned root
before it uses any of them (docs/device.md).

Body (canonical CBOR, ``v`` = 1)::

    {"v": 1, "job_id": tstr, "job_sha256": bstr(32), "device_class": tstr,
     "firmware_signing_key": SPKI DER (P-256), "min_security_counter": uint < 2**32}

``job_sha256`` is the job's identity (``formats.job.job_hash``: SHA-256 of what its officers
signed); device certificate serials carry its first 8 octets (docs/pki.md).

Exactly one signature entry, the OEM root key's; a statement with any other entry is refused.
"""

from __future__ import annotations

from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, SignatureError, VerificationError
from securethread.formats import cbor
from securethread.formats.envelope import open_envelope, seal
from securethread.formats.image import check_name
from securethread.formats.job import check_job_id
from securethread.keys.ecutil import fingerprint, load_spki, spki_der
from securethread.keys.protocol import PrivateKey

__all__ = [
    "DEVICE_TRUST_KIND",
    "MAX_DEVICE_TRUST_SIZE",
    "DeviceTrust",
    "DeviceTrustError",
    "DeviceTrustFormatError",
    "DeviceTrustSignatureError",
    "oem_root_hash",
    "sign_device_trust",
    "verify_device_trust",
]

VERSION = 1
DEVICE_TRUST_KIND = "device-trust"
MAX_DEVICE_TRUST_SIZE = 2048
_KEYS = frozenset(
    {"v", "job_id", "job_sha256", "device_class", "firmware_signing_key", "min_security_counter"}
)


class DeviceTrustError(VerificationError):
    """A device-trust statement does not verify under the OEM root, or is malformed."""


class DeviceTrustFormatError(DeviceTrustError, FormatError):
    """A device-trust statement is malformed, oversized or of an unknown version."""


class DeviceTrustSignatureError(DeviceTrustError, SignatureError):
    """A device-trust statement is not signed by the OEM root key (alone)."""


def oem_root_hash(root_certificate: x509.Certificate) -> bytes:
    """What the fab burns for an ordered part: SHA-256 of the OEM root's SPKI DER.

    The key, not the certificate, is pinned so that the OEM may re-issue its root certificate
    (new validity, same key) without stranding parts already in stock.
    """
    if not isinstance(root_certificate, x509.Certificate):
        raise TypeError("oem_root_hash needs an x509.Certificate")
    key = root_certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FormatError("OEM root certificate: not an EC key")
    return fingerprint(key)


def _p256(_i: Any, _a: Any, v: Any) -> None:
    if not isinstance(v, ec.EllipticCurvePublicKey) or not isinstance(v.curve, ec.SECP256R1):
        raise DeviceTrustFormatError("device trust: firmware-signing key must be P-256")


def _counter(_i: Any, _a: Any, v: Any) -> None:
    if type(v) is not int or not 0 <= v < 2**32:
        raise DeviceTrustFormatError("device trust: min_security_counter out of range")


def _job_id(_i: Any, _a: Any, v: Any) -> None:
    try:
        check_job_id(v)
    except FormatError as exc:
        raise DeviceTrustFormatError(f"device trust: {exc}") from None


def _sha256(_i: Any, _a: Any, v: Any) -> None:
    if type(v) is not bytes or len(v) != 32:
        raise DeviceTrustFormatError("device trust: job_sha256 must be 32 bytes")


def _device_class(_i: Any, _a: Any, v: Any) -> None:
    try:
        check_name("device class", v)
    except FormatError as exc:
        raise DeviceTrustFormatError(f"device trust: {exc}") from None


@attrs.frozen(kw_only=True)
class DeviceTrust:
    """The anchors the OEM root vouches for, for every chip provisioned under one job."""

    job_id: str = attrs.field(validator=_job_id)
    job_sha256: bytes = attrs.field(validator=_sha256)
    device_class: str = attrs.field(validator=_device_class)
    firmware_signing_key: ec.EllipticCurvePublicKey = attrs.field(validator=_p256)
    min_security_counter: int = attrs.field(validator=_counter)
    version: int = VERSION

    def __attrs_post_init__(self) -> None:
        if not cbor.is_version(self.version, VERSION):
            raise DeviceTrustFormatError(f"device trust: unsupported version {self.version!r}")

    def body(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "job_id": self.job_id,
            "job_sha256": self.job_sha256,
            "device_class": self.device_class,
            "firmware_signing_key": spki_der(self.firmware_signing_key),
            "min_security_counter": self.min_security_counter,
        }


def sign_device_trust(trust: DeviceTrust, root_key: PrivateKey) -> bytes:
    """The OEM signs ``trust`` with its root key (at job issuance; one statement per job)."""
    if not isinstance(trust, DeviceTrust):
        raise TypeError("sign_device_trust needs a DeviceTrust")
    return seal(DEVICE_TRUST_KIND, trust.body(), [root_key])


def verify_device_trust(data: bytes, *, oem_root: x509.Certificate) -> DeviceTrust:
    """Verify a statement under ``oem_root``'s key (S2: before the body is parsed)."""
    if type(data) is not bytes:
        raise DeviceTrustFormatError("device trust: not bytes")
    root_key = oem_root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise DeviceTrustFormatError("device trust: the OEM root has no EC key")
    try:
        body = open_envelope(
            data, kind=DEVICE_TRUST_KIND, keys=root_key, max_size=MAX_DEVICE_TRUST_SIZE
        )
    except SignatureError as exc:
        raise DeviceTrustSignatureError(f"device trust: {exc}") from None
    except FormatError as exc:
        raise DeviceTrustFormatError(f"device trust: {exc}") from None
    # Exactly one signature, the root's: open_envelope accepts only a COSE_Sign1 (one
    # signer, RFC 9052 §4.2) for this kind, by a key in ``keys``.
    if set(body) != _KEYS:
        raise DeviceTrustFormatError("device trust: unexpected or missing fields")
    raw_key = body["firmware_signing_key"]
    if type(raw_key) is not bytes:
        raise DeviceTrustFormatError("device trust: firmware-signing key is not an SPKI")
    try:
        key = load_spki(raw_key, what="device trust: firmware-signing key")
    except FormatError as exc:
        raise DeviceTrustFormatError(str(exc)) from None
    return DeviceTrust(
        job_id=body["job_id"],
        job_sha256=body["job_sha256"],
        device_class=body["device_class"],
        firmware_signing_key=key,
        min_security_counter=body["min_security_counter"],
        version=body["v"],
    )
