"""The silicon vendor's signed lot manifest: the chips of one lot and their public keys.

What a vendor ships beside a lot of chips (zero-secret programming, docs/formats.md "Lot
manifest"): one COSE_Sign1 (RFC 9052 §4.2, envelope kind ``lot-manifest``) signed by the
vendor's device-identity CA key itself -- the key the OEM names, so there is no lot-signing
certificate to validate -- over one canonical CBOR body::

    {"v": 1, "lot_id": tstr, "device_class": tstr, "vendor_ca": bstr(32),
     "chips": [[device_id tstr, public_key bstr(65)], ...]}

``vendor_ca`` is :func:`securethread.formats.identity.vendor_ca_id` of the signing CA (it
must be the signature's ``kid``); ``public_key`` is the chip's P-256 key as an uncompressed
SEC1 point (SEC 1 v2 §2.3.3, one encoding per key, S6); chips are in strictly ascending
device-id order, so a chip listed twice is seen at once and every lot has one encoding.

One signature over the whole lot, not one per chip (Microchip's manifests are an array of
JWS objects, one per chip): verifying 100,000 per-chip signatures costs about 65 us each
(6.5 s); one signature over 9 MB costs a hash, and a chip is then identified by a dictionary
lookup of its key (:attr:`VerifiedLot.by_key`).

:func:`verify_lot` verifies the signature under the vendor CAs the *OEM* names (S2: before
the body is parsed) and decodes strictly: a lot signed by another CA, tampered, truncated,
oversized, with a chip twice or one key for two chips is refused with its own error.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, SignatureError, VerificationError
from securethread.formats import fields
from securethread.formats.envelope import UnknownSignerError, open_signed, seal
from securethread.formats.identity import DEVICE_ID_RE, vendor_ca_id
from securethread.formats.image import NAME_RE
from securethread.formats.job import JOB_ID_RE
from securethread.keys.protocol import PrivateKey

__all__ = [
    "LOT_KIND",
    "MAX_LOT_CHIPS",
    "MAX_LOT_SIZE",
    "DuplicateChipError",
    "LotChip",
    "LotError",
    "LotFormatError",
    "LotManifest",
    "LotSignatureError",
    "LotSignerError",
    "LotSizeError",
    "ReusedKeyError",
    "VerifiedLot",
    "key_id_of_point",
    "sign_lot",
    "verify_lot",
]

VERSION = 1
LOT_KIND = "lot-manifest"
#: A lot of up to 250,000 chips; 16 + 65 bytes and CBOR framing each: about 22 MB.
MAX_LOT_CHIPS = 250_000
MAX_LOT_SIZE = 24 << 20
POINT_SIZE = 65
#: DER SubjectPublicKeyInfo of a P-256 key up to its 65-byte point (RFC 5480 §2): id-ecPublicKey,
#: secp256r1, BIT STRING of 66 octets.  SHA-256(prefix || point) is the key's fingerprint
#: (:func:`securethread.keys.ecutil.fingerprint`) without building a key object.
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
#: P-256's field prime and curve coefficient b (SEC 2 v2 §2.4.2; a = -3).
_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B


class LotError(VerificationError):
    """A lot manifest is refused."""


class LotFormatError(LotError, FormatError):
    """A lot manifest is malformed, truncated, out of order or of an unknown version."""


class LotSizeError(LotFormatError):
    """A lot manifest is larger than :data:`MAX_LOT_SIZE` or lists too many chips."""


class LotSignerError(LotError, SignatureError):
    """A lot manifest is signed by a key that is not a vendor CA the OEM names."""


class LotSignatureError(LotError, SignatureError):
    """A lot manifest's signature does not verify (it was altered after signing)."""


class DuplicateChipError(LotError):
    """A lot manifest lists one device id twice."""


class ReusedKeyError(LotError):
    """A lot manifest gives one public key to two chips."""


def key_id_of_point(point: bytes) -> bytes:
    """SHA-256 of the SPKI DER of the P-256 key whose uncompressed point is ``point``."""
    return hashlib.sha256(_P256_SPKI_PREFIX + point).digest()


def _on_p256(point: bytes) -> bool:
    """SEC 1 v2 §3.2.2.1 for an uncompressed P-256 point: x, y < p and y^2 = x^3 - 3x + b
    (mod p); P-256 has cofactor 1, so a point on the curve is in the group.  About 3 us in
    Python, against about 6 us for building a ``cryptography`` key, which is done only
    when a key is used (:meth:`LotChip.public_key`)."""
    x = int.from_bytes(point[1:33], "big")
    y = int.from_bytes(point[33:65], "big")
    return x < _P and y < _P and (y * y - (x * x * x - 3 * x + _B)) % _P == 0


