"""The device role: the simulated silicon vendor (fab) and the chip with its Secure Boot
Manager (docs/device.md).  Imports ``cryptography``, formats, pki and keys only (no
python-pkcs11, no other role)."""

from securethread.device.sbm import (
    BOOT_CONFIRMATION_KIND,
    PROVISIONING_VERSION,
    BootConfirmationError,
    DeviceTrustRefusedError,
    FlashedImage,
    NotProvisionedError,
    OemRootMismatchError,
    ProvisioningData,
    ProvisioningError,
    ProvisioningFormatError,
    ProvisioningRollbackError,
    SimulatedDevice,
    UnorderedPartError,
    WrongDeviceClassError,
    verify_boot_confirmation,
)
from securethread.device.vendor import DEFAULT_FLASH_SIZE, ChipSpec, SiliconVendor, make_chips
from securethread.formats.device_trust import oem_root_hash

__all__ = [
    "BOOT_CONFIRMATION_KIND",
    "DEFAULT_FLASH_SIZE",
    "PROVISIONING_VERSION",
    "BootConfirmationError",
    "ChipSpec",
    "DeviceTrustRefusedError",
    "FlashedImage",
    "NotProvisionedError",
    "OemRootMismatchError",
    "ProvisioningData",
    "ProvisioningError",
    "ProvisioningFormatError",
    "ProvisioningRollbackError",
    "SiliconVendor",
    "SimulatedDevice",
    "UnorderedPartError",
    "WrongDeviceClassError",
    "make_chips",
    "oem_root_hash",
    "verify_boot_confirmation",
]
