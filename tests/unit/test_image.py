"""Image format: round trips, and every way to tamper with an encrypted image or manifest.

Pure logic: keys come from the software backend (same SecretKey protocol as the token);
chunk size 4 KiB keeps it fast.
"""

from __future__ import annotations

import hashlib
import io
import os

import attrs
import pytest

from securethread.errors import ConfigurationError, ImageError, KeyPolicyError, SignatureError
from securethread.formats import cbor
from securethread.formats.image import (
    MAGIC,
    MIN_CHUNK_SIZE,
    TAG_SIZE,
    AesGcmKey,
    ChunkAuthenticationError,
    DigestMismatchError,
    ImageFormatError,
    ImageHeader,
    ImageKeyMismatchError,
    ImageSizeError,
    Manifest,
    ManifestMismatchError,
    ManifestSignatureError,
    TruncatedImageError,
    decrypt_image,
    encrypt_image,
    master_image,
    sign_manifest,
    verify_manifest,
)
from securethread.formats.mcuboot import verify_image as verify_mcuboot
from securethread.hsm import IMAGE_KEY, SIGNING, Curve, SoftwareBackend

CS = 4096
BLOCK = CS + TAG_SIZE


@pytest.fixture(scope="module")
def backend() -> SoftwareBackend:
    return SoftwareBackend("oem-sw")


@pytest.fixture(scope="module")
def key(backend: SoftwareBackend):  # type: ignore[no-untyped-def]
    return backend.generate_aes("image-key", policy=IMAGE_KEY)


@pytest.fixture(scope="module")
def fw_key(backend: SoftwareBackend):  # type: ignore[no-untyped-def]
    return backend.generate_ec("fw-sign", curve=Curve.P256, policy=SIGNING)


def _encrypt(key, data: bytes, **kw):  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    args = dict(
        image_id="fw-main",
        image_version="1.0.0",
        security_counter=3,
        device_class="sensor-v1",
        chunk_size=CS,
    )
    args.update(kw)
    m = encrypt_image(io.BytesIO(data), out, key=key, **args)
    return m, out.getvalue()


def _decrypt(key, blob: bytes, manifest: Manifest | None = None, **kw) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    decrypt_image(io.BytesIO(blob), out, key=key, manifest=manifest, **kw)
    return out.getvalue()


def _header_len(blob: bytes) -> int:
    return len(MAGIC) + 2 + int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 2], "big")


def _chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    h = _header_len(blob)
    body = blob[h:]
    return blob[:h], [body[i : i + BLOCK] for i in range(0, len(body), BLOCK)]


def _flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


@pytest.fixture(scope="module")
def soft(key):  # type: ignore[no-untyped-def]
    """The device's view of the same key: a plain AES-GCM key (cryptography)."""
    return AesGcmKey(key._value, key_id=key.key_id)


