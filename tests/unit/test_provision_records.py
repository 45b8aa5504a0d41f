"""The ledger of a "provision" job (issue 20, the silicon vendor's fab) on the software backend:
its provisioned records carry no license (a strict body of their own,
:class:`~securethread.formats.ledger.ProvisionOnlyRecord`), it has no programmed record, and
reconciliation holds each record to the body its job's stage writes. A provisioning ledger
claiming devices another fab made -- a vendor CA the job does not name, a certificate from
another job's production CA -- is refused naming the record."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from securethread.errors import JobError, LedgerError
from securethread.formats import cbor, ledger
from securethread.formats.job import STAGE_PROVISION, cosign_job, job_hash, sign_job
from securethread.formats.reconciliation import ReconciliationError
from securethread.programmer.opened import check_manifest
from tests.unit.ledger_world import (
    JOB_ID,
    OTHER_VENDOR_CA,
    World,
    device_issuer,
    make_world,
    production_ca,
)

JOB = b"\x07" * 32


def _fab(w: World) -> World:
    """``w`` with its job made a "provision" job (no image): signed again, so a new job
    identity and device serials carrying its tag."""
    job = attrs.evolve(w.job, stage=STAGE_PROVISION, image_id=None, manifest_sha256=None)
    signed = cosign_job(sign_job(job, [w.officer_keys[0]]), w.officer_keys[1])
    issuer = device_issuer(w.backend, "pca", w.pca, job_id=JOB_ID, identity=job_hash(signed))
    return attrs.evolve(w, job=job, job_signed=signed, issuer=issuer)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world("full")


@pytest.fixture(scope="module")
def fab() -> World:
    return _fab(make_world("fab"))


def _certified(w: World, slot: int, **kw: Any) -> ledger.PendingRecord:
    """What the fab's line records: certificate and vendor CA, no license."""
    return attrs.evolve(w.provisioned(slot, **kw), license_sha256=b"")


def _pending(**kw: Any) -> ledger.PendingRecord:
    args: dict[str, Any] = dict(kind=ledger.KIND_PROVISIONED, slot=0, device_id="5ec0000000000000",
                                time=1, cert=b"der", vendor_ca=b"\x0a" * 32)  # fmt: skip
    return ledger.PendingRecord(**{**args, **kw})


def test_a_provision_record_has_no_license_key_and_parses_strictly() -> None:
    raw = _pending().encode(job=JOB, seq=0, prev=JOB)
    body = cbor.decode(raw)
    assert "license_sha256" not in body and body["kind"] == "provisioned"
    assert ledger.parse_record(raw, 0).body == body
    licensed = _pending(license_sha256=b"\x01" * 32).encode(job=JOB, seq=0, prev=JOB)
    assert cbor.decode(licensed)["license_sha256"] == b"\x01" * 32  # the "full" job's body
    for bad, why in (
        ({**body, "boot": b"x"}, "unknown field 'boot'"),
        ({k: v for k, v in body.items() if k != "vendor_ca"}, "missing field 'vendor_ca'"),
        ({**body, "license_sha256": b"\x01" * 31}, "'license_sha256' must be 32 bytes"),
        ({**body, "license_sha256": None}, "'license_sha256' must be 32 bytes"),
    ):
        with pytest.raises(LedgerError, match=why):
            ledger.parse_record(cbor.encode(bad), 3)


def test_the_fab_ledger_reconciles_without_a_manifest(fab: World) -> None:
    report = fab.check(fab.items([_certified(fab, s) for s in range(4)]), manifest=None)
    assert (report.provisioned, report.programmed, report.records) == (4, 0, 4)


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (lambda w: [_certified(w, 0), w.provisioned(1)], "ledger record 1: the record names a "
         "license: job reconcile-job is a 'provision' job"),
        (lambda w: [_certified(w, 0), w.programmed(0)], "ledger record 1: job reconcile-job is a "
         "'provision' job: it programs nothing"),
        (lambda w: [_certified(w, 0), _certified(w, 1, vendor_ca=OTHER_VENDOR_CA)],
         "ledger record 1: device 0000000000001001 was certified by vendor CA 0c0c"),
        (lambda w: [_certified(w, 0, issuer=_other_job_issuer(w))],
         "ledger record 0: serial does not encode this job and slot 0"),
    ],
)  # fmt: skip
def test_a_fab_ledger_claiming_what_the_job_did_not_do_is_refused(
    fab: World, records: Any, why: str
) -> None:
    """Another fab's chips (a vendor CA the job does not name), another job's certificates,
    a license or a programmed record in a provisioning ledger: refused at that record."""
    with pytest.raises(ReconciliationError, match=why):
        fab.check(fab.items(records(fab)), manifest=None)


def _other_job_issuer(w: World) -> Any:
    """The production CA of another job, certified by the same root: its certificates
    carry another job's name and tag."""
    pca = production_ca(w.backend, w.root_key, w.root, label="pca-other", job_id="other-job",
                        window=w.window)  # fmt: skip
    return device_issuer(w.backend, "pca-other", pca, job_id="other-job", identity=b"\x09" * 32)


def test_a_full_ledger_must_license_every_device(world: World) -> None:
    with pytest.raises(ReconciliationError, match="ledger record 0: the record names no license"):
        world.check(world.items([_certified(world, 0)]))


def test_the_manifest_given_must_fit_the_stage(world: World, fab: World) -> None:
    with pytest.raises(ReconciliationError, match="'provision' job: give no manifest"):
        fab.check(fab.items([_certified(fab, 0)]), manifest=world.manifest_signed)
    with pytest.raises(ReconciliationError, match="'full' job: give the manifest the job names"):
        world.check(world.items([world.provisioned(0)]), manifest=None)


def test_a_package_manifest_must_fit_the_stage(world: World, fab: World) -> None:
    """OpenedJob's one check: a provision job's package carries no manifest, any other job's
    carries one (before anything else of the manifest is looked at)."""
    from securethread.formats.job import VerifiedJob

    full = VerifiedJob(world.job, world.job_signed, job_hash(world.job_signed))
    prov = VerifiedJob(fab.job, fab.job_signed, job_hash(fab.job_signed))
    anchors: Any = None  # not reached: the stage decides first
    with pytest.raises(JobError, match="'full' job and the package's carries no manifest"):
        check_manifest(None, full, anchors, where="the package's")
    with pytest.raises(JobError, match="'provision' job and the package's carries a manifest"):
        check_manifest(world.manifest_signed, prov, anchors, where="the package's")
    assert check_manifest(None, prov, anchors, where="the package's") is None

