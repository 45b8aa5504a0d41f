"""The token's unwrap refuses a payload that is not an AES-256 key, as the software backend
does, before C_UnwrapKey creates anything (SoftHSM).

A key transfer or sealed package carries each key wrapped with RFC 5649 under a key-encryption
key that lives in both tokens; the programmer's token unwraps it with
``CKM_AES_KEY_WRAP_PAD``.  Nothing in the mechanism fixes the length: before, an AES-128 key,
an AES-192 key or a 64-byte secret came out of the token as an "AES" key object (the
software backend already refused them).  Here the key-encryption key is one whose value the
test knows (made for the test only), so any payload can be wrapped, with its true RFC 5649
length indicator.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

from securethread.channel.transfer import STAGING
from securethread.errors import DecryptionError
from securethread.hsm import IMAGE_KEY, SoftwareBackend, Token
from securethread.keys.policy import KeyPolicy, Usage
from tests.integration.channel_net import object_census

UNWRAP = KeyPolicy(usage=Usage.UNWRAP_KEY, persistent=False)
SIZES = [1, 8, 16, 24, 33, 40, 64]  # wrapped in 16, 16, 24, 32, 48, 48, 72 bytes


def _kek(token: Token, value: bytes) -> str:
    """An unwrapping key of known value in ``token`` (test only: the library never imports
    a plaintext key)."""
    label = f"test-kek-{uuid.uuid4().hex[:10]}"
    token.session.create_object(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
         Attribute.VALUE: value, Attribute.UNWRAP: True, Attribute.TOKEN: True,
         Attribute.LABEL: label, Attribute.ID: b"test-kek", Attribute.SENSITIVE: True,
         Attribute.EXTRACTABLE: False}
    )  # fmt: skip
    return label


@pytest.fixture
def kek(programmer: Token) -> Iterator[tuple[bytes, str]]:
    value = os.urandom(32)
    label = _kek(programmer, value)
    yield value, label
    programmer.destroy(label)


@pytest.mark.parametrize("policy", [STAGING, IMAGE_KEY], ids=["session copy", "persistent"])
@pytest.mark.parametrize("size", SIZES)
def test_token_unwrap_refuses_a_payload_that_is_not_aes_256(
    programmer: Token, kek: tuple[bytes, str], size: int, policy: KeyPolicy
) -> None:
    value, label = kek
    wrapped = keywrap.aes_key_wrap_with_padding(value, os.urandom(size))
    before = object_census(programmer)
    target = f"odd-{uuid.uuid4().hex[:10]}"
    with pytest.raises(DecryptionError, match="not an AES-256 key"):
        programmer.secret_key(label).unwrap(wrapped, label=target, key_id=b"k", policy=policy)
    assert object_census(programmer) == before and not programmer.has_key(target)


@pytest.mark.parametrize("size", SIZES)
def test_the_software_backend_refuses_the_same_payloads(size: int) -> None:
    """The reference: the same payloads, the same error, from the software backend."""
    value = os.urandom(32)
    kek = SoftwareBackend("unwrap")._add_secret("kek", b"kek", value, UNWRAP)
    wrapped = keywrap.aes_key_wrap_with_padding(value, os.urandom(size))
    with pytest.raises(DecryptionError, match="not an AES-256 key"):
        kek.unwrap(wrapped, label="odd", key_id=b"k", policy=STAGING)


def test_an_aes_256_key_wrapped_the_same_way_is_unwrapped(
    programmer: Token, kek: tuple[bytes, str]
) -> None:
    """The check refuses only the length: the same key-encryption key unwraps AES-256."""
    value, label = kek
    key = os.urandom(32)
    copy = programmer.secret_key(label).unwrap(
        keywrap.aes_key_wrap_with_padding(value, key), label="", key_id=b"k",
        policy=KeyPolicy(usage=Usage.ENCIPHER, persistent=False),
    )  # fmt: skip
    try:
        nonce = b"\x02" * 12
        assert AESGCM(key).decrypt(nonce, copy.encrypt_gcm(nonce, b"probe", b""), b"") == b"probe"
    finally:
        copy.destroy()
