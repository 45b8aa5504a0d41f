"""Key backends: PKCS#11 tokens (:class:`Token`) and the software stand-in."""

from .ecutil import (
    CryptographyKeyAdapter,
    fingerprint,
    load_spki,
    point_of,
    public_from_point,
    spki_der,
    verify_signature,
)
from .module import default_module_path, load_module
from .pin import PinCallback, env_var_for, resolve_pin
from .policy import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    KEY_AGREEMENT,
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
    PolicyReport,
    Usage,
)
from .protocol import KeyBackend, PrivateKey, SecretKey
from .software import SoftwareBackend
from .token import HsmPrivateKey, HsmSecretKey, Token, key_id_for, open_token
from .uri import PKCS11URI

__all__ = [
    "CryptographyKeyAdapter",
    "Curve",
    "EPHEMERAL_AGREEMENT",
    "HsmPrivateKey",
    "HsmSecretKey",
    "IMAGE_KEY",
    "KEY_AGREEMENT",
    "KeyBackend",
    "KeyPolicy",
    "PKCS11URI",
    "PinCallback",
    "PolicyReport",
    "PrivateKey",
    "SIGNING",
    "SecretKey",
    "SoftwareBackend",
    "TEMP_CONFIRM",
    "TEMP_DERIVE",
    "TEMP_WRAP",
    "Token",
    "Usage",
    "default_module_path",
    "env_var_for",
    "fingerprint",
    "key_id_for",
    "load_module",
    "load_spki",
    "open_token",
    "point_of",
    "public_from_point",
    "resolve_pin",
    "spki_der",
    "verify_signature",
]
