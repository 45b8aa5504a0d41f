"""A simulated device with an on-chip Secure Boot Manager (the rules: docs/device.md).

Software (``cryptography``) standing in for silicon, for tests and the demo.
:class:`SimulatedDevice` is a chip as the fab (:mod:`securethread.device.vendor`) delivers it:
a key pair generated on chip, a vendor certificate, and -- for parts an OEM ordered -- the
SHA-256 of that OEM root's SPKI burnt into OTP with an initial anti-rollback floor.  Its SBM
answers identification challenges; accepts provisioning data once (OTP is write-once), and only
under the burnt root, with the firmware-signing key, device class, job and rollback floor taken
from a device-trust statement the OEM root signed; and programs an encrypted image: manifest
signature under that key *before* any decryption, device class, rollback, license,
chunk-by-chunk decryption to a staging buffer, digest check, the decrypted MCUboot image
(strict parse, SHA-256, key hash and signature TLVs under the same key, security counter), and
only then flash.  The rollback
floor (fuses) only rises.  Any refusal leaves flash, OTP and fuses untouched.  Success returns a
boot confirmation signed by the device key, which :func:`verify_boot_confirmation` checks on the
programmer side.
"""

from __future__ import annotations

import datetime
import hmac
import io
from typing import Any, BinaryIO, cast

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.device.vendor import DEFAULT_FLASH_SIZE, SiliconVendor, _check_order
from securethread.errors import (
    AlreadyProvisionedError,
    CertificateError,
    DeviceRefusedError,
    ImageError,
    RollbackError,
)
from securethread.formats.boot import (
    BOOT_CONFIRMATION_KIND,
    BootConfirmation,
    BootConfirmationError,
    verify_boot_confirmation,
)
from securethread.formats.device_trust import (
    DeviceTrust,
    DeviceTrustError,
    verify_device_trust,
)
from securethread.formats.envelope import seal
from securethread.formats.identity import IdentificationResponse, check_device_id, pop_payload
from securethread.formats.image import (
    ImageSizeError,
    Manifest,
    ManifestMismatchError,
    decrypt_image,
    verify_manifest,
)
from securethread.formats.license import open_license
from securethread.formats.mcuboot import ImageVersion
from securethread.formats.mcuboot import parse_image as parse_mcuboot
from securethread.formats.mcuboot import verify_image as verify_mcuboot
from securethread.formats.provisioning import (
    PROVISIONING_VERSION,
    DeviceTrustRefusedError,
    ProvisioningData,
    ProvisioningError,
    ProvisioningFormatError,
)
from securethread.keys.ecutil import fingerprint, spki_der

__all__ = [
    "BOOT_CONFIRMATION_KIND",
    "BootConfirmationError",
    "DEFAULT_FLASH_SIZE",
    "DeviceTrustRefusedError",
    "FlashedImage",
    "NotProvisionedError",
    "OemRootMismatchError",
    "PROVISIONING_VERSION",
    "ProvisioningData",
    "ProvisioningError",
    "ProvisioningFormatError",
    "ProvisioningRollbackError",
    "SiliconVendor",
    "UnorderedPartError",
    "SimulatedDevice",
    "WrongDeviceClassError",
    "verify_boot_confirmation",
]

VERSION = 1  # boot confirmations
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class UnorderedPartError(ProvisioningError):
    """A stock part: no OEM root was burnt at the fab, so it accepts no provisioning data."""


class OemRootMismatchError(ProvisioningError):
    """The provisioning data's OEM root is not the one whose hash the fab burnt."""


class ProvisioningRollbackError(ProvisioningError, RollbackError):
    """The provisioning data's rollback floor is below the one already fused."""


class NotProvisionedError(DeviceRefusedError):
    """The device has no trust anchors in OTP yet; it programs nothing."""


class WrongDeviceClassError(ImageError):
    """The image is for another device class."""


