"""The PKCS#11 backend: tokens (:class:`Token`) opened by RFC 7512 URI, sessions, key
templates, the direct fast path.  Re-exports the pure key protocol of :mod:`securethread.keys`."""

from securethread.keys.ecutil import (
    CryptographyKeyAdapter,
    fingerprint,
    load_spki,
    point_of,
    public_from_point,
    spki_der,
    verify_signature,
)
from securethread.keys.protocol import KeyBackend, PrivateKey, SecretKey
from securethread.keys.software import SoftwareBackend

from ..keys.policy import (
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
from .module import default_module_path, load_module
from .pin import PinCallback, env_var_for, resolve_pin
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
