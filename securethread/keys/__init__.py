"""The key protocol, EC helpers, key policies and the software backend -- no PKCS#11.

Everything here imports with ``cryptography`` alone, so the device and audit packages can
use it; ``securethread.hsm`` implements the same protocol on a PKCS#11 token.
"""

from .ecutil import (
    CryptographyKeyAdapter,
    fingerprint,
    load_spki,
    point_of,
    public_from_point,
    spki_der,
    verify_signature,
)
from .policy import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    KEY_AGREEMENT,
    PROGRAMMER_IMAGE_KEY,
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_UNWRAP,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
    PolicyReport,
    Usage,
)
from .protocol import KeyBackend, PrivateKey, SecretKey
from .software import SoftwareBackend

__all__ = [
    "CryptographyKeyAdapter",
    "Curve",
    "EPHEMERAL_AGREEMENT",
    "IMAGE_KEY",
    "KEY_AGREEMENT",
    "KeyBackend",
    "KeyPolicy",
    "PROGRAMMER_IMAGE_KEY",
    "PolicyReport",
    "PrivateKey",
    "SIGNING",
    "SecretKey",
    "SoftwareBackend",
    "TEMP_CONFIRM",
    "TEMP_DERIVE",
    "TEMP_UNWRAP",
    "TEMP_WRAP",
    "Usage",
    "fingerprint",
    "load_spki",
    "point_of",
    "public_from_point",
    "spki_der",
    "verify_signature",
]
