"""securethread: secure production of IoT devices between two PKCS#11 enclaves.

The package is laid out as it is deployed (docs/design.md): ``oem/`` runs at the OEM,
``programmer/`` at the programming centre, ``device/`` is the simulated silicon, ``audit/``
verifies offline with public keys only.  They meet only in ``formats/`` (the artefacts that
cross between parties) and ``channel/`` (the key channel); ``keys/`` is the pure key protocol
and software backend, ``hsm/`` the PKCS#11 backend, ``pki/`` the certificate profiles.

``import securethread`` loads only the error classes: the key classes are loaded on first
use (PEP 562), python-pkcs11 only with ``Token``/``open_token``, so device-side and audit code
runs with ``cryptography`` alone and the command starts (and answers Ctrl-C) at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigurationError,
    Error,
    FormatError,
    HSMError,
    QuotaExceededError,
    SignatureError,
    VerificationError,
)

if TYPE_CHECKING:
    from .hsm import Token, open_token
    from .keys import Curve, KeyBackend, SoftwareBackend

__all__ = [
    "ConfigurationError",
    "Curve",
    "Error",
    "FormatError",
    "HSMError",
    "KeyBackend",
    "QuotaExceededError",
    "SignatureError",
    "SoftwareBackend",
    "Token",
    "VerificationError",
    "open_token",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # PEP 562: the key backends load only when asked for (python-pkcs11 only for hsm).
    if name in ("Token", "open_token"):
        from . import hsm

        return getattr(hsm, name)
    if name in ("Curve", "KeyBackend", "SoftwareBackend"):
        from . import keys

        return getattr(keys, name)
    raise AttributeError(f"module 'securethread' has no attribute {name!r}")
