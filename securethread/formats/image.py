"""Encrypted firmware images: chunked AES-GCM inside the token, and a signed manifest.

Layout of an encrypted image (all integers big-endian; see docs/image.md)::

    "STIMAGE\\0" || u16 header length || header (canonical CBOR)
    chunk_0 || chunk_1 || ... || chunk_{n-1}      each = AES-GCM ciphertext || 16-byte tag

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes.  Chunk ``i`` uses

* nonce = ``nonce_prefix`` (8 random bytes, one per image) || u32(i): NIST SP 800-38D §8.2.1
  deterministic construction, the prefix being the fixed field that tells images apart and the
  index the invocation field, so within one image nonces never repeat (§8.2.1 requires no
  repetition for a given key);  across images under one key, distinct prefixes are random
  (§8.2.2 style): the chance two of ``m`` images collide is about m²/2⁶⁵, and §8.3's cap of
  2³² invocations per key bounds ``m`` × chunks far below any realistic use (an image key serves
  one product line, a handful of images);
* AAD = "securethread-image-chunk\\0" || SHA-256(header bytes) || u32(i) || u8(final),

so a flipped bit, a reordered or swapped chunk (another index or another image's header), a
dropped final chunk or an appended one all fail the tag check.  The manifest (envelope kind
``"manifest"``) binds the header hash, both SHA-256 digests, lengths, version, security counter
and device class; it is verified before the first chunk is decrypted.

The plaintext is a signed MCUboot image (:mod:`securethread.formats.mcuboot`): :func:`master_image`
builds it around the firmware, and the manifest (version 2) binds its digest.

Zero-length images are refused (:class:`ImageSizeError`): an empty firmware is never a valid
boot image, and refusing it keeps "at least one final chunk" an invariant of the format.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol, cast

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securethread.errors import (
    ConfigurationError,
    DecryptionError,
    FormatError,
    ImageError,
    SignatureError,
)
from securethread.formats import cbor, fields, mcuboot
from securethread.formats.envelope import open_envelope, seal
from securethread.keys.protocol import PrivateKey

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAX_IMAGE_SIZE",
    "AesGcmKey",
    "ChunkAuthenticationError",
    "DigestMismatchError",
    "ImageFormatError",
    "ImageHeader",
    "ImageKeyMismatchError",
    "ImageSizeError",
    "Manifest",
    "ManifestMismatchError",
    "ManifestSignatureError",
    "TruncatedImageError",
    "check_name",
    "decrypt_image",
    "encrypt_image",
    "master_image",
    "read_header",
    "sign_manifest",
    "verify_manifest",
]

FORMAT_VERSION = 2
#: Manifest v3 (issue 21: COSE framing; since v2 the plaintext it binds is a signed MCUboot
#: image, formats/mcuboot.py, whose version and security counter are the manifest's); v1 and
#: v2 are no longer read.
MANIFEST_VERSION = 3
MAGIC = b"STIMAGE\x00"
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 1 << 24
#: Default upper bound on a plaintext image (4 GiB); callers may lower it (device flash size).
MAX_IMAGE_SIZE = 1 << 32
MAX_HEADER_SIZE = 1024
MAX_MANIFEST_SIZE = 4096
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 8
MANIFEST_KIND = "manifest"

_AAD_LABEL = b"securethread-image-chunk\x00"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
NAME_RE = _NAME_RE  # image ids, versions, device classes (other formats carry them too)
_MAX_INDEX = 1 << 32


# --- errors ------------------------------------------------------------------------------


class ImageFormatError(ImageError, FormatError):
    """An image header or manifest is malformed, non-canonical or of an unknown version."""


class ImageSizeError(ImageError):
    """An image is empty or larger than the allowed maximum."""


class ManifestSignatureError(ImageError, SignatureError):
    """The manifest is not signed by the trusted firmware-signing key."""


class ManifestMismatchError(ImageError):
    """The image header does not match the (verified) manifest."""


class ImageKeyMismatchError(ImageError):
    """The key offered for decryption is not the image's key."""


class ChunkAuthenticationError(ImageError, DecryptionError):
    """A chunk failed AES-GCM authentication: altered, reordered, foreign, or a wrong final."""


