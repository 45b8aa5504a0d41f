"""The verifier's one-pass record check (fields.matcher + cbor.decode_matching) against the
long way (cbor.decode + fields.check): it accepts every well-formed record and nothing the
long way refuses -- non-shortest heads (RFC 8949 §4.2.1), trailing bytes, keys out of
order or repeated, wrong types -- and gives back the same map."""

from __future__ import annotations

import random
import struct
from typing import Any

import attrs
import cbor2
import pytest

from securethread.errors import Error, FormatError, LedgerError
from securethread.formats import cbor, fields, ledger

JOB = bytes(range(32))
_U64 = (1 << 64) - 1
#: Integers at every head-size boundary (RFC 8949 §3: 0..23 inline, then 1, 2, 4, 8 bytes).
EDGES = [0, 23, 24, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, _U64]


def _records() -> list[bytes]:
    out = []
    for i, n in enumerate(EDGES):
        common: dict[str, Any] = {"slot": n, "device_id": f"{i:016x}", "time": EDGES[-1 - i]}
        cert = bytes([i]) * [0, 1, 23, 24, 255, 256, 300, 1000, 60_000, 4][i]
        for rec in (
            ledger.PendingRecord(kind=ledger.KIND_PROVISIONED, cert=cert,
                                 license_sha256=b"\x01" * 32, vendor_ca=b"\x02" * 32, **common),
            ledger.PendingRecord(kind=ledger.KIND_PROGRAMMED, boot=cert, **common),
        ):  # fmt: skip
            out.append(rec.encode(job=JOB, seq=n, prev=bytes([i]) * 32))
    return out


RECORDS = _records()


def _long_way(raw: bytes) -> dict[str, Any] | None:
    """The map if cbor.decode and one record body's fields.check accept it, else None."""
    try:
        body = cbor.decode(raw, max_size=ledger.MAX_RECORD_SIZE)
    except FormatError:
        return None
    for cls in ledger._RECORD_CLASSES:
        try:
            fields.check(cls, body)
        except Error:
            continue
        return body  # type: ignore[no-any-return]
    return None


def _fast(raw: bytes) -> Any:
    return cbor.decode_matching(raw, ledger._record_matcher(), max_size=ledger.MAX_RECORD_SIZE)


# --- a CBOR writer that can make any one head longer than it must be ------------------------


def _corrupted(rng: random.Random, frame: bytes) -> bytes:
    """``frame`` with one to three random bytes overwritten, deleted or inserted."""
    raw = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(len(raw))
        op = rng.randrange(3)
        if op == 0:
            raw[pos] = rng.randrange(256)
        elif op == 1:
            del raw[pos]
        else:
            raw.insert(pos, rng.randrange(256))
    return bytes(raw)


def _head(major: int, arg: int, extra: int) -> bytes:
    """A head of ``major`` with argument ``arg`` in ``extra`` more bytes (0: inline)."""
    if extra == 0:
        return bytes([major << 5 | arg])
    ai = {1: 24, 2: 25, 4: 26, 8: 27}[extra]
    return bytes([major << 5 | ai]) + arg.to_bytes(extra, "big")


def _shortest(arg: int) -> int:
    return next(n for n, top in ((0, 24), (1, 1 << 8), (2, 1 << 16), (4, 1 << 32)) if arg < top) \
        if arg < 1 << 32 else 8


def _write(m: dict[str, Any], widen: int | None) -> bytes:
    """``m`` as CBOR in its key order, head number ``widen`` one size longer than shortest."""
    heads = [0]

    def head(major: int, arg: int) -> bytes:
        n = _shortest(arg)
        if heads[0] == widen:
            n = {0: 1, 1: 2, 2: 4, 4: 8}.get(n, n)
        heads[0] += 1
        return _head(major, arg, n)

    out = head(5, len(m))
    for k, v in m.items():
        kb = k.encode()
        out += head(3, len(kb)) + kb
        if type(v) is int:
            out += head(0, v) if v >= 0 else head(1, -1 - v)
        elif type(v) is bytes:
            out += head(2, len(v)) + v
        else:
            vb = v.encode()
            out += head(3, len(vb)) + vb
    return out


