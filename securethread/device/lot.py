"""The simulated fab's lot manifest: what a silicon vendor ships beside a lot of chips.

The vendor lists the chips it made for the lot (UID and public key, read from each part as
it leaves the fab) and signs the list with its device-identity CA key
(:mod:`securethread.formats.lot`, docs/formats.md "Lot manifest").
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.device.vendor import ChipSpec, SiliconVendor
from securethread.formats.lot import LotManifest, sign_lot

__all__ = ["lot_manifest"]


def lot_manifest(
    vendor: SiliconVendor, chips: Sequence[ChipSpec], *, lot_id: str, device_class: str
) -> bytes:
    """The signed lot manifest of ``chips``, made by ``vendor``."""
    entries = []
    for spec in chips:
        key = serialization.load_der_private_key(spec.private_key_der, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"chip {spec.device_id}: not an EC key")
        entries.append((spec.device_id, key.public_key()))
    manifest = LotManifest.build(
        lot_id=lot_id,
        device_class=device_class,
        vendor_ca=vendor.root_certificate,
        chips=entries,
    )
    return sign_lot(manifest, vendor.private_key)
