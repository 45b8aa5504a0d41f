"""securethread: secure production of IoT devices between two PKCS#11 enclaves.

The public API is re-exported here; see README.md for the flows and which module owns each.
"""

from .errors import (
    ConfigurationError,
    Error,
    FormatError,
    HSMError,
    QuotaExceededError,
    SignatureError,
    VerificationError,
)
from .hsm import Curve, KeyBackend, SoftwareBackend, Token, open_token

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
__version__ = "0.1.0"
