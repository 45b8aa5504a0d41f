"""Where a token's PIN comes from: a callback, the URI (RFC 7512 §2.3), or the environment.

The PIN is handed straight to ``C_Login`` and never stored on any object, logged or put
in an exception message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from urllib.parse import unquote, urlparse

from ..errors import PinMissingError

#: A callback that is given the token label and returns its user PIN.
PinCallback = Callable[[str], str]


def env_var_for(label: str, *, role: str = "PIN") -> str:
    """``SECURETHREAD_PIN_<LABEL>`` (or ``_SO_PIN_``), label upper-cased, non-alnum -> ``_``."""
    return f"SECURETHREAD_{role}_" + re.sub(r"[^A-Za-z0-9]", "_", label).upper()


def read_pin_source(source: str) -> str:
    """Read a ``pin-source`` (RFC 7512 §2.3): a file path or a ``file:`` URI; first line."""
    path = unquote(urlparse(source).path) if source.startswith("file:") else source
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise PinMissingError(f"cannot read pin-source {path!r}: {exc.strerror}") from None


def resolve_pin(
    label: str,
    *,
    callback: PinCallback | None = None,
    pin_value: str | None = None,
    pin_source: str | None = None,
) -> str:
    """Return the user PIN for token ``label`` from the first source that has one."""
    if callback is not None:
        return callback(label)
    if pin_value is not None:
        return pin_value
    if pin_source is not None:
        return read_pin_source(pin_source)
    var = env_var_for(label)
    if var in os.environ:
        return os.environ[var]
    file_var = var + "_FILE"
    if file_var in os.environ:
        return read_pin_source(os.environ[file_var])
    raise PinMissingError(
        f"no PIN for token {label!r}: set {var} (or {file_var}), pass a pin callback, "
        "or add pin-source to the URI"
    )