SIZES = [1, CS - 1, CS, CS + 1, 3 * CS, 3 * CS + 17, 3 * (1 << 20) + 5]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(key, soft, size: int) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(size)
    m, blob = _encrypt(key, data)
    assert m.plaintext_length == size
    assert m.plaintext_sha256 == hashlib.sha256(data).digest()
    assert m.ciphertext_sha256 == hashlib.sha256(blob).digest()
    assert m.chunk_count == -(-size // CS)
    assert len(blob) == _header_len(blob) + m.ciphertext_length
    assert m.image_key_id == key.key_id
    # with and without the manifest, with the software key and with the backend key
    assert _decrypt(soft, blob, m) == data
    assert _decrypt(soft, blob) == data
    # The OEM's image key only encrypts (IMAGE_KEY): nothing at the OEM decrypts.
    with pytest.raises(KeyPolicyError, match="not allowed to decrypt"):
        _decrypt(key, blob, m)


def test_nonce_prefix_is_fresh_per_image(key) -> None:  # type: ignore[no-untyped-def]
    m1, b1 = _encrypt(key, b"x" * 10)
    m2, b2 = _encrypt(key, b"x" * 10)
    assert m1.nonce_prefix != m2.nonce_prefix
    assert b1 != b2


def test_short_reads_from_raw_stream(key, soft) -> None:  # type: ignore[no-untyped-def]
    class Dribble(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = memoryview(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            n = min(len(b), 1000, len(self._data))
            b[:n] = self._data[:n]
            self._data = self._data[n:]
            return n

    data = os.urandom(5 * CS + 3)
    out = io.BytesIO()
    m = encrypt_image(
        Dribble(data),  # type: ignore[arg-type]
        out,
        key=key,
        image_id="fw",
        image_version="1",
        security_counter=0,
        device_class="c",
        chunk_size=CS,
    )
    plain = io.BytesIO()
    decrypt_image(Dribble(out.getvalue()), plain, key=soft, manifest=m)  # type: ignore[arg-type]
    assert plain.getvalue() == data


# --- sizes ---------------------------------------------------------------------------------


def test_zero_length_refused(key) -> None:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    with pytest.raises(ImageSizeError, match="zero-length"):
        _encrypt(key, b"")
    assert out.getvalue() == b""


def test_oversized_refused_on_encrypt(key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageSizeError, match="maximum"):
        _encrypt(key, os.urandom(3 * CS + 1), max_size=3 * CS)
    m, _ = _encrypt(key, os.urandom(3 * CS), max_size=3 * CS)  # the limit itself is fine
    assert m.plaintext_length == 3 * CS


def test_oversized_refused_on_decrypt(key, soft) -> None:  # type: ignore[no-untyped-def]
    m, blob = _encrypt(key, os.urandom(2 * CS + 1))
    with pytest.raises(ImageSizeError):
        _decrypt(soft, blob, m, max_size=2 * CS)
    with pytest.raises(ImageSizeError):
        _decrypt(soft, blob, None, max_size=2 * CS)


def test_bad_chunk_size_is_a_programming_error(key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        _encrypt(key, b"abc", chunk_size=MIN_CHUNK_SIZE - 1)


def test_key_without_identifier_refused() -> None:
    with pytest.raises(ConfigurationError):
        _encrypt(AesGcmKey(os.urandom(32)), b"abc")


# --- tampering with chunks -----------------------------------------------------------------


@pytest.fixture(scope="module")
def image(key):  # type: ignore[no-untyped-def]
    data = os.urandom(4 * CS + 100)  # 5 chunks, the last one short
    m, blob = _encrypt(key, data)
    return data, m, blob


@pytest.mark.parametrize("use_manifest", [True, False])
def test_every_chunk_and_tag_bit_detected(soft, image, use_manifest: bool) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    h = _header_len(blob)
    # first byte, a middle byte and the last tag byte of every chunk
    positions = []
    for i in range(m.chunk_count):
        start = h + i * BLOCK
        end = min(start + BLOCK, len(blob))
        positions += [start, (start + end) // 2, end - 1]
    for pos in positions:
        with pytest.raises(ChunkAuthenticationError):
            _decrypt(soft, _flip(blob, pos, pos % 8), m if use_manifest else None)


def test_every_header_bit_detected(soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    for pos in range(_header_len(blob)):
        bad = _flip(blob, pos, pos % 8)
        with pytest.raises(ImageError):
            _decrypt(soft, bad, m)
        with pytest.raises(ImageError):
            _decrypt(soft, bad)  # without a manifest the chunk AAD still binds the header


def test_header_altered_is_named_against_manifest(soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    header, chunks = _chunks(blob)
    h = ImageHeader.from_bytes(header)
    other = attrs.evolve(h, nonce_prefix=bytes(8)).to_bytes()
    with pytest.raises(ManifestMismatchError):
        _decrypt(soft, other + b"".join(chunks), m)


def test_missing_final_chunk(soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    header, chunks = _chunks(blob)
    cut = header + b"".join(chunks[:-1])
    with pytest.raises(TruncatedImageError):
        _decrypt(soft, cut, m)
    with pytest.raises(ChunkAuthenticationError, match="final"):
        _decrypt(soft, cut)


@pytest.mark.parametrize("cut", [1, TAG_SIZE, BLOCK // 2, BLOCK + 1])
def test_truncated_image(soft, image, cut: int) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    with pytest.raises(TruncatedImageError):
        _decrypt(soft, blob[:-cut], m)
    with pytest.raises(ImageError):
        _decrypt(soft, blob[:-cut])


def test_truncated_inside_header(soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    for n in (0, 5, len(MAGIC) + 1, _header_len(blob) - 1):
        with pytest.raises(ImageError):
            _decrypt(soft, blob[:n], m)


def test_extra_final_chunk(key, soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    header, chunks = _chunks(blob)
    extended = blob + chunks[1]
    with pytest.raises(ImageFormatError, match="extra data"):
        _decrypt(soft, extended, m)
    with pytest.raises(ImageError):
        _decrypt(soft, extended)
    # an exact multiple of the chunk size: the full-size last chunk is final
    data = os.urandom(2 * CS)
    m2, b2 = _encrypt(key, data)
    h2, c2 = _chunks(b2)
    extended = b2 + c2[0]
    with pytest.raises(ImageFormatError, match="extra data"):
        _decrypt(soft, extended, m2)
    with pytest.raises(ChunkAuthenticationError, match="chunk 1"):
        _decrypt(soft, extended)  # chunk 1 was sealed as final


def test_chunks_swapped_or_reordered(soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    header, chunks = _chunks(blob)
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    rotated = [*chunks[1:-1], chunks[0], chunks[-1]]
    duplicated = [chunks[0], chunks[0], *chunks[2:]]
    for order in (swapped, rotated, duplicated):
        bad = header + b"".join(order)
        with pytest.raises(ChunkAuthenticationError, match="chunk 0|chunk 1"):
            _decrypt(soft, bad, m)
        with pytest.raises(ChunkAuthenticationError):
            _decrypt(soft, bad)


def test_chunk_from_another_image_same_key(key, soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    header, chunks = _chunks(blob)
    _, other = _encrypt(key, os.urandom(4 * CS + 100))
    _, ochunks = _chunks(other)
    bad = header + b"".join([chunks[0], ochunks[1], *chunks[2:]])
    with pytest.raises(ChunkAuthenticationError, match="chunk 1"):
        _decrypt(soft, bad, m)


def test_wrong_key(image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    with pytest.raises(ImageKeyMismatchError):
        _decrypt(AesGcmKey(os.urandom(32), key_id=b"another key id"), blob, m)
    with pytest.raises(ChunkAuthenticationError):  # same id, other key bytes
        _decrypt(AesGcmKey(os.urandom(32), key_id=m.image_key_id), blob, m)


def test_digest_mismatch_in_signed_manifest(soft, image) -> None:  # type: ignore[no-untyped-def]
    _, m, blob = image
    with pytest.raises(DigestMismatchError, match="plaintext"):
        _decrypt(soft, blob, attrs.evolve(m, plaintext_sha256=bytes(32)))
    with pytest.raises(DigestMismatchError, match="ciphertext"):
        _decrypt(soft, blob, attrs.evolve(m, ciphertext_sha256=bytes(32)))


def test_not_an_image(soft) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageFormatError, match="magic"):
        _decrypt(soft, b"ELF\x7f" + bytes(100))
    huge = MAGIC + (5000).to_bytes(2, "big") + bytes(5000)
    with pytest.raises(ImageFormatError, match="exceeds"):
        _decrypt(soft, huge)


# --- manifest ------------------------------------------------------------------------------


def test_manifest_sign_verify(key, fw_key) -> None:  # type: ignore[no-untyped-def]
    m, _ = _encrypt(key, b"hello")
    signed = sign_manifest(m, fw_key)
    assert verify_manifest(signed, key=fw_key.public_key()) == m
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_master_image_in_one_call(key, soft, fw_key) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(CS + 7)
    out = io.BytesIO()
    signed = master_image(
        io.BytesIO(data),
        out,
        image_key=key,
        signing_key=fw_key,
        image_id="fw",
        image_version="2.0",
        security_counter=9,
        device_class="c",
        chunk_size=CS,
    )
    m = verify_manifest(signed, key=fw_key.public_key())
    assert m.security_counter == 9
    # the plaintext is the MCUboot image around the firmware, signed by the same key
    plain = _decrypt(soft, out.getvalue(), m)
    v = verify_mcuboot(plain, key=fw_key.public_key())
    assert (v.security_counter, str(v.version)) == (9, "2.0.0+0")
    assert plain[v.header_size : v.header_size + v.image_size] == data


def test_manifest_signed_by_another_key(backend, key, fw_key) -> None:  # type: ignore[no-untyped-def]
    other = backend.generate_ec("rogue", curve=Curve.P256, policy=SIGNING)
    m, _ = _encrypt(key, b"hello")
    with pytest.raises(ManifestSignatureError) as exc:
        verify_manifest(sign_manifest(m, other), key=fw_key.public_key())
    assert isinstance(exc.value, SignatureError)


def test_every_manifest_bit_detected(key, fw_key) -> None:  # type: ignore[no-untyped-def]
    m, _ = _encrypt(key, b"hello")
    signed = sign_manifest(m, fw_key)
    pub = fw_key.public_key()
    for pos in range(len(signed)):
        with pytest.raises(ImageError):
            verify_manifest(_flip(signed, pos, pos % 8), key=pub)


def test_manifest_of_another_kind_refused(key, fw_key) -> None:  # type: ignore[no-untyped-def]
    from securethread.formats.envelope import seal

    m, _ = _encrypt(key, b"hello")
    with pytest.raises(ImageFormatError, match="manifest"):
        verify_manifest(seal("license", m.to_body(), [fw_key]), key=fw_key.public_key())


BAD_FIELDS = [
    ("image_id", ""),
    ("image_id", "a/b"),
    ("image_id", "x" * 65),
    ("image_version", 1),
    ("security_counter", -1),
    ("security_counter", 2**32),
    ("security_counter", True),
    ("device_class", "sp ace"),
    ("plaintext_length", 0),
    ("plaintext_sha256", bytes(31)),
    ("ciphertext_sha256", "00" * 32),
    ("chunk_size", 100),
    ("nonce_prefix", bytes(12)),
    ("header_sha256", b""),
    ("image_key_id", b""),
    ("v", 1),  # v1 bound a raw firmware; v2 an MCUboot image
    ("v", 2),  # the encoding before issue 21
    ("v", 4),
    ("image_version", "1.2.3.4"),  # not an MCUboot version (imgtool syntax)
    ("image_version", "256.0"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_manifest_fields_validated(key, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    m, _ = _encrypt(key, b"hello")
    body = m.to_body()
    body[field] = value
    with pytest.raises(ImageFormatError):
        Manifest.from_body(body)


def test_manifest_unknown_and_missing_fields(key) -> None:  # type: ignore[no-untyped-def]
    m, _ = _encrypt(key, b"hello")
    body = m.to_body()
    with pytest.raises(ImageFormatError):
        Manifest.from_body({**body, "extra": 1})
    del body["device_class"]
    with pytest.raises(ImageFormatError):
        Manifest.from_body(body)
    with pytest.raises(ImageFormatError):
        Manifest.from_bytes(b"\xff")
    with pytest.raises(ImageFormatError):
        Manifest.from_bytes(cbor.encode([1, 2]))


def test_header_round_trip_and_validation() -> None:
    h = ImageHeader(image_id="fw", image_key_id=b"k", chunk_size=CS, nonce_prefix=bytes(8))
    assert ImageHeader.from_bytes(h.to_bytes()) == h
    raw = h.to_bytes()
    with pytest.raises(ImageFormatError, match="length"):
        ImageHeader.from_bytes(raw + b"\x00")
    with pytest.raises(ImageFormatError):
        ImageHeader(image_id="fw", image_key_id=b"k", chunk_size=CS, nonce_prefix=bytes(7))
