"""Boot confirmations (flow 8): what a device's Secure Boot Manager signs with its own key
after it verified, decrypted and flashed an image.

The confirmation is an envelope of kind ``boot-confirmation`` signed by the device key::

    {"v": 2, "device_id", "image_id", "image_version", "security_counter",
     "plaintext_sha256", "nonce"}

The programmer checks it against the nonce it sent (:func:`verify_boot_confirmation`) and
records it in the ledger; the OEM and auditors check each recorded one again at
reconciliation against the device certificate and the manifest the job names
(:func:`verify_recorded_boot_confirmation`).  Pure verification: no token, no device code,
so the OEM side never imports :mod:`securethread.device`.
"""

from __future__ import annotations

import hmac
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, SignatureError, VerificationError
from securethread.formats import fields
from securethread.formats.envelope import open_envelope
from securethread.formats.identity import DEVICE_ID_RE
from securethread.formats.image import Manifest

__all__ = [
    "BOOT_CONFIRMATION_KIND",
    "BootConfirmation",
    "BootConfirmationError",
    "open_boot_confirmation",
    "verify_boot_confirmation",
    "verify_recorded_boot_confirmation",
]

VERSION = 2
BOOT_CONFIRMATION_KIND = "boot-confirmation"
MAX_CONFIRMATION_SIZE = 2048
MIN_NONCE, MAX_NONCE = 16, 64
class BootConfirmationError(VerificationError):
    """A boot confirmation does not verify or reports something other than expected."""


@fields.body("boot confirmation", error=BootConfirmationError)
@attrs.frozen(kw_only=True)
class BootConfirmation:
    """The content of a boot confirmation (what the device signs; validated on construction)."""

    device_id: str = fields.text("device_id", min_len=16, max_len=16, pattern=DEVICE_ID_RE)
    image_id: str = fields.text("image_id", max_len=64)
    image_version: str = fields.text("image_version", max_len=64)
    security_counter: int = fields.integer("security_counter", hi=2**32 - 1)
    plaintext_sha256: bytes = fields.byte_string("plaintext_sha256", size=32)
    nonce: bytes = fields.byte_string("nonce", min_len=MIN_NONCE, max_len=MAX_NONCE)
    version: int = fields.version(VERSION)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> BootConfirmation:
        return fields.decode(cls, body)

    def to_body(self) -> dict[str, Any]:
        return fields.encode(self)

    def check(self, *, device_id: str, manifest: Manifest) -> None:
        """It reports this device and this image (id, version, counter, plaintext digest)."""
        expected = {
            "device_id": device_id,
            "image_id": manifest.image_id,
            "image_version": manifest.image_version,
            "security_counter": manifest.security_counter,
            "plaintext_sha256": manifest.plaintext_sha256,
        }
        for name, value in expected.items():
            got = getattr(self, name)
            same = (
                hmac.compare_digest(got, value)
                if isinstance(value, bytes)
                else type(got) is type(value) and got == value
            )
            if not same:
                raise BootConfirmationError(f"boot confirmation: {name} differs from what we sent")


def open_boot_confirmation(
    data: bytes, *, device_public_key: ec.EllipticCurvePublicKey
) -> BootConfirmation:
    """Verify the device's signature (strict envelope, S6), then parse (S2)."""
    try:
        body = open_envelope(
            data,
            kind=BOOT_CONFIRMATION_KIND,
            keys=device_public_key,
            max_size=MAX_CONFIRMATION_SIZE,
        )
    except SignatureError as exc:
        raise BootConfirmationError(f"boot confirmation: {exc}") from None
    except FormatError as exc:
        raise BootConfirmationError(f"boot confirmation malformed: {exc}") from None
    return BootConfirmation.from_body(body)


def verify_boot_confirmation(
    data: bytes,
    *,
    device_public_key: ec.EllipticCurvePublicKey,
    device_id: str,
    manifest: Manifest,
    nonce: bytes,
) -> None:
    """Programmer side: the signature, then that it reports this device, this image (id,
    version, counter, plaintext digest) and the nonce we sent."""
    conf = open_boot_confirmation(data, device_public_key=device_public_key)
    conf.check(device_id=device_id, manifest=manifest)
    if not isinstance(nonce, bytes) or not hmac.compare_digest(conf.nonce, nonce):
        raise BootConfirmationError("boot confirmation: nonce differs from what we sent")


def verify_recorded_boot_confirmation(
    data: bytes,
    *,
    device_public_key: ec.EllipticCurvePublicKey,
    device_id: str,
    manifest: Manifest,
) -> BootConfirmation:
    """OEM / auditor side, for a confirmation recorded in a ledger: the device's signature
    and that it reports this device and this image.  The nonce was the programmer's
    challenge (freshness towards the programmer); here it is checked for shape only."""
    conf = open_boot_confirmation(data, device_public_key=device_public_key)
    conf.check(device_id=device_id, manifest=manifest)
    return conf
