"""The device role: the simulated silicon vendor (fab) and the chip with its Secure Boot
Manager.  Imports ``cryptography``, formats, pki and keys only (no python-pkcs11)."""

from securethread.device.sbm import (
    BOOT_CONFIRMATION_KIND,
    BootConfirmationError,
    NotProvisionedError,
    ProvisioningData,
    ProvisioningError,
    ProvisioningFormatError,
    SimulatedDevice,
    WrongDeviceClassError,
    verify_boot_confirmation,
)
from securethread.device.vendor import DEFAULT_FLASH_SIZE, SiliconVendor

__all__ = [
    "BOOT_CONFIRMATION_KIND",
    "DEFAULT_FLASH_SIZE",
    "BootConfirmationError",
    "NotProvisionedError",
    "ProvisioningData",
    "ProvisioningError",
    "ProvisioningFormatError",
    "SiliconVendor",
    "SimulatedDevice",
    "WrongDeviceClassError",
    "verify_boot_confirmation",
]
