"""The software key backend: the same protocol as :class:`~securethread.hsm.token.Token`,
in memory, with ``cryptography``.

A real fake for unit tests of pure logic, and the baseline that measures the cost of the
HSM boundary.  It enforces the same key policy (each usage, extractability) and reports the
same attributes as SoftHSM does for a key of the same policy and origin (generated, derived
or unwrapped), so code that works here works on a token; it is *not* a place to keep
production secrets.
"""

from __future__ import annotations

import os
import threading

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import cmac, keywrap
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securethread.errors import (
    DecryptionError,
    DuplicateObjectError,
    KeyNotFoundError,
    KeyPolicyError,
)
from securethread.keys.ecutil import (
    CryptographyKeyAdapter,
    curve_object,
    curve_of,
    digest_for,
    public_from_point,
)
from securethread.keys.policy import TEMP_DERIVE, TEMP_WRAP, Curve, KeyPolicy, PolicyReport, Usage


def _report(
    policy: KeyPolicy, *, private_key: bool, local: bool, always_sensitive: bool, never: bool
) -> PolicyReport:
    """What SoftHSM reports for a key made under ``policy`` from the templates of
    :mod:`securethread.hsm.policy` (PKCS#11 v3.0 §4.4, §4.9-4.10).

    ``always_sensitive``/``never``: whether its value was always sensitive / never
    extractable before this key (False for an unwrapped key; a derived key inherits its
    base's).  CKA_ENCRYPT/VERIFY/WRAP do not exist on an EC private key: False.
    """
    u = policy.usage
    return PolicyReport(
        token=policy.persistent,
        private=True,
        modifiable=False,
        copyable=False,
        destroyable=True,
        sensitive=True,
        extractable=policy.transferable,
        always_sensitive=always_sensitive,
        never_extractable=never and not policy.transferable,
        local=local,
        encrypt=not private_key and bool(u & Usage.ENCIPHER),
        decrypt=not private_key and bool(u & Usage.DECIPHER),
        sign=bool(u & (Usage.SIGN if private_key else Usage.MAC)),
        verify=False,
        wrap=not private_key and bool(u & Usage.WRAP_KEY),
        unwrap=not private_key and bool(u & Usage.UNWRAP_KEY),
        derive=bool(u & Usage.DERIVE),
    )


def _lineage(base: PolicyReport) -> tuple[bool, bool]:
    return base.always_sensitive, base.never_extractable


def _ecdh_key_bytes(shared: bytes) -> bytes:
    # SoftHSM 2.6 with CKD_NULL truncates Z to the key length from the leading end
    # (it keeps the rightmost bytes); for P-256 Z is exactly 32 bytes.
    return shared[-32:]


