"""The PKCS#11 key backend: one token, logged in once per process, one session per thread.

Facts this module is built on (docs/hsm.md, PKCS#11 v2.40):

* login state is per application and token (§5.6 C_Login): we log in once on a long-lived
  session and open every other session without a PIN;
* session objects are visible to all sessions of the application but die with the session
  that created them (§4.4): temporary keys are destroyed explicitly after use;
* object lookup is linear in the number of objects: handles are cached per thread;
* concurrent object create/destroy from several threads breaks SoftHSM 2.6.1
  (SoftHSMv2 #573): those calls are serialised by a per-token lock.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import pkcs11
from asn1crypto.core import OctetString
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import KDF, Attribute, CertificateType, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from securethread.keys.ecutil import (
    CryptographyKeyAdapter,
    curve_of,
    digest_for,
    point_of,
    public_from_point,
)

from ..errors import (
    ConfigurationError,
    DecryptionError,
    DuplicateObjectError,
    HSMError,
    KeyNotFoundError,
    KeyPolicyError,
    PinIncorrectError,
    TokenDamagedError,
    TokenNotFoundError,
)
from ..keys.policy import Curve, KeyPolicy, PolicyReport
from ..keys.protocol import WRAPPED_AES256_SIZE
from .filestore import FileStore
from .module import default_module_path, load_module, module_store, reload_module
from .pin import PinCallback, resolve_pin
from .policy import (
    REPORT_ATTRIBUTES,
    certificate_template,
    private_template,
    public_template,
    report_from_attributes,
    secret_template,
)
from .uri import PKCS11URI

_EC_OIDS = {
    Curve.P256: encode_named_curve_parameters("secp256r1"),
    Curve.P384: encode_named_curve_parameters("secp384r1"),
}
_CURVE_BY_PARAMS = {v: k for k, v in _EC_OIDS.items()}


@contextmanager
def _p11(what: str) -> Iterator[None]:
    """Convert PKCS#11 exceptions into :class:`HSMError`, keeping the cause."""
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise HSMError(f"{what}: {type(exc).__name__} {exc}".rstrip()) from exc


#: How a token refuses a key for a mechanism.  python-pkcs11 0.10.1 has no exception for
#: CKR_KEY_FUNCTION_NOT_PERMITTED (it only gives an object the methods its CKA_SIGN,
#: CKA_DERIVE, ... attributes allow; see :func:`_usage`).
_KEY_REFUSED = (pkcs11.KeyTypeInconsistent,)


def _usage(obj: Any, method: str, label: str, what: str) -> Any:
    """The bound PKCS#11 operation ``method`` of ``obj``, or :class:`KeyPolicyError`.

    python-pkcs11 builds each object's class from its usage attributes (PKCS#11 v2.40
    §4.8): a key without CKA_SIGN has no ``sign`` method at all, so calling it would be an
    ``AttributeError`` rather than a token error.
    """
    fn = getattr(obj, method, None)
    if fn is None:
        raise KeyPolicyError(f"key {label!r} is not allowed to {what}")
    return fn


def _store_lock(store: FileStore | None) -> AbstractContextManager[None]:
    return store.lock() if store is not None else nullcontext()


def _get_token(lib: Any, label: str, store: FileStore | None, module_path: str) -> Any:
    """The python-pkcs11 token labelled ``label``; call with the store's lock held."""
    try:
        return lib.get_token(token_label=label)
    except pkcs11.NoSuchToken:
        if store is None:
            where = f"module {module_path!r}"
        else:
            where = f"token directory {str(store.tokendir)!r} (SOFTHSM2_CONF={str(store.conf)!r})"
            damaged = store.damaged()
            if damaged:
                names = ", ".join(d.name for d in damaged)
                raise TokenDamagedError(
                    f"no token labelled {label!r} in {where}, and {len(damaged)} token(s) "
                    f"there are damaged with no verified copy ({names}): restore them "
                    "from a backup"
                ) from None
        raise TokenNotFoundError(f"no token labelled {label!r} in {where}") from None
    except pkcs11.MultipleTokensReturned:
        raise TokenNotFoundError(f"more than one token labelled {label!r}") from None
    except pkcs11.PKCS11Error as exc:
        raise HSMError(f"cannot read token {label!r}: {type(exc).__name__}") from exc