def _widened(raw: bytes) -> list[bytes]:
    m = cbor.decode(raw)
    assert _write(m, None) == raw  # the writer is canonical when it widens nothing
    out = []
    for i in range(1 + 2 * len(m)):
        wide = _write(m, i)
        if len(wide) > len(raw):  # an 8-byte head cannot grow
            out.append(wide)
    return out


# --- tests ---------------------------------------------------------------------------------


def test_the_long_way_accepts_the_records() -> None:
    assert all(_long_way(raw) == cbor.decode(raw) for raw in RECORDS)


@pytest.mark.parametrize("raw", RECORDS, ids=range(len(RECORDS)))
def test_every_well_formed_record_goes_the_one_pass_way(raw: bytes) -> None:
    hit = _fast(raw)
    assert hit is not None, "a well-formed record fell back to the long way (slow, not wrong)"
    value, cls = hit
    assert value == cbor.decode(raw) and list(value) == list(cbor.decode(raw))
    assert cls is (ledger.ProvisionedRecord if "cert" in value else ledger.ProgrammedRecord)
    rec = ledger.parse_record(raw, 7)
    assert (rec.index, rec.raw, rec.body, rec.kind) == (7, raw, value, value["kind"])
    assert rec.hash == ledger.sha256(raw)


@pytest.mark.parametrize("raw", RECORDS, ids=range(len(RECORDS)))
def test_a_non_shortest_head_anywhere_is_refused_both_ways(raw: bytes) -> None:
    wide = _widened(raw)
    assert len(wide) >= 15
    for bad in wide:
        assert _fast(bad) is None
        with pytest.raises(LedgerError, match="not in shortest form"):
            ledger.parse_record(bad, 3)


@pytest.mark.parametrize("extra", [b"\x00", b"\xa0", b"\x40" * 3])
def test_trailing_bytes_are_refused_both_ways(extra: bytes) -> None:
    for raw in RECORDS:
        assert _fast(raw + extra) is None
        with pytest.raises(LedgerError, match="trailing bytes"):
            ledger.parse_record(raw + extra, 0)


def test_keys_out_of_order_or_repeated_are_refused_both_ways() -> None:
    m = cbor.decode(RECORDS[3])
    keys = list(m)
    swapped = dict(m)
    swapped = {keys[1]: m[keys[1]], keys[0]: m[keys[0]], **{k: m[k] for k in keys[2:]}}
    bad = [_write(swapped, None)]
    dup = _write(m, None)  # the map head says one more entry, and the last key comes again
    last = keys[-1].encode()
    bad.append(bytes([dup[0] + 1]) + dup[1:] + _head(3, len(last), 0) + last + b"\x00")
    for raw in bad:
        assert _fast(raw) is None
        with pytest.raises(LedgerError):
            ledger.parse_record(raw, 0)


@pytest.mark.parametrize(
    ("key", "value"),
    [("seq", True), ("seq", -1), ("slot", 1.0), ("v", 2), ("kind", "licensed?"),
     ("job", b"\x00" * 31), ("device_id", "0123456789ABCDEF"), ("cert", "text"),
     ("prev", None), ("time", [1])],
)  # fmt: skip
def test_a_wrong_value_is_refused_both_ways(key: str, value: Any) -> None:
    m = cbor.decode(RECORDS[2])
    raw = cbor2_dumps({**m, key: value})
    assert _fast(raw) is None
    with pytest.raises(LedgerError):
        ledger.parse_record(raw, 0)


def cbor2_dumps(m: dict[str, Any]) -> bytes:
    import cbor2

    return cbor2.dumps(m)  # keeps the map's order: the mutated value stays in place


def test_tags_and_floats_are_refused_both_ways() -> None:
    m = cbor.decode(RECORDS[4])
    raw = _write(m, None)
    seq = b"\x63seq"
    at = raw.index(seq) + len(seq)
    n = len(cbor.encode(m["seq"]))
    for value in (b"\xc2\x41\x05", b"\xfb" + struct.pack(">d", 1.0), b"\xf5", b"\xf7"):
        bad = raw[:at] + value + raw[at + n :]
        assert _fast(bad) is None
        with pytest.raises(LedgerError):
            ledger.parse_record(bad, 0)