class SoftwareSecretKey:
    __slots__ = ("_backend", "label", "key_id", "_value", "_policy", "_aead", "_report")

    def __init__(
        self,
        backend: SoftwareBackend,
        *,
        label: str,
        key_id: bytes,
        value: bytes,
        policy: KeyPolicy,
        origin: tuple[bool, bool] | None = None,
    ) -> None:
        """``origin``: (always sensitive, never extractable) of where the value came from --
        the base key of a derivation, ``(False, False)`` for an unwrapped value, ``None``
        for a key generated here."""
        policy.check_secret()  # same usage checks as the token
        self._backend = backend
        self.label = label
        self.key_id = key_id
        self._value = value
        self._policy = policy
        self._aead = AESGCM(value)
        self._report = _report(
            policy,
            private_key=False,
            local=origin is None,
            always_sensitive=origin is None or origin[0],
            never=origin is None or origin[1],
        )

    def __repr__(self) -> str:
        return f"<SoftwareSecretKey {self.label or '(temporary)'}>"

    def _require(self, usage: Usage, what: str) -> None:
        if not self._policy.usage & usage:
            raise KeyPolicyError(f"key {self.label!r} is not allowed to {what}")

    def encrypt_gcm(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        self._require(Usage.ENCIPHER, "encrypt")
        return self._aead.encrypt(nonce, plaintext, aad)

    def decrypt_gcm(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        self._require(Usage.DECIPHER, "decrypt")
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError("AES-GCM authentication failed") from None

    def cmac(self, data: bytes) -> bytes:
        self._require(Usage.MAC, "compute a CMAC")
        c = cmac.CMAC(algorithms.AES(self._value))
        c.update(data)
        return c.finalize()

    def derive_ecb(self, data: bytes, *, policy: KeyPolicy, label: str = "") -> SoftwareSecretKey:
        self._require(Usage.DERIVE, "derive")
        if len(data) != 32:
            raise ValueError("CKM_AES_ECB_ENCRYPT_DATA input must be 32 bytes for AES-256")
        enc = Cipher(algorithms.AES(self._value), modes.ECB()).encryptor()
        value = enc.update(data) + enc.finalize()
        return self._backend._add_secret(label, b"", value, policy, origin=_lineage(self._report))

    def wrap(self, key: object) -> bytes:
        self._require(Usage.WRAP_KEY, "wrap")
        if not isinstance(key, SoftwareSecretKey):
            raise KeyPolicyError("can only wrap a secret key of the same backend")
        if not key._policy.transferable:
            raise KeyPolicyError(f"key {key.label!r} is not extractable")
        return keywrap.aes_key_wrap_with_padding(self._value, key._value)

    def unwrap(
        self, wrapped: bytes, *, label: str, key_id: bytes, policy: KeyPolicy
    ) -> SoftwareSecretKey:
        self._require(Usage.UNWRAP_KEY, "unwrap")
        try:
            value = keywrap.aes_key_unwrap_with_padding(self._value, wrapped)
        except keywrap.InvalidUnwrap:
            raise DecryptionError("wrapped key fails the RFC 5649 integrity check") from None
        if len(value) != 32:
            raise DecryptionError("unwrapped key is not an AES-256 key")
        return self._backend._add_secret(label, key_id, value, policy, origin=(False, False))

    def policy_report(self) -> PolicyReport:
        return self._report

    def destroy(self) -> None:
        self._backend._secrets.pop(self.label, None)


class SoftwarePrivateKey:
    __slots__ = ("_backend", "label", "key_id", "curve", "_key", "_public", "_policy")

    def __init__(
        self,
        backend: SoftwareBackend,
        *,
        label: str,
        key_id: bytes,
        key: ec.EllipticCurvePrivateKey,
        policy: KeyPolicy,
    ) -> None:
        self._backend = backend
        self.label = label
        self.key_id = key_id
        self.curve = curve_of(key)
        self._key = key
        self._public = key.public_key()
        self._policy = policy

    def __repr__(self) -> str:
        return f"<SoftwarePrivateKey {self.label} {self.curve.name}>"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        if not self._policy.usage & Usage.SIGN:
            raise KeyPolicyError(f"key {self.label!r} is not allowed to sign")
        from securethread.keys.ecutil import hash_for

        return self._key.sign(digest, ec.ECDSA(utils.Prehashed(hash_for(self.curve))))

    def sign(self, data: bytes) -> bytes:
        return self.sign_digest(digest_for(self.curve, data))

    def derive_aes(
        self,
        peer: ec.EllipticCurvePublicKey | bytes,
        *,
        policy: KeyPolicy,
        label: str = "",
    ) -> SoftwareSecretKey:
        if not self._policy.usage & Usage.DERIVE:
            raise KeyPolicyError(f"key {self.label!r} is not allowed to derive")
        if isinstance(peer, bytes | bytearray):
            peer = public_from_point(self.curve, bytes(peer))
        if curve_of(peer) is not self.curve:
            raise KeyPolicyError(f"peer key is not on {self.curve.value}")
        shared = self._key.exchange(ec.ECDH(), peer)
        return self._backend._add_secret(
            label, b"", _ecdh_key_bytes(shared), policy, origin=_lineage(self.policy_report())
        )

    def agree_and_wrap(
        self, peer: ec.EllipticCurvePublicKey, kdf_input: bytes, key: object
    ) -> bytes:
        """The token's composite, with the same checks and the same bytes."""
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
        return _report(
            self._policy, private_key=True, local=True, always_sensitive=True, never=True
        )

    def destroy(self) -> None:
        self._backend._privates.pop(self.label, None)


class SoftwareBackend:
    """An in-memory key store implementing :class:`~securethread.hsm.protocol.KeyBackend`."""

    def __init__(self, name: str = "software") -> None:
        self.name = name
        self._privates: dict[str, SoftwarePrivateKey] = {}
        self._secrets: dict[str, SoftwareSecretKey] = {}
        self._certs: dict[str, x509.Certificate] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SoftwareBackend {self.name!r}>"

    def _add_secret(
        self,
        label: str,
        key_id: bytes,
        value: bytes,
        policy: KeyPolicy,
        *,
        origin: tuple[bool, bool] | None = None,
    ) -> SoftwareSecretKey:
        key = SoftwareSecretKey(
            self, label=label, key_id=key_id, value=value, policy=policy, origin=origin
        )
        if policy.persistent:
            with self._lock:
                if label in self._secrets:
                    raise DuplicateObjectError(f"{self.name!r} already has a key {label!r}")
                self._secrets[label] = key
        return key

    def generate_ec(
        self, label: str, *, curve: Curve, policy: KeyPolicy, key_id: bytes | None = None
    ) -> SoftwarePrivateKey:
        policy.check_private()  # same usage checks as the token
        raw = ec.generate_private_key(curve_object(curve))
        if key_id is None:
            # A random CKA_ID, as the token gives (it must be in the creation template).
            key_id = os.urandom(20) if policy.persistent else b""
        key = SoftwarePrivateKey(self, label=label, key_id=key_id, key=raw, policy=policy)
        if policy.persistent:
            with self._lock:
                if label in self._privates:
                    raise DuplicateObjectError(f"{self.name!r} already has a key {label!r}")
                self._privates[label] = key
        return key

    def generate_aes(
        self, label: str, *, policy: KeyPolicy, key_id: bytes | None = None
    ) -> SoftwareSecretKey:
        return self._add_secret(
            label, key_id if key_id is not None else os.urandom(16), os.urandom(32), policy
        )

    def private_key(self, label: str) -> SoftwarePrivateKey:
        try:
            return self._privates[label]
        except KeyError:
            raise KeyNotFoundError(f"{self.name!r} has no private key {label!r}") from None

    def secret_key(self, label: str) -> SoftwareSecretKey:
        try:
            return self._secrets[label]
        except KeyError:
            raise KeyNotFoundError(f"{self.name!r} has no secret key {label!r}") from None

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        return self.private_key(label).public_key()

    def has_key(self, label: str) -> bool:
        return label in self._privates or label in self._secrets

    def store_certificate(self, label: str, certificate: x509.Certificate) -> None:
        with self._lock:
            if label in self._certs:
                raise DuplicateObjectError(f"{self.name!r} already has a certificate {label!r}")
            self._certs[label] = certificate

    def certificate(self, label: str) -> x509.Certificate:
        try:
            return self._certs[label]
        except KeyError:
            raise KeyNotFoundError(f"{self.name!r} has no certificate {label!r}") from None

    def has_certificate(self, label: str) -> bool:
        return label in self._certs

    def random(self, n: int) -> bytes:
        return os.urandom(n)

    def destroy(self, label: str) -> None:
        self._privates.pop(label, None)
        self._secrets.pop(label, None)
        self._certs.pop(label, None)

    def close(self) -> None:
        pass
