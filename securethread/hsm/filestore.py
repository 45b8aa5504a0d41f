"""SoftHSM2's file object store, made safe against kills and concurrent processes.

What SoftHSM 2.6.1 writes, measured with ``strace`` (docs/hsm.md has the traces):

* ``C_Initialize`` reads every token's ``generation`` and ``token.object`` and rewrites
  ``generation`` in place (same 8 bytes, no truncation); a token's SO and user PIN blobs are
  read once, here, and kept for the life of the module.
* ``C_Login`` (user or SO, right or wrong PIN) rewrites ``token.object``: ``ftruncate(0)``,
  then the new content.  The write happens when the stdio stream is closed, *after*
  SoftHSM's ``fcntl`` lock was released (2.6.1's ``File::unlock`` does not flush).

So a kill between the truncation and the write leaves ``token.object`` empty and the token
is gone with every key in it, and another process that initialises the module at that
instant reads an empty token: no label (``NoSuchToken``), no user PIN blob
(``CKR_USER_PIN_NOT_INITIALIZED`` at login) or ``CKR_GENERAL_ERROR``.

This module closes both holes for every process that goes through :mod:`securethread.hsm`:

* :meth:`FileStore.lock` -- ``flock(2)`` on ``<tokendir>/.securethread.lock``, held around
  module initialisation and around each login, so no process reads a token file while
  another one rewrites it.  The kernel drops the lock of a killed process.
* :meth:`FileStore.keep_copy` -- under the lock, right before a login, a verified copy of
  the token's ``token.object`` (``token.object.copy``, written to a temporary file, synced,
  read back, renamed).
* :meth:`FileStore.repair` -- under the lock, before the module is initialised: a
  ``token.object`` that is missing, empty or does not parse is replaced by its copy
  (atomically, by rename).

File formats follow SoftHSMv2's ``src/lib/object_store`` (``ObjectFile``, ``File``,
``OSAttributes.h``): an 8-byte big-endian generation, then attributes as 8-byte type, 8-byte
kind and a kind-specific value.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TokenDirectoryError

log = logging.getLogger(__name__)

CONF_ENV = "SOFTHSM2_CONF"
#: Where SoftHSM 2.6 looks when ``SOFTHSM2_CONF`` is unset (per-user file first).
DEFAULT_CONFS = (
    Path("~/.config/softhsm2/softhsm2.conf").expanduser(),
    Path("/etc/softhsm/softhsm2.conf"),
)
LOCK_NAME = ".securethread.lock"
TOKEN_OBJECT = "token.object"
#: Not ``*.object``: SoftHSM's ``OSToken::index`` ignores it.
COPY_NAME = "token.object.copy"
DAMAGED_SUFFIX = ".damaged"
TMP_SUFFIX = ".securethread-tmp"
#: An object file with no attribute (left by a kill while SoftHSM created it) older than
#: this is moved aside; SoftHSM writes a new object's attributes milliseconds after its file.
LEFTOVER_AGE_S = 60.0

# OSAttributes.h: CKA_VENDOR_SOFTHSM = CKA_VENDOR_DEFINED + 0x5348
_CKA_OS_TOKENLABEL = 0x80005349
_CKA_OS_TOKENSERIAL = 0x8000534A
_CKA_OS_TOKENFLAGS = 0x8000534B
_CKA_OS_SOPIN = 0x8000534C
_CKA_OS_USERPIN = 0x8000534D
_REQUIRED = (_CKA_OS_TOKENLABEL, _CKA_OS_TOKENSERIAL, _CKA_OS_TOKENFLAGS, _CKA_OS_SOPIN)

# ObjectFile.cpp attribute kinds
_BOOLEAN, _ULONG, _BYTESTR, _ATTRMAP, _MECHSET = 1, 2, 3, 4, 5


class ObjectFileError(Exception):
    """An object file does not parse (internal: callers turn it into a repair or an error)."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise ObjectFileError(f"truncated at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def ulong(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def value(self, kind: int) -> object:
        if kind == _BOOLEAN:
            return self.take(1) != b"\x00"
        if kind == _ULONG:
            return self.ulong()
        if kind == _BYTESTR:
            return self.take(self.ulong())
        if kind == _MECHSET:
            return [self.ulong() for _ in range(self.ulong())]
        if kind == _ATTRMAP:
            inner = _Reader(self.take(self.ulong()))
            out = {}
            while inner.pos < len(inner.data):
                attr, sub = inner.ulong(), inner.ulong()
                if sub in (_ATTRMAP,):
                    raise ObjectFileError("nested attribute map")
                out[attr] = inner.value(sub)
            return out
        raise ObjectFileError(f"unknown attribute kind {kind}")


def parse_object_file(data: bytes) -> tuple[int, dict[int, object]]:
    """``(generation, {attribute type: value})`` of a SoftHSM object file, or
    :class:`ObjectFileError` for an empty, truncated or malformed one."""
    if not data:
        raise ObjectFileError("empty")
    r = _Reader(data)
    generation = r.ulong()
    attrs: dict[int, object] = {}
    while r.pos < len(data):
        attr, kind = r.ulong(), r.ulong()
        attrs[attr] = r.value(kind)
    return generation, attrs


@dataclass(frozen=True)
class TokenFile:
    """What a token's ``token.object`` says about it."""

    directory: Path
    label: str
    serial: str
    flags: int
    user_pin_set: bool


def read_token_object(data: bytes, directory: Path) -> TokenFile:
    """Parse a ``token.object``; :class:`ObjectFileError` unless it is complete."""
    _, attrs = parse_object_file(data)
    missing = [a for a in _REQUIRED if a not in attrs]
    if missing:
        raise ObjectFileError(f"no attribute 0x{missing[0]:08x}")
    label, serial, flags = (attrs[a] for a in _REQUIRED[:3])
    if not isinstance(label, bytes) or not isinstance(serial, bytes) or not isinstance(flags, int):
        raise ObjectFileError("token attributes of the wrong kind")
    return TokenFile(
        directory=directory,
        label=label.decode("utf-8", "replace").rstrip(" "),  # CK_UTF8CHAR[32], blank padded
        serial=serial.decode("ascii", "replace"),
        flags=flags,
        user_pin_set=_CKA_OS_USERPIN in attrs,
    )


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _token_file(directory: Path, name: str = TOKEN_OBJECT) -> TokenFile | None:
    data = _read(directory / name)
    if data is None:
        return None
    try:
        return read_token_object(data, directory)
    except ObjectFileError:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) so that a kill at any instant leaves the old
    file or the new one: temporary file, fsync, read back, rename(2), fsync of the directory."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if tmp.read_bytes() != data:
        tmp.unlink()
        raise OSError(f"read-back of {tmp} differs from what was written")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --- the SoftHSM configuration ---------------------------------------------------------


