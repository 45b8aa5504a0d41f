"""Joint reconciliation logic (formats/joint.py) on the software backend: a "program" job's
ledger against the chips of the provisioning ledgers, and the checks across those ledgers.
Real keys and formats (tests/unit/ledger_world.py); the CLI path on SoftHSM tokens is in
tests/integration/test_fab_programming.py."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from securethread.formats import ledger
from securethread.formats.job import STAGE_PROGRAM, ProductionJob, cosign_job, job_hash, sign_job
from securethread.formats.joint import (
    JointReconciliationError,
    JointReport,
    ProvisionedDevices,
    ProvisioningTap,
    reconcile_program,
)
from securethread.formats.reconciliation import ReconciliationReport
from securethread.pki import cert_fingerprint
from tests.unit.ledger_world import World, make_world, production_ca


@attrs.frozen
class Prog:
    """A programming job of the world's OEM naming the world's provisioning job's CA."""

    world: World
    job: ProductionJob
    signed: bytes

    @property
    def identity(self) -> bytes:
        return job_hash(self.signed)


@pytest.fixture(scope="module")
def w() -> World:
    return make_world("joint")


def _prog(w: World, *, quota: int = 4, named: Sequence[bytes] | None = None) -> Prog:
    job = attrs.evolve(
        w.job, job_id="prog-job", stage=STAGE_PROGRAM, quota=quota, production_ca=None,
        vendors=(), provisioned_by=tuple(named or (cert_fingerprint(w.pca),)),
    )  # fmt: skip
    return Prog(w, job, cosign_job(sign_job(job, [w.officer_keys[0]]), w.officer_keys[1]))


def _report(job_id: str) -> ReconciliationReport:
    return ReconciliationReport(
        job_id=job_id, job_sha256="00" * 32, programmer="fab-1", quota=6, quota_used=3,
        records=3, provisioned=3, programmed=0, checkpoints=1, first_time=1, last_time=1,
        closed_at=2,
    )  # fmt: skip


def _provisioned(w: World, slots: Sequence[int], *, job_id: str = "lot-1") -> ProvisioningTap:
    """What a reconciled provisioning ledger proved: (device id, certificate DER) per chip."""
    tap = ProvisioningTap()
    tap.records = [(w.device_id(s), w.provisioned(s).cert) for s in slots]
    return tap


def _devices(w: World, p: Prog, slots: Sequence[int] = (0, 1, 2)) -> ProvisionedDevices:
    devices = ProvisionedDevices(p.job.provisioned_by)
    devices.add(_report("lot-1"), _provisioned(w, slots), job_stage="provision",
                production_ca=w.pca)  # fmt: skip
    return devices


def _licensed(devices: ProvisionedDevices, w: World, chip: int, **over: Any) -> Any:
    dev = devices.devices[w.device_id(chip)]
    fields: dict[str, Any] = dict(
        kind=ledger.KIND_LICENSED, slot=chip, device_id=w.device_id(chip), time=w.now,
        license_sha256=b"\x01" * 32, cert_sha256=hashlib.sha256(dev.certificate).digest(),
        production_ca=dev.production_ca,
    )  # fmt: skip
    fields.update(over)
    return ledger.PendingRecord(**fields)


def _items(p: Prog, records: Sequence[ledger.PendingRecord]) -> list[tuple[str, bytes]]:
    """A closed programming ledger signed by the world's ledger key (one checkpoint)."""
    job, key = p.identity, p.world.ledger_key
    chained = ledger.chain(records, job=job, start_seq=0, prev=job)
    out: list[tuple[str, bytes]] = [("r", raw) for _r, _s, raw, _h in chained]
    head = chained[-1][3] if chained else job
    if chained:
        out.append(("c", ledger.sign_checkpoint(key, job=job, upto=len(chained) - 1,
                                                head=head, time=1)))  # fmt: skip
    counted = sum(r.kind != ledger.KIND_PROGRAMMED for r in records)
    totals = ledger.LedgerTotals(records=len(records), provisioned=counted,
                                 programmed=len(records) - counted, head=head,
                                 quota=p.job.quota, quota_used=counted)  # fmt: skip
    out.append(("e", ledger.sign_close(key, ledger.CloseRecord.of(totals, job=job, time=2))))
    return out


def _check(p: Prog, devices: ProvisionedDevices, records: Sequence[ledger.PendingRecord]) -> Any:
    w = p.world
    return reconcile_program(
        p.signed, p.signed, iter(_items(p, records)), officers=w.officers, min_threshold=2,
        root_cert=w.root, programmer_cert=w.programmer_cert, ledger_cert=w.ledger_cert,
        manifest=w.manifest_signed, provisioned=devices,
    )  # fmt: skip


