"""The simulated silicon vendor: the fab that makes chips and certifies their keys.

Software (``cryptography``) standing in for a fab and its device-identity CA, for tests and
the demo: one level, root -> chip, P-256; the chip's subject CN is its 64-bit UID as 16
lowercase hex digits.  For parts an OEM orders, the fab also burns into OTP the SHA-256 of the
OEM root's SubjectPublicKeyInfo (:func:`securethread.formats.device_trust.oem_root_hash`) and
an initial rollback floor, beside the chip key and the vendor certificate; the chip's SBM then
accepts provisioning data under that root only (docs/device.md).

:class:`ChipSpec` is one such part as plain data, so worker processes can rebuild it;
:func:`make_chips` makes a batch with chosen UIDs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.errors import CertificateError
from securethread.formats.identity import check_device_id
from securethread.keys.ecutil import spki_der

if TYPE_CHECKING:
    from securethread.device.sbm import SimulatedDevice

__all__ = ["DEFAULT_FLASH_SIZE", "ChipSpec", "SiliconVendor", "make_chips"]

DEFAULT_FLASH_SIZE = 16 << 20


# --- silicon vendor --------------------------------------------------------------------


class SiliconVendor:
    """A software device-identity CA (the fab), P-256, one level: root -> chip."""

    def __init__(self, name: str = "Simulated Silicon Vendor", *, valid_years: int = 25) -> None:
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(days=1)
        self._not_after = now + datetime.timedelta(days=365 * valid_years)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Device Identity Root"),
            ]
        )
        self.root_certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ku(cert_sign=True), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._issued: set[str] = set()

    @classmethod
    def from_key(
        cls, key: ec.EllipticCurvePrivateKey, root_certificate: x509.Certificate
    ) -> SiliconVendor:
        """The same simulated fab again, from its saved CA key and root certificate."""
        pub = root_certificate.public_key()
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            pub, ec.EllipticCurvePublicKey
        ):
            raise CertificateError("a silicon vendor needs an EC key and an EC root certificate")
        if spki_der(key.public_key()) != spki_der(pub):
            raise CertificateError("the vendor key does not match the vendor root certificate")
        orgs = root_certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        vendor = cls.__new__(cls)
        vendor.name = str(orgs[0].value) if orgs else "Simulated Silicon Vendor"
        vendor._key = key
        vendor._not_before = root_certificate.not_valid_before_utc
        vendor._not_after = root_certificate.not_valid_after_utc
        vendor.root_certificate = root_certificate
        vendor._issued = set()
        return vendor

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The fab's CA key (software: this vendor is a simulation, saved to be reloaded)."""
        return self._key

    def certify(self, device_id: str, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        """The chip's identity certificate: CN = device id, digitalSignature + keyAgreement."""
        check_device_id(device_id)
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
                        x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                    ]
                )
            )
            .issuer_name(self.root_certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_ku(cert_sign=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def make_chip(
        self,
        device_id: str | None = None,
        *,
        oem_root_hash: bytes | None = None,
        rollback_floor: int = 0,
        flash_size: int = DEFAULT_FLASH_SIZE,
    ) -> SimulatedDevice:
        """A new chip as it leaves the fab (see :meth:`make_spec`)."""
        return self.make_spec(
            device_id,
            oem_root_hash=oem_root_hash,
            rollback_floor=rollback_floor,
            flash_size=flash_size,
        ).open()

    def make_spec(
        self,
        device_id: str | None = None,
        *,
        oem_root_hash: bytes | None,
        rollback_floor: int = 0,
        flash_size: int = DEFAULT_FLASH_SIZE,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> ChipSpec:
        """A new part: UID (``device_id``, or a fresh random one), key pair generated "on chip",
        vendor certificate; for an ordered part, ``oem_root_hash`` (32 bytes) and
        ``rollback_floor`` burnt into OTP.  ``oem_root_hash=None`` is a stock part: it
        identifies itself but accepts no provisioning data.  A UID is never issued twice.
        ``key`` is the chip's key pair where a simulation must be reproducible (default: a
        fresh one, as a chip generates it).
        """
        _check_order(oem_root_hash, rollback_floor)
        uid = self._fresh_uid() if device_id is None else check_device_id(device_id)
        if uid in self._issued:
            raise ValueError(f"this fab already issued chip UID {uid}")
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
        cert = self.certify(uid, key.public_key())
        self._issued.add(uid)
        return ChipSpec(
            device_id=uid,
            private_key_der=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            vendor_certificate_der=cert.public_bytes(serialization.Encoding.DER),
            oem_root_hash=oem_root_hash,
            rollback_floor=rollback_floor,
            flash_size=flash_size,
        )

    def _fresh_uid(self) -> str:
        while (uid := os.urandom(8).hex()) in self._issued:
            pass
        return uid


def _check_order(oem_root_hash: bytes | None, rollback_floor: int) -> None:
    if oem_root_hash is not None and (type(oem_root_hash) is not bytes or len(oem_root_hash) != 32):
        raise ValueError("oem_root_hash must be 32 bytes (SHA-256) or None for a stock part")
    if type(rollback_floor) is not int or not 0 <= rollback_floor < 2**32:
        raise ValueError("rollback_floor must be an integer in [0, 2**32)")


@attrs.frozen(kw_only=True)
class ChipSpec:
    """One part as the fab made it, as plain (picklable) data, so a worker can rebuild it.

    :meth:`open` gives a fresh chip with OTP, flash and fuses as they left the fab; two
    opens are two independent simulations of the same part (same UID and key).  The private
    key is in here because the chip is simulated; a real chip's key never leaves it.
    """

    device_id: str
    private_key_der: bytes = attrs.field(repr=False)
    vendor_certificate_der: bytes = attrs.field(repr=False)
    oem_root_hash: bytes | None
    rollback_floor: int = 0
    flash_size: int = DEFAULT_FLASH_SIZE
    #: What a fab's provisioning run wrote into its OTP (provisioning data), or None: blank.
    otp: bytes | None = attrs.field(default=None, repr=False)

    def open(self) -> SimulatedDevice:
        """The chip (its methods are the programmer's DevicePort: identify, provision,
        program).  A part provisioned at the fab (``otp``) opens with that OTP: the SBM
        takes it again under its own rules, as it did when it was written."""
        from securethread.device.sbm import SimulatedDevice

        key = serialization.load_der_private_key(self.private_key_der, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("chip spec: the chip key is not an EC private key")
        dev = SimulatedDevice(
            device_id=self.device_id,
            private_key=key,
            vendor_certificate=x509.load_der_x509_certificate(self.vendor_certificate_der),
            oem_root_hash=self.oem_root_hash,
            rollback_floor=self.rollback_floor,
            flash_size=self.flash_size,
        )
        if self.otp is not None:
            dev.provision(self.otp)
        return dev


def make_chips(
    vendor: SiliconVendor,
    uids: Sequence[int],
    *,
    oem_root_hash: bytes | None,
    rollback_floor: int = 0,
    flash_size: int = DEFAULT_FLASH_SIZE,
) -> list[ChipSpec]:
    """Parts with chosen 64-bit UIDs, ordered for the OEM whose root hash is given
    (``None``: stock parts that accept no provisioning)."""
    out = []
    for uid in uids:
        if type(uid) is not int or not 0 <= uid < 2**64:
            raise ValueError(f"chip UID {uid!r} is not a 64-bit unsigned integer")
        out.append(
            vendor.make_spec(
                f"{uid:016x}",
                oem_root_hash=oem_root_hash,
                rollback_floor=rollback_floor,
                flash_size=flash_size,
            )
        )
    return out


def _ku(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
