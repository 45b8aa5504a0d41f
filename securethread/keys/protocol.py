"""The key-backend protocol: what the rest of securethread may ask of a key store.

Two implementations: :class:`securethread.hsm.token.Token` (PKCS#11) and
:class:`securethread.hsm.software.SoftwareBackend` (in-memory, for pure unit tests and
for measuring the cost of the HSM boundary).  Protocol code above this layer never
touches PKCS#11 and never sees secret key bytes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.keys.policy import Curve, KeyPolicy, PolicyReport

#: An AES-256 key wrapped with AES-KWP: the 8-byte AIV block and 32 key bytes (RFC 5649 §4.1).
WRAPPED_AES256_SIZE = 40


@runtime_checkable
class SecretKey(Protocol):
    """An AES-256 key that stays inside its backend."""

    label: str
    key_id: bytes

    def encrypt_gcm(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-GCM (NIST SP 800-38D) with a 96-bit nonce; returns ciphertext || 16-byte tag."""
        ...

    def decrypt_gcm(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`encrypt_gcm`; raises ``DecryptionError`` on a bad tag."""
        ...

    def cmac(self, data: bytes) -> bytes:
        """AES-CMAC (NIST SP 800-38B), 16 bytes; used for key confirmation."""
        ...

    def derive_ecb(self, data: bytes, *, policy: KeyPolicy, label: str = "") -> SecretKey:
        """New AES-256 key = AES-ECB(self, data), data 32 bytes (CKM_AES_ECB_ENCRYPT_DATA)."""
        ...

    def wrap(self, key: SecretKey) -> bytes:
        """Wrap ``key`` with AES-KWP (RFC 5649, CKM_AES_KEY_WRAP_PAD)."""
        ...

    def unwrap(self, wrapped: bytes, *, label: str, key_id: bytes, policy: KeyPolicy) -> SecretKey:
        """Unwrap an AES-256 key (RFC 5649) into the backend under ``policy``; anything else
        (another length, a failed integrity check) is a ``DecryptionError``."""
        ...

    def policy_report(self) -> PolicyReport: ...

    def destroy(self) -> None:
        """Remove the key from the backend (temporary keys must be destroyed after use)."""
        ...


@runtime_checkable
class PrivateKey(Protocol):
    """An EC private key that stays inside its backend.

    ``as_cryptography()`` gives an ``ec.EllipticCurvePrivateKey`` so that
    ``x509.CertificateBuilder.sign()`` and friends work unchanged.
    """

    label: str
    key_id: bytes
    curve: Curve

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA over a precomputed digest; DER-encoded signature (RFC 3279 §2.2.3)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA with SHA-256 (P-256) or SHA-384 (P-384), hashed in Python; DER output."""
        ...

    def derive_aes(
        self, peer: ec.EllipticCurvePublicKey, *, policy: KeyPolicy, label: str = ""
    ) -> SecretKey:
        """ECDH (CKM_ECDH1_DERIVE, CKD_NULL) into a non-extractable AES-256 key."""
        ...

    def agree_and_wrap(
        self, peer: ec.EllipticCurvePublicKey, kdf_input: bytes, key: SecretKey
    ) -> bytes:
        """RFC 5649-wrap ``key`` under KEK = AES-ECB(ECDH(self, peer), ``kdf_input``).

        Equal to ``derive_aes`` (TEMP_DERIVE) -> ``derive_ecb`` (TEMP_WRAP) -> ``wrap``, with
        both temporaries destroyed: the per-device step of a license, as one call.
        """
        ...

    def as_cryptography(self) -> ec.EllipticCurvePrivateKey: ...

    def policy_report(self) -> PolicyReport: ...

    def destroy(self) -> None: ...


@runtime_checkable
class KeyBackend(Protocol):
    """A key store: a PKCS#11 token or the software stand-in."""

    name: str

    def generate_ec(
        self, label: str, *, curve: Curve, policy: KeyPolicy, key_id: bytes | None = None
    ) -> PrivateKey: ...

    def generate_aes(
        self, label: str, *, policy: KeyPolicy, key_id: bytes | None = None
    ) -> SecretKey: ...

    def private_key(self, label: str) -> PrivateKey: ...

    def secret_key(self, label: str) -> SecretKey: ...

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey: ...

    def has_key(self, label: str) -> bool: ...

    def store_certificate(self, label: str, certificate: x509.Certificate) -> None: ...

    def certificate(self, label: str) -> x509.Certificate: ...

    def has_certificate(self, label: str) -> bool: ...

    def random(self, n: int) -> bytes: ...

    def destroy(self, label: str) -> None:
        """Destroy every object labelled ``label``."""
        ...

    def close(self) -> None: ...
