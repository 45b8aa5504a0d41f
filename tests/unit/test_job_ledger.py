"""Jobs, the quota store and the ledger, on the software backend (pure logic + SQLite)."""

from __future__ import annotations

import io
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    FormatError,
    JobError,
    LedgerError,
    NotTargetedError,
    QuotaExceededError,
    SignatureError,
)
from securethread.formats import cbor, ledger
from securethread.formats.job import (
    ProductionJob,
    Targets,
    cosign_job,
    sign_job,
    verify_job,
)
from securethread.formats.ledger import LedgerNotClosedError
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint
from securethread.pki.profile import DeviceProfile
from securethread.programmer.store import UNGUARDED, JobClosedError, SQLiteStore
from tests import cose_edit

PROGRAMMER = b"\x11" * 32
VENDOR_CA = b"\x0a" * 32


@pytest.fixture
def keys() -> SoftwareBackend:
    b = SoftwareBackend("oem")
    for name in ("officer-1", "officer-2", "officer-3", "ledger"):
        b.generate_ec(name, curve=Curve.P256, policy=SIGNING)
    return b


def make_job(**kw: object) -> ProductionJob:
    now = int(time.time())
    args: dict[str, object] = dict(
        job_id="job-1",
        device_class="sensor-v1",
        targets=Targets(ranges=((0x1000, 0x1FFF),), explicit=frozenset({"00000000000000aa"})),
        quota=5,
        not_before=now - 60,
        not_after=now + 3600,
        image_id="fw-1",
        manifest_sha256=b"\x22" * 32,
        programmer=PROGRAMMER,
        certificate=DeviceProfile(organisation="Test OEM"),
        production_ca=b"\x33" * 32,
        vendors=(VENDOR_CA,),
    )
    args.update(kw)
    return ProductionJob(**args)  # type: ignore[arg-type]


def officers(b: SoftwareBackend, *names: str) -> dict[bytes, ec.EllipticCurvePublicKey]:
    return {fingerprint(b.public_key(n)): b.public_key(n) for n in names}


def test_job_round_trip_and_targets(keys: SoftwareBackend) -> None:
    signed = sign_job(make_job(), [keys.private_key("officer-1")])
    v = verify_job(
        signed, officers=officers(keys, "officer-1"), programmer=PROGRAMMER, min_threshold=1
    )
    assert v.job.quota == 5
    assert "0000000000001abc" in v.job.targets
    assert "00000000000000aa" in v.job.targets
    with pytest.raises(NotTargetedError):
        v.job.targets.check("0000000000002000")


@pytest.mark.parametrize(
    "kw, err",
    [
        ({"quota": 0}, JobError),
        ({"quota": -1}, JobError),
        ({"job_id": "bad id!"}, FormatError),
        ({"manifest_sha256": b"x"}, FormatError),
        ({"not_after": 0, "not_before": 10}, JobError),
        ({"threshold": 0}, JobError),
    ],
)
def test_bad_job_fields_are_refused(kw: dict[str, object], err: type[Exception]) -> None:
    with pytest.raises(err):
        make_job(**kw)


def test_bad_targets_refused() -> None:
    with pytest.raises(FormatError):
        Targets()
    with pytest.raises(FormatError):
        Targets(ranges=((5, 1),))
    with pytest.raises(FormatError):
        Targets(explicit=frozenset({"XYZ"}))


