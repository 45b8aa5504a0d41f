"""Ledger closure (S4): a returned ledger must end in its signed close record, and the close
record must describe exactly the records before it.

Each scenario here used to pass ``verify_ledger`` (a checkpoint is true of every prefix):
a ledger cut after any checkpoint, down to the job with zero records, and an empty ledger
whose close record says otherwise.
"""

from __future__ import annotations

import pytest

from securethread.errors import LedgerError
from securethread.formats import ledger
from securethread.formats.ledger import CloseRecordMismatchError, LedgerNotClosedError
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from securethread.keys.protocol import PrivateKey
from securethread.programmer.store import UNGUARDED, SQLiteStore

JOB = b"\x44" * 32
RECORDS = 7  # committed in batches of 2: checkpoints after records 1, 3, 5, 6


def _pending(i: int) -> ledger.PendingRecord:
    return ledger.PendingRecord(
        kind=ledger.KIND_PROVISIONED,
        slot=i,
        device_id=f"{0x1000 + i:016x}",
        time=1_700_000_000,
        cert=b"cert%d" % i,
        license_sha256=b"\x01" * 32,
        vendor_ca=b"\x0a" * 32,
    )


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return SoftwareBackend("closure").generate_ec("ledger", curve=Curve.P256, policy=SIGNING)


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory, key: PrivateKey) -> list[tuple[str, bytes]]:
    """An honest closed ledger from the real store: 7 records, 4 checkpoints, close."""
    store = SQLiteStore(tmp_path_factory.mktemp("closure") / "store.sqlite")
    try:
        store.open_job(job=JOB, job_id="job-1", quota=10, signed=b"signed-job")
        for first in range(0, RECORDS, 2):
            batch = [_pending(i) for i in range(first, min(first + 2, RECORDS))]
            slots = store.reserve(JOB, len(batch), guard=UNGUARDED)
            assert list(slots) == [p.slot for p in batch]
            store.commit(
                JOB,
                batch,
                lambda upto, head: ledger.sign_checkpoint(
                    key, job=JOB, upto=upto, head=head, time=1
                ),
            )
        store.close_job(JOB, ledger.close_signer(key, job=JOB, time=2))
        return list(store.export(JOB))
    finally:
        store.close()


def _verify(items: list[tuple[str, bytes]], key: PrivateKey) -> ledger.LedgerSummary:
    return ledger.verify_ledger(items, job=JOB, ledger_key=key.public_key())


def _close(key: PrivateKey, **fields: object) -> bytes:
    base: dict[str, object] = dict(
        job=JOB, records=0, provisioned=0, programmed=0, head=JOB, quota=10, quota_used=0, time=2
    )
    base.update(fields)
    return ledger.sign_close(key, ledger.CloseRecord(**base))  # type: ignore[arg-type]


def test_honest_closed_ledger_verifies(closed: list[tuple[str, bytes]], key: PrivateKey) -> None:
    s = _verify(closed, key)
    assert (s.records, s.provisioned, s.checkpoints) == (RECORDS, RECORDS, 4)
    assert s.close is not None and (s.close.records, s.close.quota_used) == (RECORDS, RECORDS)


def _checkpoint_positions(items: list[tuple[str, bytes]]) -> list[int]:
    return [i for i, (tag, _) in enumerate(items) if tag == "c"]


