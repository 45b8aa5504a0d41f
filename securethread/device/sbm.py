"""A simulated silicon vendor and a simulated device with an on-chip Secure Boot Manager.

Everything here is software (``cryptography``) standing in for silicon, for tests and the demo:

* :class:`SiliconVendor` -- a device-identity CA that certifies each chip's key at the "fab"
  (subject CN = the 64-bit chip UID as 16 lowercase hex digits);
* :class:`SimulatedDevice` -- a chip with a key pair generated on chip, OTP, a monotonic
  anti-rollback fuse counter and flash.  Its SBM answers identification challenges, accepts
  provisioning data once (OTP is write-once), and programs an encrypted image: manifest
  signature against the OTP anchor *before* any decryption, device class, rollback, license,
  chunk-by-chunk decryption to a staging buffer, digest check, and only then flash.  Any failure
  leaves flash, OTP and the fuse counter untouched.  Success returns a boot confirmation signed
  by the device key, which :func:`verify_boot_confirmation` checks on the programmer side.
"""

from __future__ import annotations

import datetime
import hmac
import io
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.device.vendor import DEFAULT_FLASH_SIZE, SiliconVendor
from securethread.errors import (
    AlreadyProvisionedError,
    CertificateError,
    DeviceRefusedError,
    FormatError,
    ImageError,
    RollbackError,
    SignatureError,
    VerificationError,
)
from securethread.formats import cbor
from securethread.formats.envelope import open_envelope, seal
from securethread.formats.identity import IdentificationResponse, check_device_id, pop_payload
from securethread.formats.image import (
    ImageSizeError,
    Manifest,
    check_name,
    decrypt_image,
    verify_manifest,
)
from securethread.formats.license import open_license
from securethread.keys.ecutil import spki_der
from securethread.keys.policy import Curve
from securethread.pki import untrusted

__all__ = [
    "BOOT_CONFIRMATION_KIND",
    "BootConfirmationError",
    "DEFAULT_FLASH_SIZE",
    "NotProvisionedError",
    "ProvisioningData",
    "ProvisioningError",
    "ProvisioningFormatError",
    "SiliconVendor",
    "SimulatedDevice",
    "WrongDeviceClassError",
    "verify_boot_confirmation",
]

VERSION = 1
BOOT_CONFIRMATION_KIND = "boot-confirmation"
MAX_PROVISIONING_SIZE = 16 << 10
MAX_CONFIRMATION_SIZE = 2048
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class ProvisioningFormatError(DeviceRefusedError, FormatError):
    """Provisioning data is malformed, oversized or of an unknown version."""


class ProvisioningError(DeviceRefusedError):
    """Provisioning data does not fit this device (foreign key or id, bad chain)."""


class NotProvisionedError(DeviceRefusedError):
    """The device has no trust anchors in OTP yet; it programs nothing."""


class WrongDeviceClassError(ImageError):
    """The image is for another device class."""


class BootConfirmationError(VerificationError):
    """A boot confirmation does not verify or reports something other than expected."""


# --- provisioning data -----------------------------------------------------------------


def _is(kind: type, what: str) -> Any:
    def check(_i: object, _a: object, v: object) -> None:
        if not isinstance(v, kind):
            raise ProvisioningFormatError(f"provisioning data: {what} has the wrong type")

    return check


def _p256(_i: Any, _a: Any, v: Any) -> None:
    if not isinstance(v, ec.EllipticCurvePublicKey) or not isinstance(v.curve, ec.SECP256R1):
        raise ProvisioningFormatError("provisioning data: firmware-signing key must be P-256")


def _counter(_i: Any, _a: Any, v: Any) -> None:
    if type(v) is not int or not 0 <= v < 2**32:
        raise ProvisioningFormatError("provisioning data: security counter out of range")


def _device_class(_i: Any, _a: Any, v: Any) -> None:
    try:
        check_name("device class", v)
    except ImageError:
        raise ProvisioningFormatError(f"provisioning data: bad device class {v!r}") from None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@attrs.frozen(kw_only=True)