def test_expired_foreign_tampered_jobs(keys: SoftwareBackend) -> None:
    trusted = officers(keys, "officer-1")
    now = int(time.time())
    expired = sign_job(
        make_job(not_before=now - 100, not_after=now - 10), [keys.private_key("officer-1")]
    )
    with pytest.raises(JobError, match="expired"):
        verify_job(expired, officers=trusted, programmer=PROGRAMMER, min_threshold=1)
    future = sign_job(
        make_job(not_before=now + 100, not_after=now + 200), [keys.private_key("officer-1")]
    )
    with pytest.raises(JobError, match="not valid yet"):
        verify_job(future, officers=trusted, programmer=PROGRAMMER, min_threshold=1)
    foreign = sign_job(make_job(programmer=b"\x33" * 32), [keys.private_key("officer-1")])
    with pytest.raises(JobError, match="another programmer"):
        verify_job(foreign, officers=trusted, programmer=PROGRAMMER, min_threshold=1)
    good = sign_job(make_job(), [keys.private_key("officer-1")])
    body = cose_edit.body(good)
    body["quota"] = 5000
    with pytest.raises(SignatureError):
        verify_job(
            cose_edit.with_body(good, body),
            officers=trusted,
            programmer=PROGRAMMER,
            min_threshold=1,
        )
    with pytest.raises(SignatureError):
        verify_job(
            good, officers=officers(keys, "officer-2"), programmer=PROGRAMMER, min_threshold=1
        )
    with pytest.raises(FormatError):
        verify_job(good[:-3], officers=trusted, programmer=PROGRAMMER, min_threshold=1)


def test_m_of_n(keys: SoftwareBackend) -> None:
    trusted = officers(keys, "officer-1", "officer-2", "officer-3")
    one = sign_job(make_job(threshold=2), [keys.private_key("officer-1")])
    with pytest.raises(SignatureError, match="the job requires 2"):
        verify_job(one, officers=trusted, programmer=PROGRAMMER, min_threshold=1)
    two = cosign_job(one, keys.private_key("officer-3"))
    v = verify_job(two, officers=trusted, programmer=PROGRAMMER, min_threshold=1)
    assert v.job.threshold == 2
    # the programmer's own floor applies even if the job asks for less
    with pytest.raises(SignatureError):
        verify_job(one, officers=trusted, programmer=PROGRAMMER, min_threshold=2)
    with pytest.raises(FormatError, match="already signed"):
        cosign_job(two, keys.private_key("officer-1"))


# --- store + ledger --------------------------------------------------------------------------

JOB = b"\x44" * 32


def pending(i: int, kind: str = ledger.KIND_PROVISIONED) -> ledger.PendingRecord:
    return ledger.PendingRecord(
        kind=kind,
        slot=i,
        device_id=f"{i:016x}",
        time=1_700_000_000 + i,
        cert=b"cert%d" % i if kind == ledger.KIND_PROVISIONED else b"",
        license_sha256=b"\x01" * 32 if kind == ledger.KIND_PROVISIONED else b"",
        vendor_ca=VENDOR_CA if kind == ledger.KIND_PROVISIONED else b"",
        boot=b"boot" if kind == ledger.KIND_PROGRAMMED else b"",
    )


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    s = SQLiteStore(tmp_path / "prod.sqlite")
    s.open_job(job=JOB, job_id="job-1", quota=10, signed=b"signed-job")
    yield s
    s.close()


def signer(keys: SoftwareBackend):  # type: ignore[no-untyped-def]
    k = keys.private_key("ledger")
    return lambda upto, head: ledger.sign_checkpoint(k, job=JOB, upto=upto, head=head, time=1)


def closer(keys: SoftwareBackend) -> ledger.CloseSigner:
    return ledger.close_signer(keys.private_key("ledger"), job=JOB, time=2)


def test_quota_reservation_never_exceeds(store: SQLiteStore) -> None:
    assert store.reserve(JOB, 4, guard=UNGUARDED) == [0, 1, 2, 3]
    assert store.reserve(JOB, 4, guard=UNGUARDED) == [4, 5, 6, 7]
    assert store.reserve(JOB, 4, guard=UNGUARDED) == [8, 9]  # only what is left
    with pytest.raises(QuotaExceededError):
        store.reserve(JOB, 1, guard=UNGUARDED)
    assert store.counts(JOB) == (10, 10)
    with pytest.raises(JobError):
        store.reserve(b"\x00" * 32, 1, guard=UNGUARDED)
    with pytest.raises(JobError):
        store.open_job(job=JOB, job_id="job-1", quota=11, signed=b"x")