# --- device ----------------------------------------------------------------------------


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


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
    """A chip with an on-chip SBM; private key, OTP and flash are reachable only via the SBM.

    ``oem_root_hash`` is what the fab burnt for an ordered part (SHA-256 of the OEM root's
    SPKI DER, :func:`securethread.formats.device_trust.oem_root_hash`); ``None`` is a stock part
    that refuses every provisioning.  ``rollback_floor`` is the fuse value it leaves the fab with.
    """

    def __init__(
        self,
        *,
        device_id: str,
        private_key: ec.EllipticCurvePrivateKey,
        vendor_certificate: x509.Certificate,
        oem_root_hash: bytes | None = None,
        rollback_floor: int = 0,
        flash_size: int = DEFAULT_FLASH_SIZE,
    ) -> None:
        _check_order(oem_root_hash, rollback_floor)
        self.device_id = check_device_id(device_id)
        self._key = private_key
        self.public_key = private_key.public_key()
        self._spki = spki_der(self.public_key)
        self.vendor_certificate = vendor_certificate
        self._vendor_der = vendor_certificate.public_bytes(serialization.Encoding.DER)
        self.flash_size = flash_size
        self._oem_root_hash = oem_root_hash  # burnt at the fab, read-only
        self._otp: bytes | None = None  # write-once
        self._otp_data: ProvisioningData | None = None
        self._trust: DeviceTrust | None = None  # verified from OTP under the burnt root
        self._fuse_counter = rollback_floor  # monotonic anti-rollback fuses
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
    def firmware(self) -> bytes | None:
        """The payload of the MCUboot image in flash (what the bootloader would jump to)."""
        if self._flash is None:
            return None
        img = parse_mcuboot(self._flash)
        return self._flash[img.header_size : img.header_size + img.image_size]

    @property
    def oem_root_hash(self) -> bytes | None:
        """The OEM root hash burnt at the fab (``None``: a stock part)."""
        return self._oem_root_hash

    @property
    def trust(self) -> DeviceTrust | None:
        """The anchors the SBM verified at provisioning (firmware key, class, job, floor)."""
        return self._trust

    @property
    def flashed(self) -> FlashedImage | None:
        return self._flashed

    @property
    def rollback_counter(self) -> int:
        """The fused rollback floor: set at the fab, raised by provisioning and by boots."""
        return self._fuse_counter

    def state(self) -> tuple[bytes | None, bytes | None, int]:
        """Flash, OTP and fuse counter: the persistent state a refusal must not change."""
        return self._flash, self._otp, self._fuse_counter

    # --- SBM services --------------------------------------------------------------------

    def identify(self, challenge: bytes) -> bytes:
        """Answer an identification challenge: proof of possession, the vendor certificate
        and, once provisioned, the OEM device certificate and production-CA certificate
        from OTP (a programming job identifies the chip by those: docs/device.md)."""
        if not isinstance(challenge, bytes) or not 16 <= len(challenge) <= 64:
            raise DeviceRefusedError("identification challenge must be 16-64 bytes")
        sig = self._key.sign(pop_payload(challenge, self.device_id, self._spki), _ECDSA_SHA256)
        otp = self._otp_data
        return IdentificationResponse(
            challenge=challenge,
            device_id=self.device_id,
            public_key=self._spki,
            vendor_certificate=self._vendor_der,
            signature=sig,
            device_certificate=None if otp is None else _der(otp.device_certificate),
            production_ca_certificate=(
                None if otp is None else _der(otp.production_ca_certificate)
            ),
        ).to_bytes()

    def provision(self, provisioning_bytes: bytes, *, at: datetime.datetime | None = None) -> None:
        """Write trust anchors to OTP once, and only what the burnt OEM root vouches for.

        Order (docs/device.md): OTP unwritten and the part ordered; the OEM root's SPKI hash
        equals the burnt one (before anything else in the data is used); the root is
        self-signed; the device-trust statement verifies under it; its rollback floor is not
        below the fused one; the device certificate is for this chip and chains root ->
        production CA (of the statement's job) -> device.  Then OTP and fuses, in one step.
        """
        if self._otp is not None:
            raise AlreadyProvisionedError(f"device {self.device_id}: OTP already written")
        if self._oem_root_hash is None:
            raise UnorderedPartError(
                f"device {self.device_id}: stock part, no OEM root burnt at the fab"
            )
        data = ProvisioningData.from_bytes(provisioning_bytes)
        trust = self._check_anchors(data, self._oem_root_hash)
        self._check_device_certificate(data, trust, at)
        # Commit after every check: OTP, then the fuses up to the authenticated floor.
        self._otp_data, self._trust = data, trust
        self._otp = bytes(provisioning_bytes)
        self._fuse_counter = max(self._fuse_counter, trust.min_security_counter)

    def _check_anchors(self, data: ProvisioningData, burnt: bytes) -> DeviceTrust:
        """The root against the burnt hash, then the OEM-signed statement under that root."""
        root = data.oem_root_certificate
        root_key = root.public_key()
        if not isinstance(root_key, ec.EllipticCurvePublicKey) or not hmac.compare_digest(
            fingerprint(root_key), burnt
        ):
            raise OemRootMismatchError(
                f"device {self.device_id}: OEM root is not the one burnt at the fab"
            )
        try:
            # Same key as burnt; the name and extensions are vouched for by its self-signature.
            root.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise OemRootMismatchError(
                f"device {self.device_id}: OEM root certificate is not self-signed by its key"
            ) from None
        try:
            trust = verify_device_trust(data.device_trust, oem_root=root)
        except DeviceTrustError as exc:
            raise DeviceTrustRefusedError(f"device {self.device_id}: {exc}") from None
        if trust.min_security_counter < self._fuse_counter:
            raise ProvisioningRollbackError(
                f"device {self.device_id}: rollback floor {trust.min_security_counter} is below "
                f"the fused {self._fuse_counter}"
            )
        return trust

    def _check_device_certificate(
        self, data: ProvisioningData, trust: DeviceTrust, at: datetime.datetime | None
    ) -> None:
        """This chip's key and id, certified by the production CA of the statement's job, with
        that job's tag in its serial."""
        from securethread.pki import validate_device_chain

        cert = data.device_certificate
        cert_key = cert.public_key()
        if not isinstance(cert_key, ec.EllipticCurvePublicKey) or spki_der(cert_key) != self._spki:
            raise ProvisioningError(
                f"device {self.device_id}: device certificate certifies another key"
            )
        # the device id is the subject serialNumber (X.520); the CN follows the job's template
        cns = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if len(cns) != 1 or cns[0].value != self.device_id:
            raise ProvisioningError(
                f"device {self.device_id}: device certificate names another device id"
            )
        try:
            validate_device_chain(
                cert,
                data.production_ca_certificate,
                data.oem_root_certificate,
                at=at,
                job_id=trust.job_id,
                job_tag=trust.job_sha256,
            )
        except CertificateError as exc:
            raise ProvisioningError(
                f"device {self.device_id}: device certificate chain: {exc}"
            ) from exc

    def _check_mcuboot(self, installed: bytes, m: Manifest, trust: DeviceTrust) -> None:
        """The decrypted plaintext is an MCUboot image as bootutil would check it: strict parse,
        SHA-256 TLV, key hash TLV and ECDSA signature under the same firmware-signing key, its
        protected security counter and header version the manifest's (so the counter a
        bootloader enforces is the one already checked against the floor)."""
        v = verify_mcuboot(installed, key=trust.firmware_signing_key)
        if v.security_counter != m.security_counter:
            raise ManifestMismatchError(
                f"MCUboot security counter {v.security_counter} differs from the manifest's "
                f"{m.security_counter}"
            )
        if v.version != ImageVersion.parse(m.image_version):
            raise ManifestMismatchError(
                f"MCUboot image version {v.version} differs from the manifest's "
                f"{m.image_version!r}"
            )

    def program(
        self,
        manifest: bytes,
        image: BinaryIO,
        license: bytes,
        nonce: bytes,
        *,
        at: datetime.datetime | None = None,
    ) -> bytes:
        """Verify, decrypt and flash an image; return a signed boot confirmation.

        Order: manifest signature under the firmware-signing key the OEM root vouched for
        (before anything is decrypted), device class, rollback, size, license (signer under
        the burnt root, device, image), then chunk-by-chunk decryption to staging, digests,
        the MCUboot image in staging (:meth:`_check_mcuboot`), and only then flash (which
        holds the MCUboot image, as a bootloader's slot would) and fuses.  (Signature matches
        the programmer's DevicePort.)
        """
        otp, trust = self._otp_data, self._trust
        if otp is None or trust is None:
            raise NotProvisionedError(f"device {self.device_id}: not provisioned")
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise DeviceRefusedError("programmer nonce must be 16-64 bytes")
        m = verify_manifest(manifest, key=trust.firmware_signing_key)
        if m.device_class != trust.device_class:
            raise WrongDeviceClassError(
                f"image is for device class {m.device_class!r}, device is {trust.device_class!r}"
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
        decrypt_image(image, staging, key=key, manifest=m, max_size=self.flash_size)
        installed = staging.getvalue()
        self._check_mcuboot(installed, m, trust)
        # Commit: flash, then the monotonic fuses (a real SBM burns fuses after the copy).
        self._flash = installed
        self._fuse_counter = max(self._fuse_counter, m.security_counter)
        self._flashed = FlashedImage(
            m.image_id, m.image_version, m.security_counter, m.plaintext_sha256
        )
        return seal(
            BOOT_CONFIRMATION_KIND,
            BootConfirmation(
                device_id=self.device_id,
                image_id=m.image_id,
                image_version=m.image_version,
                security_counter=m.security_counter,
                plaintext_sha256=m.plaintext_sha256,
                nonce=nonce,
            ).to_body(),
            [cast(Any, _ChipSigner(self._key))],
        )
