"""Deterministic CBOR (RFC 8949 §4.2.1), the one canonical encoding of every wire format.

The codec is cbor2's C extension; this module keeps the strict subset securethread accepts
and enforces what cbor2 does not:

* types: unsigned/negative integers in 64 bits, byte strings, text strings, arrays, maps
  with text keys (integer keys only where a caller allows them: COSE header maps,
  RFC 9052 §3), booleans and null.  Floats, other simple values, bignums and tags are
  refused (tags 18 and 98, COSE_Sign1 and COSE_Sign, only at the top where asked for);
* definite lengths only, no duplicate map keys, nesting at most :data:`MAX_DEPTH`
  (cbor2's own options);
* map keys in the bytewise order of their encodings (§4.2.1), checked on the decoded map;
* shortest heads for every integer and length, and no trailing bytes: the decoded value
  is encoded again and must give back exactly the input (one comparison catches every
  non-shortest form at once).

So a signature always covers exactly one byte string and two encoders can never disagree
about an artefact.  Every refusal is a :class:`FormatError` naming the artefact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import cbor2

from securethread.errors import FormatError

#: Upper bound for nesting, to keep hostile inputs from exhausting the stack.
MAX_DEPTH = 16

#: COSE message tags (RFC 9052 §2): the only tags a caller may allow, at the top only.
TAG_COSE_SIGN1 = 18
TAG_COSE_SIGN = 98
_COSE_TAGS = frozenset({TAG_COSE_SIGN1, TAG_COSE_SIGN})

_UINT_LIMIT = 1 << 64  # RFC 8949 §3.1: major types 0 and 1 carry a 64-bit argument
#: Integer map keys are one-byte ones (-24..23, all COSE header labels used are): then
#: cbor2's canonical (length-first) order is the §4.2.1 bytewise order of the encodings.
_INT_KEYS = range(-24, 24)
_TAG_MSG = "tags (major type 6) are not allowed"
_SIMPLE_MSG = "unsupported simple value or float"


T = TypeVar("T")


class Encoded:
    """One item already in deterministic CBOR, spliced verbatim by :func:`encode`.

    Only :func:`pre_encode` makes these, so the bytes are always this encoder's output: a
    hot path encodes its per-job constants once (a certificate, a key) and reuses them.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def pre_encode(value: Any) -> Encoded:
    """Encode ``value`` once for reuse inside many later :func:`encode` calls."""
    return Encoded(encode(value))


class Template:
    """A text-keyed map whose canonical encoding is written once with some values left
    open: :meth:`fill` gives the encoding with those values in place (byte or text strings),
    equal to :func:`encode` of the whole map.  For a hot path that encodes one map shape per
    device (a license, provisioning data): the constant keys and values are not walked,
    sorted and encoded again each time.

    The encoding of a map is its head, then each key's encoding followed by its value's, in
    the keys' canonical order (RFC 8949 §4.2.1), so the pieces between the open values are
    fixed bytes.
    """

    __slots__ = ("_parts", "_where")

    def __init__(self, constant: dict[str, Any], open_keys: tuple[str, ...]) -> None:
        keys = tuple(constant) + open_keys
        if len(set(keys)) != len(keys):
            raise TypeError("a key is both constant and open, or open twice")
        order = _order(keys, False)
        parts = [_head(5, len(order))]
        holes = []
        for k in order:
            parts[-1] += encode(k)
            if k in open_keys:
                holes.append(k)
                parts.append(b"")
            else:
                parts[-1] += encode(constant[k])
        self._parts = tuple(parts)
        #: For each open value in canonical order, its place among fill's arguments.
        self._where = tuple(open_keys.index(k) for k in holes)

    def fill(self, *values: bytes | str) -> bytes:
        """The map's encoding with ``values`` for the open keys, in the order they were named."""
        if len(values) != len(self._where):
            raise TypeError(f"expected {len(self._where)} values")
        out = [self._parts[0]]
        for i, part in zip(self._where, self._parts[1:], strict=True):
            value = values[i]
            if type(value) is not bytes and type(value) is not str:
                raise TypeError(f"cannot fill in {type(value).__name__}")
            out.append(cbor2.dumps(value))  # a string's head is always written shortest
            out.append(part)
        return b"".join(out)


def _head(major: int, n: int) -> bytes:
    """The shortest head of ``major`` with argument ``n`` (RFC 8949 §3)."""
    if n < 24:
        return bytes([major << 5 | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | ai]) + n.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR head")


