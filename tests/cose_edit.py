"""Edit COSE messages in tests: change a payload or a signature, keep the rest verbatim."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import cbor2

from securethread.formats import cbor, envelope
from securethread.keys.protocol import PrivateKey


def parts(env: bytes) -> tuple[int, list[Any]]:
    """The tag and the four elements of a COSE_Sign1/COSE_Sign (RFC 9052 §4)."""
    tag = cbor.decode(env, cose_tag=True)
    assert isinstance(tag, cbor2.CBORTag)
    return tag.tag, list(tag.value)


def build(tag: int, items: list[Any]) -> bytes:
    return cbor.encode(cbor2.CBORTag(tag, items))


def body(env: bytes) -> Any:
    return cbor.decode(parts(env)[1][2])


def with_body(env: bytes, new_body: Any) -> bytes:
    """The same signatures over another payload (which they do not sign)."""
    tag, items = parts(env)
    items[2] = cbor.encode(new_body)
    return build(tag, items)


def signature(env: bytes, index: int = 0) -> bytes:
    tag, items = parts(env)
    return bytes(items[3] if tag == cbor.TAG_COSE_SIGN1 else items[3][index][2])


def with_signature(env: bytes, sig: bytes, index: int = 0) -> bytes:
    tag, items = parts(env)
    if tag == cbor.TAG_COSE_SIGN1:
        items[3] = sig
    else:
        items[3][index][2] = sig
    return build(tag, items)


def multi_seal(kind: str, payload_body: Any, keys: Iterable[PrivateKey]) -> bytes:
    """A COSE_Sign of ``kind`` by ``keys`` whatever the kind (to test that a single-signer
    kind refuses one)."""
    payload = cbor.encode(payload_body)
    prot = envelope.protected_body(kind)
    entries = sorted(
        (envelope._signature_entry(k, prot, payload) for k in keys), key=lambda e: e[0]
    )
    return build(cbor.TAG_COSE_SIGN, [prot, {}, payload, [e[1] for e in entries]])
