"""Reconciliation (flow 9) of ledgers a programmer could return, honest or not.

The ledger key is the programmer's: a rogue programmer can sign any record, and anyone on
the transport can replace the export.  Reconciliation must still refuse what the OEM did
not authorise -- naming the first bad record -- and it checks against the OEM's own
records (job, root, programmer certificate, production CA, manifest), never against what
the export carries.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from securethread.errors import LedgerError
from securethread.formats import cbor, ledger
from securethread.formats.job import cosign_job, job_hash, sign_job
from securethread.formats.reconciliation import (
    LedgerSignerError,
    ProductionCAError,
    ReconciliationError,
    WrongJobError,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from securethread.pki import EnclavePurpose, oids

from .ledger_world import (
    BASE,
    JOB_ID,
    LAST_TARGET,
    QUOTA,
    World,
    certify,
    device_issuer,
    make_world,
)
from .ledger_world import production_ca as make_production_ca


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def _honest(w: World, n: int = QUOTA) -> list[ledger.PendingRecord]:
    recs = [w.provisioned(s, t=w.now + 30 * (s // 2)) for s in range(n)]
    return recs + [w.programmed(s) for s in range(n)]


def test_honest_ledger_over_several_batches_reconciles(world: World) -> None:
    # three batch times: the per-time validator is rebuilt and reused correctly
    report = world.check(world.items(_honest(world), quota_used=QUOTA))
    assert (report.provisioned, report.programmed, report.records) == (QUOTA, QUOTA, 2 * QUOTA)
    assert (report.quota, report.quota_used, report.programmer) == (QUOTA, QUOTA, "prog1")
    assert report.first_time == world.now and report.last_time == world.now
    assert report.job_sha256 == world.job_id.hex()
    assert '"reconciled": true' in report.to_json()


def test_empty_closed_ledger_reconciles(world: World) -> None:
    report = world.check(world.items([], quota_used=2))  # two slots counted, lost in crashes
    assert (report.records, report.provisioned, report.quota_used) == (0, 0, 2)


def test_certificate_from_a_rogue_ca_is_named(world: World) -> None:
    rogue = make_world("rogue")  # same job id, CA under another root: not the OEM's
    recs = [world.provisioned(0), world.provisioned(1, issuer=rogue.issuer)]
    with pytest.raises(LedgerError, match="ledger record 1") as exc:
        world.check(world.items(recs))
    assert exc.value.index == 1


def test_record_time_outside_the_production_ca_window_is_refused(world: World) -> None:
    late = int(world.pca.not_valid_after_utc.timestamp()) + 3600
    recs = [world.provisioned(0), world.provisioned(1), world.provisioned(2, t=late)]
    with pytest.raises(LedgerError, match="ledger record 2.*(expired|valid|window)"):
        world.check(world.items(recs))


@pytest.mark.parametrize(
    ("tamper", "index", "why"),
    [
        (lambda w, r: r.__setitem__(1, attrs.evolve(r[1], slot=4)), 1, "slot 4"),
        (lambda w, r: r.__setitem__(2, attrs.evolve(r[2], device_id=r[0].device_id)), 2, "twice"),
        (lambda w, r: r.append(w.provisioned(QUOTA)), 3, "outside the quota"),
        (lambda w, r: r.insert(1, w.programmed(5)), 1, "programmed but not provisioned"),
        (lambda w, r: r.extend([w.programmed(0), w.programmed(0)]), 4, "programmed twice"),
    ],
)
def test_forged_records_are_named(world: World, tamper: Any, index: int, why: str) -> None:
    recs = [world.provisioned(s) for s in range(3)]
    tamper(world, recs)
    with pytest.raises(LedgerError, match=why) as exc:
        world.check(world.items(recs, quota_used=len(recs)))
    assert exc.value.index == index


def test_more_devices_than_the_quota_is_refused() -> None:
    w = make_world("quota")
    recs = [w.provisioned(s) for s in range(QUOTA)]
    extra = w.provisioned(0, device_id=f"{BASE + 99:016x}")
    with pytest.raises(LedgerError, match=f"ledger record {QUOTA}"):
        w.check(w.items([*recs, extra], close=False))  # no honest close record can exist


# --- checks that used to be skipped -----------------------------------------------------------


def test_device_outside_the_jobs_targets_is_refused(world: World) -> None:
    outsider = f"{LAST_TARGET + 1:016x}"
    recs = [world.provisioned(0), world.provisioned(1, device_id=outsider)]
    with pytest.raises(ReconciliationError, match="outside the job's targets") as exc:
        world.check(world.items(recs))
    assert exc.value.index == 1


def test_record_device_id_differing_from_its_certificate_is_refused(world: World) -> None:
    rec = world.provisioned(1)
    swapped = attrs.evolve(rec, device_id=world.device_id(2))  # certificate still names 1
    with pytest.raises(ReconciliationError, match="certificate is for device") as exc:
        world.check(world.items([world.provisioned(0), swapped]))
    assert exc.value.index == 1


def test_the_same_chip_key_certified_twice_is_refused(world: World) -> None:
    key = world.device_key(world.device_id(0)).public_key()
    recs = [world.provisioned(0), world.provisioned(1, key=key)]
    with pytest.raises(ReconciliationError, match="chip key already certified") as exc:
        world.check(world.items(recs))
    assert exc.value.index == 1


def test_production_ca_of_another_job_is_refused(world: World) -> None:
    pca = make_production_ca(
        world.backend, world.root_key, world.root, label="pca-other", job_id="other-job",
        window=world.window,
    )  # fmt: skip
    issuer = device_issuer(
        world.backend, "pca-other", pca, job_id="other-job", identity=world.job_id
    )
    recs = [world.provisioned(0, issuer=issuer)]
    with pytest.raises(ProductionCAError, match="not the one job reconcile-job names"):
        world.check(world.items(recs), production_ca_cert=pca)


def test_production_ca_certified_for_another_issue_of_the_job_id_is_refused(
    world: World,
) -> None:
    """Same job id, same root, but certified for a later job: it starts after this one ended."""
    later = (
        world.window[1] + datetime.timedelta(hours=1),
        world.window[1] + datetime.timedelta(days=2),
    )
    pca = make_production_ca(
        world.backend, world.root_key, world.root, label="pca-reissue", job_id=JOB_ID,
        window=later,
    )  # fmt: skip
    recs = [world.provisioned(0)]
    with pytest.raises(ProductionCAError, match="not the one job reconcile-job names"):
        world.check(world.items(recs), production_ca_cert=pca)


@pytest.mark.parametrize(
    ("boot", "why"),
    [
        (lambda w: w.boot(w.device_id(0), image_version="0.9.0"), "image_version differs"),
        (lambda w: w.boot(w.device_id(0), device_id=w.device_id(1)), "device_id differs"),
        (lambda w: w.boot(w.device_id(1)), "not trusted"),  # signed by another chip
        (lambda w: w.boot(w.device_id(0), nonce=b"short"), "field .nonce. must be 16..64 bytes"),
        (lambda w: b"\xa0", "malformed"),
    ],
)
def test_bad_boot_confirmation_is_refused(world: World, boot: Any, why: str) -> None:
    recs = [world.provisioned(0), world.provisioned(1), world.programmed(0, boot=boot(world))]
    with pytest.raises(ReconciliationError, match=f"boot confirmation.*{why}") as exc:
        world.check(world.items(recs))
    assert exc.value.index == 2


# --- the ledger signer -----------------------------------------------------------------------


def _self_signed_ledger_certificate(key: Any, subject: x509.Name) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([oids.EKU_LEDGER_SIGNING]), critical=False)
        .sign(key.as_cryptography(), hashes.SHA256())
    )


def test_ledger_resigned_with_a_fresh_key_and_a_self_signed_certificate_is_refused(
    world: World,
) -> None:
    forger = SoftwareBackend("forger").generate_ec("k", curve=Curve.P256, policy=SIGNING)
    fake = _self_signed_ledger_certificate(forger, world.ledger_cert.subject)
    items = world.items([world.provisioned(0)], key=forger)
    with pytest.raises(LedgerSignerError, match="ledger-signing certificate not trusted"):
        world.check(items, ledger_cert=fake)


def test_ledger_certificate_of_another_enclave_is_refused(world: World) -> None:
    other = certify(
        world.backend, world.root_key, world.root, label="p2-ledger",
        purpose=EnclavePurpose.LEDGER_SIGNING, enclave="prog2",
    )  # fmt: skip
    items = world.items([world.provisioned(0)], key=world.backend.private_key("p2-ledger"))
    with pytest.raises(LedgerSignerError, match="the job names"):
        world.check(items, ledger_cert=other)


def test_identity_certificate_offered_as_ledger_certificate_is_refused(world: World) -> None:
    items = world.items([world.provisioned(0)], key=world.backend.private_key("p-id"))
    with pytest.raises(LedgerSignerError, match="not trusted"):
        world.check(items, ledger_cert=world.programmer_cert)


def test_programmer_certificate_the_job_does_not_name_is_refused(world: World) -> None:
    other = certify(
        world.backend, world.root_key, world.root, label="p3-id",
        purpose=EnclavePurpose.IDENTITY, enclave="prog3",
    )  # fmt: skip
    with pytest.raises(LedgerSignerError, match="not the enclave job"):
        world.check(world.items([world.provisioned(0)]), programmer_cert=other)


def test_ledger_signed_by_the_right_certificate_key_of_another_ledger_is_refused(
    world: World,
) -> None:
    """The certificate is genuine but the checkpoints are signed by another key."""
    forger = SoftwareBackend("forger2").generate_ec("k", curve=Curve.P256, policy=SIGNING)
    with pytest.raises(LedgerError, match="checkpoint after record 0 does not verify"):
        world.check(world.items([world.provisioned(0)], key=forger))


# --- the job -------------------------------------------------------------------------------


def test_export_carrying_another_job_is_refused(world: World) -> None:
    other = attrs.evolve(world.job, quota=QUOTA + 1)
    other_signed = cosign_job(sign_job(other, [world.officer_keys[0]]), world.officer_keys[1])
    with pytest.raises(WrongJobError, match="another job"):
        world.check(world.items([world.provisioned(0)]), export_job=other_signed)


def test_export_carrying_another_framing_of_the_same_job_reconciles(world: World) -> None:
    reframed = cosign_job(sign_job(world.job, [world.officer_keys[2]]), world.officer_keys[0])
    assert reframed != world.job_signed and job_hash(reframed) == world.job_id
    report = world.check(world.items([world.provisioned(0)]), export_job=reframed)
    assert report.provisioned == 1


def test_issued_job_below_the_oem_floor_is_refused(world: World) -> None:
    lone = sign_job(world.job, [world.officer_keys[0]])
    with pytest.raises(Exception, match="2 required|requires 2"):
        world.check(world.items([]), issued_job=lone, export_job=lone)


def test_manifest_the_job_does_not_name_is_refused(world: World) -> None:
    other = cbor.encode({"kind": "manifest"})
    with pytest.raises(ReconciliationError, match="not the one job"):
        world.check(world.items([]), manifest=other)


def test_close_record_stating_another_quota_is_refused(world: World) -> None:
    items = world.items([world.provisioned(0)])
    body = ledger.CloseRecord(
        job=world.job_id, records=1, provisioned=1, programmed=0,
        head=ledger.sha256(items[0][1]), quota=QUOTA + 10, quota_used=1, time=2,
    )  # fmt: skip
    items[-1] = ("e", ledger.sign_close(world.ledger_key, body))
    with pytest.raises(ReconciliationError, match="quota of 16"):
        world.check(items)


def test_no_record_is_acted_on_before_its_checkpoint_verifies(world: World) -> None:
    """A record with a foreign certificate followed by a forged checkpoint: the checkpoint
    is what is refused -- the record's content was never looked at."""
    rogue = make_world("rogue2")
    forger = SoftwareBackend("forger3").generate_ec("k", curve=Curve.P256, policy=SIGNING)
    items = world.items([world.provisioned(0, issuer=rogue.issuer)], key=forger)
    with pytest.raises(LedgerError, match="checkpoint after record 0 does not verify"):
        world.check(items)
