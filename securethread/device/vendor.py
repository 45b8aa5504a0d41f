"""The simulated silicon vendor: the fab that certifies each chip's key.

Software (``cryptography``) standing in for a device-identity CA, for tests and the demo:
one level, root -> chip, P-256; the chip's subject CN is its 64-bit UID as 16 lowercase hex
digits.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.errors import CertificateError
from securethread.formats.identity import check_device_id
from securethread.keys.ecutil import spki_der

if TYPE_CHECKING:
    from securethread.device.sbm import SimulatedDevice

__all__ = ["DEFAULT_FLASH_SIZE", "SiliconVendor"]

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

    def make_chip(self, *, flash_size: int = DEFAULT_FLASH_SIZE) -> SimulatedDevice:
        """A new chip: fresh unique 64-bit UID, key pair generated "on chip", vendor cert."""
        while True:
            device_id = os.urandom(8).hex()
            if device_id not in self._issued:
                break
        self._issued.add(device_id)
        from securethread.device.sbm import SimulatedDevice

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.certify(device_id, key.public_key())
        return SimulatedDevice(
            device_id=device_id, private_key=key, vendor_certificate=cert, flash_size=flash_size
        )


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
