"""Where a token's PIN comes from, in this order (docs/hsm.md):

1. a callback the caller passes (a prompt, or a :class:`PinSet` a worker process received);
2. the PKCS#11 URI's ``pin-value`` or ``pin-source`` (RFC 7512 §2.3);
3. ``SECURETHREAD_PIN_<LABEL>``;
4. the file named by ``SECURETHREAD_PIN_<LABEL>_FILE`` (its first line);
5. the party's PIN file (``label=PIN`` lines, mode 0600): the one passed as ``pin_file``,
   else the one ``SECURETHREAD_PINS_FILE`` names (set by
   ``softhsm_config.TokenDirectory.activate``; a path, never a PIN);
6. nothing: :class:`PinMissingError` -- a command line may then prompt.

The PIN is handed straight to ``C_Login``; it is never stored on a token object, logged,
put in an exception message or written to ``os.environ``.  Worker processes receive PINs
as a :class:`PinSet` argument, which ``multiprocessing``'s spawn start method pickles
through the pipe it starts the child with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import PinMissingError

#: A callback that is given the token label and returns its user PIN.
PinCallback = Callable[[str], str]

#: Names the party's PIN file (a path) for this process and the processes it starts.
PINS_FILE_ENV = "SECURETHREAD_PINS_FILE"


def env_var_for(label: str, *, role: str = "PIN") -> str:
    """``SECURETHREAD_PIN_<LABEL>`` (or ``_SO_PIN_``), label upper-cased, non-alnum -> ``_``."""
    return f"SECURETHREAD_{role}_" + re.sub(r"[^A-Za-z0-9]", "_", label).upper()


def _first_line(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            pin = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise PinMissingError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PinMissingError(f"{what} {path!r} is not UTF-8 text") from None
    if not pin:
        raise PinMissingError(f"{what} {path!r} is empty")
    return pin


def read_pin_source(source: str) -> str:
    """Read a ``pin-source`` (RFC 7512 §2.3): a file path or a ``file:`` URI; first line."""
    path = unquote(urlparse(source).path) if source.startswith("file:") else source
    return _first_line(path, "pin-source")


def read_pin_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``label=PIN`` lines of a party's PIN file.

    Lines named ``SECURETHREAD_PIN_<LABEL>`` (the older ``pins.env`` form) are kept under
    that name; SO PIN lines are skipped.  :class:`PinMissingError` if it cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PinMissingError(f"cannot read PIN file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PinMissingError(f"PIN file {str(path)!r} is not UTF-8 text") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if eq and name and value and not name.startswith("SECURETHREAD_SO_PIN_"):
            out[name] = value
    return out


def _from_pin_file(label: str, path: str | os.PathLike[str]) -> str | None:
    pins = read_pin_file(path)
    return pins.get(label, pins.get(env_var_for(label)))


def resolve_pin(
    label: str,
    *,
    callback: PinCallback | None = None,
    pin_value: str | None = None,
    pin_source: str | None = None,
    pin_file: str | os.PathLike[str] | None = None,
) -> str:
    """Return the user PIN for token ``label`` from the first source that has one (the
    order is in this module's docstring)."""
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
        return _first_line(os.environ[file_var], f"PIN file ({file_var})")
    party = pin_file if pin_file is not None else os.environ.get(PINS_FILE_ENV)
    if party:
        pin = _from_pin_file(label, party)
        if pin is not None:
            return pin
        raise PinMissingError(
            f"no PIN for token {label!r}: not in PIN file {str(party)!r}; set {var} "
            f"(or {file_var}) or pass a pin callback"
        )
    raise PinMissingError(
        f"no PIN for token {label!r}: set {var} (or {file_var}), pass a pin callback, "
        "or add pin-source to the URI"
    )


class PinSet:
    """PINs for a fixed set of tokens, resolved once in the leader process and handed to
    worker processes as an argument: a picklable :data:`PinCallback`.

    ``multiprocessing`` with the spawn start method pickles a ``Process``'s (or a pool
    initializer's) arguments into the pipe the child reads at start-up, so the PINs never
    pass through the environment or a command line.  ``repr`` shows only the labels.
    """

    __slots__ = ("_pins",)

    def __init__(self, pins: Mapping[str, str]) -> None:
        for label, pin in pins.items():
            if not isinstance(label, str) or not isinstance(pin, str) or not pin:
                raise TypeError("a PinSet maps token labels to non-empty PIN strings")
        self._pins = dict(pins)

    @classmethod
    def resolve(
        cls,
        labels: Iterable[str],
        *,
        callback: PinCallback | None = None,
        pin_file: str | os.PathLike[str] | None = None,
    ) -> PinSet:
        """Resolve each label's PIN now, by :func:`resolve_pin`'s order."""
        return cls(
            {
                label: resolve_pin(label, callback=callback, pin_file=pin_file)
                for label in labels
            }
        )

    def __call__(self, label: str) -> str:
        try:
            return self._pins[label]
        except KeyError:
            raise PinMissingError(f"no PIN for token {label!r} in this PinSet") from None

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(self._pins)

    def __repr__(self) -> str:
        return f"PinSet({sorted(self._pins)!r})"

    def __getstate__(self) -> dict[str, str]:
        return self._pins

    def __setstate__(self, state: dict[str, str]) -> None:
        self._pins = dict(state)