def _splice(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if type(value) is Encoded:
        encoder.write(value.raw)
        return
    raise TypeError(f"cannot CBOR-encode {type(value).__name__}")


def _key_sort(k: Any) -> tuple[int, int, Any]:
    # §4.2.1: bytewise order of the encoded keys.  Integer labels (-24..23) are one byte:
    # unsigned (major 0) before negative (major 1, -1 first) before text (major 3).  Text
    # keys: shorter UTF-8 first, then UTF-8 byte order, which is Python's code point order.
    if type(k) is int:
        return (0, k, "") if k >= 0 else (1, -1 - k, "")
    return (3, len(k.encode("utf-8")), k)


#: Canonical order of each key sequence seen (text-keyed maps; checked once per sequence).
_order_cache: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _order(keys: tuple[Any, ...], int_keys: bool) -> tuple[Any, ...]:
    if not int_keys:
        hit = _order_cache.get(keys)
        if hit is not None:
            return hit
    for k in keys:
        if type(k) is not str and not (int_keys and type(k) is int and k in _INT_KEYS):
            raise TypeError("CBOR map keys must be text strings")
    order = tuple(sorted(keys, key=_key_sort))
    if not int_keys and len(_order_cache) < 4096:
        _order_cache[keys] = order
    return order


def _prep(value: Any, int_keys: bool) -> Any:
    """``value`` with only the supported types and every map in canonical key order, so
    that cbor2's plain (fast) encoding is the §4.2.1 one."""
    t = type(value)
    if t is dict:
        out = {}
        for k in _order(tuple(value), int_keys):
            v = value[k]
            tv = type(v)
            out[k] = v if tv is bytes or tv is str or tv is Encoded else _prep(v, int_keys)
        return out
    if t is bytes or t is str or t is bool or value is None or t is Encoded:
        return value
    if t is int:
        if not -_UINT_LIMIT <= value < _UINT_LIMIT:
            raise ValueError("integer too large for CBOR head")
        return value
    if t is list or t is tuple:
        return [_prep(v, int_keys) for v in value]
    if t is cbor2.CBORTag and value.tag in _COSE_TAGS:
        return cbor2.CBORTag(value.tag, _prep(value.value, int_keys))
    if isinstance(value, int):
        return _prep(int(value), int_keys)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [_prep(v, int_keys) for v in value]
    if isinstance(value, dict):
        return _prep({_norm_key(k): v for k, v in value.items()}, int_keys)
    raise TypeError(f"cannot CBOR-encode {type(value).__name__}")


def _norm_key(k: Any) -> Any:
    return str(k) if isinstance(k, str) else k


def encode(value: Any, *, int_keys: bool = False) -> bytes:
    """Encode ``value`` deterministically (§4.2.1: shortest heads, definite lengths, map
    keys in bytewise order of their encodings).

    Raises ``TypeError``/``ValueError`` for what the strict subset has no place for
    (floats, non-text map keys unless ``int_keys``, integers beyond 64 bits, ...).
    """
    try:
        # Maps are put in canonical order by _prep; cbor2's heads are always the shortest.
        return cbor2.dumps(_prep(value, int_keys), default=_splice)
    except cbor2.CBOREncodeError as exc:
        raise TypeError(str(exc)) from None


def _refuse_tag(_decoder: Any) -> Any:
    raise _Refused(_TAG_MSG)


class _Refused(Exception):
    """Raised inside cbor2's callbacks; becomes the FormatError's message."""


#: cbor2's built-in semantic tags, each overridden to refuse (tags are not in the subset).
_REFUSE_BUILTIN: dict[int, Callable[[Any], Any]] = {
    t: _refuse_tag
    for t in (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261)
    + (1004, 43000, 55799)
}


def _tag_none(tag: cbor2.CBORTag, _immutable: bool) -> Any:
    raise _Refused(_TAG_MSG)


def _tag_cose(tag: cbor2.CBORTag, _immutable: bool) -> Any:
    if tag.tag in _COSE_TAGS:
        return tag
    raise _Refused(_TAG_MSG)


_ORDER_MSG = "map keys not in canonical order or duplicated"


def _check(value: Any) -> None:
    """Exact types and canonical key order (RFC 8949 §4.2.1) of a value cbor2 decoded.

    Integers need no range check: a bignum (tags 2/3) is refused while decoding, so every
    integer came from a major type 0/1 head.  Text keys sort by the length of their UTF-8
    encoding, then bytewise; Python's string order is UTF-8's byte order (code points).
    """
    t = type(value)
    if t is dict:
        keys = tuple(value)
        if keys not in _ordered_keys:  # each artefact's key sequence is checked once
            _check_key_order(keys)
        for v in value.values():
            tv = type(v)
            if not (tv is bytes or tv is str or tv is int or tv is bool or v is None):
                _check(v)
        return
    if t is list:
        for item in value:
            ti = type(item)
            if not (ti is bytes or ti is str or ti is int or ti is bool or item is None):
                _check(item)
        return
    if t is bytes or t is str or t is int or t is bool or value is None:
        return
    if t is float or t is cbor2.CBORSimpleValue or value is cbor2.undefined:
        raise _Refused(_SIMPLE_MSG)
    raise _Refused(_TAG_MSG)  # CBORTag below the top, or a semantic type


#: Key sequences already found in canonical order (text keys only).
_ordered_keys: set[tuple[Any, ...]] = set()


def _check_key_order(keys: tuple[Any, ...]) -> None:
    prev_n, prev = -1, ""
    for k in keys:
        if type(k) is not str:
            raise _Refused("map keys must be text strings")
        n = len(k) if k.isascii() else len(k.encode("utf-8"))
        if n < prev_n or (n == prev_n and k <= prev):
            raise _Refused(_ORDER_MSG)
        prev_n, prev = n, k
    if len(_ordered_keys) < 4096:
        _ordered_keys.add(keys)


#: Encoded map keys of COSE header maps (few, small).
_key_cache: dict[Any, bytes] = {}


def _key_bytes(k: Any) -> bytes:
    kb = _key_cache.get((type(k), k))
    if kb is None:
        kb = cbor2.dumps(k)
        if len(_key_cache) < 4096:
            _key_cache[(type(k), k)] = kb
    return kb


def _check_labels(value: Any) -> None:
    """:func:`_check` for maps that may also carry integer labels -24..23 (COSE headers,
    RFC 9052 §3): keys ordered by their encodings' bytes."""
    t = type(value)
    if t is dict:
        prev = b""
        for k, v in value.items():
            tk = type(k)
            if tk is not str and not (tk is int and k in _INT_KEYS):
                raise _Refused("map keys must be text strings or labels -24..23")
            kb = _key_bytes(k)
            if kb <= prev:
                raise _Refused(_ORDER_MSG)
            prev = kb
            _check_labels(v)
    elif t is list:
        for item in value:
            _check_labels(item)
    else:
        _check(value)


def _thaw(value: Any) -> Any:
    """A tag's content as plain lists and dicts (cbor2 hands it over immutable)."""
    t = type(value)
    if t is tuple or t is list:
        return [_thaw(v) for v in value]
    if t is cbor2.frozendict or t is dict:
        return {k: _thaw(v) for k, v in value.items()}
    return value


def _decode_error(exc: Exception) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, _Refused):
            return str(cause)
        if isinstance(cause, UnicodeDecodeError):
            return "text string is not valid UTF-8"
        cause = cause.__cause__ or cause.__context__
    msg = str(exc)
    if isinstance(exc, cbor2.CBORDecodeEOF) or "premature end" in msg:
        return "truncated"
    if "indefinite" in msg or "unknown" in msg and "subtype" in msg:
        return "indefinite lengths and reserved values are not canonical"
    if "break code" in msg:
        return "unexpected break (indefinite lengths are not canonical)"
    if "Duplicate map key" in msg:
        return "map keys not in canonical order or duplicated"
    if "nesting depth" in msg:
        return "nesting too deep"
    if "simple value" in msg or "special value" in msg:
        return _SIMPLE_MSG
    if "semantic tag" in msg:
        return _TAG_MSG
    return f"malformed CBOR ({msg})"