def test_commit_export_verify(store: SQLiteStore, keys: SoftwareBackend) -> None:
    assert store.reserve(JOB, 3, guard=UNGUARDED) == [0, 1, 2]
    c1 = store.commit(JOB, [pending(0), pending(1)], signer(keys))
    c2 = store.commit(
        JOB, [pending(2), pending(1), pending(0, ledger.KIND_PROGRAMMED)], signer(keys)
    )
    assert [seq for _, seq, _ in c1.records] == [0, 1]
    assert [p.device_id for p in c2.duplicates] == [f"{1:016x}"]
    pub = keys.public_key("ledger")
    # while the run is open: the programmer's own check passes, a returned ledger would not
    so_far = ledger.verify_open_ledger(store.export(JOB), job=JOB, ledger_key=pub)
    assert (so_far.records, so_far.close) == (4, None)
    with pytest.raises(LedgerNotClosedError):
        ledger.verify_ledger(store.export(JOB), job=JOB, ledger_key=pub)
    store.reserve(JOB, 1, guard=UNGUARDED)  # a slot counted for a device that never got its record
    close = store.close_job(JOB, closer(keys))
    assert store.close_job(JOB, closer(keys)) == close  # idempotent
    items = list(store.export(JOB))
    assert items[-1] == (ledger.TAG_CLOSE, close)
    summary = ledger.verify_ledger(items, job=JOB, ledger_key=pub)
    assert (summary.records, summary.provisioned, summary.programmed, summary.checkpoints) == (
        4,
        3,
        1,
        2,
    )
    assert summary.close is not None
    assert (summary.close.quota, summary.close.quota_used, summary.close.head) == (
        10,
        4,
        summary.head,
    )
    buf = io.BytesIO()
    ledger.write_export(buf, b"signed-job", items)
    buf.seek(0)
    job_signed, it = ledger.read_export(buf)
    assert job_signed == b"signed-job"
    assert ledger.verify_ledger(it, job=JOB, ledger_key=keys.public_key("ledger")).records == 4


def _records(store: SQLiteStore, keys: SoftwareBackend) -> list[tuple[str, bytes]]:
    store.reserve(JOB, 6, guard=UNGUARDED)
    for i in range(0, 6, 2):
        store.commit(JOB, [pending(i), pending(i + 1)], signer(keys))
    store.close_job(JOB, closer(keys))
    return list(store.export(JOB))


def _verify(items: list[tuple[str, bytes]], keys: SoftwareBackend) -> None:
    ledger.verify_ledger(items, job=JOB, ledger_key=keys.public_key("ledger"))


def test_tampered_ledgers_name_the_first_bad_record(
    store: SQLiteStore, keys: SoftwareBackend
) -> None:
    items = _records(store, keys)
    recs = [i for i, (t, _) in enumerate(items) if t == "r"]
    # deleted record 2
    with pytest.raises(LedgerError) as e:
        _verify([it for k, it in enumerate(items) if k != recs[2]], keys)
    assert e.value.index == 2
    # reordered records 2 and 3
    swapped = list(items)
    swapped[recs[2]], swapped[recs[3]] = swapped[recs[3]], swapped[recs[2]]
    with pytest.raises(LedgerError) as e:
        _verify(swapped, keys)
    assert e.value.index == 2
    # duplicated record 1
    dup = list(items)
    dup.insert(recs[1] + 1, items[recs[1]])
    with pytest.raises(LedgerError) as e:
        _verify(dup, keys)
    assert e.value.index == 2
    # altered record 3 (a byte of its certificate)
    altered = list(items)
    body = cbor.decode(items[recs[3]][1])
    body["cert"] = b"forged"
    altered[recs[3]] = ("r", cbor.encode(body))
    with pytest.raises(LedgerError) as e:
        _verify(altered, keys)
    assert e.value.index == 3
    # altered last record (only its checkpoint commits to it)
    last = list(items)
    body = cbor.decode(items[recs[5]][1])
    body["device_id"] = "00000000000000ff"
    last[recs[5]] = ("r", cbor.encode(body))
    with pytest.raises(LedgerError) as e:
        _verify(last, keys)
    assert e.value.index == 5
    # final checkpoint removed (the close record follows uncovered records)
    with pytest.raises(LedgerError, match="not covered") as e:
        _verify(items[:-2] + items[-1:], keys)
    assert e.value.index == 4
    # wrong ledger key
    other = SoftwareBackend()
    other.generate_ec("x", curve=Curve.P256, policy=SIGNING)
    with pytest.raises(LedgerError):
        ledger.verify_ledger(items, job=JOB, ledger_key=other.public_key("x"))
    # garbage record
    with pytest.raises(LedgerError) as e:
        _verify([("r", b"\xff\x00")] + items[1:], keys)
    assert e.value.index == 0


