"""Deterministic CBOR (RFC 8949 §4.2.1): encoder output and the strict decoder's refusals."""

from __future__ import annotations

from typing import Any

import pytest

from securethread.errors import Error, FormatError
from securethread.formats import cbor

# RFC 8949 Appendix A vectors that fall inside the supported subset.
RFC_VECTORS: list[tuple[Any, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


@pytest.mark.parametrize(("value", "hexstr"), RFC_VECTORS)
def test_rfc8949_vectors_round_trip(value: Any, hexstr: str) -> None:
    encoded = cbor.encode(value)
    assert encoded.hex() == hexstr
    assert cbor.decode(encoded) == value


@pytest.mark.parametrize(
    "value",
    [
        {"nested": {"list": [b"\x00" * 300, -(2**40), "x" * 70000], "t": True, "n": None}},
        [[[[[]]]]],
        {"": b"", "k": [False, 0, -1]},
    ],
)
def test_round_trip_structures(value: Any) -> None:
    assert cbor.decode(cbor.encode(value)) == value


def test_tuple_and_bytearray_encode_as_array_and_bstr() -> None:
    assert cbor.encode((1, 2)) == cbor.encode([1, 2])
    assert cbor.encode(bytearray(b"ab")) == cbor.encode(b"ab")
    assert cbor.encode(memoryview(b"ab")) == b"\x42ab"


def test_map_keys_sorted_by_encoded_bytes_not_insertion_order() -> None:
    # §4.2.1: shorter keys sort first because their length head is smaller.
    a = cbor.encode({"bb": 1, "a": 2, "c": 3, "aaa": 4})
    b = cbor.encode({"aaa": 4, "c": 3, "a": 2, "bb": 1})
    assert a == b
    assert a.hex() == "a4" + "616102" + "616303" + "62626201" + "63616161" + "04"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert cbor.decode(bytearray(b"\x83\x01\x02\x03")) == [1, 2, 3]  # type: ignore[arg-type]
    assert cbor.decode(memoryview(b"\x01")) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", [1.5, {1: "int key"}, {b"k": 1}, object(), {"a": {2: 3}}, 2**64, -(2**64) - 1]
)
def test_encode_unsupported_is_a_programming_error(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        cbor.encode(value)


NON_SHORTEST = [
    "1800",  # 0 in one extra byte
    "1817",  # 23 in one extra byte
    "190018",  # 24 in two bytes
    "1900ff",  # 255 in two bytes
    "1a0000ffff",  # 65535 in four bytes
    "1b00000000ffffffff",  # 2^32-1 in eight bytes
    "3800",  # -1 in one extra byte
    "5800",  # empty bstr with a long length
    "780161",  # "a" with a long length
    "9800",  # empty array with a long length
    "b800",  # empty map with a long length
    "81190001",  # inside an array
]


@pytest.mark.parametrize("hexstr", NON_SHORTEST)
def test_non_shortest_heads_rejected(hexstr: str) -> None:
    with pytest.raises(FormatError, match="shortest"):
        cbor.decode(bytes.fromhex(hexstr))


@pytest.mark.parametrize(
    "hexstr",
    [
        "5f42010243030405ff",  # indefinite byte string
        "7f657374726561646d696e67ff",  # indefinite text string
        "9f018202039f0405ffff",  # indefinite array
        "bf61610161629f0203ffff",  # indefinite map
        "1c",  # reserved additional info 28
        "1d",
        "1e",
    ],
)
def test_indefinite_lengths_and_reserved_values_rejected(hexstr: str) -> None:
    with pytest.raises(FormatError, match="indefinite|reserved"):
        cbor.decode(bytes.fromhex(hexstr))


def test_break_byte_alone_rejected() -> None:
    with pytest.raises(FormatError):
        cbor.decode(b"\xff")


@pytest.mark.parametrize("extra", [b"\x00", b"\xf6", b"\x83\x01\x02\x03"])
def test_trailing_bytes_rejected(extra: bytes) -> None:
    with pytest.raises(FormatError, match="trailing"):
        cbor.decode(cbor.encode({"a": 1}) + extra, what="job")


def test_error_message_names_what() -> None:
    with pytest.raises(FormatError, match="^license: "):
        cbor.decode(b"\x01\x02", what="license")


def test_every_truncation_of_a_valid_item_is_rejected() -> None:
    full = cbor.encode({"body": b"\x00" * 40, "list": [1, 1000, 70000, 2**40, "txt"], "z": None})
    for cut in range(len(full)):
        with pytest.raises(FormatError):
            cbor.decode(full[:cut])


@pytest.mark.parametrize("hexstr", ["18", "19 00", "1a000000", "1b00000000000000", "4401", "6461"])
def test_truncated_heads_and_strings(hexstr: str) -> None:
    with pytest.raises(FormatError, match="truncated"):
        cbor.decode(bytes.fromhex(hexstr.replace(" ", "")))


def test_huge_declared_lengths_do_not_allocate() -> None:
    # A 2^64-1 element array in 9 bytes: must be refused as truncated, not looped over.
    for head in ("9bffffffffffffffff", "bbffffffffffffffff", "5bffffffffffffffff"):
        with pytest.raises(FormatError, match="truncated"):
            cbor.decode(bytes.fromhex(head))


def test_empty_input_rejected() -> None:
    with pytest.raises(FormatError, match="empty"):
        cbor.decode(b"")


def test_non_bytes_input_rejected() -> None:
    with pytest.raises(FormatError, match="expected bytes"):
        cbor.decode("a0")  # type: ignore[arg-type]


def test_duplicate_map_keys_rejected() -> None:
    # {"a": 1, "a": 2}
    with pytest.raises(FormatError, match="duplicated"):
        cbor.decode(bytes.fromhex("a2616101616102"))


def test_unsorted_map_keys_rejected() -> None:
    # {"b": 1, "a": 2}: valid CBOR, not deterministic.
    with pytest.raises(FormatError, match="canonical order"):
        cbor.decode(bytes.fromhex("a2616201616102"))
    # {"aa": 1, "b": 2}: length-first order means "b" must come first.
    with pytest.raises(FormatError, match="canonical order"):
        cbor.decode(bytes.fromhex("a262616101616202"))


@pytest.mark.parametrize("hexstr", ["a10102", "a1400102", "a1f501", "a1800102"])
def test_non_text_map_keys_rejected(hexstr: str) -> None:
    with pytest.raises(FormatError, match="text strings"):
        cbor.decode(bytes.fromhex(hexstr))


@pytest.mark.parametrize(
    "hexstr",
    [
        "f93c00",  # half float 1.0
        "fa47c35000",  # single float 100000.0
        "fb3ff199999999999a",  # double 1.1
        "f7",  # undefined
        "e0",  # simple(0)
        "f820",  # simple(32)
    ],
)
def test_floats_and_other_simple_values_rejected(hexstr: str) -> None:
    with pytest.raises(FormatError, match="simple value or float"):
        cbor.decode(bytes.fromhex(hexstr))


@pytest.mark.parametrize(
    "hexstr",
    [
        "c074323031332d30332d32315432303a30343a30305a",  # tag 0 date string
        "c11a514b67b0",  # tag 1 epoch
        "c249010000000000000000",  # tag 2 bignum
        "d82076687474703a2f2f7777772e6578616d706c652e636f6d",  # tag 32 URI
    ],
)
def test_tags_rejected(hexstr: str) -> None:
    with pytest.raises(FormatError, match="major type 6"):
        cbor.decode(bytes.fromhex(hexstr))


def test_invalid_utf8_text_rejected() -> None:
    with pytest.raises(FormatError, match="UTF-8"):
        cbor.decode(b"\x62\xc3\x28")


def test_depth_bomb_rejected() -> None:
    bomb = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(FormatError, match="nesting too deep"):
        cbor.decode(bomb)
    map_bomb = b"\xa1\x61a" * 1000 + b"\x00"
    with pytest.raises(FormatError, match="nesting too deep"):
        cbor.decode(map_bomb)


def test_depth_limit_boundary() -> None:
    ok: Any = 0
    for _ in range(cbor.MAX_DEPTH):
        ok = [ok]
    assert cbor.decode(cbor.encode(ok)) == ok
    with pytest.raises(FormatError, match="nesting too deep"):
        cbor.decode(cbor.encode([ok]))


def test_max_size_enforced_before_parsing() -> None:
    data = cbor.encode({"blob": b"\x00" * 100})
    assert cbor.decode(data, max_size=len(data)) == {"blob": b"\x00" * 100}
    with pytest.raises(FormatError, match=f"exceeds the limit of {len(data) - 1}"):
        cbor.decode(data, what="image", max_size=len(data) - 1)
    # Oversize is refused even when the content is also malformed: size is checked first.
    with pytest.raises(FormatError, match="exceeds"):
        cbor.decode(b"\xff" * 10, max_size=4)


def test_format_error_is_a_securethread_error() -> None:
    with pytest.raises(Error):
        cbor.decode(b"\x18")


@pytest.mark.parametrize(
    "hexstr", ["a2616201616102", "1800", "f93c00", "c001", "5f40ff", "81" * 40 + "00"]
)
def test_every_error_names_the_artefact(hexstr: str) -> None:
    # Regression: errors raised deep inside the item used to omit ``what``.
    with pytest.raises(FormatError, match="^ledger record: "):
        cbor.decode(bytes.fromhex(hexstr), what="ledger record")


# --- the fast encoder against a plain reference (RFC 8949 §4.2.1) ---------------------------


def _ref_head(major: int, n: int) -> bytes:
    for size, info in ((0, None), (1, 24), (2, 25), (4, 26), (8, 27)):
        if info is None and n < 24:
            return bytes(((major << 5) | n,))
        if info is not None and n < 1 << (8 * size):
            return bytes(((major << 5) | info,)) + n.to_bytes(size, "big")
    raise ValueError


def _ref(v: Any) -> bytes:
    if v is True or v is False or v is None:
        return {True: b"\xf5", False: b"\xf4", None: b"\xf6"}[v]
    if isinstance(v, int):
        return _ref_head(0, v) if v >= 0 else _ref_head(1, -1 - v)
    if isinstance(v, bytes | bytearray | memoryview):
        return _ref_head(2, len(bytes(v))) + bytes(v)
    if isinstance(v, str):
        b = v.encode()
        return _ref_head(3, len(b)) + b
    if isinstance(v, list | tuple):
        return _ref_head(4, len(v)) + b"".join(_ref(x) for x in v)
    items = sorted((_ref(k), _ref(x)) for k, x in v.items())
    return _ref_head(5, len(items)) + b"".join(k + x for k, x in items)


def _random_value(rng: Any, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
    if kind == 1:
        return -rng.randrange(1, 2**40)
    if kind == 2:
        return rng.randbytes(rng.choice([0, 1, 23, 24, 300, 70000]))
    if kind == 3:
        return "".join(rng.choice("aZ09-é€") for _ in range(rng.randrange(0, 40)))
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return rng.randrange(0, 2**16)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 7:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3)))
    keys = ["v", "a", "bb", "kind", "é", "zz" * rng.randrange(1, 20), str(rng.random())]
    return {k: _random_value(rng, depth + 1) for k in rng.sample(keys, rng.randrange(0, 6))}