def split_body(
    body: Any, field: str, *, what: str, error: type[FormatError]
) -> tuple[dict[str, Any], Any]:
    """A body made of a header (a :func:`~securethread.formats.fields.body` class) and one
    list ``field`` decoded on its own (a lot's chips, a package's, confirmations): the
    header's map and the raw ``field``, once ``body`` is a map holding it; else ``error``."""
    if type(body) is not dict:
        raise error(f"{what}: must be a CBOR map")
    rest = dict(body)
    if field not in rest:
        raise error(f"{what}: missing field {field!r}")
    raw = rest.pop(field)
    return rest, raw


@attrs.frozen
class LotChip:
    """One chip of a verified lot: its UID, its key as a checked SEC1 point, the key's id
    (:func:`key_id_of_point`)."""

    device_id: str
    point: bytes = attrs.field(repr=False)
    key_id: bytes = attrs.field(repr=False)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The chip's key (the point was checked on the curve when the lot was decoded)."""
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.point)


@fields.body("lot manifest", error=LotFormatError)
@attrs.frozen(kw_only=True)
class _LotHeader:
    """The scalar fields of a lot body (the chips are decoded by :func:`_decode_chips`)."""

    lot_id: str = fields.text("lot_id", max_len=64, pattern=JOB_ID_RE)
    device_class: str = fields.text("device_class", max_len=64, pattern=NAME_RE)
    vendor_ca: bytes = fields.byte_string("vendor_ca", size=32)
    version: int = fields.version(VERSION)


@attrs.frozen(kw_only=True)
class LotManifest:
    """A lot's content: build it from chips (the vendor) or from a verified body."""

    lot_id: str
    device_class: str
    vendor_ca: bytes
    chips: tuple[LotChip, ...] = attrs.field(repr=lambda c: f"<{len(c)} chips>")

    @classmethod
    def build(
        cls,
        *,
        lot_id: str,
        device_class: str,
        vendor_ca: x509.Certificate,
        chips: Iterable[tuple[str, ec.EllipticCurvePublicKey]],
    ) -> LotManifest:
        """The manifest of ``chips`` (device id, key), sorted and checked as a verifier will."""
        raw = []
        for device_id, key in chips:
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                raise LotFormatError(f"lot manifest: chip {device_id!r} key is not P-256")
            raw.append(
                [
                    device_id,
                    key.public_bytes(
                        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                    ),
                ]
            )
        raw.sort(key=lambda c: c[0] if isinstance(c[0], str) else "")
        header = _LotHeader(
            lot_id=lot_id, device_class=device_class, vendor_ca=vendor_ca_id(vendor_ca)
        )
        return cls._from(header, _decode_chips(raw))

    @classmethod
    def _from(cls, header: _LotHeader, chips: tuple[LotChip, ...]) -> LotManifest:
        return cls(
            lot_id=header.lot_id,
            device_class=header.device_class,
            vendor_ca=header.vendor_ca,
            chips=chips,
        )

    def to_body(self) -> dict[str, Any]:
        header = _LotHeader(
            lot_id=self.lot_id, device_class=self.device_class, vendor_ca=self.vendor_ca
        )
        return {**fields.encode(header), "chips": [[c.device_id, c.point] for c in self.chips]}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LotManifest:
        """Strict decode of a (verified) body: the header's fields, then every chip."""
        rest, chips = split_body(body, "chips", what="lot manifest", error=LotFormatError)
        header = fields.decode(_LotHeader, rest)
        return cls._from(header, _decode_chips(chips))


def _decode_chips(raw: Any) -> tuple[LotChip, ...]:
    """Every chip: ``[device_id, point]``, ids strictly ascending, no key twice.

    The per-chip cost is dominated by the point's curve check (:func:`_on_p256`)."""
    if type(raw) is not list:
        raise LotFormatError("lot manifest: field 'chips' must be a list")
    if not 1 <= len(raw) <= MAX_LOT_CHIPS:
        raise LotSizeError(f"lot manifest: {len(raw)} chips, must be 1..{MAX_LOT_CHIPS}")
    out: list[LotChip] = []
    seen_points: dict[bytes, str] = {}
    previous = ""
    on_curve = _on_p256
    match = DEVICE_ID_RE.fullmatch
    for i, entry in enumerate(raw):
        if type(entry) is not list or len(entry) != 2:
            raise LotFormatError(f"lot manifest: chip {i} is not [device_id, public_key]")
        device_id, point = entry
        if type(device_id) is not str or match(device_id) is None:
            raise LotFormatError(
                f"lot manifest: chip {i}: device id {device_id!r} is not 16 lowercase hex digits"
            )
        if device_id <= previous:
            if device_id == previous:
                raise DuplicateChipError(f"lot manifest: chip {device_id} is listed twice")
            raise LotFormatError(
                f"lot manifest: chip {device_id} is out of order (ids strictly ascending)"
            )
        previous = device_id
        if type(point) is not bytes or len(point) != POINT_SIZE or point[0] != 4:
            raise LotFormatError(
                f"lot manifest: chip {device_id}: public key is not a 65-byte uncompressed "
                "SEC1 point"
            )
        other = seen_points.get(point)
        if other is not None:
            raise ReusedKeyError(
                f"lot manifest: chips {other} and {device_id} have the same public key"
            )
        seen_points[point] = device_id
        if not on_curve(point):
            raise LotFormatError(
                f"lot manifest: chip {device_id}: public key is not a point on P-256"
            )
        out.append(LotChip(device_id, point, key_id_of_point(point)))
    return tuple(out)