def key_id_for(public: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-1 of the public point, RFC 5280 §4.2.1.2 method (1): the certificates'
    SubjectKeyIdentifier.

    Not the CKA_ID of generated pairs: the point exists only after generation, and a
    non-modifiable key cannot be given an attribute afterwards (PKCS#11 v3.0 §4.4), so
    :meth:`Token.generate_ec` puts a random CKA_ID in the creation template instead.
    """
    return hashlib.sha1(point_of(public)).digest()  # noqa: S324 - an identifier, not a MAC


class Token:
    """A logged-in PKCS#11 token.  Safe to share between threads; one per process.

    Use :func:`open_token` rather than the constructor: it returns the process's existing
    instance for a token that is already open (a second login would fail).
    """

    def __init__(self, *, module_path: str, label: str, pin: Callable[[], str]) -> None:
        self.module_path = module_path
        self.name = label
        self._pid = os.getpid()
        lib = load_module(module_path)
        store = module_store(module_path)
        # SoftHSM reads the token file here and rewrites it on login: both under the token
        # directory's inter-process lock, with a verified copy taken first (.filestore).
        with _store_lock(store):
            self._p11_token = _get_token(lib, label, store, module_path)
        secret = pin()  # outside the lock: the callback may prompt
        with _store_lock(store):
            if store is not None:
                serial = bytes(self._p11_token.serial).decode("ascii", "replace")
                store.keep_copy(serial=serial, label=label)
            try:
                self._login_session = self._p11_token.open(rw=True, user_pin=secret)
            except pkcs11.PinIncorrect:
                raise PinIncorrectError(f"token {label!r} rejected the user PIN") from None
            except pkcs11.PinLocked:
                raise PinIncorrectError(f"token {label!r}: user PIN is locked") from None
            except pkcs11.PKCS11Error as exc:
                raise HSMError(f"cannot log in to token {label!r}: {type(exc).__name__}") from exc
            finally:
                del secret
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._caches: list[dict[Any, Any]] = []  # every thread's handle cache
        self._objects_lock = threading.Lock()  # SoftHSMv2 #573
        self._sessions_lock = threading.Lock()
        self._private_keys: dict[str, HsmPrivateKey] = {}
        self._secret_keys: dict[str, HsmSecretKey] = {}
        self._refs = 1
        self._closed = False

    def __repr__(self) -> str:
        return f"<Token {self.name!r}>"

    # --- sessions and lookups ------------------------------------------------------------

    def _state(self) -> threading.local:
        local = self._local
        if not hasattr(local, "session"):
            if self._closed:
                raise HSMError(f"token {self.name!r} is closed")
            if os.getpid() != self._pid:
                raise HSMError("a Token cannot be used across fork(); open it in the child")
            with self._sessions_lock:
                if not self._sessions:
                    session = self._login_session
                else:
                    with _p11(f"open session on {self.name!r}"):
                        session = self._p11_token.open(rw=True)
                self._sessions.append(session)
            local.session = session
            local.cache = {}
            with self._sessions_lock:
                self._caches.append(local.cache)
        return local

    @property
    def session(self) -> Any:
        """This thread's ``pkcs11.Session``."""
        return self._state().session

    def _find(self, object_class: ObjectClass, label: str) -> Any:
        state = self._state()
        key = (object_class, label)
        obj = state.cache.get(key)
        if obj is None:
            objs = list(
                state.session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label})
            )
            if not objs:
                raise KeyNotFoundError(
                    f"token {self.name!r} has no {object_class.name.lower()} labelled {label!r}"
                )
            if len(objs) > 1:
                raise HSMError(f"token {self.name!r} has {len(objs)} objects labelled {label!r}")
            obj = state.cache[key] = objs[0]
        return obj

    def _forget(self, object_class: ObjectClass, label: str) -> None:
        # Every thread's cache, not just this one's: a handle another thread cached for a
        # destroyed object would otherwise fail with ObjectHandleInvalid (or, were the
        # label re-created, keep naming the old object).
        with self._sessions_lock:
            for cache in self._caches:
                cache.pop((object_class, label), None)

    def _exists(self, object_class: ObjectClass, label: str) -> bool:
        try:
            self._find(object_class, label)
        except KeyNotFoundError:
            return False
        return True

    # --- key generation ------------------------------------------------------------------

    def generate_ec(
        self, label: str, *, curve: Curve, policy: KeyPolicy, key_id: bytes | None = None
    ) -> HsmPrivateKey:
        """Generate an EC key pair inside the token under ``policy`` (S1).

        Persistent keys get a random 20-byte CKA_ID unless ``key_id`` is given; it is in the
        creation template of both halves, which are non-modifiable (docs/keys.md).
        """
        if policy.persistent and self._exists(ObjectClass.PRIVATE_KEY, label):
            raise DuplicateObjectError(f"token {self.name!r} already has a key {label!r}")
        if key_id is None and policy.persistent:
            key_id = os.urandom(20)
        session = self.session
        with self._objects_lock, _p11(f"generate EC key {label!r}"):
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: _EC_OIDS[curve]}, local=True
            )
            pub, priv = params.generate_keypair(
                store=policy.persistent,
                label=label,
                id=key_id or b"",
                public_template=public_template(policy),
                private_template=private_template(policy),
            )
            public = public_from_point(curve, OctetString.load(pub[Attribute.EC_POINT]).native)
        key = HsmPrivateKey(
            self,
            label=label,
            key_id=key_id or b"",
            curve=curve,
            public=public,
            handle=None if policy.persistent else priv,
        )
        if not policy.persistent:
            key._temp_public = pub
        else:
            self._private_keys[label] = key
        return key

    def generate_aes(
        self, label: str, *, policy: KeyPolicy, key_id: bytes | None = None
    ) -> HsmSecretKey:
        """Generate an AES-256 key inside the token under ``policy`` (S1)."""
        if policy.persistent and self._exists(ObjectClass.SECRET_KEY, label):
            raise DuplicateObjectError(f"token {self.name!r} already has a key {label!r}")
        key_id = key_id if key_id is not None else os.urandom(16)
        with self._objects_lock, _p11(f"generate AES key {label!r}"):
            obj = self.session.generate_key(
                KeyType.AES,
                256,
                label=label,
                id=key_id,
                store=policy.persistent,
                template=secret_template(policy),
            )
        return HsmSecretKey(
            self, label=label, key_id=key_id, handle=None if policy.persistent else obj
        )

    # --- lookups by label ----------------------------------------------------------------

    def private_key(self, label: str) -> HsmPrivateKey:
        """The EC private key ``label`` (its public half must be in the token too)."""
        key = self._private_keys.get(label)
        if key is not None:
            return key
        priv = self._find(ObjectClass.PRIVATE_KEY, label)
        with _p11(f"read key {label!r}"):
            if priv.key_type != KeyType.EC:
                raise KeyPolicyError(f"key {label!r} is not an EC key")
            params = priv[Attribute.EC_PARAMS]
            key_id = priv[Attribute.ID]
        curve = _CURVE_BY_PARAMS.get(bytes(params))
        if curve is None:
            raise KeyPolicyError(f"key {label!r} is on an unsupported curve")
        public = self.public_key(label)
        key = HsmPrivateKey(self, label=label, key_id=key_id, curve=curve, public=public)
        self._private_keys[label] = key
        return key

    def secret_key(self, label: str) -> HsmSecretKey:
        key = self._secret_keys.get(label)
        if key is not None:
            return key
        obj = self._find(ObjectClass.SECRET_KEY, label)
        with _p11(f"read key {label!r}"):
            if obj.key_type != KeyType.AES:
                raise KeyPolicyError(f"key {label!r} is not an AES key")
            key_id = obj[Attribute.ID]
        key = HsmSecretKey(self, label=label, key_id=key_id)
        self._secret_keys[label] = key
        return key

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        pub = self._find(ObjectClass.PUBLIC_KEY, label)
        with _p11(f"read public key {label!r}"):
            params = bytes(pub[Attribute.EC_PARAMS])
            point = OctetString.load(pub[Attribute.EC_POINT]).native
        curve = _CURVE_BY_PARAMS.get(params)
        if curve is None:
            raise KeyPolicyError(f"key {label!r} is on an unsupported curve")
        return public_from_point(curve, point)

    def has_key(self, label: str) -> bool:
        return any(
            self._exists(cls, label) for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY)
        )

    def labels(self, object_class: ObjectClass = ObjectClass.PRIVATE_KEY) -> list[str]:
        with _p11("list objects"):
            return sorted(
                o[Attribute.LABEL]
                for o in self.session.get_objects({Attribute.CLASS: object_class})
            )

    # --- certificates --------------------------------------------------------------------

    def store_certificate(self, label: str, certificate: x509.Certificate) -> None:
        """Store ``certificate`` as a CKO_CERTIFICATE with its key's label and CKA_ID."""
        key_id = b""
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            try:
                key_id = self._find(cls, label)[Attribute.ID]
                break
            except KeyNotFoundError:
                continue
        if self._exists(ObjectClass.CERTIFICATE, label):
            raise DuplicateObjectError(f"token {self.name!r} already has a certificate {label!r}")
        der = certificate.public_bytes(serialization.Encoding.DER)
        with self._objects_lock, _p11(f"store certificate {label!r}"):
            self.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    **certificate_template(),
                    Attribute.LABEL: label,
                    Attribute.ID: key_id,
                    Attribute.SUBJECT: certificate.subject.public_bytes(),
                    Attribute.ISSUER: certificate.issuer.public_bytes(),
                    Attribute.SERIAL_NUMBER: _der_integer(certificate.serial_number),
                    Attribute.VALUE: der,
                }
            )

    def certificate(self, label: str) -> x509.Certificate:
        obj = self._find(ObjectClass.CERTIFICATE, label)
        with _p11(f"read certificate {label!r}"):
            der = bytes(obj[Attribute.VALUE])
        return x509.load_der_x509_certificate(der)

    def has_certificate(self, label: str) -> bool:
        return self._exists(ObjectClass.CERTIFICATE, label)

    # --- misc ----------------------------------------------------------------------------

    def random(self, n: int) -> bytes:
        with _p11("generate random"):
            return bytes(self.session.generate_random(8 * n))

    def destroy(self, label: str) -> None:
        """Destroy every object (key pair halves, certificate) labelled ``label``."""
        with self._objects_lock, _p11(f"destroy {label!r}"):
            for obj in list(self.session.get_objects({Attribute.LABEL: label})):
                obj.destroy()
        for cls in (
            ObjectClass.PRIVATE_KEY,
            ObjectClass.PUBLIC_KEY,
            ObjectClass.SECRET_KEY,
            ObjectClass.CERTIFICATE,
        ):
            self._forget(cls, label)
        self._private_keys.pop(label, None)
        self._secret_keys.pop(label, None)

    def _destroy_object(self, obj: Any) -> None:
        with self._objects_lock, _p11("destroy temporary object"):
            obj.destroy()

    def close(self) -> None:
        """Close every session (the login session last, which logs the process out)."""
        with _registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            _registry.pop((self.module_path, self.name, self._pid), None)
        self._closed = True
        with self._sessions_lock:
            for s in reversed(self._sessions):
                if s is not self._login_session:
                    _close_quietly(s)
            _close_quietly(self._login_session)
            self._sessions.clear()

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except pkcs11.PKCS11Error:
        pass


