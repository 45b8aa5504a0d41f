"""Direct PKCS#11 calls for the one per-device key operation of the license hot path.

``agree_and_wrap`` is ECDH -> KEK derivation -> RFC 5649 wrap -> destroy the two temporaries:
five C calls.  Through python-pkcs11 each derived key also costs a C_GetAttributeValue of ten
attributes and a new Python class (``make_object`` builds one per object): an ECDH derive plus
destroy took 173 us that way and 109 us as direct calls, and the license step went from 499 to
337 us per device (docs/performance.md).  Here the
mechanisms and templates are built once, the C functions are called through ``ctypes`` on
the module python-pkcs11 already loaded (``dlopen`` of the same path returns the same
instance), with python-pkcs11's session and object handles.

Nothing here decides a key attribute: the templates are :func:`.policy.secret_template`
of ``TEMP_DERIVE`` and ``TEMP_WRAP``, in its order (session objects, sensitive, never
extractable, non-modifiable, non-copyable; Z may only derive, the KEK only wrap); the token
enforces each key's usage attributes itself (``CKR_KEY_FUNCTION_NOT_PERMITTED``).  The key
wrapped is the programmer's PROGRAMMER_IMAGE_KEY, which has no usage: C_WrapKey needs only
its CKA_EXTRACTABLE.
Structures follow PKCS#11 v2.40 Base Specification §3 (CK_MECHANISM, CK_ATTRIBUTE) and the
Current Mechanisms document ("EC mechanism parameters": CK_ECDH1_DERIVE_PARAMS; "Key
derivation by data encryption": CK_KEY_DERIVATION_STRING_DATA); CK_ULONG is ``unsigned long``
and structures are not packed on Unix.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from ..errors import HSMError, KeyPolicyError
from ..keys.policy import TEMP_DERIVE, TEMP_WRAP, KeyPolicy
from .module import shares_function_table
from .policy import secret_template

_ULONG = ctypes.c_ulong
_BBOOL = ctypes.c_ubyte

CKD_NULL = 0x00000001  # CK_EC_KDF_TYPE: the raw shared secret, no KDF

#: Return values that mean "this key may not be used for this" (PKCS#11 v2.40 §5.1).
_POLICY_RVS = {
    0x63: "CKR_KEY_TYPE_INCONSISTENT",
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x69: "CKR_KEY_NOT_WRAPPABLE",
    0x6A: "CKR_KEY_UNEXTRACTABLE",
}
_OTHER_RVS = {
    0x05: "CKR_GENERAL_ERROR",
    0x06: "CKR_FUNCTION_FAILED",
    0x07: "CKR_ARGUMENTS_BAD",
    0x60: "CKR_KEY_HANDLE_INVALID",
    0x70: "CKR_MECHANISM_INVALID",
    0x71: "CKR_MECHANISM_PARAM_INVALID",
    0x82: "CKR_OBJECT_HANDLE_INVALID",
    0xB3: "CKR_SESSION_HANDLE_INVALID",
    0x150: "CKR_BUFFER_TOO_SMALL",
}


class _Mechanism(ctypes.Structure):  # CK_MECHANISM
    _fields_ = [("mechanism", _ULONG), ("pParameter", ctypes.c_void_p), ("ulParameterLen", _ULONG)]


class _Attribute(ctypes.Structure):  # CK_ATTRIBUTE
    _fields_ = [("type", _ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", _ULONG)]


class _Ecdh1DeriveParams(ctypes.Structure):  # CK_ECDH1_DERIVE_PARAMS
    _fields_ = [
        ("kdf", _ULONG),
        ("ulSharedDataLen", _ULONG),
        ("pSharedData", ctypes.c_void_p),
        ("ulPublicDataLen", _ULONG),
        ("pPublicData", ctypes.c_void_p),
    ]


class _KeyDerivationStringData(ctypes.Structure):  # CK_KEY_DERIVATION_STRING_DATA
    _fields_ = [("pData", ctypes.c_void_p), ("ulLen", _ULONG)]


class _Template:
    """A CK_ATTRIBUTE array for an AES-256 session key under ``policy``; owns its values."""

    def __init__(self, policy: KeyPolicy) -> None:
        if policy.persistent or policy.transferable:
            raise KeyPolicyError("direct calls only create temporary, non-extractable keys")
        values: list[tuple[int, Any]] = [
            (Attribute.CLASS, _ULONG(ObjectClass.SECRET_KEY)),
            (Attribute.KEY_TYPE, _ULONG(KeyType.AES)),
            (Attribute.VALUE_LEN, _ULONG(32)),
        ]
        for attr, flag in secret_template(policy).items():
            values.append((attr, _BBOOL(1 if flag else 0)))
        self._values = [v for _, v in values]  # keep the buffers alive
        self.array = (_Attribute * len(values))(
            *(
                _Attribute(int(a), ctypes.cast(ctypes.byref(v), ctypes.c_void_p), ctypes.sizeof(v))
                for a, v in values
            )
        )
        self.count = _ULONG(len(values))


class Calls:
    """The C functions of one loaded module, with the hot path's templates built once."""

    def __init__(self, module_path: str) -> None:
        try:
            lib = ctypes.CDLL(module_path)
            self._derive = lib.C_DeriveKey
            self._wrap = lib.C_WrapKey
            self._destroy = lib.C_DestroyObject
        except (OSError, AttributeError) as exc:
            raise HSMError(f"{module_path!r} does not export the PKCS#11 key functions") from exc
        handle, ulong_p = _ULONG, ctypes.POINTER(_ULONG)
        mech_p, attr_p = ctypes.POINTER(_Mechanism), ctypes.POINTER(_Attribute)
        # C_DeriveKey(hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey)
        self._derive.argtypes = [handle, mech_p, handle, attr_p, _ULONG, ulong_p]
        # C_WrapKey(hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen)
        self._wrap.argtypes = [handle, mech_p, handle, handle, ctypes.c_char_p, ulong_p]
        # C_DestroyObject(hSession, hObject)
        self._destroy.argtypes = [handle, handle]
        for fn in (self._derive, self._wrap, self._destroy):
            fn.restype = _ULONG
        self._z_template = _Template(TEMP_DERIVE)
        self._kek_template = _Template(TEMP_WRAP)
        self._kwp = _Mechanism(Mechanism.AES_KEY_WRAP_PAD, None, 0)

    def agree_and_wrap(
        self, session: int, agreement_key: int, peer_point: bytes, kdf_input: bytes, key: int
    ) -> bytes:
        """ECDH(agreement_key, peer) -> Z; KEK = AES-ECB(Z, kdf_input); KWP(KEK, key).

        Z and KEK are session objects created from the TEMP_* templates and destroyed before
        returning, also on failure.  The caller serialises object creation (SoftHSMv2 #573).
        """
        if len(kdf_input) != 32:
            raise ValueError("CKM_AES_ECB_ENCRYPT_DATA input must be 32 bytes for AES-256")
        s = _ULONG(session)
        point = ctypes.create_string_buffer(peer_point, len(peer_point))
        # CKM_ECDH1_DERIVE ("Elliptic curve Diffie-Hellman key derivation"): the value is Z
        # truncated from the leading end to CKA_VALUE_LEN; SoftHSM 2.6 takes only CKD_NULL.
        ecdh = _Ecdh1DeriveParams(CKD_NULL, 0, None, len(peer_point), ctypes.addressof(point))
        ecdh_mech = _Mechanism(Mechanism.ECDH1_DERIVE, ctypes.addressof(ecdh), ctypes.sizeof(ecdh))
        data = ctypes.create_string_buffer(kdf_input, 32)
        # CKM_AES_ECB_ENCRYPT_DATA ("Key derivation by data encryption"): AES-ECB(base, data).
        ecb = _KeyDerivationStringData(ctypes.addressof(data), 32)
        ecb_mech = _Mechanism(
            Mechanism.AES_ECB_ENCRYPT_DATA, ctypes.addressof(ecb), ctypes.sizeof(ecb)
        )
        z, kek = _ULONG(0), _ULONG(0)
        try:
            self._check(
                self._derive(
                    s,
                    ctypes.byref(ecdh_mech),
                    _ULONG(agreement_key),
                    self._z_template.array,
                    self._z_template.count,
                    ctypes.byref(z),
                ),
                "ECDH derive",
            )
            self._check(
                self._derive(
                    s,
                    ctypes.byref(ecb_mech),
                    z,
                    self._kek_template.array,
                    self._kek_template.count,
                    ctypes.byref(kek),
                ),
                "KEK derive",
            )
            # CKM_AES_KEY_WRAP_PAD = RFC 5649 key wrap with padding: 32 -> 40 bytes.
            out = ctypes.create_string_buffer(64)
            out_len = _ULONG(64)
            self._check(
                self._wrap(
                    s, ctypes.byref(self._kwp), kek, _ULONG(key), out, ctypes.byref(out_len)
                ),
                "wrap",
            )
            wrapped = out.raw[: out_len.value]
        finally:
            # Both temporaries go, whatever happened above; a failed destroy is reported
            # (a leaked session object slows every later lookup), unless already failing.
            rvs = [self._destroy(s, h) for h in (kek, z) if h.value]
        for rv in rvs:
            self._check(rv, "destroy temporary key")
        return wrapped

    @staticmethod
    def _check(rv: int, what: str) -> None:
        if rv == 0:
            return
        if rv in _POLICY_RVS:
            raise KeyPolicyError(f"{what} refused by the token: {_POLICY_RVS[rv]}")
        raise HSMError(f"{what} failed: {_OTHER_RVS.get(rv, f'CKR 0x{rv:x}')}")


_calls_lock = threading.Lock()
_calls: dict[str, Calls | None] = {}


def calls_for(module_path: str) -> Calls | None:
    """The (process-wide, cached) direct calls for an already loaded module; None when its
    exported functions do not act on python-pkcs11's sessions (a module that gives each
    caller a state of its own, such as p11-kit-proxy or p11-kit-client, or exports only
    C_GetFunctionList): the caller then goes through python-pkcs11."""
    module_path = os.path.realpath(module_path)
    with _calls_lock:
        if module_path not in _calls:
            try:
                _calls[module_path] = (
                    Calls(module_path) if shares_function_table(module_path) else None
                )
            except HSMError:
                _calls[module_path] = None
        return _calls[module_path]