def test_ledger_cut_after_each_checkpoint_is_refused(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    for pos in _checkpoint_positions(closed):
        cut = closed[: pos + 1]
        records = sum(tag == "r" for tag, _ in cut)
        with pytest.raises(LedgerNotClosedError, match="without its signed close record") as e:
            _verify(cut, key)
        assert e.value.index == records


def test_ledger_cut_after_each_checkpoint_with_the_close_record_moved_up_is_refused(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    for pos in _checkpoint_positions(closed)[:-1]:
        cut = [*closed[: pos + 1], closed[-1]]
        with pytest.raises(CloseRecordMismatchError, match="close record says 7 records"):
            _verify(cut, key)


def test_ledger_cut_to_zero_records_is_refused(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    with pytest.raises(LedgerNotClosedError, match="with no record") as e:
        _verify([], key)
    assert e.value.index == 0
    with pytest.raises(CloseRecordMismatchError, match="says 7 records"):
        _verify([closed[-1]], key)


def test_empty_ledger_whose_close_record_says_otherwise_is_refused(key: PrivateKey) -> None:
    lying = [
        _close(key, records=3, provisioned=3, quota_used=3),  # says 3 devices
        _close(key, head=b"\x01" * 32),  # says some record ends the chain
        _close(key, job=b"\x55" * 32),  # another job's empty ledger
    ]
    for env in lying:
        with pytest.raises(CloseRecordMismatchError):
            _verify([("e", env)], key)
    assert _verify([("e", _close(key, quota_used=2))], key).records == 0  # honest and empty


def test_close_record_not_last_or_twice_is_refused(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    with pytest.raises(LedgerError, match="after its close record"):
        _verify([*closed, closed[-1]], key)
    with pytest.raises(LedgerError, match="after its close record"):
        _verify([*closed, closed[0]], key)


def test_close_record_by_another_key_is_refused(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    other = SoftwareBackend("other").generate_ec("k", curve=Curve.P256, policy=SIGNING)
    s = _verify(closed, key)
    assert s.close is not None
    forged = ledger.sign_close(other, s.close)
    with pytest.raises(LedgerError, match="close record does not verify"):
        _verify([*closed[:-1], ("e", forged)], key)


@pytest.mark.parametrize(
    "fields",
    [
        {"records": 2, "provisioned": 1, "programmed": 0},  # counts do not add up
        {"records": 1, "provisioned": 1, "quota_used": 0},  # more devices than slots counted
        {"quota_used": 11},  # more slots than the quota
        {"records": True},  # a bool is not a count
    ],
)
def test_malformed_close_records_are_refused(key: PrivateKey, fields: dict[str, object]) -> None:
    with pytest.raises(CloseRecordMismatchError):
        _close(key, **fields)


def test_no_record_is_handed_out_before_its_checkpoint_verifies(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    """The reader hands a batch out only after its checkpoint verified."""
    positions = _checkpoint_positions(closed)
    forged = list(closed)
    other = SoftwareBackend("other2").generate_ec("k", curve=Curve.P256, policy=SIGNING)
    forged[positions[1]] = ("c", ledger.sign_checkpoint(other, job=JOB, upto=3, head=JOB, time=1))
    seen: list[int] = []
    reader = ledger.LedgerReader(job=JOB, ledger_key=key.public_key())
    with pytest.raises(LedgerError, match="checkpoint after record 3 does not verify"):
        for rec in reader.records(forged):
            seen.append(rec.index)
    assert seen == [0, 1]  # the first batch only: records 2 and 3 were never handed out


def test_open_ledger_is_only_accepted_by_the_named_open_check(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    running = closed[:-1]
    s = ledger.verify_open_ledger(running, job=JOB, ledger_key=key.public_key())
    assert (s.records, s.close) == (RECORDS, None)
    with pytest.raises(LedgerNotClosedError):
        _verify(running, key)


def test_export_file_round_trip_keeps_the_close_record(
    closed: list[tuple[str, bytes]], key: PrivateKey
) -> None:
    import io

    buf = io.BytesIO()
    ledger.write_export(buf, b"signed-job", closed)
    buf.seek(0)
    _job, items = ledger.read_export(buf)
    assert _verify(list(items), key).close is not None


def test_more_records_than_one_batch_without_a_checkpoint_is_refused(key: PrivateKey) -> None:
    big = ledger.chain(
        [_pending(i % 16) for i in range(ledger.MAX_BATCH)], job=JOB, start_seq=0, prev=JOB
    )
    items = [("r", raw) for _r, _s, raw, _h in big]
    extra = ledger.chain([_pending(0)], job=JOB, start_seq=ledger.MAX_BATCH, prev=big[-1][3])
    items.append(("r", extra[0][2]))
    with pytest.raises(LedgerError, match=f"more than {ledger.MAX_BATCH} ledger records"):
        _verify(items, key)
    with pytest.raises(ValueError, match="at most"):
        ledger.chain([_pending(0)] * (ledger.MAX_BATCH + 1), job=JOB, start_seq=0, prev=JOB)
