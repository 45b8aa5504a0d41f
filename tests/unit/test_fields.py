"""The field layer (securethread/formats/fields.py): every rule, every error naming its field,
and encode(decode(x)) == x on the artefacts of the fuzz world for every converted format."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from securethread.channel.transfer import ImportedKey, WrappedEntry
from securethread.errors import Error, FormatError, VerificationError
from securethread.formats import cbor, envelope, fields, ledger
from securethread.formats import license as license_format
from securethread.formats.boot import BootConfirmation
from securethread.formats.device_trust import DeviceTrust
from securethread.formats.fields import Absent, Order
from securethread.formats.identity import IdentificationResponse
from securethread.formats.image import ImageHeader
from securethread.formats.job import ProductionJob, Targets
from securethread.formats.jobpackage import JobPackage, ProductionCARequest
from securethread.formats.license import License
from securethread.formats.onboarding import CertificateBundle, EnrolmentRequest, OfficerBundle
from securethread.formats.provisioning import ProvisioningData
from securethread.formats.responder import ResponderRequest
from securethread.formats.transcript import CeremonyRecord
from securethread.programmer.crl_mark import Anchor
from securethread.programmer.quota_mark import Mark
from tests.fuzz.world import World, build


class PartError(VerificationError):
    """A test body's own error class."""


@fields.body("part", error=PartError)
@attrs.frozen(kw_only=True)
class Part:
    label: str = fields.text("label", max_len=8, pattern=r"[a-z]+")
    size: int = fields.integer("size", lo=1, hi=100)


@fields.body("thing")
@attrs.frozen(kw_only=True)
class Thing:
    count: int = fields.integer("count")
    delta: int = fields.integer("delta", lo=-5, hi=5)
    digest: bytes = fields.byte_string("digest", size=4)
    blob: bytes = fields.byte_string("blob", min_len=1, max_len=6)
    name: str = fields.text("name", max_len=5)
    flag: bool = fields.boolean("flag")
    part: Part = fields.nested("part", Part)
    ids: tuple[int, ...] = fields.list_of(
        "ids", fields.int_rule(hi=9), max_len=3, order=Order.SORTED
    )
    tags: tuple[str, ...] = fields.list_of(
        "tags", fields.text_rule(max_len=4), min_len=1, max_len=3, order=Order.UNIQUE
    )
    parts: tuple[Part, ...] = fields.list_of("parts", fields.body_rule(Part), max_len=2)
    note: str | None = fields.text("note-x", max_len=9, absent=Absent.OMIT)
    extra: bytes | None = fields.byte_string("extra", max_len=2, absent=Absent.NULL)
    version: int = fields.version(3)

    def __attrs_post_init__(self) -> None:  # a cross-field rule stays here
        if self.count < len(self.ids):
            raise FormatError("thing: count is below the number of ids")


def good() -> dict[str, Any]:
    return {
        "v": 3,
        "count": 7,
        "delta": -5,
        "digest": b"\x00\x01\x02\x03",
        "blob": b"x",
        "name": "héllo",
        "flag": False,
        "part": {"label": "ab", "size": 100},
        "ids": [0, 2, 9],
        "tags": ["b", "a"],
        "parts": [],
        "extra": None,
    }


def test_good_body_round_trips_to_the_same_bytes() -> None:
    raw = cbor.encode(good())
    thing = fields.decode(Thing, cbor.decode(raw))
    assert thing.part == Part(label="ab", size=100) and thing.ids == (0, 2, 9)
    assert thing.note is None and thing.extra is None and thing.version == 3
    assert cbor.encode(fields.encode(thing)) == raw
    with_optional = {**good(), "note-x": "hi", "extra": b"zz"}
    thing = fields.decode(Thing, with_optional)
    assert (thing.note, thing.extra) == ("hi", b"zz")
    assert fields.encode(thing) == with_optional


def test_construction_validates_like_decode() -> None:
    with pytest.raises(FormatError, match=r"^thing: field 'count' must be an integer"):
        attrs.evolve(fields.decode(Thing, good()), count=True)
    with pytest.raises(PartError, match=r"^part: field 'size' must be an integer in 1\.\.100"):
        Part(label="a", size=0)