def _conf_path() -> Path:
    env = os.environ.get(CONF_ENV)
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFS[-1]


def _parse_conf(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if eq:
            out[key.strip()] = value.strip()
    return out


def is_softhsm(module_path: str) -> bool:
    return "softhsm" in os.path.basename(module_path).lower()


# --- the inter-process lock ------------------------------------------------------------


class _DirectoryLock:
    """``flock(2)`` on one file; re-entrant within a thread, exclusive across threads and
    processes.  flock locks belong to an open file description, so a process keeps one
    descriptor and counts nested holders itself."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutex = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._pid = os.getpid()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            if self._pid != os.getpid():  # a forked child: the parent's descriptor is not ours
                self._fd, self._depth, self._pid = None, 0, os.getpid()
            if self._depth == 0:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    raise TokenDirectoryError(
                        f"cannot create lock file {str(self.path)!r}: {exc.strerror}"
                    ) from None
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process holds it
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    os.close(self._fd)  # closing the last descriptor releases the flock
                    self._fd = None


_locks_guard = threading.Lock()
_locks: dict[Path, _DirectoryLock] = {}


def _lock_for(tokendir: Path) -> _DirectoryLock:
    path = tokendir / LOCK_NAME
    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = _DirectoryLock(path)
        return lock


# --- the store ---------------------------------------------------------------------------


@dataclass
class RepairReport:
    """What :meth:`FileStore.repair` found: token directories restored from their copy,
    token directories damaged with no usable copy, leftover object files moved aside."""

    restored: list[Path] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)
    moved_aside: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class FileStore:
    """A SoftHSM2 token directory (``directories.tokendir``) with the file backend."""

    conf: Path
    tokendir: Path

    @classmethod
    def from_environment(cls) -> FileStore | None:
        """The store the SoftHSM module will use in this process (``SOFTHSM2_CONF`` or the
        default configuration), ``None`` for a non-file backend, or
        :class:`TokenDirectoryError` naming the missing configuration or directory."""
        conf = _conf_path()
        where = f"(set {CONF_ENV})" if CONF_ENV not in os.environ else f"(from {CONF_ENV})"
        if not conf.is_file():
            raise TokenDirectoryError(
                f"SoftHSM configuration {str(conf)!r} {where} does not exist"
            )
        try:
            settings = _parse_conf(conf.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise TokenDirectoryError(
                f"cannot read SoftHSM configuration {str(conf)!r}: {exc.strerror}"
            ) from None
        if settings.get("objectstore.backend", "file") != "file":
            return None
        value = settings.get("directories.tokendir")
        if not value:
            raise TokenDirectoryError(
                f"SoftHSM configuration {str(conf)!r} names no directories.tokendir"
            )
        tokendir = Path(value)
        if not tokendir.is_dir():
            raise TokenDirectoryError(
                f"token directory {value!r} named in {str(conf)!r} does not exist"
            )
        if not os.access(tokendir, os.R_OK | os.W_OK | os.X_OK):
            raise TokenDirectoryError(
                f"token directory {value!r} named in {str(conf)!r} is not readable and writable"
            )
        return cls(conf=conf.resolve(), tokendir=tokendir.resolve())

    @classmethod
    def for_module(cls, module_path: str) -> FileStore | None:
        """:meth:`from_environment` for a SoftHSM module, ``None`` for any other module."""
        return cls.from_environment() if is_softhsm(module_path) else None

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The directory's inter-process lock (exclusive; re-entrant in a thread)."""
        return _lock_for(self.tokendir).held()

    def token_dirs(self) -> list[Path]:
        try:
            entries = sorted(self.tokendir.iterdir())
        except OSError:
            return []
        return [p for p in entries if p.is_dir() and not p.name.startswith(".")]

    def tokens(self) -> list[TokenFile]:
        """Every token whose ``token.object`` parses (no module needed)."""
        out = []
        for d in self.token_dirs():
            info = _token_file(d)
            if info is not None:
                out.append(info)
        return out

    def damaged(self) -> list[Path]:
        """Token directories whose ``token.object`` neither parses nor has a usable copy."""
        return [
            d
            for d in self.token_dirs()
            if _token_file(d) is None and _token_file(d, COPY_NAME) is None
        ]

    def repair(self) -> RepairReport:
        """Restore damaged ``token.object`` files from their verified copies.  Call with
        :meth:`lock` held, before the module is initialised."""
        report = RepairReport()
        now = time.time()
        for d in self.token_dirs():
            for stale in d.glob("*" + TMP_SUFFIX):
                stale.unlink(missing_ok=True)
            if _token_file(d) is None:
                copy = _read(d / COPY_NAME)
                if copy is not None and _token_file(d, COPY_NAME) is not None:
                    replace_file(d / TOKEN_OBJECT, copy)
                    log.warning("restored %s from its verified copy", d / TOKEN_OBJECT)
                    report.restored.append(d)
                else:
                    log.error("%s is damaged and has no verified copy", d / TOKEN_OBJECT)
                    report.damaged.append(d)
            for obj in d.glob("*.object"):
                if obj.name == TOKEN_OBJECT:
                    continue
                try:
                    st = obj.stat()
                except OSError:
                    continue
                # Only the generation (or nothing): SoftHSM created the file and was killed
                # before writing the object's attributes.  Such a file makes an object
                # search without a template fail (CKR_ATTRIBUTE_VALUE_INVALID).
                if st.st_size <= 8 and now - st.st_mtime > LEFTOVER_AGE_S:
                    target = obj.with_name(obj.name + DAMAGED_SUFFIX)
                    os.replace(obj, target)
                    log.warning("moved aside empty object file %s", obj)
                    report.moved_aside.append(target)
        return report

    def keep_copy(self, *, serial: str, label: str) -> bool:
        """Refresh the verified copy of the ``token.object`` of the token ``serial`` (or,
        failing that, ``label``) before a write-prone call.  Call with :meth:`lock` held.
        Returns whether a copy was written (it is skipped when only SoftHSM's generation
        counter differs)."""
        wrote = False
        infos = self.tokens()
        matches = [t for t in infos if t.serial == serial] or [
            t for t in infos if t.label == label
        ]
        for info in matches:
            current = _read(info.directory / TOKEN_OBJECT)
            if current is None:
                continue
            old = _read(info.directory / COPY_NAME)
            if old is not None and old[8:] == current[8:] and _token_file(
                info.directory, COPY_NAME
            ):
                continue
            replace_file(info.directory / COPY_NAME, current)
            wrote = True
        return wrote
