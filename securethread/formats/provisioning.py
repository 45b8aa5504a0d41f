"""Provisioning data: what the programmer writes into a device's OTP (flow 7), the artefact
that crosses from the programmer's line to the chip.  The chip's rules for it are in
docs/device.md; this module is only the format (canonical CBOR, versioned) and the line's
fast encoder.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securethread.errors import DeviceRefusedError, FormatError
from securethread.formats import cbor, fields
from securethread.formats.device_trust import (
    MAX_DEVICE_TRUST_SIZE,
    DeviceTrustError,
    verify_device_trust,
)
from securethread.pki import untrusted

PROVISIONING_VERSION = 3  # 3: COSE framing (issue 21); 2: anchors from a device-trust statement
MAX_PROVISIONING_SIZE = 16 << 10


class ProvisioningFormatError(DeviceRefusedError, FormatError):
    """Provisioning data is malformed, oversized or of an unknown version."""


class ProvisioningError(DeviceRefusedError):
    """Provisioning data does not fit this device (foreign key or id, bad chain)."""


class DeviceTrustRefusedError(ProvisioningError):
    """The device-trust statement is not signed by the burnt OEM root, or is malformed."""


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@attrs.frozen
class _Certificate(fields.Rule):
    """A certificate: DER on the wire, parsed in Python (by the one hardened loader)."""

    what: str

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, x509.Certificate) else "must be an X.509 certificate"

    def to_cbor(self, value: Any) -> Any:
        return _der(value)

    def from_cbor(self, raw: Any) -> Any:
        return untrusted.load_certificate(raw, what=self.what)


@fields.body("provisioning data", error=ProvisioningFormatError)
@attrs.frozen(kw_only=True)
class ProvisioningData:
    """What the programmer writes into a device's OTP (canonical CBOR, versioned).

    Unverified as constructed: the SBM checks the root against its OTP hash, the device-trust
    statement under that root and the certificate chain before it writes any of it.
    """

    device_certificate: x509.Certificate = fields.custom(
        "device_certificate", _Certificate("device certificate")
    )
    production_ca_certificate: x509.Certificate = fields.custom(
        "production_ca_certificate", _Certificate("production CA certificate")
    )
    oem_root_certificate: x509.Certificate = fields.custom(
        "oem_root_certificate", _Certificate("OEM root certificate")
    )
    #: The OEM-signed statement (:mod:`securethread.formats.device_trust`), as signed.
    device_trust: bytes = fields.byte_string(
        "device_trust", min_len=1, max_len=MAX_DEVICE_TRUST_SIZE
    )
    version: int = fields.version(PROVISIONING_VERSION)

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def packager(
        cls,
        *,
        production_ca_certificate: x509.Certificate,
        oem_root_certificate: x509.Certificate,
        device_trust: bytes,
        job_sha256: bytes,
    ) -> Callable[[bytes], bytes]:
        """A function from a device certificate's DER to the provisioning data bytes.

        The job's anchors are checked once as a chip will check them (the statement verifies
        under the root and names the production CA's job and ``job_sha256``, the job the line
        opened) and encoded once; per device only the certificate is encoded.  The result
        equals ``ProvisioningData(...).to_bytes()``.
        """
        from securethread.pki import job_id_of

        proto = cls(
            device_certificate=production_ca_certificate,  # placeholder, replaced below
            production_ca_certificate=production_ca_certificate,
            oem_root_certificate=oem_root_certificate,
            device_trust=device_trust,
        )
        try:
            trust = verify_device_trust(device_trust, oem_root=oem_root_certificate)
        except DeviceTrustError as exc:
            raise DeviceTrustRefusedError(str(exc)) from None
        if job_id_of(production_ca_certificate) != trust.job_id:
            raise ProvisioningError(
                f"device trust is for job {trust.job_id!r}, the production CA for "
                f"{job_id_of(production_ca_certificate)!r}"
            )
        if not hmac.compare_digest(trust.job_sha256, job_sha256):
            raise ProvisioningError(f"device trust names another signed job {trust.job_id!r}")
        constant = fields.encode(proto)
        del constant["device_certificate"]
        template = cbor.Template(constant, ("device_certificate",))

        def package(device_certificate_der: bytes) -> bytes:
            if type(device_certificate_der) is not bytes:
                raise ProvisioningFormatError("provisioning data: device certificate not DER")
            return template.fill(device_certificate_der)

        return package

    @classmethod
    def from_bytes(cls, data: bytes) -> ProvisioningData:
        try:
            d = cbor.decode(data, what="provisioning data", max_size=MAX_PROVISIONING_SIZE)
        except FormatError as exc:
            raise ProvisioningFormatError(str(exc)) from None
        return fields.decode(cls, d)
