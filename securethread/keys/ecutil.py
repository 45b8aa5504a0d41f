"""EC helpers shared by both key backends: point codecs, digests, the cryptography adapter."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.utils import Buffer

from securethread.errors import InvalidPointError, KeyPolicyError
from securethread.keys.policy import Curve

if TYPE_CHECKING:
    from securethread.keys.protocol import PrivateKey

_CURVE_OBJECTS: dict[Curve, ec.EllipticCurve] = {
    Curve.P256: ec.SECP256R1(),
    Curve.P384: ec.SECP384R1(),
}


def curve_object(curve: Curve) -> ec.EllipticCurve:
    return _CURVE_OBJECTS[curve]


def curve_of(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> Curve:
    name = key.curve.name
    for c in Curve:
        if c.value == name:
            return c
    raise KeyPolicyError(f"unsupported curve {name!r} (supported: P-256, P-384)")


def hash_for(curve: Curve) -> hashes.HashAlgorithm:
    """SHA-256 for P-256, SHA-384 for P-384 (NIST SP 800-57: matching security strength)."""
    return hashes.SHA256() if curve is Curve.P256 else hashes.SHA384()


def digest_for(curve: Curve, data: bytes) -> bytes:
    return (hashlib.sha256 if curve is Curve.P256 else hashlib.sha384)(data).digest()


def public_from_point(curve: Curve, point: bytes) -> ec.EllipticCurvePublicKey:
    """Load an uncompressed SEC1 point (X9.62 §4.3.6), refusing points not on the curve."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE_OBJECTS[curve], point)
    except (ValueError, TypeError) as exc:  # TypeError: not a bytes-like point
        raise InvalidPointError(f"EC point is not a valid {curve.name} point: {exc}") from None


def point_of(key: ec.EllipticCurvePublicKey) -> bytes:
    """Uncompressed SEC1 encoding of ``key``."""
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_spki(der: bytes, *, what: str = "public key") -> ec.EllipticCurvePublicKey:
    """Load a canonical DER SubjectPublicKeyInfo holding a P-256/P-384 key, or raise
    FormatError: the hardened loader for keys from outside (securethread.pki.untrusted)."""
    from securethread.pki.untrusted import load_public_key  # pki imports keys: not at top

    return load_public_key(der, what=what)


def fingerprint(key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 over the DER SubjectPublicKeyInfo: the key's identity in every artefact."""
    return hashlib.sha256(spki_der(key)).digest()


def raw_to_der(raw: bytes) -> bytes:
    """PKCS#11 ECDSA output r||s (PKCS#11 v2.40 §2.3.1) to a DER Ecdsa-Sig-Value."""
    half = len(raw) // 2
    return utils.encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


def verify_signature(
    public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, *, what: str
) -> None:
    """Verify an ECDSA signature made by :meth:`PrivateKey.sign`; raise SignatureError."""
    from cryptography.exceptions import InvalidSignature

    from securethread.errors import SignatureError

    try:
        public.verify(signature, data, ec.ECDSA(hash_for(curve_of(public))))
    except InvalidSignature:
        raise SignatureError(f"{what}: signature does not verify") from None


class CryptographyKeyAdapter(ec.EllipticCurvePrivateKey):
    """A backend key dressed as ``ec.EllipticCurvePrivateKey`` for signing only.

    ``x509.CertificateBuilder.sign()`` and ``CertificateSigningRequestBuilder.sign()``
    call ``sign(data, ECDSA(hash))``; we hash in Python and let the backend sign the
    digest.  Everything that would expose the private value raises.
    """

    __slots__ = ("_key",)

    def __init__(self, key: PrivateKey) -> None:
        self._key = key

    @property
    def backend_key(self) -> PrivateKey:
        return self._key

    @property
    def curve(self) -> ec.EllipticCurve:
        return _CURVE_OBJECTS[self._key.curve]

    @property
    def key_size(self) -> int:
        return self._key.curve.bits

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise KeyPolicyError("only ECDSA signatures are supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            return self._key.sign_digest(bytes(data))
        h = hashes.Hash(algorithm)
        h.update(bytes(data))
        return self._key.sign_digest(h.finalize())

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._refuse("raw ECDH output (use derive_aes)")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._refuse("private numbers")

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        self._refuse("private key bytes")

    def __copy__(self) -> CryptographyKeyAdapter:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CryptographyKeyAdapter:
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CryptographyKeyAdapter) and other._key is self._key

    def __hash__(self) -> int:
        return id(self._key)

    def _refuse(self, what: str) -> NoReturn:
        raise KeyPolicyError(f"{what} of key {self._key.label!r} cannot leave the key store")