BAD: list[tuple[str, Any, str]] = [
    # (field, bad value, what the message says)
    ("count", True, "'count' must be an integer in 0..18446744073709551615"),
    ("count", -1, "'count' must be an integer in 0.."),
    ("count", 1 << 64, "'count' must be an integer in 0.."),
    ("count", 1.0, "'count' must be an integer"),
    ("delta", 6, "'delta' must be an integer in -5..5"),
    ("delta", False, "'delta' must be an integer in -5..5"),
    ("digest", b"abc", "'digest' must be 4 bytes"),
    ("digest", bytearray(b"abcd"), "'digest' must be 4 bytes"),
    ("digest", "abcd", "'digest' must be 4 bytes"),
    ("blob", b"", "'blob' must be 1..6 bytes"),
    ("blob", b"1234567", "'blob' must be 1..6 bytes"),
    ("name", "", "'name' must be text of 1..5 characters"),
    ("name", "toolong", "'name' must be text of 1..5 characters"),
    ("name", b"abc", "'name' must be text"),
    ("flag", 0, "'flag' must be true or false"),
    ("flag", None, "'flag' must be true or false"),
    ("part", [], "'part': part: must be a CBOR map"),
    ("part", {"label": "AB", "size": 1}, r"'part': part: field 'label' must match \[a-z\]\+"),
    ("part", {"label": "ab"}, "'part': part: missing field 'size'"),
    ("ids", (1, 2), "'ids' must be an array"),
    ("ids", [1, 1], "'ids' must be strictly ascending"),
    ("ids", [2, 1], "'ids' must be strictly ascending"),
    ("ids", [0, 1, 2, 3], "'ids' must list 0..3 items"),
    ("ids", [10], "'ids' item 0 must be an integer in 0..9"),
    ("ids", [1, True], "'ids' item 1 must be an integer"),
    ("tags", [], "'tags' must list 1..3 items"),
    ("tags", ["a", "a"], "'tags' must not repeat an item"),
    ("tags", ["abcde"], "'tags' item 0 must be text of 1..4"),
    ("parts", [{"label": "a", "size": 1, "x": 1}], "'parts': part: unknown field 'x'"),
    ("note-x", None, "'note-x' is left out when absent, not null"),
    ("note-x", "", "'note-x' must be text of 1..9"),
    ("extra", b"123", "'extra' must be 0..2 bytes"),
    ("v", 2, r"'v' must be 3 \(unsupported version 2\)"),
    ("v", True, r"'v' must be 3 \(unsupported version True\)"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_bad_field_is_refused_naming_it(key: str, value: Any, message: str) -> None:
    with pytest.raises(FormatError, match=f"^thing: field {message}"):
        fields.decode(Thing, {**good(), key: value})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({k: v for k, v in good().items() if k != "flag"}, "thing: missing field 'flag'"),
        ({k: v for k, v in good().items() if k != "extra"}, "missing field 'extra'"),
        ({**good(), "Flag": True}, "thing: unknown field 'Flag'"),
        ({**good(), "note": "hi"}, "thing: unknown field 'note'"),
        ([good()], "thing: must be a CBOR map"),
        (None, "thing: must be a CBOR map"),
    ],
)
def test_key_set_is_exact(raw: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        fields.decode(Thing, raw)


def test_nested_error_is_raised_as_the_outer_format() -> None:
    """The part's own error class names the part; the thing raises its own class around it."""
    with pytest.raises(FormatError) as info:
        fields.decode(Thing, {**good(), "part": {"label": "ab", "size": 0}})
    assert not isinstance(info.value, PartError)
    assert str(info.value) == "thing: field 'part': part: field 'size' must be an integer in 1..100"
    with pytest.raises(PartError, match="^part: unknown field 'z'"):
        fields.decode(Part, {"label": "a", "size": 1, "z": 0})


def test_cross_field_rule_runs_after_field_rules() -> None:
    with pytest.raises(FormatError, match="count is below"):
        fields.decode(Thing, {**good(), "count": 2})


def test_declaration_mistakes_are_programming_errors() -> None:
    with pytest.raises(TypeError, match="not a field-layer field"):

        @fields.body("plain")
        @attrs.frozen
        class Plain:
            x: int

    with pytest.raises(TypeError, match="key twice"):

        @fields.body("twice")
        @attrs.frozen
        class Twice:
            a: int = fields.integer("k")
            b: int = fields.integer("k")

    with pytest.raises(TypeError, match="only lists of scalars"):
        fields.list_of("x", fields.body_rule(Part), max_len=1, order=Order.SORTED)
    with pytest.raises(TypeError, match="exactly one of"):
        fields.byte_string("x")
    with pytest.raises(TypeError, match="not declared"):
        fields.encode(object())


def test_errors_are_rooted_at_securethread_error() -> None:
    with pytest.raises(Error):
        fields.decode(Part, {"label": 1, "size": 1})


# --- every converted format: encode(decode(x)) == x on the fuzz world's artefacts -----------


@pytest.fixture(scope="module")
def world() -> World:
    return build()


def _signed_body(data: bytes) -> list[Any]:
    return [envelope.peek_body(data)[1]]


def _license_body(data: bytes) -> list[Any]:
    return _signed_body(cbor.decode(data)["envelope"])


def _export_items(tag: str) -> Callable[[bytes], list[Any]]:
    def bodies(data: bytes) -> list[Any]:
        items = ledger.read_export(io.BytesIO(data))[1]
        return [envelope.peek_body(p)[1] for t, p in items if t == tag]

    return bodies


def _records(kind: str) -> Callable[[bytes], list[Any]]:
    def bodies(data: bytes) -> list[Any]:
        items = ledger.read_export(io.BytesIO(data))[1]
        records = [cbor.decode(p) for t, p in items if t == ledger.TAG_RECORD]
        return [r for r in records if r["kind"] == kind]

    return bodies


def _ceremony_records(data: bytes) -> list[Any]:
    """The record maps of a transcript file (each frame a COSE_Sign1 around one record)."""
    from securethread.formats.transcript import MAGIC, SignedRecord

    out, pos = [], len(MAGIC)
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append(cbor.decode(SignedRecord.from_bytes(data[pos + 4 : pos + 4 + n]).record))
        pos += 4 + n
    return out


#: format -> (fuzz-world seed, the decoded bodies in one artefact, the body class)
ROUND_TRIPS: dict[str, tuple[str, Callable[[bytes], list[Any]], type]] = {
    "license": ("license", _license_body, License),
    "license container": ("license", lambda d: [cbor.decode(d)], license_format._Container),
    "boot confirmation": ("boot_confirmation", _signed_body, BootConfirmation),
    "ledger checkpoint": ("ledger_export", _export_items(ledger.TAG_CHECKPOINT), ledger.Checkpoint),
    "ledger close record": ("ledger_export", _export_items(ledger.TAG_CLOSE), ledger.CloseRecord),
    "job": ("job", _signed_body, ProductionJob),
    "device trust": ("device_trust", _signed_body, DeviceTrust),
    "enrolment request": ("enrolment_request", _signed_body, EnrolmentRequest),
    "certificate bundle": ("certificate_bundle", _signed_body, CertificateBundle),
    "officer bundle": (
        "certificate_bundle", lambda d: _signed_body(_signed_body(d)[0]["officers"]), OfficerBundle,
    ),
    "image header": ("image_header", lambda d: [cbor.decode(d[10:])], ImageHeader),
    "ceremony record": ("transcript", lambda d: _ceremony_records(d), CeremonyRecord),
    "job package": ("job_package", lambda data: [cbor.decode(data)], JobPackage),
    "provisioning data": ("provisioning", lambda data: [cbor.decode(data)], ProvisioningData),
    "identification response": (
        "identification", lambda data: [cbor.decode(data)], IdentificationResponse,
    ),
    "ledger provisioned record": (
        "ledger_export", _records(ledger.KIND_PROVISIONED), ledger.ProvisionedRecord,
    ),
    "ledger programmed record": (
        "ledger_export", _records(ledger.KIND_PROGRAMMED), ledger.ProgrammedRecord,
    ),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_encode_decode_is_byte_identical_on_real_artefacts(world: World, name: str) -> None:
    seed, bodies_of, cls = ROUND_TRIPS[name]
    bodies = [b for data in world.seeds[seed] for b in bodies_of(data)]
    assert bodies, name
    for raw in bodies:
        obj: Any = fields.decode(cls, raw)
        assert cbor.encode(fields.encode(obj)) == cbor.encode(raw)
        if cls in (ledger.ProvisionedRecord, ledger.ProgrammedRecord):
            fields.check(cls, raw)  # parse_record checks records in place


def test_job_package_optional_responder_request_is_left_out_when_absent() -> None:
    package = JobPackage(
        job=b"j", production_ca=b"p", manifest=b"m", device_trust=b"d", vendors=(b"v",)
    )
    assert "ocsp-responder" not in fields.encode(package)
    with_request = attrs.evolve(package, ocsp_responder=b"r")
    assert JobPackage.from_bytes(with_request.to_bytes()) == with_request
    with pytest.raises(FormatError, match="'ocsp-responder' is left out when absent, not null"):
        fields.decode(JobPackage, {**fields.encode(package), "ocsp-responder": None})


def test_production_ca_request_names_its_field() -> None:
    req = ProductionCARequest("prog1", "job-1", b"csr")
    assert fields.decode(ProductionCARequest, fields.encode(req)) == req
    with pytest.raises(FormatError, match="^production-CA request: field 'programmer' must match"):
        fields.decode(ProductionCARequest, {**fields.encode(req), "programmer": "../x"})


def test_responder_request_round_trips_and_names_its_field() -> None:
    req = ResponderRequest("job-1", bytes(32), b"csr")
    raw = cbor.encode(fields.encode(req))
    assert fields.decode(ResponderRequest, cbor.decode(raw)) == req
    with pytest.raises(FormatError, match="^OCSP responder request: field 'job_id' must match"):
        fields.decode(ResponderRequest, {**cbor.decode(raw), "job_id": "a b"})


@fields.body("tagged")
@attrs.frozen(kw_only=True)
class Tagged:
    kind: str = fields.constant("kind", "a")
    n: int = fields.integer("n", hi=3)


def test_check_validates_in_place_like_decode() -> None:
    fields.check(Tagged, {"kind": "a", "n": 3})
    assert fields.encode(Tagged(n=1)) == {"kind": "a", "n": 1}
    for raw, message in [
        ({"kind": "b", "n": 1}, r"field 'kind' must be 'a' \(unsupported kind 'b'\)"),
        ({"kind": "a", "n": 4}, "field 'n' must be an integer in 0..3"),
        ({"kind": "a"}, "missing field 'n'"),
        ({"kind": "a", "n": 1, "m": 1}, "unknown field 'm'"),
    ]:
        with pytest.raises(FormatError, match=f"^tagged: {message}"):
            fields.check(Tagged, raw)
        with pytest.raises(FormatError, match=f"^tagged: {message}"):
            fields.decode(Tagged, raw)
    with pytest.raises(TypeError, match="use decode"):
        fields.check(Thing, good())


def test_token_records_round_trip_and_name_their_field() -> None:
    """The quota mark and the revocation anchor (kept in the programmer token)."""
    mark = Mark(job=b"j" * 32, job_id="job-1", store_id=b"s" * 16, generation=1, committed=2,
                reserved=3, limit=4, head=b"h" * 32, nonce=b"n" * 8)  # fmt: skip
    assert Mark.from_bytes(mark.to_bytes()) == mark
    with pytest.raises(FormatError, match="^quota mark: field 'gen' must be an integer"):
        fields.decode(Mark, {**fields.encode(mark), "gen": 1 << 63})
    anchor = Anchor(job=b"j" * 32, job_id="job-1", opened=True, crl=b"der")
    assert fields.decode(Anchor, fields.encode(anchor)) == anchor
    with pytest.raises(FormatError, match="^revocation anchor: field 'opened' must be true or"):
        fields.decode(Anchor, {**fields.encode(anchor), "opened": 1})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ranges": [[2, 3], [0, 1]], "explicit": []}, "'ranges' must be strictly ascending"),
        ({"ranges": [[0, 1], [0, 1]], "explicit": []}, "'ranges' must be strictly ascending"),
        ({"ranges": [[0, 1, 2]], "explicit": []}, "'ranges' must be an array of 2 items"),
        ({"ranges": [[0, True]], "explicit": []}, "'ranges' item 0 item 1 must be an integer"),
        ({"ranges": [], "explicit": ["00000000000000bb", "00000000000000aa"]},
         "'explicit' must be strictly ascending"),
        ({"ranges": [], "explicit": ["00000000000000AA"]}, "'explicit' item 0 must match"),
        ({"ranges": [], "explicit": {"00000000000000aa": 1}}, "'explicit' must be an array"),
    ],
)  # fmt: skip
def test_sets_and_sorted_lists_have_one_encoding(raw: Any, message: str) -> None:
    """Python callers may give targets in any order (they are sorted); the wire may not."""
    assert Targets(ranges=((2, 3), (0, 1))) == Targets(ranges=((0, 1), (2, 3)))
    assert fields.encode(Targets(explicit=frozenset({"00000000000000bb", "00000000000000aa"}))) == {
        "ranges": [], "explicit": ["00000000000000aa", "00000000000000bb"]
    }  # fmt: skip
    with pytest.raises(FormatError, match=f"^job targets: field {message}"):
        Targets.from_obj(raw)


