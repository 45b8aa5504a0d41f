"""Deterministic CBOR (RFC 8949 §4.2.1), the one canonical encoding of every wire format.

Only the subset securethread needs: unsigned/negative integers, byte strings, text
strings, arrays, maps with text keys, booleans and null.  Encoding is deterministic
(shortest-form heads, definite lengths, map keys sorted by their encoded bytes), and the
decoder *rejects* anything that is not in that form, so a signature always covers exactly
one byte string and two encoders can never disagree about an artefact.
"""

from __future__ import annotations

from typing import Any

from securethread.errors import FormatError

#: Upper bound for nesting, to keep hostile inputs from exhausting the stack.
MAX_DEPTH = 16

_MT_UINT, _MT_NINT, _MT_BYTES, _MT_TEXT, _MT_ARRAY, _MT_MAP, _MT_SIMPLE = 0, 1, 2, 3, 4, 5, 7
_FALSE, _TRUE, _NULL = 0xF4, 0xF5, 0xF6


def _head(major: int, n: int) -> bytes:
    # RFC 8949 §4.2.1: the argument uses the shortest possible encoding.
    if n < 24:
        return _SMALL_HEADS[major][n]
    mt = major << 5
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return bytes((mt | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((mt | 26,)) + n.to_bytes(4, "big")
    if n < 0x10000000000000000:
        return bytes((mt | 27,)) + n.to_bytes(8, "big")
    raise ValueError("integer too large for CBOR head")


#: One-byte heads (argument < 24) per major type, built once.
_SMALL_HEADS = [[bytes(((major << 5) | n,)) for n in range(24)] for major in range(8)]


class Encoded(bytes):
    """One item already in deterministic CBOR, spliced verbatim by :func:`encode`.

    Only :func:`pre_encode` makes these, so the bytes are always this encoder's output: a
    hot path encodes its per-job constants once (a certificate, a key) and reuses them.
    """

    __slots__ = ()


def pre_encode(value: Any) -> Encoded:
    """Encode ``value`` once for reuse inside many later :func:`encode` calls."""
    return Encoded(encode(value))


def encode(value: Any) -> bytes:
    """Encode ``value`` deterministically. Raises ``TypeError`` for unsupported types."""
    out = bytearray()
    _encode(value, out)
    return bytes(out)


#: Encoded map keys: the same few field names recur in every artefact.
_key_cache: dict[str, bytes] = {}


def _key(k: Any) -> bytes:
    kb = _key_cache.get(k) if type(k) is str else None
    if kb is None:
        if not isinstance(k, str):
            raise TypeError("CBOR map keys must be text strings")
        b = k.encode("utf-8")
        kb = _head(_MT_TEXT, len(b)) + b
        if len(_key_cache) < 4096 and type(k) is str:
            _key_cache[k] = kb
    return kb


def _encode(value: Any, out: bytearray) -> None:
    # Exact-type dispatch first (the hot path); subclasses fall through to isinstance.
    t = type(value)
    if t is bytes:
        out += _head(_MT_BYTES, len(value))
        out += value
    elif t is str:
        b = value.encode("utf-8")
        out += _head(_MT_TEXT, len(b))
        out += b
    elif t is int:
        if value >= 0:
            out += _head(_MT_UINT, value)
        else:
            out += _head(_MT_NINT, -1 - value)
    elif t is dict:
        items = (
            sorted((_key(k), v) for k, v in value.items())
            if len(value) > 1
            else [(_key(k), v) for k, v in value.items()]
        )
        # §4.2.1: keys in bytewise lexicographic order of their encodings (distinct keys
        # have distinct encodings, so the sort never compares values).
        out += _head(_MT_MAP, len(items))
        for kb, v in items:
            out += kb
            tv = type(v)  # flat fields inline: most artefacts are maps of bytes/str/int
            if tv is bytes:
                out += _head(_MT_BYTES, len(v))
                out += v
            elif tv is str and v.isascii():
                out += _head(_MT_TEXT, len(v))
                out += v.encode("ascii")
            elif tv is int and v >= 0:
                out += _head(_MT_UINT, v)
            else:
                _encode(v, out)
    elif t is list or t is tuple:
        out += _head(_MT_ARRAY, len(value))
        for item in value:
            _encode(item, out)
    elif t is Encoded:
        out += value
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif value is None:
        out.append(_NULL)
    elif isinstance(value, int):
        _encode(int(value), out)
    elif isinstance(value, bytes | bytearray | memoryview):
        _encode(bytes(value), out)
    elif isinstance(value, str):
        _encode(str(value), out)
    elif isinstance(value, list | tuple):
        _encode(list(value), out)
    elif isinstance(value, dict):
        _encode(dict(value), out)
    else:
        raise TypeError(f"cannot CBOR-encode {type(value).__name__}")


def decode(data: bytes, *, what: str = "data", max_size: int | None = None) -> Any:
    """Decode one canonical CBOR item that spans all of ``data``.

    Raises :class:`FormatError` naming ``what`` if the bytes are truncated, carry trailing
    bytes, exceed ``max_size``, or are not in deterministic form.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_size is not None and len(data) > max_size:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise FormatError(f"{what}: empty")
    try:
        value, pos = _decode(data, 0, 0)
    except IndexError:
        raise FormatError(f"{what}: truncated") from None
    except FormatError as exc:  # errors deep in the item also name the artefact
        raise FormatError(f"{what}: {exc}") from None
    if pos != len(data):
        raise FormatError(f"{what}: {len(data) - pos} trailing bytes")
    return value


def is_version(value: object, expected: int) -> bool:
    """``value`` is the integer ``expected``: the one check of every format's version field.

    Exact type: CBOR ``true`` (simple value 21, RFC 8949 §3.3) decodes to Python ``True``,
    which compares equal to ``1``; a version given as ``true`` is refused, not read as 1.
    """
    return type(value) is int and value == expected


def _read_arg(data: bytes, pos: int, info: int) -> tuple[int, int]:
    if info < 24:
        return info, pos
    size = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if size is None:
        raise FormatError("indefinite lengths and reserved values are not canonical")
    if pos + size > len(data):
        raise IndexError
    n = int.from_bytes(data[pos : pos + size], "big")
    # Reject non-shortest heads (RFC 8949 §4.2.1, "preferred serialization").
    if (size == 1 and n < 24) or (size > 1 and n < (1 << (4 * size))):
        raise FormatError("integer or length not in shortest form")
    return n, pos + size


def _decode(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise FormatError("nesting too deep")
    ib = data[pos]
    pos += 1
    major, info = ib >> 5, ib & 0x1F
    if major == _MT_SIMPLE:
        if ib == _FALSE:
            return False, pos
        if ib == _TRUE:
            return True, pos
        if ib == _NULL:
            return None, pos
        raise FormatError(f"unsupported simple value or float 0x{ib:02x}")
    n, pos = _read_arg(data, pos, info)
    if major == _MT_UINT:
        return n, pos
    if major == _MT_NINT:
        return -1 - n, pos
    if major in (_MT_BYTES, _MT_TEXT):
        end = pos + n
        if end > len(data):
            raise IndexError
        raw = data[pos:end]
        if major == _MT_BYTES:
            return raw, end
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError:
            raise FormatError("text string is not valid UTF-8") from None
    if major == _MT_ARRAY:
        if n > len(data) - pos:  # each item takes at least one byte
            raise IndexError
        items = []
        for _ in range(n):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == _MT_MAP:
        if 2 * n > len(data) - pos:
            raise IndexError
        result: dict[str, Any] = {}
        prev: bytes | None = None
        for _ in range(n):
            kstart = pos
            key, pos = _decode(data, pos, depth + 1)
            if not isinstance(key, str):
                raise FormatError("map keys must be text strings")
            kbytes = data[kstart:pos]
            if prev is not None and kbytes <= prev:
                raise FormatError("map keys not in canonical order or duplicated")
            prev = kbytes
            result[key], pos = _decode(data, pos, depth + 1)
        return result, pos
    raise FormatError(f"unsupported CBOR major type {major}")  # tags (6)
