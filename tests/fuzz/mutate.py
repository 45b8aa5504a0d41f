"""Mutations of valid artefacts: bytes, CBOR structure, DER structure, ledger and transcript
framing, and re-signing with the fuzz world's own keys so that mutated bodies get past the
signature check and reach the parsers behind it.

Every choice is drawn from a :class:`Source`: a seeded ``random.Random`` in the long mode, a
hypothesis ``data`` object in pytest (so hypothesis can shrink a failing mutation).
"""

from __future__ import annotations

import copy
import hashlib
import random
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.hashes import HashAlgorithm

from securethread.errors import Error
from securethread.formats import cbor, envelope, ledger, transcript

_T = TypeVar("_T")
_RFC6979 = {"deterministic_signing": True}


class Source(Protocol):
    """Where a mutation's choices come from."""

    def below(self, n: int) -> int:
        """A number in ``[0, n)`` (``n`` >= 1)."""
        ...

    def raw(self, n: int) -> bytes:
        """``n`` arbitrary bytes."""
        ...


class RandomSource:
    """Choices from a seeded PRNG (the long mode: fast, reproducible from the seed)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def below(self, n: int) -> int:
        return self._rng.randrange(n)

    def raw(self, n: int) -> bytes:
        return self._rng.randbytes(n)


def chance(src: Source, num: int, den: int) -> bool:
    return src.below(den) < num


def pick(src: Source, seq: Sequence[_T]) -> _T:
    return seq[src.below(len(seq))]


# --- what a mutation may need from the world ----------------------------------------------


class Keyring:
    """The fuzz world's signing keys by SPKI fingerprint, to re-sign mutated bodies.

    :meth:`sign` signs a COSE Sig_structure (RFC 9052 §4.4) as the library does;
    ``ledger`` holds the ledger key and job hash for re-chaining exports.
    """

    def __init__(
        self,
        keys: Mapping[bytes, ec.EllipticCurvePrivateKey],
        *,
        curve_orders: Mapping[bytes, int],
        hashes: Mapping[bytes, HashAlgorithm],
        ledger_fp: bytes = b"",
        ledger_job: bytes = b"",
    ) -> None:
        self.keys = dict(keys)
        self.hashes = dict(hashes)
        self.orders = dict(curve_orders)
        self.ledger_fp = ledger_fp
        self.ledger_job = ledger_job

    def alg(self, fp: bytes) -> int:
        """The COSE alg of the key ``fp`` (RFC 9053 §2.1: ES256 -7, ES384 -35)."""
        return -7 if self.hashes[fp].name == "sha256" else -35

    def sign(self, fp: Any, tbs: bytes) -> bytes | None:
        """r||s over ``tbs`` by the key ``fp``, or None if the ring has no such key."""
        key = self.keys.get(fp) if isinstance(fp, bytes) else None
        if key is None:
            return None
        # RFC 6979 deterministic ECDSA: the same mutation gives the same bytes (hypothesis
        # replays a mutation and needs identical draws).
        der = key.sign(tbs, ec.ECDSA(self.hashes[fp], **_RFC6979))
        # Low-s form (S6: one valid encoding per signature), as the library's signers emit.
        r, s = asym_utils.decode_dss_signature(der)
        n = self.orders[fp]
        if s > n // 2:
            s = n - s
        size = (n.bit_length() + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# --- plain bytes ------------------------------------------------------------------------------

_BYTES = (0x00, 0x01, 0x02, 0x7F, 0x80, 0x81, 0xFF, 0xFE, 0x1F, 0x20, 0x3F, 0x40, 0xC0, 0xF4)
_INTS = (0, 1, 2, 23, 24, 127, 128, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 2**31 - 1, 2**32 - 1,
         2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1)  # fmt: skip


def _flip(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    if not d:
        return bytes([src.below(256)])
    b = bytearray(d)
    b[src.below(len(b))] ^= 1 << src.below(8)
    return bytes(b)


def _set_byte(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    if not d:
        return bytes([pick(src, _BYTES)])
    b = bytearray(d)
    b[src.below(len(b))] = pick(src, _BYTES) if chance(src, 1, 2) else src.below(256)
    return bytes(b)


def _truncate(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    if not d:
        return d
    return d[: src.below(len(d))] if chance(src, 3, 4) else d[src.below(len(d)) :]


def _insert(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    i = src.below(len(d) + 1)
    n = 1 + src.below(16)
    chunk = src.raw(n) if chance(src, 1, 2) else bytes([pick(src, _BYTES)]) * n
    return d[:i] + chunk + d[i:]


def _delete(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    if not d:
        return d
    i = src.below(len(d))
    n = 1 + src.below(min(32, len(d) - i))
    return d[:i] + d[i + n :]


def _duplicate(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    if not d:
        return d
    i = src.below(len(d))
    n = 1 + src.below(min(64, len(d) - i))
    j = src.below(len(d) + 1)
    return d[:j] + d[i : i + n] + d[j:]


def _overwrite_int(src: Source, d: bytes, _c: Sequence[bytes]) -> bytes:
    size = pick(src, (1, 2, 4, 8))
    value = pick(src, _INTS) % (1 << (8 * size))
    i = src.below(len(d) + 1)
    return d[:i] + value.to_bytes(size, "big") + d[i + size :]


def _splice(src: Source, d: bytes, corpus: Sequence[bytes]) -> bytes:
    other = pick(src, corpus) if corpus else d
    i = src.below(len(d) + 1)
    j = src.below(len(other) + 1)
    return d[:i] + other[j:] if chance(src, 1, 2) else other[:j] + d[i:]


BYTE_OPS: tuple[Callable[[Source, bytes, Sequence[bytes]], bytes], ...] = (
    _flip, _flip, _set_byte, _truncate, _insert, _delete, _duplicate, _overwrite_int, _splice,
)  # fmt: skip


def mutate_bytes(src: Source, d: bytes, corpus: Sequence[bytes]) -> bytes:
    return pick(src, BYTE_OPS)(src, d, corpus)


# --- DER (X.690) structure ----------------------------------------------------------------------


class _Der:
    __slots__ = ("tag", "children", "content", "prefix")

    def __init__(
        self, tag: int, children: list[_Der] | None, content: bytes, prefix: bytes = b""
    ) -> None:
        self.tag, self.children, self.content, self.prefix = tag, children, content, prefix

    def encode(self) -> bytes:
        if self.children is not None:
            body = self.prefix + b"".join(c.encode() for c in self.children)
        else:
            body = self.content
        n = len(body)
        if n < 0x80:
            head = bytes((self.tag, n))
        else:
            k = (n.bit_length() + 7) // 8
            head = bytes((self.tag, 0x80 | k)) + n.to_bytes(k, "big")
        return head + body


def _der_all(data: bytes, depth: int) -> list[_Der]:
    out, pos = [], 0
    while pos < len(data):
        node, pos = _der_one(data, pos, depth)
        out.append(node)
    return out


def _der_one(data: bytes, pos: int, depth: int) -> tuple[_Der, int]:
    if depth > 12 or pos + 2 > len(data):
        raise ValueError("not DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag number")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        n = first
    else:
        k = first & 0x7F
        if not 1 <= k <= 3 or pos + k > len(data):
            raise ValueError("bad length")
        n = int.from_bytes(data[pos : pos + k], "big")
        pos += k
    end = pos + n
    if end > len(data):
        raise ValueError("truncated")
    content = data[pos:end]
    if tag & 0x20:
        return _Der(tag, _der_all(content, depth + 1), content), end
    for prefix in (b"", b"\x00") if tag in (0x03, 0x04) else ():
        if tag == 0x03 and prefix == b"" or tag == 0x04 and prefix:
            continue
        inner = content[len(prefix) :]
        if len(inner) >= 2 and inner[0] in (0x30, 0x31, 0x02, 0x04, 0x03, 0x06, 0x01):
            try:
                return _Der(tag, _der_all(inner, depth + 1), content, prefix), end
            except ValueError:
                pass
    return _Der(tag, None, content), end


def parse_der(data: bytes) -> list[_Der] | None:
    try:
        nodes = _der_all(data, 0)
    except ValueError:
        return None
    return nodes or None


def _der_slots(nodes: list[_Der]) -> list[tuple[list[_Der], int]]:
    out: list[tuple[list[_Der], int]] = []
    stack = [nodes]
    while stack:
        siblings = stack.pop()
        for i, node in enumerate(siblings):
            out.append((siblings, i))
            if node.children is not None:
                stack.append(node.children)
    return out


_TAGS = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x12, 0x13, 0x14, 0x16, 0x17, 0x18, 0x1A,
         0x1C, 0x1E, 0x30, 0x31, 0x80, 0x81, 0x82, 0x86, 0x87, 0x88, 0xA0, 0xA1, 0xA3,
         0xA4)  # fmt: skip
_OIDS = (
    "2a8648ce3d030107",  # secp256r1
    "2b81040022",  # secp384r1
    "2b81040023",  # secp521r1
    "2b8104000a",  # secp256k1
    "2b240303020801010b",  # brainpoolP384r1
    "2a8648ce3d0201",  # id-ecPublicKey
    "2a864886f70d010101",  # rsaEncryption
    "2b6570",  # Ed25519
    "2b6571",  # Ed448
    "2a8648ce380401",  # DSA
    "2a8648ce3d040302",  # ecdsa-with-SHA256
    "2a8648ce3d040304",  # ecdsa-with-SHA512
    "2a864886f70d010105",  # sha1WithRSAEncryption
    "2a864886f70d01010a",  # RSASSA-PSS
    "550403",  # commonName
    "55040a",  # organizationName
    "551d13",  # basicConstraints
    "551d0f",  # keyUsage
    "551d25",  # extKeyUsage
    "551d11",  # subjectAltName
    "551d1e",  # nameConstraints
    "551d20",  # certificatePolicies
    "2b0601050507010b",  # subjectInfoAccess
    "69d18b",  # made up
)
_CONTENTS = (
    b"", b"\x00", b"\xff", b"\x80", b"\x01\x01\xff", b"\x00\x00\xd8\x00", b"\xd8\x00",
    b"\xdc\x00\xd8\x00", b"\xff\xfe\xfd", b"\xc3\x28", b"\xed\xa0\x80", "\u00fc".encode("latin-1"),
    b"A" * 300, b"\x01" * 25, b"\x80" + b"\x00" * 20, b"\x00\x00\x01", b"99991231235959Z",
    b"491231235959Z", b"20500101000000.5Z", b"0", b"\x07\x80", b"\x00\x01\x02",
)  # fmt: skip


def mutate_der(
    src: Source, data: bytes, corpus: Sequence[bytes], nodes: list[_Der] | None = None
) -> bytes:
    """Mutate one node of a DER tree and re-encode with correct lengths, so the outer
    structure stays well formed and the mutation reaches the lazily parsed fields."""
    nodes = nodes if nodes is not None else parse_der(data)
    if nodes is None:
        return mutate_bytes(src, data, corpus)
    slots = _der_slots(nodes)
    siblings, i = pick(src, slots)
    node = siblings[i]
    op = src.below(10)
    if op == 0:
        node.tag = pick(src, _TAGS)
    elif op == 1:
        siblings.insert(src.below(len(siblings) + 1), copy.deepcopy(node))
    elif op == 2 and len(slots) > 1:
        del siblings[i]
    elif op == 3 and len(siblings) > 1:
        j = src.below(len(siblings))
        siblings[i], siblings[j] = siblings[j], siblings[i]
    elif op == 4:
        donors = [t for t in (parse_der(pick(src, corpus)) for _ in range(1)) if t]
        if donors:
            donor_siblings, k = pick(src, _der_slots(donors[0]))
            siblings[i] = donor_siblings[k]
    elif op == 5:
        node.children, node.content = None, pick(src, _CONTENTS)
    elif op == 6:
        node.tag, node.children, node.content = 0x06, None, bytes.fromhex(pick(src, _OIDS))
    elif op == 7 and node.children is None and node.tag == 0x06:
        node.content = bytes.fromhex(pick(src, _OIDS))
    else:
        node.children, node.content = None, mutate_bytes(src, node.encode()[2:], corpus)
        if node.content[:1] and op == 8:
            node.content = node.content[: 2 + src.below(len(node.content))]
    return b"".join(n.encode() for n in nodes)


# --- CBOR structure -----------------------------------------------------------------------------

_STRINGS = ("", "a", "x" * 300, "\u00e9", "\x00", "\U0001f600", "..", "/", "-1", "0" * 16,
            "ffffffffffffffff", "oem", "programmer", "job", "license", "manifest")  # fmt: skip


def _random_value(src: Source, depth: int = 0) -> Any:
    k = src.below(9 if depth < 2 else 6)
    if k == 0:
        return pick(src, _INTS) * (-1 if chance(src, 1, 4) else 1)
    if k == 1:
        return src.raw(src.below(70))
    if k == 2:
        return pick(src, _STRINGS)
    if k == 3:
        return pick(src, (True, False, None))
    if k == 4:
        return -(2**64)
    if k == 5:
        return 2**64 - 1
    if k == 6:
        return [_random_value(src, depth + 1) for _ in range(src.below(3))]
    if k == 7:
        return {pick(src, _STRINGS): _random_value(src, depth + 1) for _ in range(src.below(3))}
    return src.raw(1 + src.below(8))


def _cbor_slots(holder: list[Any]) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    stack: list[tuple[Any, Any]] = [(holder, 0)]
    while stack:
        parent, key = stack.pop()
        out.append((parent, key))
        value = parent[key]
        if isinstance(value, dict):
            stack.extend((value, k) for k in value)
        elif isinstance(value, list):
            stack.extend((value, i) for i in range(len(value)))
    return out


def _keys_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value] + [k for v in value.values() for k in _keys_in(v)]
    if isinstance(value, list):
        return [k for v in value for k in _keys_in(v)]
    return []


def decode_cbor(data: bytes) -> Any:
    try:
        return cbor.decode(data, int_keys=True, cose_tag=True)
    except Error:
        return None


def _kid(protected: Any) -> Any:
    hdr = decode_cbor(protected) if isinstance(protected, bytes) else None
    return hdr.get(4) if isinstance(hdr, dict) else None


def _resign(src: Source, msg: Any, ring: Keyring, corpus: Sequence[bytes]) -> bool:
    """Mutate the payload of a COSE_Sign1/COSE_Sign (RFC 9052 §4), then sign it again."""
    items = msg.value
    if not (isinstance(items, list) and len(items) == 4 and isinstance(items[2], bytes)):
        return False
    prot, payload = items[0], mutate_blob(src, items[2], corpus, ring, depth=1)
    items[2] = payload
    if msg.tag == cbor.TAG_COSE_SIGN1:
        sig = ring.sign(_kid(prot), cbor.encode(["Signature1", prot, b"", payload]))
        if sig is not None:
            items[3] = sig
    elif isinstance(items[3], list):
        for entry in items[3]:
            if isinstance(entry, list) and len(entry) == 3:
                tbs = cbor.encode(["Signature", prot, entry[0], b"", payload])
                sig = ring.sign(_kid(entry[0]), tbs)
                if sig is not None:
                    entry[2] = sig
    return True


def _mutate_cose(
    src: Source, obj: Any, corpus: Sequence[bytes], ring: Keyring | None, depth: int
) -> bytes:
    msg = cbor2.CBORTag(obj.tag, copy.deepcopy(obj.value))
    if ring is not None and chance(src, 1, 2) and _resign(src, msg, ring, corpus):
        try:
            return cbor.encode(msg)
        except (ValueError, TypeError):
            pass
    head = cbor.encode(cbor2.CBORTag(obj.tag, 0))[:-1]  # the tag's head alone
    return head + mutate_cbor(src, obj.value, corpus, ring, depth)


def mutate_cbor(
    src: Source, obj: Any, corpus: Sequence[bytes], ring: Keyring | None, depth: int
) -> bytes:
    if isinstance(obj, cbor2.CBORTag):
        return _mutate_cose(src, obj, corpus, ring, depth)
    holder = [copy.deepcopy(obj)]
    slots = _cbor_slots(holder)
    parent, key = pick(src, slots)
    value = parent[key]
    op = src.below(6)
    if isinstance(value, bytes) and op < 3:
        parent[key] = mutate_blob(src, value, corpus, ring, depth=depth + 1)
    elif isinstance(value, str) and op < 3:
        if chance(src, 1, 2):
            parent[key] = pick(src, _STRINGS)
        else:
            parent[key] = mutate_bytes(src, value.encode(), corpus).decode("utf-8", "replace")
    elif isinstance(value, bool) or value is None:
        parent[key] = _random_value(src)
    elif isinstance(value, int) and op < 3:
        parent[key] = pick(
            src, (value + 1, value - 1, -value - 1, pick(src, _INTS), -pick(src, _INTS) - 1)
        )
    elif isinstance(value, dict) and op < 4:
        if value and chance(src, 1, 2):
            del value[pick(src, list(value))]
        else:
            names = _keys_in(holder[0]) or ["v"]
            value[pick(src, names)] = _random_value(src)
    elif isinstance(value, list) and op < 4:
        if value and chance(src, 1, 2):
            i = src.below(len(value))
            if chance(src, 1, 2):
                del value[i]
            else:
                value.insert(src.below(len(value) + 1), copy.deepcopy(value[i]))
        else:
            value.append(_random_value(src))
    elif parent is not holder and isinstance(parent, dict) and op == 4:
        del parent[key]
    else:
        parent[key] = _random_value(src)
    try:
        return cbor.encode(holder[0], int_keys=True)
    except (ValueError, TypeError):  # an int pushed past 64 bits: CBOR cannot carry it
        return mutate_bytes(src, cbor.encode(obj, int_keys=True), corpus)


# --- framed formats ---------------------------------------------------------------------------

LEDGER_MAGIC = ledger.EXPORT_MAGIC
TRANSCRIPT_MAGIC = transcript.MAGIC  # was a stale copy of version 1: transcripts went unsplit


def _split_ledger(data: bytes) -> list[tuple[bytes, bytes]] | None:
    if not data.startswith(LEDGER_MAGIC):
        return None
    items, pos = [], len(LEDGER_MAGIC)
    while pos < len(data):
        if pos + 5 > len(data):
            return None
        (n,) = struct.unpack(">I", data[pos + 1 : pos + 5])
        if pos + 5 + n > len(data):
            return None
        items.append((data[pos : pos + 1], data[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    return items


def _join_ledger(items: list[tuple[bytes, bytes]]) -> bytes:
    return LEDGER_MAGIC + b"".join(t + struct.pack(">I", len(p)) + p for t, p in items)


def _rechain(items: list[tuple[bytes, bytes]], ring: Keyring) -> None:
    """Re-link every record to its predecessor's hash and re-sign every checkpoint, so a
    ledger with hostile record bodies verifies and reaches what acts on the records."""
    prev, index = ring.ledger_job, -1
    for i, (tag, payload) in enumerate(items):
        if tag == b"r":
            rec = decode_cbor(payload)
            if isinstance(rec, dict) and "prev" in rec:
                rec["prev"] = prev
                payload = cbor.encode(rec)
                items[i] = (tag, payload)
            prev = hashlib.sha256(payload).digest()
            index += 1
        elif tag == b"c":
            body = cbor.encode({"job": ring.ledger_job, "upto": index, "head": prev, "time": 1})
            fp = ring.ledger_fp
            prot = envelope.protected_header("ledger-checkpoint", ring.alg(fp), fp)
            sig = ring.sign(fp, envelope.sig_structure1(prot, body)) or b""
            items[i] = (tag, cbor.encode(cbor2.CBORTag(cbor.TAG_COSE_SIGN1, [prot, {}, body, sig])))


def mutate_ledger(src: Source, data: bytes, corpus: Sequence[bytes], ring: Keyring | None) -> bytes:
    items = _split_ledger(data)
    if items is None or len(items) < 2:
        return mutate_bytes(src, data, corpus)
    op = src.below(6)
    i = 1 + src.below(len(items) - 1)  # item 0 is the signed job
    if op == 0:
        del items[i]
    elif op == 1:
        items.insert(src.below(len(items)) + 1, items[i])
    elif op == 2:
        j = 1 + src.below(len(items) - 1)
        items[i], items[j] = items[j], items[i]
    elif op == 3:
        items[i] = (bytes([pick(src, b"rcjx\x00")]), items[i][1])
    else:
        if op == 5:
            i = src.below(len(items))  # the job too
        items[i] = (items[i][0], mutate_blob(src, items[i][1], corpus, ring, depth=1))
        if ring is not None and ring.ledger_fp and chance(src, 2, 3):
            _rechain(items, ring)
    return _join_ledger(items)


def mutate_transcript(
    src: Source, data: bytes, corpus: Sequence[bytes], ring: Keyring | None
) -> bytes:
    if not data.startswith(TRANSCRIPT_MAGIC):
        return mutate_bytes(src, data, corpus)
    frames, pos = [], len(TRANSCRIPT_MAGIC)
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        frames.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if not frames:
        return mutate_bytes(src, data, corpus)
    i = src.below(len(frames))
    op = src.below(5)
    if op == 0:
        del frames[i]
    elif op == 1:
        frames.insert(src.below(len(frames) + 1), frames[i])
    elif op == 2:
        j = src.below(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    else:
        frames[i] = mutate_blob(src, frames[i], corpus, ring, depth=1)
    return TRANSCRIPT_MAGIC + b"".join(len(f).to_bytes(4, "big") + f for f in frames)


# --- dispatch ------------------------------------------------------------------------------


def mutate_blob(
    src: Source, data: bytes, corpus: Sequence[bytes], ring: Keyring | None, *, depth: int = 0
) -> bytes:
    """One mutation of ``data``, aware of whatever structure it has."""
    if depth < 4 and chance(src, 3, 4):
        if data.startswith(LEDGER_MAGIC):
            return mutate_ledger(src, data, corpus, ring)
        if data.startswith(TRANSCRIPT_MAGIC):
            return mutate_transcript(src, data, corpus, ring)
        obj = decode_cbor(data) if data[:1] and data[0] >> 5 in (4, 5, 6) else None
        if isinstance(obj, dict | list | cbor2.CBORTag):
            return mutate_cbor(src, obj, corpus, ring, depth)
        nodes = parse_der(data) if data[:1] in (b"\x30", b"\x31") else None
        if nodes is not None:
            return mutate_der(src, data, corpus, nodes)
    return mutate_bytes(src, data, corpus)


def mutate_text(src: Source, text: str, corpus: Sequence[bytes]) -> str:
    """A PKCS#11 URI or other text: bytes mutated, then read back with lone surrogates
    (``surrogateescape``) so that non-characters reach the parser as they would from argv."""
    parts = [p for p in text.replace("?", ";?;").split(";") if p]
    if parts and chance(src, 1, 3):
        i = src.below(len(parts))
        choice = src.below(4)
        if choice == 0:
            parts.insert(src.below(len(parts) + 1), parts[i])
        elif choice == 1:
            parts[i] += pick(src, ("=", "%", "%zz", "%C3", "%00", "\udcff", "\u00b2", "9" * 30))
        elif choice == 2:
            del parts[i]
        else:
            parts[i] = parts[i].upper()
        return ";".join(parts).replace(";?;", "?")
    raw = mutate_bytes(src, text.encode("utf-8", "surrogateescape"), corpus)
    return raw.decode("utf-8", "surrogateescape")


def mutate(
    src: Source,
    seeds: Sequence[bytes],
    corpus: Sequence[bytes],
    ring: Keyring | None,
    *,
    text: bool = False,
    max_ops: int = 3,
) -> bytes:
    """A seed with 1..``max_ops`` stacked mutations (fewer more often); ``text`` seeds are
    UTF-8 (with surrogate escapes) and mutated as text."""
    data = pick(src, seeds)
    for _ in range(1 + min(src.below(max_ops), src.below(max_ops))):
        if text:
            s = data.decode("utf-8", "surrogateescape")
            data = mutate_text(src, s, corpus).encode("utf-8", "surrogateescape")
        else:
            data = mutate_blob(src, data, corpus, ring)
    return data
