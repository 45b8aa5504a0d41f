"""Image encryption in the real `oem` SoftHSM token; decryption by the token and by the device.

To cross-check the token's AES-GCM against `cryptography` (the device side) the test needs an
image key whose bytes it knows: it imports one through an ECDH-derived wrapping key (software
EC key x token EC key, CKM_ECDH1_DERIVE, rightmost 32 bytes of Z) and RFC 5649 unwrap.  That
import path exists only in this test; production image keys are generated in the token.
"""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import KeyPolicyError
from securethread.formats.image import (
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    AesGcmKey,
    ChunkAuthenticationError,
    TruncatedImageError,
    decrypt_image,
    encrypt_image,
)
from securethread.hsm import IMAGE_KEY, KeyPolicy, Usage
from securethread.keys.policy import EPHEMERAL_AGREEMENT, Curve

CS = DEFAULT_CHUNK_SIZE
_TEMP_KEK = KeyPolicy(usage=Usage.WRAP, persistent=False)
#: A test key that also decrypts, to check the token's GCM against the device's (IMAGE_KEY
#: itself only encrypts: nothing at the OEM decrypts).
_ROUND_TRIP = KeyPolicy(usage=Usage.ENCRYPT, transferable=True)


@pytest.fixture(scope="module")
def known_key(oem):  # type: ignore[no-untyped-def]
    """(token key, software twin): the same AES-256 key in the oem token and in software."""
    value = os.urandom(32)
    key_id = os.urandom(16)
    sw = ec.generate_private_key(ec.SECP256R1())
    eph = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    kek = eph.derive_aes(sw.public_key(), policy=_TEMP_KEK)
    shared = sw.exchange(ec.ECDH(), eph.public_key())[-32:]
    label = "img-known-" + uuid.uuid4().hex[:8]
    token_key = kek.unwrap(
        keywrap.aes_key_wrap_with_padding(shared, value),
        label=label,
        key_id=key_id,
        policy=_ROUND_TRIP,
    )
    kek.destroy()
    eph.destroy()
    yield token_key, AesGcmKey(value, key_id=key_id)
    oem.destroy(label)


def _encrypt(key, data: bytes):  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    m = encrypt_image(
        io.BytesIO(data),
        out,
        key=key,
        image_id="fw-main",
        image_version="1.0",
        security_counter=1,
        device_class="sensor-v1",
    )
    return m, out.getvalue()


@pytest.mark.parametrize("size", [1, CS - 1, CS, CS + 1, 3 * CS + 5])
def test_token_round_trip_default_chunk(known_key, size: int) -> None:  # type: ignore[no-untyped-def]
    token_key, soft = known_key
    data = os.urandom(size)
    m, blob = _encrypt(token_key, data)
    assert m.chunk_size == CS and m.chunk_count == -(-size // CS)
    assert m.plaintext_sha256 == hashlib.sha256(data).digest()
    for key in (soft, token_key):  # the device's software path and the token's own
        out = io.BytesIO()
        decrypt_image(io.BytesIO(blob), out, key=key, manifest=m)
        assert out.getvalue() == data


def test_token_decrypt_detects_tampering(known_key) -> None:  # type: ignore[no-untyped-def]
    token_key, _ = known_key
    m, blob = _encrypt(token_key, os.urandom(CS + 100))
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(ChunkAuthenticationError, match="chunk 1"):
        decrypt_image(io.BytesIO(bytes(bad)), io.BytesIO(), key=token_key, manifest=m)
    with pytest.raises(TruncatedImageError):
        decrypt_image(io.BytesIO(blob[:-TAG_SIZE]), io.BytesIO(), key=token_key, manifest=m)


def test_generated_token_key(oem, label: str) -> None:  # type: ignore[no-untyped-def]
    key = oem.generate_aes(label, policy=IMAGE_KEY)
    try:
        data = os.urandom(2 * CS + 1)
        m, blob = _encrypt(key, data)
        with pytest.raises(KeyPolicyError, match="not allowed to decrypt"):
            decrypt_image(io.BytesIO(blob), io.BytesIO(), key=key, manifest=m)
        assert m.image_key_id == key.key_id
        key.policy_report().check(transferable=True)  # S1: sensitive
    finally:
        oem.destroy(label)


class _Pattern(io.RawIOBase):
    """``size`` bytes of a cheap non-repeating pattern, generated on the fly."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._n = 0
        self._block = os.urandom(CS)
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self._left, CS)
        if n <= 0:
            return 0
        chunk = self._n.to_bytes(8, "big") + self._block[8:n]
        chunk = chunk[:n]
        b[:n] = chunk
        self.sha.update(chunk)
        self._left -= n
        self._n += 1
        return n


class _HashSink(io.RawIOBase):
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def]
        self.sha.update(b)
        self.n += len(b)
        return len(b)


@pytest.mark.slow
def test_256_mib_streams_in_constant_memory(known_key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 256 MiB image through the token and back through the device path, peak Python heap
    far below the image (generous bound; the tight figure is in benchmarks/bench_image.py)."""
    size = 256 << 20
    token_key, soft = known_key
    src = _Pattern(size)
    path = tmp_path / "image.enc"
    tracemalloc.start()
    try:
        with open(path, "wb") as f:
            m = encrypt_image(
                io.BufferedReader(src, CS),
                f,
                key=token_key,
                image_id="big",
                image_version="1",
                security_counter=1,
                device_class="c",
            )
        _, enc_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = _HashSink()
        with open(path, "rb") as f:
            decrypt_image(f, sink, key=soft, manifest=m)  # type: ignore[arg-type]
        _, dec_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m.plaintext_length == size == sink.n
    assert m.plaintext_sha256 == src.sha.digest() == sink.sha.digest()
    assert path.stat().st_size == len(_header(path)) + m.ciphertext_length
    print(
        f"peak traced heap: encrypt {enc_peak / 2**20:.1f} MiB, decrypt {dec_peak / 2**20:.1f} MiB"
    )
    assert enc_peak < 32 << 20, enc_peak
    assert dec_peak < 32 << 20, dec_peak


def _header(path: Path) -> bytes:
    from securethread.formats.image import read_header

    with open(path, "rb") as f:
        return read_header(f)[1]