def test_random_corruptions_accepted_one_pass_are_accepted_the_long_way() -> None:
    """Whatever the one pass accepts, the long way accepts as the same map (seeded)."""
    rng = random.Random(21)
    accepted = 0
    for _ in range(20_000):
        data = _corrupted(rng, rng.choice(RECORDS))
        hit = _fast(data)
        long = _long_way(data)
        if hit is not None:
            accepted += 1
            assert long is not None and long == hit[0], data.hex()
        elif long is not None:  # refused one pass but fine: must not be a real record shape
            pytest.fail(f"the long way accepts what the one pass refused: {data.hex()}")
    assert accepted > 100  # changed bytes inside strings stay records


# --- fields.matcher on bodies of every scalar rule ------------------------------------------


@fields.body("sample")
@attrs.frozen(kw_only=True)
class Sample:
    small: int = fields.integer("n", lo=-(1 << 64), hi=_U64)
    blob: bytes = fields.byte_string("blob", max_len=70_000)
    fixed: bytes = fields.byte_string("fixed", size=24)
    name: str = fields.text("näme", max_len=300)
    tag: str = fields.constant("tag", "sämple")
    version: int = fields.version(300)


@fields.body("flagged")
@attrs.frozen(kw_only=True)
class Flagged:
    flag: bool = fields.boolean("flag")
    n: int = fields.integer("n")


@fields.body("optional")
@attrs.frozen(kw_only=True)
class Optional_:
    n: int | None = fields.integer("n", absent=fields.Absent.OMIT)


def _sample(rng: random.Random) -> dict[str, Any]:
    n = rng.choice(EDGES) * rng.choice((1, -1)) - rng.randrange(2)
    n = max(min(n, _U64), -(1 << 64))
    text = "".join(rng.choice("aé水\U00010151") for _ in range(rng.choice((1, 23, 24, 100))))
    blob = bytes(rng.choice((0, 23, 24, 255, 256, 65535, 65536)))
    return fields.encode(Sample(small=n, blob=blob, fixed=bytes(24), name=text))


def test_matcher_size_is_the_canonical_encodings_size() -> None:
    match = fields.matcher([Sample])
    rng = random.Random(5)
    for _ in range(300):
        m = _sample(rng)
        raw = cbor.encode(m)
        canonical = cbor.decode(raw)
        assert match(canonical) == (Sample, len(raw))
        assert cbor.decode_matching(raw, match, max_size=1 << 20) == (canonical, Sample)


def test_matcher_refuses_what_check_refuses() -> None:
    match = fields.matcher([Sample])
    good = cbor.decode(cbor.encode(_sample(random.Random(1))))
    for key, bad in [("n", True), ("n", 1 << 64), ("blob", bytearray(3)), ("fixed", bytes(23)),
                     ("näme", ""), ("näme", 7), ("tag", "sample"), ("v", 299),
                     ("v", True)]:  # fmt: skip
        m = {**good, key: bad}
        assert match(m) is None
        with pytest.raises(FormatError):
            fields.check(Sample, m)
    assert match({k: good[k] for k in reversed(good)}) is None  # same keys, not in order
    assert match({**good, "extra": 1}) is None and match([good]) is None


def test_a_rule_it_cannot_size_falls_back_to_reencoding() -> None:
    match = fields.matcher([Flagged])
    raw = cbor.encode({"flag": True, "n": 24})
    assert match(cbor.decode(raw)) == (Flagged, None)
    assert cbor.decode_matching(raw, match, max_size=64) == ({"flag": True, "n": 24}, Flagged)
    assert cbor.decode_matching(raw[:-1] + b"\x00\x18", match, max_size=64) is None
    assert match({"flag": 1, "n": 24}) is None


def test_matcher_takes_flat_bodies_it_can_tell_apart() -> None:
    with pytest.raises(TypeError, match="nested or optional"):
        fields.matcher([Optional_])
    with pytest.raises(TypeError, match="cannot be told apart"):
        fields.matcher([Sample, Sample])


def test_decode_matching_limits() -> None:
    match = fields.matcher([Flagged])
    raw = cbor.encode({"flag": False, "n": 1})
    assert cbor.decode_matching(raw, match, max_size=len(raw) - 1) is None
    assert cbor.decode_matching(bytearray(raw), match, max_size=64) is None  # type: ignore[arg-type]
    assert cbor.decode_matching(b"", match, max_size=64) is None
    assert cbor.decode_matching(b"\x81" * 100 + b"\x00", match, max_size=1000) is None