def test_a_programming_ledger_reconciles_with_its_provisioning_ledger(w: World) -> None:
    p = _prog(w)
    devices = _devices(w, p)
    records = [_licensed(devices, w, s) for s in (0, 1)] + [w.programmed(s) for s in (0, 1)]
    report = _check(p, devices, records)
    assert (report.licensed, report.programmed, report.quota_used) == (2, 2, 2)
    joint = JointReport(program=report, provisioning=tuple(devices.reports)).to_json()
    assert joint["provisioned"] == 3 and joint["provisioned_not_programmed"] == 1
    assert "no chip twice" in JointReport(report, tuple(devices.reports)).human()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"production_ca": b"\x07" * 32}, "which job prog-job does not name"),
        ({"cert_sha256": b"\x08" * 32}, "is not the one provisioning job lot-1 issued"),
    ],
)
def test_a_licensed_record_not_backed_by_the_provisioning_ledger_is_refused(
    w: World, change: dict[str, Any], message: str
) -> None:
    p = _prog(w, named=(cert_fingerprint(w.pca), b"\x07" * 32) if "production_ca" not in change
              else None)  # fmt: skip
    devices = _devices(w, p)
    with pytest.raises(JointReconciliationError, match=message) as info:
        _check(p, devices, [_licensed(devices, w, 0), _licensed(devices, w, 1, **change)])
    assert "programming ledger record 1" in str(info.value)


def test_a_chip_no_provisioning_ledger_holds_is_refused(w: World) -> None:
    p = _prog(w)
    devices = _devices(w, p, slots=(0,))
    other = _devices(w, p, slots=(0, 3))  # to build a record for a chip lot-1 never had
    with pytest.raises(JointReconciliationError, match="is not in the ledger of provisioning"):
        _check(p, devices, [_licensed(other, w, 3)])


def test_a_chip_programmed_twice_is_refused(w: World) -> None:
    p = _prog(w)
    devices = _devices(w, p)
    once = [_licensed(devices, w, 0), w.programmed(0)]
    with pytest.raises(JointReconciliationError, match="programmed twice"):
        _check(p, devices, [*once, _licensed(devices, w, 1), w.programmed(0)])
    with pytest.raises(JointReconciliationError, match="appears twice"):
        _check(p, devices, [*once, _licensed(devices, w, 0, slot=1)])


def test_a_boot_confirmation_by_another_key_and_a_foreign_record_kind_are_refused(
    w: World,
) -> None:
    p = _prog(w)
    devices = _devices(w, p)
    forged = w.programmed(0, boot=w.boot(w.device_id(1), device_id=w.device_id(0)))
    with pytest.raises(JointReconciliationError, match="boot confirmation"):
        _check(p, devices, [_licensed(devices, w, 0), forged])
    with pytest.raises(JointReconciliationError, match="a 'provisioned' record"):
        _check(p, devices, [w.provisioned(0)])


def test_provisioning_ledgers_claiming_one_chip_or_one_key_are_refused(w: World) -> None:
    second = production_ca(w.backend, w.root_key, w.root, label="pca-2", job_id="lot-2",
                           window=w.window)  # fmt: skip
    p = _prog(w, named=(cert_fingerprint(w.pca), cert_fingerprint(second)))
    devices = _devices(w, p)
    # another fab's ledger claims chip 1, which lot-1's ledger provisioned
    with pytest.raises(JointReconciliationError, match="claims device .* which job lot-1"):
        devices.add(_report("lot-2"), _provisioned(w, (1,)), job_stage="provision",
                    production_ca=second)  # fmt: skip
    # ... or certifies chip 0's key under another device id
    tap = ProvisioningTap()
    tap.records = [(w.device_id(9), w.provisioned(9, key=w.device_key(w.device_id(0))
                                                  .public_key()).cert)]  # fmt: skip
    with pytest.raises(JointReconciliationError, match="certified for device"):
        devices.add(_report("lot-2"), tap, job_stage="provision", production_ca=second)


def test_a_provisioning_job_the_programming_job_does_not_name_is_refused(w: World) -> None:
    p = _prog(w)
    devices = ProvisionedDevices(p.job.provisioned_by)
    other = production_ca(w.backend, w.root_key, w.root, label="pca-3", job_id="lot-3",
                          window=w.window)  # fmt: skip
    with pytest.raises(JointReconciliationError, match="is not one the programming job names"):
        devices.add(_report("lot-3"), _provisioned(w, (0,)), job_stage="provision",
                    production_ca=other)  # fmt: skip
    with pytest.raises(JointReconciliationError, match="not a provisioning job"):
        devices.add(_report("lot-1"), _provisioned(w, (0,)), job_stage="full",
                    production_ca=w.pca)  # fmt: skip
    devices.add(_report("lot-1"), _provisioned(w, (0,)), job_stage="provision",
                production_ca=w.pca)  # fmt: skip
    with pytest.raises(JointReconciliationError, match="given twice"):
        devices.add(_report("lot-1"), _provisioned(w, ()), job_stage="provision",
                    production_ca=w.pca)  # fmt: skip
    der = w.pca.public_bytes(serialization.Encoding.DER)
    assert cert_fingerprint(w.pca) == hashlib.sha256(der).digest()