def _der_integer(n: int) -> bytes:
    from asn1crypto.core import Integer

    return bytes(Integer(n).dump())


class HsmPrivateKey:
    """An EC private key inside a token.  Persistent keys are looked up per thread."""

    __slots__ = ("_token", "label", "key_id", "curve", "_public", "_handle", "_temp_public")

    def __init__(
        self,
        token: Token,
        *,
        label: str,
        key_id: bytes,
        curve: Curve,
        public: ec.EllipticCurvePublicKey,
        handle: Any = None,
    ) -> None:
        self._token = token
        self.label = label
        self.key_id = key_id
        self.curve = curve
        self._public = public
        self._handle = handle  # set for session (temporary) keys only
        self._temp_public: Any = None

    def __repr__(self) -> str:
        return f"<HsmPrivateKey {self._token.name}/{self.label} {self.curve.name}>"

    def _obj(self) -> Any:
        if self._handle is not None:
            return self._handle
        return self._token._find(ObjectClass.PRIVATE_KEY, self.label)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        from securethread.keys.ecutil import raw_to_der

        obj = self._obj()
        try:
            raw = _usage(obj, "sign", self.label, "sign")(digest, mechanism=Mechanism.ECDSA)
        except _KEY_REFUSED as exc:
            raise KeyPolicyError(f"key {self.label!r} is not allowed to sign") from exc
        except pkcs11.PKCS11Error as exc:
            raise HSMError(f"sign with {self.label!r}: {type(exc).__name__}") from exc
        return raw_to_der(raw)

    def sign(self, data: bytes) -> bytes:
        return self.sign_digest(digest_for(self.curve, data))

    def _peer_point(self, peer: ec.EllipticCurvePublicKey | bytes) -> bytes:
        """The peer's uncompressed point, after checking it is on this key's curve."""
        if isinstance(peer, bytes | bytearray):
            peer = public_from_point(self.curve, bytes(peer))
        if curve_of(peer) is not self.curve:
            raise KeyPolicyError(
                f"peer key is on {peer.curve.name}, key {self.label!r} on {self.curve.value}"
            )
        return point_of(peer)

    def derive_aes(
        self,
        peer: ec.EllipticCurvePublicKey | bytes,
        *,
        policy: KeyPolicy,
        label: str = "",
    ) -> HsmSecretKey:
        point = self._peer_point(peer)
        derive_key = _usage(self._obj(), "derive_key", self.label, "derive")
        token = self._token
        try:
            with token._objects_lock:
                # PKCS#11 v2.40 §2.3.14: CKM_ECDH1_DERIVE; SoftHSM 2.6 only has CKD_NULL.
                derived = derive_key(
                    KeyType.AES,
                    256,
                    label=label,
                    store=policy.persistent,
                    mechanism=Mechanism.ECDH1_DERIVE,
                    mechanism_param=(KDF.NULL, None, point),
                    template=secret_template(policy),
                )
        except _KEY_REFUSED as exc:
            raise KeyPolicyError(f"key {self.label!r} is not allowed to derive") from exc
        except pkcs11.PKCS11Error as exc:
            raise HSMError(f"ECDH with {self.label!r}: {type(exc).__name__}") from exc
        return HsmSecretKey(
            token, label=label, key_id=b"", handle=None if policy.persistent else derived
        )

    def agree_and_wrap(
        self, peer: ec.EllipticCurvePublicKey, kdf_input: bytes, key: object
    ) -> bytes:
        """RFC 5649-wrap ``key`` under AES-ECB(ECDH(self, peer), ``kdf_input``), in the token.

        The same bytes as ``derive_aes`` -> ``derive_ecb`` -> ``wrap`` with TEMP_DERIVE and
        TEMP_WRAP temporaries, in five direct C calls (see :mod:`.direct`).
        """
        from .direct import calls_for

        if not isinstance(key, HsmSecretKey) or key._token is not self._token:
            raise KeyPolicyError("can only wrap a secret key of the same token")
        token = self._token
        calls = calls_for(token.module_path)
        if calls is None:  # a proxy or remote module (p11-kit): the same steps, via python-pkcs11
            return self._agree_and_wrap_stepwise(peer, kdf_input, key)
        point = self._peer_point(peer)
        base, target = self._obj().handle, key._obj().handle
        with token._objects_lock:
            return calls.agree_and_wrap(token.session.handle, base, point, kdf_input, target)

    def _agree_and_wrap_stepwise(
        self, peer: ec.EllipticCurvePublicKey, kdf_input: bytes, key: HsmSecretKey
    ) -> bytes:
        """derive_aes (TEMP_DERIVE) -> derive_ecb (TEMP_WRAP) -> wrap, temporaries destroyed."""
        from ..keys.policy import TEMP_DERIVE, TEMP_WRAP

        if len(kdf_input) != 32:
            raise ValueError("CKM_AES_ECB_ENCRYPT_DATA input must be 32 bytes for AES-256")
        z = self.derive_aes(peer, policy=TEMP_DERIVE)
        try:
            kek = z.derive_ecb(kdf_input, policy=TEMP_WRAP)
            try:
                return kek.wrap(key)
            finally:
                kek.destroy()
        finally:
            z.destroy()

    def as_cryptography(self) -> ec.EllipticCurvePrivateKey:
        return CryptographyKeyAdapter(self)

    def policy_report(self) -> PolicyReport:
        attributes = REPORT_ATTRIBUTES[ObjectClass.PRIVATE_KEY]
        with _p11(f"read attributes of {self.label!r}"):
            return report_from_attributes(self._obj().get_attributes(attributes))

    def destroy(self) -> None:
        if self._handle is None:
            self._token.destroy(self.label)
            return
        self._token._destroy_object(self._handle)
        if self._temp_public is not None:
            self._token._destroy_object(self._temp_public)
        self._handle = self._temp_public = None


