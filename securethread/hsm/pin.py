"""Where a token's PIN comes from, in this order (docs/hsm.md):

1. a callback the caller passes (a prompt, or a :class:`PinSet` a worker process received);
2. the PKCS#11 URI's ``pin-value`` or ``pin-source`` (RFC 7512 §2.3);
3. ``SECURETHREAD_PIN_<LABEL>``, the label upper-cased with every character but letters and
   digits as ``_`` (``SECURETHREAD_PIN_PROGRAMMER``), or the label as given
   (``SECURETHREAD_PIN_programmer``); both spellings set at once is refused, not guessed;
4. the file named by ``SECURETHREAD_PIN_<LABEL>_FILE`` (same two spellings; its first line);
5. the party's PIN file (``label=PIN`` lines): the one passed as ``pin_file``, else the one
   ``SECURETHREAD_PINS_FILE`` names (set by ``softhsm_config.TokenDirectory.activate``; a
   path, never a PIN);
6. nothing: :class:`PinMissingError` -- a command line may then prompt.

Every PIN file (the party's, a ``_FILE`` variable's, a URI's ``pin-source``) must be a
regular file no group or other user can read or write: one that is (mode 0644) is refused,
naming the file and its mode (:class:`~securethread.errors.InsecurePinFileError`).

The PIN is handed straight to ``C_Login``; it is never stored on a token object, logged,
put in an exception message or written to ``os.environ``.  Worker processes receive PINs
as a :class:`PinSet` argument through their start pipe; every process this library starts
gets :func:`child_environment`, which holds no PIN variable whatever the caller set.  A
process that holds a PIN makes itself non-dumpable with no core file
(:func:`harden_process`).
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import unquote, urlparse

from ..errors import ConfigurationError, InsecurePinFileError, PinMissingError

#: A callback that is given the token label and returns its user PIN.
PinCallback = Callable[[str], str]

#: Names the party's PIN file (a path) for this process and the processes it starts.
PINS_FILE_ENV = "SECURETHREAD_PINS_FILE"


def env_var_for(label: str, *, role: str = "PIN") -> str:
    """``SECURETHREAD_PIN_<LABEL>`` (or ``_SO_PIN_``), label upper-cased, non-alnum -> ``_``."""
    return f"SECURETHREAD_{role}_" + re.sub(r"[^A-Za-z0-9]", "_", label).upper()


def env_var_names(label: str, *, role: str = "PIN") -> tuple[str, ...]:
    """The spellings of ``label``'s variable that are read: :func:`env_var_for`'s, and the
    label as given (``SECURETHREAD_PIN_programmer``) where that differs."""
    normal = env_var_for(label, role=role)
    given = f"SECURETHREAD_{role}_{label}"
    return (normal,) if given == normal else (normal, given)


def _from_environment(label: str, suffix: str) -> tuple[str, str] | None:
    """The one variable of ``label`` (``suffix`` ``""`` or ``"_FILE"``) that is set, as
    (name, value); refuses two spellings set at once (which one was meant is a guess)."""
    names = [n + suffix for n in env_var_names(label)]
    found = [n for n in names if n in os.environ]
    if len(found) > 1:
        raise ConfigurationError(
            f"token {label!r}: both {found[0]} and {found[1]} are set; set only one"
        )
    if not found:
        return None
    if not suffix and found[0].upper().endswith("_FILE"):
        # SECURETHREAD_PIN_X_FILE is also token X's PIN-file variable: never read as a PIN.
        raise ConfigurationError(
            f"token {label!r}: {found[0]} is also the PIN-file variable of token "
            f"{label[:-5]!r}; give this token's PIN by callback, URI or PIN file"
        )
    return found[0], os.environ[found[0]]


def _open_private(path: str | os.PathLike[str], what: str) -> int:
    """Open a PIN file for reading; refuse one that is not a regular file or that group or
    others may read or write (checked on the open descriptor: no race with a rename)."""
    shown = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise PinMissingError(f"cannot read {what} {shown!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PinMissingError(f"cannot read {what} {shown!r}: Is a directory or device")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise InsecurePinFileError(
                f"{what} {shown!r} has mode {mode:04o}: group or others may read or write it; "
                f"make it the owner's alone (chmod 600 {shown})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private_text(path: str | os.PathLike[str], what: str) -> str:
    """A PIN file's text (at most 1 MiB), once :func:`_open_private` accepted it."""
    fd = _open_private(path, what)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise PinMissingError(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PinMissingError(f"{what} {os.fspath(path)!r} is not UTF-8 text") from None


def _first_line(path: str, what: str) -> str:
    lines = read_private_text(path, what).splitlines()
    pin = lines[0] if lines else ""
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
    that name; SO PIN lines are skipped.  :class:`PinMissingError` if it cannot be read,
    :class:`~securethread.errors.InsecurePinFileError` if others may read or write it.
    """
    text = read_private_text(path, "PIN file")
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
    harden_process()  # before any PIN is in this process's memory
    if callback is not None:
        return callback(label)
    if pin_value is not None:
        return pin_value
    if pin_source is not None:
        return read_pin_source(pin_source)
    var = env_var_for(label)
    file_var = var + "_FILE"
    direct = _from_environment(label, "")
    if direct is not None:
        return direct[1]
    named = _from_environment(label, "_FILE")
    if named is not None:
        return _first_line(named[1], f"PIN file ({named[0]})")
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
        harden_process()
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
        harden_process()  # a worker process receiving its PINs
        self._pins = dict(state)


# --- processes that hold PINs -----------------------------------------------------------------

_PR_SET_DUMPABLE = 4  # prctl(2), <linux/prctl.h>
_hardened: int | None = None  # the pid that hardened itself (a forked child does it again)


def harden_process() -> None:
    """Keep this process's memory, which now holds a PIN, out of core files and away from
    other processes of its user: RLIMIT_CORE 0 (setrlimit(2)), and on Linux
    ``prctl(PR_SET_DUMPABLE, 0)`` -- no core dump, no ptrace attach and no
    ``/proc/<pid>/{mem,environ}`` for processes without CAP_SYS_PTRACE.  The dumpable flag
    is reset by execve(2), so every process calls this itself; cheap after the first."""
    global _hardened
    pid = os.getpid()
    if _hardened == pid:
        return
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise ConfigurationError(
                f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}"
            )
    _hardened = pid


def _names_a_file(value: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(value).st_mode)
    except (OSError, ValueError):
        return False


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process this one starts: ``base`` (default ``os.environ``)
    without a PIN.  Every ``SECURETHREAD_PIN_*`` and ``SECURETHREAD_SO_PIN_*`` variable, in
    any case, is dropped -- except a ``..._FILE`` one whose value names an existing file: a
    file name is not a PIN (the file's own mode guards it).  A ``..._FILE`` variable that
    names no file may be the PIN of a token whose label ends in ``_file``: dropped."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        upper = name.upper()
        if upper.startswith(("SECURETHREAD_PIN_", "SECURETHREAD_SO_PIN_")):
            if upper.endswith("_FILE") and _names_a_file(env[name]):
                continue
            del env[name]
    return env