def test_fast_encoder_matches_reference_and_round_trips() -> None:
    import random

    rng = random.Random(8949)
    for _ in range(3000):
        v = _random_value(rng)
        assert cbor.encode(v) == _ref(v)
        cbor.decode(cbor.encode(v))  # canonical by the strict decoder


def test_subclasses_encode_as_their_base_type() -> None:
    import enum

    class Small(enum.IntEnum):
        TWO = 2

    class Text(str):
        pass

    v = {"e": Small.TWO, "t": Text("x"), "b": bytearray(b"ab"), "m": memoryview(b"cd")}
    assert cbor.encode(v) == cbor.encode({"e": 2, "t": "x", "b": b"ab", "m": b"cd"})
    assert cbor.encode((1, 2)) == cbor.encode([1, 2])


def test_pre_encoded_items_splice_verbatim() -> None:
    cert = bytes(range(256)) * 3
    fields = {"certificate": cbor.pre_encode(cert), "nested": cbor.pre_encode({"z": 1, "a": [2]})}
    assert cbor.encode({**fields, "v": 1}) == cbor.encode(
        {"certificate": cert, "nested": {"z": 1, "a": [2]}, "v": 1}
    )
    assert isinstance(cbor.pre_encode(1), cbor.Encoded)


def test_non_text_map_keys_are_refused() -> None:
    with pytest.raises(TypeError, match="text strings"):
        cbor.encode({1: "x"})