@fields.body("notes")
@attrs.frozen(kw_only=True)
class Notes:
    named: tuple[tuple[str, Any], ...] = fields.map_of(
        "named", fields.text_rule(max_len=3),
        fields.one_of(
            fields.int_rule(hi=9), fields.list_rule(fields.text_rule(max_len=2), max_len=2)
        ),
        max_len=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"named": {"a": 1, "b": ["x"]}}, None),
        ({"named": []}, "'named' must be a map"),
        ({"named": {"abcd": 1}}, "'named' name 'abcd' must be text of 1..3"),
        ({"named": {"a": 10}}, "'named' 'a' must be an integer in 0..9 or must list 0..2 items"),
        ({"named": {"a": True}}, "'named' 'a' must be an integer"),
        ({"named": {"a": ["xyz"]}}, "'named' 'a' must be an integer in 0..9 or item 0 must"),
        ({"named": {"a": 1, "b": 2, "c": 3}}, "'named' must map 0..2 names"),
    ],
)
def test_writer_named_maps_and_alternatives(raw: Any, message: str | None) -> None:
    if message is None:
        notes = fields.decode(Notes, raw)
        assert notes.named == (("a", 1), ("b", ("x",)))  # sorted pairs, a list as a tuple
        assert fields.encode(notes) == raw
        assert Notes(named={"b": ["x"], "a": 1}) == notes  # type: ignore[arg-type]
        return
    with pytest.raises(FormatError, match=f"^notes: field {message}"):
        fields.decode(Notes, raw)


def test_key_transfer_entries_are_exact() -> None:
    """The acknowledgement's ``transferable`` was read with bool(): 1 or "no" passed as a
    flag. Declared as a boolean, only true or false is accepted."""
    entry = WrappedEntry(label="image-key", key_id=b"id", usage="encrypt", transferable=True,
                         wrapped=b"w" * 40, kcv=b"k" * 8)  # fmt: skip
    assert WrappedEntry.from_cbor(entry.to_cbor()) == entry
    ack = ImportedKey.of(entry)
    assert ImportedKey.from_cbor(ack.to_cbor()) == ack
    for bad in (1, "no", None):
        with pytest.raises(FormatError, match="^acknowledgement entry: field 'transferable'"):
            ImportedKey.from_cbor({**ack.to_cbor(), "transferable": bad})
    with pytest.raises(FormatError, match="^transfer entry: field 'label' must be 1..128 bytes"):
        WrappedEntry.from_cbor({**entry.to_cbor(), "label": "é" * 65})  # 130 bytes of UTF-8
