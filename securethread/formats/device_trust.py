"""The OEM's device-trust statement: what a chip may trust beyond its OEM root.

An ordered chip carries, burnt at the fab, the SHA-256 of its OEM root's SubjectPublicKeyInfo
(:func:`oem_root_hash`).  Everything else it needs -- which key signs its firmware, its device
class, its rollback floor and the job it is provisioned under -- reaches it in provisioning data
that crosses the untrusted line.  So the OEM signs those values with its root key, once per job
when it issues the job (envelope kind ``"device-trust"``); the programmer copies the statement
unchanged into every device's provisioning data; the SBM verifies it under the pinned root
before it uses any of them (docs/device.md).

Body (canonical CBOR, ``v`` = 2)::

    {"v": 2, "job_id": tstr, "job_sha256": bstr(32), "device_class": tstr,
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
from securethread.formats import fields
from securethread.formats.envelope import open_envelope, seal
from securethread.formats.image import NAME_RE
from securethread.formats.job import JOB_ID_RE
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

VERSION = 2
DEVICE_TRUST_KIND = "device-trust"
MAX_DEVICE_TRUST_SIZE = 2048


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


@attrs.frozen
class _P256Key(fields.Rule):
    """A P-256 public key: SubjectPublicKeyInfo DER on the wire, parsed in Python."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, ec.EllipticCurvePublicKey) and isinstance(value.curve, ec.SECP256R1):
            return None
        return "must be a P-256 public key"

    def to_cbor(self, value: Any) -> Any:
        return spki_der(value)

    def from_cbor(self, raw: Any) -> Any:
        if type(raw) is not bytes:
            raise DeviceTrustFormatError("not an SPKI")
        return load_spki(raw, what="SPKI")


@fields.body("device trust", error=DeviceTrustFormatError)
@attrs.frozen(kw_only=True)
class DeviceTrust:
    """The anchors the OEM root vouches for, for every chip provisioned under one job."""

    job_id: str = fields.text("job_id", max_len=64, pattern=JOB_ID_RE)
    job_sha256: bytes = fields.byte_string("job_sha256", size=32)
    device_class: str = fields.text("device_class", max_len=64, pattern=NAME_RE)
    firmware_signing_key: ec.EllipticCurvePublicKey = fields.custom(
        "firmware_signing_key", _P256Key()
    )
    min_security_counter: int = fields.integer("min_security_counter", hi=2**32 - 1)
    version: int = fields.version(VERSION)

    def body(self) -> dict[str, Any]:
        return fields.encode(self)


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
    return fields.decode(DeviceTrust, body)
