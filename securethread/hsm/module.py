"""Loading a PKCS#11 module once per process, with the library's own locking switched on.

python-pkcs11 calls ``C_Initialize(NULL)``; given NULL, SoftHSM 2.6.1 disables its internal
locking and crashes when two threads use it at once (docs/hsm.md).  PKCS#11 v2.40 §5.4
(C_Initialize) lets the application pass ``CK_C_INITIALIZE_ARGS`` with
``CKF_OS_LOCKING_OK``; we re-initialise the module that way right after loading it, before
any session exists.

For SoftHSM's file store, initialisation reads every token's files, so it runs under the
token directory's inter-process lock, after damaged token files were restored from their
verified copies (:mod:`.filestore`, docs/hsm.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any

import pkcs11

from ..errors import ModuleLoadError
from .filestore import FileStore

#: Where Debian and other distributions put SoftHSM2's module.
SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)

CKF_OS_LOCKING_OK = 0x00000002  # PKCS#11 v2.40 §3.6, CK_C_INITIALIZE_ARGS flags


class _CInitializeArgs(ctypes.Structure):
    # PKCS#11 v2.40 §3.6: CK_C_INITIALIZE_ARGS
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


_lock = threading.Lock()
_loaded: dict[str, tuple[int, Any, FileStore | None]] = {}


def default_module_path() -> str:
    """The module named by ``SECURETHREAD_PKCS11_MODULE``, else the first SoftHSM2 found."""
    env = os.environ.get("SECURETHREAD_PKCS11_MODULE")
    if env:
        return env
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise ModuleLoadError(
        "no PKCS#11 module found: install softhsm2 or set SECURETHREAD_PKCS11_MODULE"
    )


def load_module(path: str) -> Any:
    """Return the loaded ``pkcs11.lib`` for ``path``, initialised with OS locking.

    Idempotent per process.  A forked child re-initialises (PKCS#11 v2.40 §6.7.1: a
    child must call C_Initialize); worker processes should be spawned, not forked.
    For SoftHSM a missing configuration or token directory is a
    :class:`~securethread.errors.TokenDirectoryError` naming it.
    """
    path = os.path.realpath(path)
    pid = os.getpid()
    with _lock:
        cached = _loaded.get(path)
        if cached is not None and cached[0] == pid:
            return cached[1]
        if not os.path.isfile(path):
            raise ModuleLoadError(f"PKCS#11 module {path!r} does not exist")
        store = FileStore.for_module(path)
        with store.lock() if store is not None else contextlib.nullcontext():
            if store is not None:
                store.repair()
            try:
                lib = pkcs11.lib(path)
            except pkcs11.PKCS11Error as exc:
                reason = f"{type(exc).__name__} {exc}".strip()
                raise ModuleLoadError(f"cannot load PKCS#11 module {path!r}: {reason}") from exc
            _reinitialise_with_os_locking(path)
        _loaded[path] = (pid, lib, store)
        return lib


def module_store(path: str) -> FileStore | None:
    """The SoftHSM file store the loaded module ``path`` reads (``None`` for other modules
    or a module not loaded in this process)."""
    cached = _loaded.get(os.path.realpath(path))
    if cached is None or cached[0] != os.getpid():
        return None
    return cached[2]


def reload_module(path: str) -> Any:
    """Finalize and re-initialise ``path`` so it rescans its tokens (and re-reads
    ``SOFTHSM2_CONF``).

    Every session and object handle of the module dies; only call this when nothing is
    open (e.g. after a token was created by ``softhsm2-util`` in another process).
    """
    path = os.path.realpath(path)
    with _lock:
        _loaded.pop(path, None)
    return load_module(path)


def _reinitialise_with_os_locking(path: str) -> None:
    try:
        cdll = ctypes.CDLL(path)  # dlopen of the same path returns the same module instance
        finalize = cdll.C_Finalize
        initialize = cdll.C_Initialize
    except (OSError, AttributeError) as exc:
        raise ModuleLoadError(f"{path!r} does not export C_Initialize/C_Finalize") from exc
    finalize.argtypes = [ctypes.c_void_p]
    initialize.argtypes = [ctypes.c_void_p]
    finalize(None)  # CKR_CRYPTOKI_NOT_INITIALIZED is fine here
    args = _CInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
    rv = initialize(ctypes.byref(args))
    if rv != 0:
        raise ModuleLoadError(f"C_Initialize(CKF_OS_LOCKING_OK) on {path!r} returned 0x{rv:x}")