def test_closed_job_takes_no_more_slots_or_records(
    store: SQLiteStore, keys: SoftwareBackend
) -> None:
    store.reserve(JOB, 1, guard=UNGUARDED)
    store.commit(JOB, [pending(0)], signer(keys))
    store.close_job(JOB, closer(keys))
    before = list(store.export(JOB))
    with pytest.raises(JobClosedError, match="closed"):
        store.reserve(JOB, 1, guard=UNGUARDED)
    with pytest.raises(JobClosedError, match="closed"):
        store.commit(JOB, [pending(1)], signer(keys))
    assert list(store.export(JOB)) == before
    assert store.counts(JOB) == (10, 1)


def test_closing_a_job_the_store_does_not_know_is_refused(
    store: SQLiteStore, keys: SoftwareBackend
) -> None:
    with pytest.raises(JobError, match="not open"):
        store.close_job(b"\x00" * 32, closer(keys))


def test_verify_job_has_no_default_threshold_floor(keys: SoftwareBackend) -> None:
    """M-of-N for real: the verifier must state its floor (it used to default to 1)."""
    import inspect

    param = inspect.signature(verify_job).parameters["min_threshold"]
    assert param.default is inspect.Parameter.empty
    assert param.kind is inspect.Parameter.KEYWORD_ONLY
    signed = sign_job(make_job(), [keys.private_key("officer-1")])
    with pytest.raises(TypeError, match="min_threshold"):
        verify_job(signed, officers=officers(keys, "officer-1"), programmer=PROGRAMMER)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="floor"):
        verify_job(
            signed, officers=officers(keys, "officer-1"), programmer=PROGRAMMER, min_threshold=0
        )


def test_job_signed_by_one_officer_with_threshold_one_is_refused_under_a_floor_of_two(
    keys: SoftwareBackend,
) -> None:
    trusted = officers(keys, "officer-1", "officer-2", "officer-3")
    lone = sign_job(make_job(threshold=1, quota=1_000_000), [keys.private_key("officer-1")])
    with pytest.raises(SignatureError, match="1 valid signature.*2 required"):
        verify_job(lone, officers=trusted, programmer=PROGRAMMER, min_threshold=2)
    both = cosign_job(lone, keys.private_key("officer-2"))
    assert verify_job(both, officers=trusted, programmer=PROGRAMMER, min_threshold=2).job.quota


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", True),
        ("v", True),
        ("quota", True),
        ("not_before", 1.5),
        ("certificate_days", "3650"),
        ("manifest_sha256", "x" * 32),
    ],
)
def test_job_fields_of_the_wrong_type_are_refused(
    keys: SoftwareBackend, field: str, value: object
) -> None:
    body = make_job().to_obj()
    body[field] = value
    with pytest.raises((FormatError, JobError)):
        ProductionJob.from_obj(body)


def test_target_ranges_have_one_encoding() -> None:
    a = Targets(ranges=((0x2000, 0x2FFF), (0x1000, 0x1FFF)))
    b = Targets(ranges=((0x1000, 0x1FFF), (0x2000, 0x2FFF)))
    assert a == b and a.to_obj() == b.to_obj()
    unsorted = {"ranges": [[0x2000, 0x2FFF], [0x1000, 0x1FFF]], "explicit": []}
    with pytest.raises(FormatError, match="field .ranges. must be strictly ascending"):
        Targets.from_obj(unsorted)
