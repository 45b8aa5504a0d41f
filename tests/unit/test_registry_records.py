"""Registry ingest's fast record walk reads what the strict CBOR decoder reads, and refuses
what is not a ledger record's flat map (a FormatError, never an IndexError or a wrong row)."""

from __future__ import annotations

import pytest

from benchmarks.synth_ledger import device_records, make_world
from securethread.errors import FormatError
from securethread.formats import cbor, ledger
from securethread.oem.registry import _provisioned_fields


@pytest.fixture(scope="module")
def records() -> list[bytes]:
    w = make_world(4, label="walk")
    pending = device_records(w, 0) + device_records(w, 1)
    return [raw for _r, _s, raw, _h in ledger.chain(pending, job=w.job_sha256, start_seq=0,
                                                    prev=w.job_sha256)]  # fmt: skip


def test_fields_are_the_strict_decoders(records: list[bytes]) -> None:
    provisioned = 0
    for raw in records:
        strict = ledger.parse_record(raw, 0).body
        fast = _provisioned_fields(raw)
        if strict["kind"] != ledger.KIND_PROVISIONED:
            assert fast is None
            continue
        provisioned += 1
        assert fast is not None
        assert {k.decode(): v for k, v in fast.items()} == {
            k: v.encode() if isinstance(v, str) else v for k, v in strict.items()
        }
    assert provisioned == 2


@pytest.mark.parametrize(
    "mangle",
    [
        lambda r: r[:-1],  # truncated
        lambda r: r[: len(r) // 2],
        lambda r: r + b"\x00",  # trailing byte
        lambda r: b"\x80" + r[1:],  # an array, not a map
        lambda r: cbor.encode({"kind": "provisioned", "cert": [1, 2]}),  # nested value
        lambda r: cbor.encode({"kind": "provisioned", "slot": -1}),  # negative integer
        lambda r: b"\xa1\x01" + cbor.encode("provisioned"),  # a key that is not text
        lambda r: b"\xbf" + r[1:],  # indefinite-length map
        lambda r: b"",
    ],
)
def test_what_is_not_a_flat_record_is_a_format_error(
    records: list[bytes], mangle: object
) -> None:
    with pytest.raises(FormatError):
        _provisioned_fields(mangle(records[0]))  # type: ignore[operator]


def test_the_kind_pair_tells_provisioned_records_from_the_others(records: list[bytes]) -> None:
    # ingest skips a record without these bytes unwalked: every provisioned record has them
    from securethread.oem.registry import _PROVISIONED_PAIR

    for raw in records:
        provisioned = ledger.parse_record(raw, 0).kind == ledger.KIND_PROVISIONED
        assert (_PROVISIONED_PAIR in raw) == provisioned