class TruncatedImageError(ImageError):
    """The encrypted image ended before the manifest says it should."""


class DigestMismatchError(ImageError):
    """A SHA-256 over the plaintext or the ciphertext differs from the manifest."""


# --- keys --------------------------------------------------------------------------------


class GcmKey(Protocol):
    """What the image code needs of a key: a token ``SecretKey`` or :class:`AesGcmKey`."""

    key_id: bytes

    def encrypt_gcm(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes: ...

    def decrypt_gcm(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes: ...


class AesGcmKey:
    """A software AES-256-GCM key (the device side, after the license is unwrapped)."""

    __slots__ = ("key_id", "_aead")

    def __init__(self, key: bytes, *, key_id: bytes = b"") -> None:
        if len(key) != 32:
            raise ValueError("image keys are AES-256")
        self.key_id = key_id
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"<AesGcmKey id={self.key_id.hex() or '?'}>"

    def encrypt_gcm(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def decrypt_gcm(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError("AES-GCM authentication failed") from None


# --- value objects -----------------------------------------------------------------------


def check_name(what: str, value: object) -> str:
    """Image ids, versions and device classes: 1-64 characters of [A-Za-z0-9._+-]."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ImageFormatError(f"{what} {value!r} is not 1-64 characters of [A-Za-z0-9._+-]")
    return value


def _name(what: str) -> Any:
    def check(_inst: object, _attr: object, value: object) -> None:
        check_name(what, value)

    return check


def _uint(what: str, lo: int, hi: int) -> Any:
    def check(_inst: object, _attr: object, value: object) -> None:
        if type(value) is not int or not lo <= value <= hi:
            raise ImageFormatError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")

    return check


def _octets(what: str, lo: int, hi: int | None = None) -> Any:
    hi = lo if hi is None else hi

    def check(_inst: object, _attr: object, value: object) -> None:
        if not isinstance(value, bytes) or not lo <= len(value) <= hi:
            raise ImageFormatError(f"{what} must be {lo}..{hi} bytes")

    return check


def _mcuboot_version() -> Any:
    """An image version the MCUboot header can carry: imgtool's major[.minor[.rev[+build]]]."""

    def check(_inst: object, _attr: object, value: object) -> None:
        check_name("image version", value)
        try:
            mcuboot.ImageVersion.parse(cast(str, value))
        except mcuboot.McubootFormatError as exc:
            raise ImageFormatError(str(exc)) from None

    return check


def _fields(
    data: Any, keys: frozenset[str], what: str, version: int = FORMAT_VERSION
) -> Mapping[str, Any]:
    if not isinstance(data, dict) or set(data) != keys:
        raise ImageFormatError(f"{what}: unexpected or missing fields")
    if not cbor.is_version(data["v"], version):
        raise ImageFormatError(f"{what}: unsupported format version {data['v']!r}")
    return data


@fields.body("image header", error=ImageFormatError)
@attrs.frozen(kw_only=True)
class ImageHeader:
    """The clear header in front of the chunks; its SHA-256 is bound into every chunk's AAD."""

    image_id: str = fields.text("image_id", max_len=64, pattern=NAME_RE)
    image_key_id: bytes = fields.byte_string("key_id", min_len=1, max_len=64)
    chunk_size: int = fields.integer("chunk_size", lo=MIN_CHUNK_SIZE, hi=MAX_CHUNK_SIZE)
    nonce_prefix: bytes = fields.byte_string("nonce_prefix", size=NONCE_PREFIX_SIZE)
    version: int = fields.version(FORMAT_VERSION)

    def to_bytes(self) -> bytes:
        body = cbor.encode(fields.encode(self))
        return MAGIC + len(body).to_bytes(2, "big") + body

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageHeader:
        """Parse the complete header (magic, length, CBOR), exactly."""
        if len(data) > MAX_HEADER_SIZE or len(data) < len(MAGIC) + 2:
            raise ImageFormatError("image header: bad size")
        if data[: len(MAGIC)] != MAGIC:
            raise ImageFormatError("not a securethread encrypted image (bad magic)")
        n = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 2], "big")
        if n != len(data) - len(MAGIC) - 2:
            raise ImageFormatError("image header: length field does not match")
        try:
            raw = cbor.decode(data[len(MAGIC) + 2 :], what="image header")
        except FormatError as exc:
            raise ImageFormatError(str(exc)) from None
        return fields.decode(cls, raw)


def read_header(src: BinaryIO) -> tuple[ImageHeader, bytes]:
    """Read and parse the header at the start of ``src``; return it and its exact bytes."""
    fixed = _read_full(src, len(MAGIC) + 2)
    if len(fixed) < len(MAGIC) + 2:
        raise TruncatedImageError("image ends inside its header")
    if fixed[: len(MAGIC)] != MAGIC:
        raise ImageFormatError("not a securethread encrypted image (bad magic)")
    n = int.from_bytes(fixed[len(MAGIC) :], "big")
    if n > MAX_HEADER_SIZE - len(fixed):
        raise ImageFormatError(f"image header of {n} bytes exceeds the limit")
    body = _read_full(src, n)
    if len(body) < n:
        raise TruncatedImageError("image ends inside its header")
    raw = fixed + body
    return ImageHeader.from_bytes(raw), raw


@attrs.frozen(kw_only=True)
class Manifest:
    """What the firmware-signing key vouches for (the body of a ``manifest`` envelope)."""

    image_id: str = attrs.field(validator=_name("image id"))
    image_version: str = attrs.field(validator=_mcuboot_version())
    security_counter: int = attrs.field(validator=_uint("security counter", 0, 2**32 - 1))
    device_class: str = attrs.field(validator=_name("device class"))
    plaintext_length: int = attrs.field(validator=_uint("plaintext length", 1, 2**64 - 1))
    plaintext_sha256: bytes = attrs.field(validator=_octets("plaintext SHA-256", 32))
    ciphertext_sha256: bytes = attrs.field(validator=_octets("ciphertext SHA-256", 32))
    chunk_size: int = attrs.field(validator=_uint("chunk size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE))
    nonce_prefix: bytes = attrs.field(validator=_octets("nonce prefix", NONCE_PREFIX_SIZE))
    header_sha256: bytes = attrs.field(validator=_octets("header SHA-256", 32))
    image_key_id: bytes = attrs.field(validator=_octets("image key id", 1, 64))
    version: int = attrs.field(
        default=MANIFEST_VERSION, validator=_uint("version", MANIFEST_VERSION, MANIFEST_VERSION)
    )

    _KEYS = frozenset(
        {
            "v",
            "image_id",
            "image_version",
            "security_counter",
            "device_class",
            "plaintext_length",
            "plaintext_sha256",
            "ciphertext_sha256",
            "chunk_size",
            "nonce_prefix",
            "header_sha256",
            "image_key_id",
        }
    )

    def __attrs_post_init__(self) -> None:
        if self.chunk_count > _MAX_INDEX:
            raise ImageFormatError("manifest: more chunks than 32-bit nonce indices")

    @property
    def chunk_count(self) -> int:
        return -(-self.plaintext_length // self.chunk_size)

    @property
    def ciphertext_length(self) -> int:
        """Exact length of the encrypted image (header excluded)."""
        return self.plaintext_length + TAG_SIZE * self.chunk_count

    def to_body(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "image_id": self.image_id,
            "image_version": self.image_version,
            "security_counter": self.security_counter,
            "device_class": self.device_class,
            "plaintext_length": self.plaintext_length,
            "plaintext_sha256": self.plaintext_sha256,
            "ciphertext_sha256": self.ciphertext_sha256,
            "chunk_size": self.chunk_size,
            "nonce_prefix": self.nonce_prefix,
            "header_sha256": self.header_sha256,
            "image_key_id": self.image_key_id,
        }

    @classmethod
    def from_body(cls, body: Any) -> Manifest:
        d = _fields(body, cls._KEYS, "manifest", MANIFEST_VERSION)
        return cls(
            image_id=d["image_id"],
            image_version=d["image_version"],
            security_counter=d["security_counter"],
            device_class=d["device_class"],
            plaintext_length=d["plaintext_length"],
            plaintext_sha256=d["plaintext_sha256"],
            ciphertext_sha256=d["ciphertext_sha256"],
            chunk_size=d["chunk_size"],
            nonce_prefix=d["nonce_prefix"],
            header_sha256=d["header_sha256"],
            image_key_id=d["image_key_id"],
            version=d["v"],
        )

    def to_bytes(self) -> bytes:
        """Canonical CBOR of the body (unsigned; :func:`sign_manifest` makes the envelope)."""
        return cbor.encode(self.to_body())

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            body = cbor.decode(data, what="manifest", max_size=MAX_MANIFEST_SIZE)
        except FormatError as exc:
            raise ImageFormatError(str(exc)) from None
        return cls.from_body(body)


def sign_manifest(manifest: Manifest, signing_key: PrivateKey) -> bytes:
    """Seal ``manifest`` in a ``manifest`` envelope signed by the firmware-signing key."""
    return seal(MANIFEST_KIND, manifest.to_body(), [signing_key])


def verify_manifest(data: bytes, *, key: ec.EllipticCurvePublicKey) -> Manifest:
    """Verify the envelope under the firmware-signing ``key``, then parse the body (S2)."""
    try:
        body = open_envelope(data, kind=MANIFEST_KIND, keys=key, max_size=MAX_MANIFEST_SIZE)
    except SignatureError as exc:
        raise ManifestSignatureError(f"manifest: {exc}") from None
    except FormatError as exc:
        raise ImageFormatError(f"manifest: {exc}") from None
    return Manifest.from_body(body)


# --- streaming -------------------------------------------------------------------------


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes unless EOF comes first (raw streams may return short reads)."""
    data = src.read(n)
    if data is None:
        data = b""
    if len(data) == n or not data:
        return bytes(data) if not isinstance(data, bytes) else data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_bounded(src: BinaryIO, limit: int) -> bytes:
    """All of ``src`` in 1 MiB reads; :class:`ImageSizeError` past ``limit`` bytes."""
    parts, got = [], 0
    while piece := _read_full(src, min(DEFAULT_CHUNK_SIZE, limit + 1 - got)):
        parts.append(piece)
        got += len(piece)
        if got > limit:
            raise ImageSizeError(f"firmware exceeds the maximum of {limit} bytes")
    return b"".join(parts)


def _aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return _AAD_LABEL + header_hash + index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


class _Sink:
    """Hashes and writes finished chunks on two worker threads, one chunk behind the token.

    hashlib and python-pkcs11 release the GIL on large buffers, so while the token runs
    AES-GCM on chunk ``i+1``, one thread hashes chunk ``i``'s plaintext and another hashes
    (and writes) its ciphertext: SHA-256 of both is about as much work as SoftHSM's GCM,
    so one hashing thread would be the bottleneck.  At most one chunk is in flight, which
    keeps memory constant.
    """

    def __init__(self, dst: BinaryIO | None, pt_hash: Any, ct_hash: Any) -> None:
        self._dst = dst
        self._pt = pt_hash
        self._ct = ct_hash
        self._pt_pool = ThreadPoolExecutor(1, thread_name_prefix="image-pt")
        self._ct_pool = ThreadPoolExecutor(1, thread_name_prefix="image-ct")
        self._pending: tuple[Future[None], Future[None]] | None = None

    def _absorb_ct(self, pt: bytes, ct: bytes) -> None:
        self._ct.update(ct)
        if self._dst is not None:
            self._dst.write(pt if self._write_plain else ct)

    _write_plain = False

    def submit(self, pt: bytes, ct: bytes) -> None:
        self.drain()
        self._pending = (
            self._pt_pool.submit(self._pt.update, pt),
            self._ct_pool.submit(self._absorb_ct, pt, ct),
        )

    def drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            for f in pending:
                f.result()

    def close(self) -> None:
        for pool in (self._pt_pool, self._ct_pool):
            pool.shutdown(wait=True, cancel_futures=True)


class _PlainSink(_Sink):
    _write_plain = True


def _check_limits(chunk_size: int, max_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if max_size < 1:
        raise ValueError("max_size must be positive")


def encrypt_image(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key: GcmKey,
    image_id: str,
    image_version: str,
    security_counter: int,
    device_class: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_size: int = MAX_IMAGE_SIZE,
) -> Manifest:
    """Encrypt ``src`` to ``dst`` chunk by chunk with ``key`` (normally in the OEM token).

    Streams in constant memory (about four chunks).  Returns the unsigned :class:`Manifest`;
    sign it with :func:`sign_manifest`.  On error ``dst`` holds a partial image to discard.
    Raises :class:`ImageSizeError` for an empty input or one above ``max_size``.
    """
    _check_limits(chunk_size, max_size)
    max_size = min(max_size, chunk_size * _MAX_INDEX)
    key_id = bytes(key.key_id)
    if not 1 <= len(key_id) <= 64:
        raise ConfigurationError("the image key needs an identifier (CKA_ID) of 1-64 bytes")
    prefix = os.urandom(NONCE_PREFIX_SIZE)
    header = ImageHeader(
        image_id=image_id, image_key_id=key_id, chunk_size=chunk_size, nonce_prefix=prefix
    )
    header_bytes = header.to_bytes()
    header_hash = hashlib.sha256(header_bytes).digest()
    pt_hash, ct_hash = hashlib.sha256(), hashlib.sha256(header_bytes)
    encrypt = key.encrypt_gcm

    cur = _read_full(src, chunk_size)
    if not cur:
        raise ImageSizeError("refusing to encrypt a zero-length image")
    dst.write(header_bytes)
    sink = _Sink(dst, pt_hash, ct_hash)
    total = index = 0
    try:
        while True:
            nxt = _read_full(src, chunk_size) if len(cur) == chunk_size else b""
            final = not nxt
            total += len(cur)
            if total > max_size:
                raise ImageSizeError(f"image exceeds the maximum of {max_size} bytes")
            nonce = prefix + index.to_bytes(4, "big")
            ct = encrypt(nonce, cur, _aad(header_hash, index, final))
            sink.submit(cur, ct)
            if final:
                break
            cur, index = nxt, index + 1
        sink.drain()
    finally:
        sink.close()
    return Manifest(
        image_id=image_id,
        image_version=image_version,
        security_counter=security_counter,
        device_class=device_class,
        plaintext_length=total,
        plaintext_sha256=pt_hash.digest(),
        ciphertext_sha256=ct_hash.digest(),
        chunk_size=chunk_size,
        nonce_prefix=prefix,
        header_sha256=header_hash,
        image_key_id=key_id,
    )


def master_image(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    image_key: GcmKey,
    signing_key: PrivateKey,
    image_id: str,
    image_version: str,
    security_counter: int,
    device_class: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_size: int = MAX_IMAGE_SIZE,
    load_address: int = 0,
    header_size: int = mcuboot.DEFAULT_HEADER_SIZE,
    mcuboot_input: bool = False,
) -> bytes:
    """Mastering in one call: the MCUboot image, :func:`encrypt_image`, :func:`sign_manifest`.

    ``src`` is the raw firmware, made into an MCUboot image (header, payload, security
    counter, SHA-256, key hash and ECDSA signature TLVs) signed by ``signing_key`` -- in the
    token for a PKCS#11 key; with ``mcuboot_input`` it is an unsigned MCUboot image
    (``imgtool create``) signed here.  That MCUboot image is the plaintext of the encrypted
    container, so the manifest binds its digest.  The firmware is held in memory (an MCU's
    flash, bounded by ``max_size``).
    """
    _check_limits(chunk_size, max_size)
    version = mcuboot.ImageVersion.parse(image_version)
    firmware = _read_bounded(src, max_size)
    if not firmware:
        raise ImageSizeError("refusing to master a zero-length firmware")
    if mcuboot_input:
        signed = mcuboot.resign_image(
            firmware, signer=signing_key, version=version, security_counter=security_counter
        )
    else:
        signed = mcuboot.build_image(
            firmware,
            signer=signing_key,
            version=version,
            security_counter=security_counter,
            load_address=load_address,
            header_size=header_size,
        )
    if len(signed) > max_size:
        raise ImageSizeError(f"MCUboot image exceeds the maximum of {max_size} bytes")
    manifest = encrypt_image(
        io.BytesIO(signed),
        dst,
        key=image_key,
        image_id=image_id,
        image_version=image_version,
        security_counter=security_counter,
        device_class=device_class,
        chunk_size=chunk_size,
        max_size=max_size,
    )
    return sign_manifest(manifest, signing_key)


def decrypt_image(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key: GcmKey,
    manifest: Manifest | None = None,
    max_size: int = MAX_IMAGE_SIZE,
) -> ImageHeader:
    """Decrypt ``src`` to ``dst``, releasing each chunk only after its tag verifies.

    With a verified ``manifest`` (the normal case) the header hash, lengths and both digests
    are checked too: the header before the first chunk is decrypted, the digests at the end.
    If this raises, whatever reached ``dst`` must be discarded (the device SBM decrypts to a
    staging buffer for exactly this reason).
    """
    header, header_bytes = read_header(src)
    header_hash = hashlib.sha256(header_bytes).digest()
    key_id = bytes(getattr(key, "key_id", b"") or b"")
    if key_id and not hmac.compare_digest(key_id, header.image_key_id):
        raise ImageKeyMismatchError("the image is encrypted under another image key")
    expected_chunks: int | None = None
    if manifest is not None:
        if not hmac.compare_digest(header_hash, manifest.header_sha256):
            raise ManifestMismatchError("image header does not match the manifest")
        if manifest.plaintext_length > max_size:
            raise ImageSizeError(
                f"image of {manifest.plaintext_length} bytes exceeds the maximum of {max_size}"
            )
        expected_chunks = manifest.chunk_count
    cs = header.chunk_size
    block = cs + TAG_SIZE
    prefix = header.nonce_prefix
    pt_hash, ct_hash = hashlib.sha256(), hashlib.sha256(header_bytes)
    decrypt = key.decrypt_gcm
    sink = _PlainSink(dst, pt_hash, ct_hash)
    total = index = 0
    try:
        cur = _read_full(src, block)
        while True:
            if expected_chunks is not None:
                assert manifest is not None
                final = index == expected_chunks - 1
                want = block if not final else manifest.ciphertext_length - index * block
                if len(cur) < want:
                    raise TruncatedImageError(
                        f"image truncated in chunk {index} of {expected_chunks}"
                    )
                if len(cur) > want:
                    raise ImageFormatError("extra data after the final chunk")
                nxt = b""
            else:
                if len(cur) <= TAG_SIZE:
                    raise TruncatedImageError(f"image truncated: chunk {index} is missing")
                nxt = _read_full(src, block) if len(cur) == block else b""
                final = not nxt
            if index >= _MAX_INDEX:
                raise ImageFormatError("image has more chunks than 32-bit nonce indices")
            nonce = prefix + index.to_bytes(4, "big")
            try:
                pt = decrypt(nonce, cur, _aad(header_hash, index, final))
            except DecryptionError:
                raise ChunkAuthenticationError(
                    f"chunk {index} failed authentication"
                    f"{' as the final chunk' if final else ''}: altered, reordered, from another"
                    " image, or the image was truncated or extended"
                ) from None
            total += len(pt)
            if total > max_size:
                raise ImageSizeError(f"image exceeds the maximum of {max_size} bytes")
            sink.submit(pt, cur)
            if final:
                break
            index += 1
            cur = nxt if expected_chunks is None else _read_full(src, block)
        sink.drain()
    finally:
        sink.close()
    if expected_chunks is not None:
        assert manifest is not None
        if src.read(1):
            raise ImageFormatError("extra data after the final chunk")
        if not hmac.compare_digest(ct_hash.digest(), manifest.ciphertext_sha256):
            raise DigestMismatchError("ciphertext SHA-256 differs from the manifest")
        if total != manifest.plaintext_length or not hmac.compare_digest(
            pt_hash.digest(), manifest.plaintext_sha256
        ):
            raise DigestMismatchError("plaintext SHA-256 differs from the manifest")
    return header
