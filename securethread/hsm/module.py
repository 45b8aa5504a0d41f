"""Loading a PKCS#11 module once per process, with the library's own locking switched on.

python-pkcs11 calls ``C_Initialize(NULL)``; given NULL, SoftHSM 2.6.1 disables its internal
locking and crashes when two threads use it at once (docs/hsm.md).  PKCS#11 v2.40 §5.4
(C_Initialize) lets the application pass ``CK_C_INITIALIZE_ARGS`` with
``CKF_OS_LOCKING_OK``; we re-initialise the module that way right after loading it, before
any session exists.  The re-initialisation goes through the module's function list
(``C_GetFunctionList``, PKCS#11 v2.40 §5.2 / v3.0 §5.4), the one entry point every module
must export: proxy and remote modules such as p11-kit-proxy and p11-kit-client export
nothing else.

For SoftHSM's file store, initialisation reads every token's files, so it runs under the
token directory's inter-process lock, after damaged token files were restored from their
verified copies (:mod:`.filestore`, docs/hsm.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
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


# PKCS#11 v2.40 §2.1: Cryptoki structures are packed to 1 byte on Windows, natural elsewhere.
_PACK = 1 if sys.platform == "win32" else 0


class _CInitializeArgs(ctypes.Structure):
    # PKCS#11 v2.40 §3.6: CK_C_INITIALIZE_ARGS
    _pack_ = _PACK
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _CVersion(ctypes.Structure):
    # PKCS#11 v2.40 §3.1: CK_VERSION
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


_CK_RV = ctypes.c_ulong
_C_INITIALIZE = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)  # CK_C_Initialize(pInitArgs)
_C_FINALIZE = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)  # CK_C_Finalize(pReserved)


class _CFunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST (PKCS#11 v2.40 §5.2; v3.0 §5.4 keeps the same order and
    CK_FUNCTION_LIST_3_0 extends it): the version, then C_Initialize and C_Finalize.  Only
    these are read, so the rest of the table need not be declared."""

    _pack_ = _PACK
    _fields_ = [
        ("version", _CVersion),
        ("C_Initialize", _C_INITIALIZE),
        ("C_Finalize", _C_FINALIZE),
    ]


_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190  # PKCS#11 v2.40 §3.6 (C_Finalize before C_Initialize)
_CKR_CANT_LOCK = 0x0A

_lock = threading.Lock()
#: path -> (pid, python-pkcs11 lib, SoftHSM file store or None, one shared function table)
_loaded: dict[str, tuple[int, Any, FileStore | None, bool]] = {}


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
            shared = _reinitialise_with_os_locking(path)
        _loaded[path] = (pid, lib, store, shared)
        return lib


def module_store(path: str) -> FileStore | None:
    """The SoftHSM file store the loaded module ``path`` reads (``None`` for other modules
    or a module not loaded in this process)."""
    cached = _loaded.get(os.path.realpath(path))
    if cached is None or cached[0] != os.getpid():
        return None
    return cached[2]


def shares_function_table(path: str) -> bool:
    """True when the loaded module ``path`` gives every caller one function table, so that
    C functions looked up in it act on python-pkcs11's sessions and objects
    (:mod:`.direct`); False for a module that gives each caller a state of its own
    (p11-kit-proxy, p11-kit-client) or one not loaded in this process."""
    cached = _loaded.get(os.path.realpath(path))
    return cached is not None and cached[0] == os.getpid() and cached[3]


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


def _function_list(path: str) -> ctypes._Pointer[_CFunctionListHead]:
    """The module's CK_FUNCTION_LIST, from ``C_GetFunctionList`` (PKCS#11 v2.40 §5.2)."""
    try:
        get_function_list = ctypes.CDLL(path).C_GetFunctionList
    except (OSError, AttributeError) as exc:
        raise ModuleLoadError(
            f"{path!r} is not a PKCS#11 module: it does not export C_GetFunctionList"
        ) from exc
    get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CFunctionListHead))]
    get_function_list.restype = _CK_RV
    table = ctypes.POINTER(_CFunctionListHead)()
    rv = get_function_list(ctypes.byref(table))
    if rv != 0 or not table:
        raise ModuleLoadError(f"C_GetFunctionList on {path!r} returned 0x{rv:x}")
    if not table.contents.C_Initialize or not table.contents.C_Finalize:
        raise ModuleLoadError(f"the function list of {path!r} has no C_Initialize/C_Finalize")
    return table


def _reinitialise_with_os_locking(path: str) -> bool:
    """C_Finalize(NULL), then C_Initialize with CKF_OS_LOCKING_OK, through the function list;
    returns whether the module has one function table for every caller.

    dlopen of the path python-pkcs11 loaded returns the same module instance; a module with
    one static table (SoftHSM and most others) returns python-pkcs11's table again.  A module
    that hands every caller a state of its own (p11-kit-proxy and p11-kit-client do: two
    calls, two tables) is left alone: python-pkcs11's state is not reachable from here, and
    p11-kit initialises the modules behind it with CKF_OS_LOCKING_OK itself (docs/hsm.md).
    """
    first, second = _function_list(path), _function_list(path)
    if ctypes.addressof(first.contents) != ctypes.addressof(second.contents):
        return False
    functions = first.contents
    rv = functions.C_Finalize(None)
    if rv == _CKR_CRYPTOKI_NOT_INITIALIZED:
        return False  # not the state python-pkcs11 initialised: nothing of ours to touch
    if rv != 0:
        raise ModuleLoadError(f"C_Finalize on {path!r} returned 0x{rv:x}")
    args = _CInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
    rv = functions.C_Initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
    if rv == _CKR_CANT_LOCK:
        # PKCS#11 v2.40 §5.4: the module cannot be used from several threads at once
        raise ModuleLoadError(
            f"{path!r} refuses OS locking (CKR_CANT_LOCK): it cannot be shared between threads"
        )
    if rv != 0:
        raise ModuleLoadError(f"C_Initialize(CKF_OS_LOCKING_OK) on {path!r} returned 0x{rv:x}")
    return True
