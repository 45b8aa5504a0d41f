"""Reconciliation (flow 9) of ledgers a programmer could return, honest or not.

The ledger key is the programmer's: a rogue programmer can sign any record.  Reconciliation
must still refuse certificates the job's production CA did not issue, certificates used
outside their CA's window, serials that do not encode the slot, duplicates, programming
without provisioning and counts above the quota -- naming the first bad record.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import LedgerError
from securethread.formats import ledger
from securethread.formats.job import ProductionJob, Targets, cosign_job, sign_job
from securethread.formats.reconciliation import reconcile
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint
from securethread.pki import (
    DeviceCertificateIssuer,
    certify_production_ca,
    create_production_ca_csr,
    create_root_ca,
)

JOB_ID = "reconcile-job"
BASE = 0x1000
QUOTA = 6


@attrs.define
class World:
    backend: SoftwareBackend
    root: Any
    pca: Any
    issuer: DeviceCertificateIssuer
    job_signed: bytes
    officers: dict[bytes, ec.EllipticCurvePublicKey]
    ledger_key: Any
    now: int

    def check(self, records: list[ledger.PendingRecord]) -> Any:
        return reconcile(
            self.job_signed,
            _items(records, self.job_signed, self.ledger_key),
            officers=self.officers,
            programmer=b"\x07" * 32,
            ledger_key=self.ledger_key.public_key(),
            root_cert=self.root,
            production_ca_cert=self.pca,
        )

    def provisioned(self, slot: int, *, t: int | None = None, issuer: Any = None) -> Any:
        device_id = f"{BASE + slot:016x}"
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        cert = (issuer or self.issuer).issue(key, device_id, slot)
        return ledger.PendingRecord(
            kind=ledger.KIND_PROVISIONED,
            slot=slot,
            device_id=device_id,
            time=self.now if t is None else t,
            cert=cert.public_bytes(serialization.Encoding.DER),
            license_sha256=b"\x01" * 32,
        )


def _items(records: list[ledger.PendingRecord], job_signed: bytes, key: Any) -> Iterator[Any]:
    job = ledger.sha256(job_signed)
    prev = job
    for seq, (_r, _s, raw, head) in enumerate(
        ledger.chain(records, job=job, start_seq=0, prev=prev)
    ):
        yield "r", raw
        prev = head
        if seq % 4 == 3 or seq == len(records) - 1:
            yield "c", ledger.sign_checkpoint(key, job=job, upto=seq, head=prev, time=1)


def _world(label: str = "w") -> World:
    b = SoftwareBackend(label)
    root = create_root_ca(b, label="root")
    root_key = b.private_key("root")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    nb = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    na = now + datetime.timedelta(days=1)
    csr = create_production_ca_csr(b, label="pca", job_id=JOB_ID)
    pca = certify_production_ca(root_key, root, csr, job_id=JOB_ID, not_before=nb, not_after=na)
    officers = [b.generate_ec(f"o{i}", curve=Curve.P256, policy=SIGNING) for i in range(2)]
    job = ProductionJob(
        job_id=JOB_ID, device_class="c", targets=Targets(ranges=((BASE, BASE + 100),)),
        quota=QUOTA, not_before=int(nb.timestamp()), not_after=int(na.timestamp()),
        image_id="img", manifest_sha256=b"\x02" * 32, programmer=b"\x07" * 32, threshold=2,
    )  # fmt: skip
    return World(
        backend=b,
        root=root,
        pca=pca,
        issuer=DeviceCertificateIssuer(b.private_key("pca"), pca, job_id=JOB_ID),
        job_signed=cosign_job(sign_job(job, [officers[0]]), officers[1]),
        officers={fingerprint(k.public_key()): k.public_key() for k in officers},
        ledger_key=b.generate_ec("ledger", curve=Curve.P256, policy=SIGNING),
        now=int(now.timestamp()),
    )


@pytest.fixture(scope="module")
def world() -> World:
    return _world()


def test_honest_ledger_over_several_batches_reconciles(world: World) -> None:
    # three batch times: the per-time validator is rebuilt and reused correctly
    recs = [world.provisioned(s, t=world.now + 30 * (s // 2)) for s in range(QUOTA)]
    report = world.check(recs)
    assert (report.provisioned, report.records, report.quota) == (QUOTA, QUOTA, QUOTA)
    assert report.first_time == world.now and report.last_time == world.now + 60


def test_certificate_from_a_rogue_ca_is_named(world: World) -> None:
    rogue = _world("rogue")  # same job id, CA under another root: not the OEM's
    recs = [world.provisioned(0), world.provisioned(1, issuer=rogue.issuer)]
    with pytest.raises(LedgerError, match="ledger record 1") as exc:
        world.check(recs)
    assert exc.value.index == 1


def test_record_time_outside_the_production_ca_window_is_refused(world: World) -> None:
    late = int(world.pca.not_valid_after_utc.timestamp()) + 3600
    recs = [world.provisioned(0), world.provisioned(1), world.provisioned(2, t=late)]
    with pytest.raises(LedgerError, match="ledger record 2.*(expired|valid)"):
        world.check(recs)


@pytest.mark.parametrize(
    ("tamper", "index", "why"),
    [
        (lambda w, r: r.__setitem__(1, attrs.evolve(r[1], slot=4)), 1, "slot 4"),
        (lambda w, r: r.__setitem__(2, attrs.evolve(r[2], device_id=r[0].device_id)), 2, "twice"),
        (lambda w, r: r.append(w.provisioned(QUOTA)), 3, "outside the quota"),
        (
            lambda w, r: r.insert(
                1,
                ledger.PendingRecord(
                    kind=ledger.KIND_PROGRAMMED,
                    slot=5,
                    device_id=f"{BASE + 5:016x}",
                    time=w.now,
                    boot=b"x",
                ),
            ),  # fmt: skip
            1,
            "programmed but not provisioned",
        ),
    ],
)
def test_forged_records_are_named(world: World, tamper: Any, index: int, why: str) -> None:
    recs = [world.provisioned(s) for s in range(3)]
    tamper(world, recs)
    with pytest.raises(LedgerError, match=why) as exc:
        world.check(recs)
    assert exc.value.index == index


def test_more_devices_than_the_quota_is_refused() -> None:
    w = _world("quota")
    recs = [w.provisioned(s) for s in range(QUOTA)]
    extra = attrs.evolve(w.provisioned(0), device_id=f"{BASE + 99:016x}")
    with pytest.raises(LedgerError, match=f"ledger record {QUOTA}"):
        w.check([*recs, extra])