def decode(
    data: bytes,
    *,
    what: str = "data",
    max_size: int | None = None,
    int_keys: bool = False,
    cose_tag: bool = False,
) -> Any:
    """Decode one canonical CBOR item that spans all of ``data``.

    ``int_keys`` admits integer map keys (COSE header maps); ``cose_tag`` admits one tag 18
    or 98 around the whole item (returned as a :class:`cbor2.CBORTag`).  Raises
    :class:`FormatError` naming ``what`` if the bytes are truncated, carry trailing bytes,
    exceed ``max_size``, or are not in deterministic form.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise FormatError(f"{what}: expected bytes, got {type(data).__name__}")
        data = bytes(data)
    if max_size is not None and len(data) > max_size:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise FormatError(f"{what}: empty")
    try:
        value = cbor2.loads(
            data,
            tag_hook=_tag_cose if cose_tag else _tag_none,
            semantic_decoders=_REFUSE_BUILTIN,
            max_depth=MAX_DEPTH + 1 if cose_tag else MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
        if type(value) is cbor2.CBORTag:  # only a COSE tag gets through the hook
            value = cbor2.CBORTag(value.tag, _thaw(value.value))
            (_check_labels if int_keys else _check)(value.value)
        elif int_keys:
            _check_labels(value)
        elif type(value) is not bytes:
            _check(value)
    except (cbor2.CBORError, _Refused, RecursionError, ValueError, OverflowError) as exc:
        raise FormatError(f"{what}: {_decode_error(exc)}") from None
    again = cbor2.dumps(value)
    if again != data:
        if len(again) < len(data) and data.startswith(again):
            raise FormatError(f"{what}: {len(data) - len(again)} trailing bytes")
        raise FormatError(f"{what}: integer or length not in shortest form")
    return value


def decode_matching(
    data: bytes, match: Callable[[Any], tuple[T, int | None] | None], *, max_size: int
) -> tuple[Any, T] | None:
    """:func:`decode` for a verifier's hot loop over many small maps of known bodies (the
    ledger's records): ``(value, body)`` if ``data`` is one canonical CBOR item that
    ``match`` accepts, else ``None`` -- then call :func:`decode` (and the body's check),
    whose error names the problem.  It accepts nothing :func:`decode` refuses.

    ``match`` (a :func:`securethread.formats.fields.matcher`) stands in for decode's walk
    of exact types and key order, which it proves for the maps it accepts (scalars of exact
    types, keys in §4.2.1 order), and gives the size of the value's canonical encoding.
    The rest is decode's: the size limit, cbor2's strict options, refused tags.  Instead of
    re-encoding, ``data`` must be exactly that size: cbor2 decoded it as definite-length
    items in that key order, so it differs from the canonical encoding only in heads longer
    than the shortest (every one adds bytes) and in trailing bytes (more bytes); its size is
    the canonical size only if there are neither (§4.2.1; tests/unit/test_cbor.py compares
    both paths on mutated records)."""
    if type(data) is not bytes or len(data) > max_size:
        return None
    try:
        value = cbor2.loads(
            data,
            tag_hook=_tag_none,
            semantic_decoders=_REFUSE_BUILTIN,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except (cbor2.CBORError, _Refused, RecursionError, ValueError, OverflowError):
        return None
    hit = match(value)
    if hit is None:
        return None
    body, size = hit
    if size is not None:
        return (value, body) if size == len(data) else None
    return (value, body) if cbor2.dumps(value) == data else None


_SIGN1_HEAD = b"\xd2\x84"  # tag 18 (COSE_Sign1, RFC 9052 §2), array of 4


def decode_sign1(data: bytes, *, max_size: int) -> tuple[bytes, bytes, bytes] | None:
    """The protected header, payload and signature of ``data`` if it is exactly the
    canonical encoding of a tagged COSE_Sign1 ``18([bstr, {}, bstr, bstr])``, else ``None``
    (then :func:`decode` with ``cose_tag=True`` names the problem).  It accepts nothing
    decode refuses: the same strict cbor2 options, and the bytes written again from the
    three strings must be ``data`` itself (shortest heads, no trailing bytes)."""
    if type(data) is not bytes or len(data) > max_size or data[:2] != _SIGN1_HEAD:
        return None
    try:
        value = cbor2.loads(
            data,
            tag_hook=_tag_cose,
            semantic_decoders=_REFUSE_BUILTIN,
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except (cbor2.CBORError, _Refused, RecursionError, ValueError, OverflowError):
        return None
    if type(value) is not cbor2.CBORTag or value.tag != TAG_COSE_SIGN1:
        return None
    parts = value.value
    if type(parts) not in (list, tuple) or len(parts) != 4:
        return None
    prot, unprot, payload, sig = parts
    if type(prot) is not bytes or type(payload) is not bytes or type(sig) is not bytes:
        return None
    if type(unprot) not in (dict, cbor2.frozendict) or unprot:
        return None
    again = b"".join(
        (_SIGN1_HEAD, cbor2.dumps(prot), b"\xa0", cbor2.dumps(payload), cbor2.dumps(sig))
    )
    return (prot, payload, sig) if again == data else None


def is_version(value: object, expected: int) -> bool:
    """``value`` is the integer ``expected``: the one check of every format's version field.

    Exact type: CBOR ``true`` (simple value 21, RFC 8949 §3.3) decodes to Python ``True``,
    which compares equal to ``1``; a version given as ``true`` is refused, not read as 1.
    """
    return type(value) is int and value == expected