@attrs.frozen
class VerifiedLot:
    """A lot manifest verified under a vendor CA the OEM named: what later code trusts.

    ``sha256`` is the envelope's content id (what the signature covers, never its framing);
    ``vendor`` the named CA certificate whose key signed it."""

    manifest: LotManifest
    sha256: bytes
    vendor: x509.Certificate = attrs.field(repr=False)
    by_key: Mapping[bytes, LotChip] = attrs.field(repr=False, eq=False)
    by_id: Mapping[str, LotChip] = attrs.field(repr=False, eq=False)

    @property
    def lot_id(self) -> str:
        return self.manifest.lot_id

    def __len__(self) -> int:
        return len(self.manifest.chips)


class _CryptographySigner:
    """A ``cryptography`` EC key as an envelope signer (the simulated vendor's CA key)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def sign_lot(manifest: LotManifest, key: ec.EllipticCurvePrivateKey | PrivateKey) -> bytes:
    """The vendor signs ``manifest`` with its device-identity CA key (COSE_Sign1)."""
    signer = (
        cast(PrivateKey, _CryptographySigner(key))
        if isinstance(key, ec.EllipticCurvePrivateKey)
        else key
    )
    return seal(LOT_KIND, manifest.to_body(), [signer])


def verify_lot(data: bytes, *, vendor_cas: Sequence[x509.Certificate]) -> VerifiedLot:
    """Verify a lot under one of ``vendor_cas`` (the OEM's choice, never the lot's), then
    decode it strictly (see the module docstring)."""
    if type(data) is not bytes:
        raise LotFormatError("lot manifest: not bytes")
    if len(data) > MAX_LOT_SIZE:
        raise LotSizeError(f"lot manifest: {len(data)} bytes, more than {MAX_LOT_SIZE}")
    keys: dict[bytes, ec.EllipticCurvePublicKey] = {}
    certs: dict[bytes, x509.Certificate] = {}
    for cert in vendor_cas:
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise LotSignerError("a vendor CA must hold an EC key")
        keys[vendor_ca_id(cert)] = key
        certs[vendor_ca_id(cert)] = cert
    if not keys:
        raise LotSignerError("no vendor CA is named to verify the lot under")
    paused = gc.isenabled()
    gc.disable()  # 100,000s of acyclic objects are decoded and built: no collection meanwhile
    try:
        return _verify(data, keys, certs)
    finally:
        if paused:
            gc.enable()


def _verify(
    data: bytes,
    keys: Mapping[bytes, ec.EllipticCurvePublicKey],
    certs: Mapping[bytes, x509.Certificate],
) -> VerifiedLot:
    try:
        opened = open_signed(data, kind=LOT_KIND, keys=keys, max_size=MAX_LOT_SIZE)
    except UnknownSignerError:
        raise LotSignerError(
            "lot manifest: signed by a key that is not a vendor CA the OEM names"
        ) from None
    except SignatureError as exc:
        raise LotSignatureError(f"lot manifest: signature does not verify ({exc})") from None
    except FormatError as exc:
        raise LotFormatError(f"lot manifest: {exc}") from None
    manifest = LotManifest.from_body(opened.body)
    by_key = {c.key_id: c for c in manifest.chips}
    by_id = {c.device_id: c for c in manifest.chips}
    signer = opened.signers[0]
    if manifest.vendor_ca != signer:
        raise LotSignerError(
            f"lot manifest: names vendor CA {manifest.vendor_ca.hex()[:16]}, signed by "
            f"{signer.hex()[:16]}"
        )
    return VerifiedLot(
        manifest=manifest,
        sha256=opened.content_id,
        vendor=certs[signer],
        by_key=by_key,
        by_id=by_id,
    )
