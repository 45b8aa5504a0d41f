"""securethread: secure production of IoT devices between two PKCS#11 enclaves.

The package is laid out as it is deployed (docs/design.md): ``oem/`` runs at the OEM,
``programmer/`` at the programming centre, ``device/`` is the simulated silicon, ``audit/``
verifies offline with public keys only.  They meet only in ``formats/`` (the artefacts that
cross between parties) and ``channel/`` (the key channel); ``keys/`` is the pure key protocol
and software backend, ``hsm/`` the PKCS#11 backend, ``pki/`` the certificate profiles.

``import securethread`` does not load python-pkcs11: ``Token`` and ``open_token`` are loaded
on first use, so device-side and audit code runs with ``cryptography`` alone.
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
from .keys import Curve, KeyBackend, SoftwareBackend

if TYPE_CHECKING:
    from .hsm import Token, open_token

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
    # PEP 562: the PKCS#11 backend loads only when asked for.
    if name in ("Token", "open_token"):
        from . import hsm

        return getattr(hsm, name)
    raise AttributeError(f"module 'securethread' has no attribute {name!r}")