class HsmSecretKey:
    """An AES-256 key inside a token."""

    __slots__ = ("_token", "label", "key_id", "_handle")

    def __init__(self, token: Token, *, label: str, key_id: bytes, handle: Any = None) -> None:
        self._token = token
        self.label = label
        self.key_id = key_id
        self._handle = handle

    def __repr__(self) -> str:
        return f"<HsmSecretKey {self._token.name}/{self.label or '(temporary)'}>"

    def _obj(self) -> Any:
        if self._handle is not None:
            return self._handle
        return self._token._find(ObjectClass.SECRET_KEY, self.label)

    def encrypt_gcm(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        if len(nonce) != 12:
            raise ValueError("GCM nonce must be 96 bits")
        with _p11(f"AES-GCM encrypt with {self.label!r}"):
            return bytes(
                _usage(self._obj(), "encrypt", self.label, "encrypt")(
                    plaintext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=pkcs11.GCMParams(nonce, aad, 128),
                )
            )

    def decrypt_gcm(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        if len(nonce) != 12:
            raise ValueError("GCM nonce must be 96 bits")
        if len(ciphertext) < 16:
            raise DecryptionError("AES-GCM ciphertext shorter than its tag")
        decrypt = _usage(self._obj(), "decrypt", self.label, "decrypt")
        try:
            return bytes(
                decrypt(
                    ciphertext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=pkcs11.GCMParams(nonce, aad, 128),
                )
            )
        except (pkcs11.GeneralError, pkcs11.EncryptedDataInvalid) as exc:
            # SoftHSM 2.6.1 reports a bad GCM tag as CKR_GENERAL_ERROR (docs/hsm.md).
            raise DecryptionError("AES-GCM authentication failed") from exc
        except pkcs11.PKCS11Error as exc:
            raise HSMError(f"AES-GCM decrypt with {self.label!r}: {exc!r}") from exc

    def cmac(self, data: bytes) -> bytes:
        with _p11(f"AES-CMAC with {self.label!r}"):
            sign = _usage(self._obj(), "sign", self.label, "compute a CMAC")
            return bytes(sign(data, mechanism=Mechanism.AES_CMAC))

    def derive_ecb(self, data: bytes, *, policy: KeyPolicy, label: str = "") -> HsmSecretKey:
        if len(data) != 32:
            raise ValueError("CKM_AES_ECB_ENCRYPT_DATA input must be 32 bytes for AES-256")
        derive_key = _usage(self._obj(), "derive_key", self.label, "derive")
        try:
            with self._token._objects_lock:
                # PKCS#11 v2.40 §2.10.x: CKM_AES_ECB_ENCRYPT_DATA, value = AES-ECB(base, data).
                derived = derive_key(
                    KeyType.AES,
                    256,
                    label=label,
                    store=policy.persistent,
                    mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                    mechanism_param=data,
                    template=secret_template(policy),
                )
        except _KEY_REFUSED as exc:
            raise KeyPolicyError(f"key {self.label!r} is not allowed to derive") from exc
        except pkcs11.PKCS11Error as exc:
            raise HSMError(f"derive from {self.label!r}: {type(exc).__name__}") from exc
        return HsmSecretKey(
            self._token, label=label, key_id=b"", handle=None if policy.persistent else derived
        )

    def wrap(self, key: object) -> bytes:
        if not isinstance(key, HsmSecretKey) or key._token is not self._token:
            raise KeyPolicyError("can only wrap a secret key of the same token")
        wrap_key = _usage(self._obj(), "wrap_key", self.label, "wrap")
        try:
            # RFC 5649 via CKM_AES_KEY_WRAP_PAD (PKCS#11 v2.40 §2.14.4).
            return bytes(wrap_key(key._obj(), mechanism=Mechanism.AES_KEY_WRAP_PAD))
        except pkcs11.KeyUnextractable as exc:
            raise KeyPolicyError(f"key {key.label!r} is not extractable") from exc
        except _KEY_REFUSED as exc:
            raise KeyPolicyError(f"key {self.label!r} is not a wrapping key") from exc
        except pkcs11.PKCS11Error as exc:
            raise HSMError(f"wrap with {self.label!r}: {type(exc).__name__}") from exc

    def unwrap(
        self, wrapped: bytes, *, label: str, key_id: bytes, policy: KeyPolicy
    ) -> HsmSecretKey:
        token = self._token
        # Refused before C_UnwrapKey creates anything, as the software backend refuses it:
        # RFC 5649 §4.1 wraps 25..32 bytes in 40, and SoftHSM 2.6.1 keeps the padding of a
        # shorter payload (it stores len(wrapped) - 8 bytes, measured): so 40 bytes is an
        # AES-256 key in the token, anything else an AES-128/192 key or some other secret.
        # A token that strips the padding and reports CKA_VALUE_LEN is checked after it.
        if len(wrapped) != WRAPPED_AES256_SIZE:
            raise DecryptionError(
                f"unwrapped key is not an AES-256 key ({len(wrapped)} wrapped bytes, "
                f"RFC 5649 wraps one in {WRAPPED_AES256_SIZE})"
            )
        if policy.persistent and token._exists(ObjectClass.SECRET_KEY, label):
            raise DuplicateObjectError(f"token {token.name!r} already has a key {label!r}")
        unwrap_key = _usage(self._obj(), "unwrap_key", self.label, "unwrap")
        try:
            with token._objects_lock:
                obj = unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.AES,
                    wrapped,
                    label=label,
                    id=key_id,
                    store=policy.persistent,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD,
                    template=secret_template(policy),
                )
        except (pkcs11.WrappedKeyInvalid, pkcs11.WrappedKeyLenRange, pkcs11.GeneralError) as exc:
            raise DecryptionError("wrapped key fails the RFC 5649 integrity check") from exc
        except _KEY_REFUSED as exc:
            raise KeyPolicyError(f"key {self.label!r} is not an unwrapping key") from exc
        except pkcs11.PKCS11Error as exc:
            raise HSMError(f"unwrap with {self.label!r}: {type(exc).__name__}") from exc
        with _p11(f"read the length of unwrapped key {label!r}"):
            length = obj[Attribute.VALUE_LEN]  # 0 on SoftHSM 2.6.1: it does not set it
        if length not in (0, 32):  # PKCS#11 v2.40 §2.8.2: CKA_VALUE_LEN in bytes
            with token._objects_lock:
                obj.destroy()
            raise DecryptionError(f"unwrapped key is not an AES-256 key ({length} bytes)")
        if not policy.persistent:
            return HsmSecretKey(token, label=label, key_id=key_id, handle=obj)
        return token.secret_key(label)

    def policy_report(self) -> PolicyReport:
        attributes = REPORT_ATTRIBUTES[ObjectClass.SECRET_KEY]
        with _p11(f"read attributes of {self.label!r}"):
            return report_from_attributes(self._obj().get_attributes(attributes))

    def destroy(self) -> None:
        if self._handle is None:
            self._token.destroy(self.label)
        else:
            self._token._destroy_object(self._handle)
            self._handle = None


# --- opening tokens --------------------------------------------------------------------------

_registry_lock = threading.Lock()
_registry: dict[tuple[str, str, int], Token] = {}


def open_token(
    uri_or_label: str | PKCS11URI,
    *,
    module_path: str | None = None,
    pin: PinCallback | None = None,
) -> Token:
    """Open (or re-use this process's open) token, by RFC 7512 URI or by label.

    ``open_token("pkcs11:token=oem?module-path=/usr/lib/softhsm/libsofthsm2.so")`` or
    ``open_token("oem")``.  The PIN comes from ``pin`` (a callback given the label, e.g. a
    :class:`~securethread.hsm.pin.PinSet` a worker process received), else the URI's
    pin-value/pin-source, else :func:`~securethread.hsm.pin.resolve_pin`'s sources; it is
    never stored.
    """
    if isinstance(uri_or_label, PKCS11URI):
        uri: PKCS11URI | None = uri_or_label
    elif uri_or_label.lower().startswith("pkcs11:"):
        uri = PKCS11URI.parse(uri_or_label)
    else:
        uri = None
    label = uri.token if uri is not None else str(uri_or_label)
    if not label:
        from ..errors import URIError

        raise URIError("PKCS#11 URI does not name a token (token=...)")
    module = (uri.module_path if uri is not None else None) or module_path
    module = os.path.realpath(module or default_module_path())
    key = (module, label, os.getpid())
    with _registry_lock:
        existing = _registry.get(key)
        if existing is not None:
            existing._refs += 1
            return existing

        def get_pin() -> str:
            return resolve_pin(
                label,
                callback=pin,
                pin_value=uri.pin_value if uri is not None else None,
                pin_source=uri.pin_source if uri is not None else None,
            )

        _follow_configuration(module)
        token = Token(module_path=module, label=label, pin=get_pin)
        _registry[key] = token
        return token


def _follow_configuration(module: str) -> None:
    """Re-initialise ``module`` if ``SOFTHSM2_CONF`` now names another token directory than
    the one it was loaded with; refuse while a token of it is open.  Call with
    ``_registry_lock`` held."""
    loaded = module_store(module)
    if loaded is None:
        return
    wanted = FileStore.for_module(module)
    if wanted is None or wanted.conf == loaded.conf:
        return
    if any(k[0] == module and k[2] == os.getpid() for k in _registry):
        raise ConfigurationError(
            f"this process has tokens of {str(loaded.conf)!r} open; open the tokens of "
            f"{str(wanted.conf)!r} in another process"
        )
    reload_module(module)