# --- cbor.Template: a map encoded once with some values left open ---------------------------


def test_template_fills_to_the_canonical_encoding() -> None:
    rng = random.Random(9)
    for n in (1, 3, 22, 23, 24, 30, 300):
        keys = [rng.choice(["k", "é", "水", "kk"]) + str(i) for i in range(n)]
        m: dict[str, Any] = {k: rng.choice([rng.randrange(-(1 << 64), 1 << 64), b"x" * i, "t"])
                             for i, k in enumerate(keys)}  # fmt: skip
        open_keys = tuple(rng.sample(keys, min(3, n)))
        choices: list[bytes | str] = [b"", b"y" * rng.choice((1, 23, 24, 300)), "é" * 30]
        values = tuple(rng.choice(choices) for _ in open_keys)
        t = cbor.Template({k: v for k, v in m.items() if k not in open_keys}, open_keys)
        assert t.fill(*values) == cbor.encode({**m, **dict(zip(open_keys, values, strict=True))})


def test_template_refuses_what_encode_would_not_write() -> None:
    with pytest.raises(TypeError, match="open twice"):
        cbor.Template({"a": 1}, ("a",))
    t = cbor.Template({"a": 1}, ("b", "c"))
    with pytest.raises(TypeError, match="expected 2 values"):
        t.fill(b"x")
    for bad in (1, 1.5, bytearray(b"x"), None, [b"x"]):
        with pytest.raises(TypeError, match="cannot fill in"):
            t.fill(b"x", bad)  # type: ignore[arg-type]


# --- cbor.decode_sign1: the envelope's one pass over a COSE_Sign1 ---------------------------


def _sign1_the_long_way(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    try:
        outer = cbor.decode(data, max_size=1 << 16, cose_tag=True)
    except FormatError:
        return None
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != cbor.TAG_COSE_SIGN1:
        return None
    if type(outer.value) is not list or len(outer.value) != 4:
        return None
    prot, unprot, payload, sig = outer.value
    if unprot != {} or not all(type(x) is bytes for x in (prot, payload, sig)):
        return None
    return prot, payload, sig


def test_decode_sign1_accepts_only_what_decode_accepts() -> None:
    from securethread.formats import envelope

    frames = [envelope.sign1_frame(b"\xa1\x01\x26" * k, b"p" * n, b"s" * 64)
              for k, n in ((1, 0), (1, 23), (8, 24), (100, 300))]  # fmt: skip
    for frame in frames:
        assert cbor.decode_sign1(frame, max_size=1 << 16) == _sign1_the_long_way(frame)
        assert cbor.decode_sign1(frame, max_size=len(frame) - 1) is None
        assert cbor.decode_sign1(frame + b"\x00", max_size=1 << 16) is None  # trailing
    prot, payload, sig = b"\xa0", b"body", b"s" * 64
    bad = [
        b"\xd8\x12\x84" + cbor.encode(prot) + b"\xa0" + cbor.encode(payload) + cbor.encode(sig),
        b"\xd2\x84\x58\x01\xa0\xa0" + cbor.encode(payload) + cbor.encode(sig),  # long head
        b"\xd2\x84" + cbor.encode(prot) + b"\xa1\x01\x01" + cbor.encode(payload) + cbor.encode(sig),
        b"\xd2\x84" + cbor.encode(prot) + b"\xa0\xd2\x44body" + cbor.encode(sig),  # nested tag
        b"\xd8\x62\x84" + cbor.encode(prot) + b"\xa0" + cbor.encode(payload) + cbor.encode(sig),
        b"\xd2\x83" + cbor.encode(prot) + b"\xa0" + cbor.encode(payload),
    ]
    for data in bad:
        assert cbor.decode_sign1(data, max_size=1 << 16) is None
    rng = random.Random(18)
    accepted = 0
    for _ in range(20_000):
        data = _corrupted(rng, rng.choice(frames))
        fast = cbor.decode_sign1(data, max_size=1 << 16)
        assert fast == _sign1_the_long_way(data), data.hex()
        accepted += fast is not None
    assert accepted > 100