class ProvisioningData:
    """What the programmer writes into a device's OTP (canonical CBOR, versioned)."""

    device_certificate: x509.Certificate = attrs.field(
        validator=_is(x509.Certificate, "device certificate")
    )
    production_ca_certificate: x509.Certificate = attrs.field(
        validator=_is(x509.Certificate, "production CA certificate")
    )
    oem_root_certificate: x509.Certificate = attrs.field(
        validator=_is(x509.Certificate, "OEM root certificate")
    )
    firmware_signing_key: ec.EllipticCurvePublicKey = attrs.field(validator=_p256)
    min_security_counter: int = attrs.field(validator=_counter)
    device_class: str = attrs.field(validator=_device_class)
    version: int = VERSION

    _KEYS = frozenset(
        {
            "v",
            "device_certificate",
            "production_ca_certificate",
            "oem_root_certificate",
            "firmware_signing_key",
            "min_security_counter",
            "device_class",
        }
    )

    def __attrs_post_init__(self) -> None:
        if self.version != VERSION:
            raise ProvisioningFormatError(f"provisioning data: unsupported version {self.version}")

    def to_bytes(self) -> bytes:
        return cbor.encode(self._fields(_der(self.device_certificate)))

    @classmethod
    def packager(
        cls,
        *,
        production_ca_certificate: x509.Certificate,
        oem_root_certificate: x509.Certificate,
        firmware_signing_key: ec.EllipticCurvePublicKey,
        min_security_counter: int,
        device_class: str,
    ) -> Callable[[bytes], bytes]:
        """A function from a device certificate's DER to the provisioning data bytes.

        The job's anchors are validated and encoded once; per device only the certificate
        is encoded.  The result equals ``ProvisioningData(...).to_bytes()`` byte for byte.
        """
        proto = cls(
            device_certificate=production_ca_certificate,  # placeholder, replaced below
            production_ca_certificate=production_ca_certificate,
            oem_root_certificate=oem_root_certificate,
            firmware_signing_key=firmware_signing_key,
            min_security_counter=min_security_counter,
            device_class=device_class,
        )
        fields = {k: cbor.pre_encode(v) for k, v in proto._fields(b"").items()}

        def package(device_certificate_der: bytes) -> bytes:
            if type(device_certificate_der) is not bytes:
                raise ProvisioningFormatError("provisioning data: device certificate not DER")
            return cbor.encode({**fields, "device_certificate": device_certificate_der})

        return package

    def _fields(self, device_der: bytes) -> dict[str, Any]:
        return {
            "v": self.version,
            "device_certificate": device_der,
            "production_ca_certificate": _der(self.production_ca_certificate),
            "oem_root_certificate": _der(self.oem_root_certificate),
            "firmware_signing_key": spki_der(self.firmware_signing_key),
            "min_security_counter": self.min_security_counter,
            "device_class": self.device_class,
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> ProvisioningData:
        try:
            d = cbor.decode(data, what="provisioning data", max_size=MAX_PROVISIONING_SIZE)
        except FormatError as exc:
            raise ProvisioningFormatError(str(exc)) from None
        if not isinstance(d, dict) or set(d) != cls._KEYS:
            raise ProvisioningFormatError("provisioning data: unexpected or missing fields")
        certs = {}
        try:
            for name in ("device_certificate", "production_ca_certificate", "oem_root_certificate"):
                what = f"provisioning data: {name.replace('_', ' ')}"
                certs[name] = untrusted.load_certificate(d[name], what=what)
            key = untrusted.load_public_key(
                d["firmware_signing_key"],
                what="provisioning data: firmware-signing key",
                curves=(Curve.P256,),
            )
        except FormatError as exc:
            raise ProvisioningFormatError(str(exc)) from None
        return cls(
            **certs,
            firmware_signing_key=key,
            min_security_counter=d["min_security_counter"],
            device_class=d["device_class"],
            version=d["v"],
        )


# --- device ----------------------------------------------------------------------------


class _ChipSigner:
    """The device key as an envelope signer (ECDSA P-256 / SHA-256, DER)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _ECDSA_SHA256)


@attrs.frozen
class FlashedImage:
    """What the SBM records about the image in flash."""

    image_id: str
    image_version: str
    security_counter: int
    plaintext_sha256: bytes


class SimulatedDevice:
    """A chip with an on-chip SBM; private key, OTP and flash are reachable only via the SBM."""

    def __init__(
        self,
        *,
        device_id: str,
        private_key: ec.EllipticCurvePrivateKey,
        vendor_certificate: x509.Certificate,
        flash_size: int = DEFAULT_FLASH_SIZE,
    ) -> None:
        self.device_id = check_device_id(device_id)
        self._key = private_key
        self.public_key = private_key.public_key()
        self._spki = spki_der(self.public_key)
        self.vendor_certificate = vendor_certificate
        self._vendor_der = _der(vendor_certificate)
        self.flash_size = flash_size
        self._otp: bytes | None = None  # write-once
        self._otp_data: ProvisioningData | None = None
        self._fuse_counter = 0  # monotonic anti-rollback fuses
        self._flash: bytes | None = None
        self._flashed: FlashedImage | None = None

    def __repr__(self) -> str:
        return f"<SimulatedDevice {self.device_id}>"

    # Read-only views for tests and the programmer's checks.
    @property
    def otp(self) -> bytes | None:
        return self._otp

    @property
    def flash(self) -> bytes | None:
        return self._flash

    @property
    def flashed(self) -> FlashedImage | None:
        return self._flashed

    @property
    def rollback_counter(self) -> int:
        """The effective minimum security counter (OTP minimum, raised by successful boots)."""
        base = self._otp_data.min_security_counter if self._otp_data else 0
        return max(base, self._fuse_counter)

    def state(self) -> tuple[bytes | None, bytes | None, int]:
        """Flash, OTP and fuse counter: the persistent state a refusal must not change."""
        return self._flash, self._otp, self._fuse_counter

    # --- SBM services --------------------------------------------------------------------

    def identify(self, challenge: bytes) -> bytes:
        """Answer an identification challenge (proof of possession + vendor certificate)."""
        if not isinstance(challenge, bytes) or not 16 <= len(challenge) <= 64:
            raise DeviceRefusedError("identification challenge must be 16-64 bytes")
        sig = self._key.sign(pop_payload(challenge, self.device_id, self._spki), _ECDSA_SHA256)
        return IdentificationResponse(
            challenge=challenge,
            device_id=self.device_id,
            public_key=self._spki,
            vendor_certificate=self._vendor_der,
            signature=sig,
        ).to_bytes()

    def provision(self, provisioning_bytes: bytes, *, at: datetime.datetime | None = None) -> None:
        """Write trust anchors to OTP once: the device certificate must be for this chip and
        chain root -> production CA -> device."""
        from securethread.pki import validate_device_chain

        if self._otp is not None:
            raise AlreadyProvisionedError(f"device {self.device_id}: OTP already written")
        data = ProvisioningData.from_bytes(provisioning_bytes)
        cert = data.device_certificate
        cert_key = cert.public_key()
        if not isinstance(cert_key, ec.EllipticCurvePublicKey) or spki_der(cert_key) != self._spki:
            raise ProvisioningError(
                f"device {self.device_id}: device certificate certifies another key"
            )
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != self.device_id:
            raise ProvisioningError(
                f"device {self.device_id}: device certificate names another device id"
            )
        try:
            validate_device_chain(
                cert, data.production_ca_certificate, data.oem_root_certificate, at=at
            )
        except CertificateError as exc:
            raise ProvisioningError(
                f"device {self.device_id}: device certificate chain: {exc}"
            ) from exc
        # Commit: one assignment, after every check.
        self._otp_data = data
        self._otp = bytes(provisioning_bytes)

    def program(
        self,
        manifest: bytes,
        image_stream: BinaryIO,
        license: bytes,
        *,
        nonce: bytes,
        at: datetime.datetime | None = None,
    ) -> bytes:
        """Verify, decrypt and flash an image; return a signed boot confirmation.

        Order: manifest signature under the OTP firmware-signing key (before anything is
        decrypted), device class, rollback, size, license (signer, device, image), then
        chunk-by-chunk decryption to staging, digests, and only then flash and fuses.
        """
        otp = self._otp_data
        if otp is None:
            raise NotProvisionedError(f"device {self.device_id}: not provisioned")
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise DeviceRefusedError("programmer nonce must be 16-64 bytes")
        m = verify_manifest(manifest, key=otp.firmware_signing_key)
        if m.device_class != otp.device_class:
            raise WrongDeviceClassError(
                f"image is for device class {m.device_class!r}, device is {otp.device_class!r}"
            )
        if m.security_counter < self.rollback_counter:
            raise RollbackError(
                f"image security counter {m.security_counter} is below the device's "
                f"minimum {self.rollback_counter}"
            )
        if m.plaintext_length > self.flash_size:
            raise ImageSizeError(
                f"image of {m.plaintext_length} bytes exceeds flash of {self.flash_size}"
            )
        key = open_license(
            license,
            device_id=self.device_id,
            device_key=self._key,
            oem_root=otp.oem_root_certificate,
            image_id=m.image_id,
            image_key_id=m.image_key_id,
            at=at,
        )
        staging = io.BytesIO()
        decrypt_image(image_stream, staging, key=key, manifest=m, max_size=self.flash_size)
        # Commit: flash, then the monotonic fuses (a real SBM burns fuses after the copy).
        self._flash = staging.getvalue()
        self._fuse_counter = max(self._fuse_counter, m.security_counter)
        self._flashed = FlashedImage(
            m.image_id, m.image_version, m.security_counter, m.plaintext_sha256
        )
        return seal(
            BOOT_CONFIRMATION_KIND,
            {
                "v": VERSION,
                "device_id": self.device_id,
                "image_id": m.image_id,
                "image_version": m.image_version,
                "security_counter": m.security_counter,
                "plaintext_sha256": m.plaintext_sha256,
                "nonce": nonce,
            },
            [cast(Any, _ChipSigner(self._key))],
        )


def verify_boot_confirmation(
    data: bytes,
    *,
    device_public_key: ec.EllipticCurvePublicKey,
    device_id: str,
    manifest: Manifest,
    nonce: bytes,
) -> None:
    """Check a device's boot confirmation: its signature, then that it reports this device,
    this image (id, version, counter, plaintext digest) and our nonce."""
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
    expected = {
        "v": VERSION,
        "device_id": device_id,
        "image_id": manifest.image_id,
        "image_version": manifest.image_version,
        "security_counter": manifest.security_counter,
        "plaintext_sha256": manifest.plaintext_sha256,
        "nonce": nonce,
    }
    if set(body) != set(expected):
        raise BootConfirmationError("boot confirmation: unexpected or missing fields")
    for name, value in expected.items():
        got = body[name]
        same = (
            hmac.compare_digest(got, value)
            if isinstance(value, bytes) and isinstance(got, bytes)
            else type(got) is type(value) and got == value
        )
        if not same:
            raise BootConfirmationError(f"boot confirmation: {name} differs from what we sent")
