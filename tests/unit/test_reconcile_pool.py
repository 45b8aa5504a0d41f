"""Reconciliation with its signature checks in worker processes gives the answer of one
process: the same report, or the same first bad record with the same message, whichever of
the main process, the ledger reader or a worker finds it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from benchmarks.synth_ledger import SynthWorld, device_records, make_world
from securethread.errors import LedgerError
from securethread.formats import ledger, reconcile_pool
from securethread.formats.reconciliation import CertificateSignatures, reconcile

DEVICES = 24


@pytest.fixture(scope="module")
def world() -> SynthWorld:
    return make_world(64, label="pool")


def _items(w: SynthWorld, records: Sequence[ledger.PendingRecord]) -> list[tuple[str, bytes]]:
    job, out = w.job_sha256, []
    chained = ledger.chain(records, job=job, start_seq=0, prev=job)
    head = job
    for seq, (_r, _s, raw, h) in enumerate(chained):
        out.append(("r", raw))
        head = h
        if seq % 5 == 4 or seq == len(records) - 1:
            out.append(("c", ledger.sign_checkpoint(w.ledger_key, job=job, upto=seq, head=head,
                                                    time=1)))  # fmt: skip
    prov = sum(r.kind == ledger.KIND_PROVISIONED for r in records)
    totals = ledger.LedgerTotals(records=len(records), provisioned=prov,
                                 programmed=len(records) - prov, head=head, quota=w.job.quota,
                                 quota_used=prov)  # fmt: skip
    out.append(("e", ledger.sign_close(w.ledger_key, ledger.CloseRecord.of(totals, job=job,
                                                                           time=2))))  # fmt: skip
    return out


def _both(
    w: SynthWorld,
    items: list[tuple[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    signatures: CertificateSignatures = CertificateSignatures.COVERED,
) -> tuple[Any, Any]:
    """(one process, a pool of two from the first device): a report or (index, message)."""
    args = w.reconcile_args() | {"certificate_signatures": signatures}
    issued = args.pop("issued_job")

    def run(workers: int) -> Any:
        try:
            return reconcile(issued, w.job_signed, iter(items), workers=workers, **args)
        except LedgerError as exc:
            return (exc.index, str(exc))

    one = run(1)
    monkeypatch.setattr(reconcile_pool, "THRESHOLD", 0)
    monkeypatch.setattr(reconcile_pool, "CHUNK", 3)
    return one, run(2)


def _records(w: SynthWorld, change: Callable[[int, ledger.PendingRecord], Any] | None = None
             ) -> list[ledger.PendingRecord]:  # fmt: skip
    out: list[ledger.PendingRecord] = []
    for slot in range(DEVICES):
        for rec in device_records(w, slot):
            new = change(slot, rec) if change else rec
            out.extend(new if isinstance(new, list) else [new])
    return out


@pytest.mark.parametrize("signatures", list(CertificateSignatures))
def test_an_honest_ledger_gives_the_same_report(
    world: SynthWorld, monkeypatch: pytest.MonkeyPatch, signatures: CertificateSignatures
) -> None:
    one, pool = _both(world, _items(world, _records(world)), monkeypatch, signatures)
    assert one == pool and one.provisioned == one.programmed == DEVICES


def _bad_boot(slots: set[int]) -> Callable[[int, ledger.PendingRecord], Any]:
    def change(slot: int, rec: ledger.PendingRecord) -> Any:
        if slot in slots and rec.kind == ledger.KIND_PROGRAMMED:
            boot = bytearray(rec.boot)
            boot[-5] ^= 0x01  # inside the signature
            return attrs.evolve(rec, boot=bytes(boot))
        return rec

    return change


def _bad_signature(slots: set[int]) -> Callable[[int, ledger.PendingRecord], Any]:
    def change(slot: int, rec: ledger.PendingRecord) -> Any:
        if slot in slots and rec.kind == ledger.KIND_PROVISIONED:
            cert = bytearray(rec.cert)
            cert[-3] ^= 0x01  # the production CA's signature, not the TBS
            return attrs.evolve(rec, cert=bytes(cert))
        return rec

    return change


def _outside_targets(slot_: int) -> Callable[[int, ledger.PendingRecord], Any]:
    def change(slot: int, rec: ledger.PendingRecord) -> Any:
        if slot == slot_:
            return attrs.evolve(rec, device_id="00000000000000ff")
        return rec

    return change


def _serial_of_slot(
    w: SynthWorld, slot_: int, other: int
) -> Callable[[int, ledger.PendingRecord], Any]:
    """Slot ``slot_``'s certificate issued with slot ``other``'s serial (same key, same id)."""

    def change(slot: int, rec: ledger.PendingRecord) -> Any:
        if slot == slot_ and rec.kind == ledger.KIND_PROVISIONED:
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            key = x509.load_der_x509_certificate(rec.cert).public_key()
            cert = w.issuer.issue(key, rec.device_id, other)  # type: ignore[arg-type]
            return attrs.evolve(rec, cert=cert.public_bytes(serialization.Encoding.DER))
        return rec

    return change


@pytest.mark.parametrize(
    "slot, other, why",
    [(10, 4, "appears twice"), (10, 22, "does not encode this job and slot 10")],
)
def test_a_serial_seen_before_or_of_another_slot_is_named(
    world: SynthWorld, monkeypatch: pytest.MonkeyPatch, slot: int, other: int, why: str
) -> None:
    change = _serial_of_slot(world, slot, other)
    one, pool = _both(world, _items(world, _records(world, change)), monkeypatch)
    assert one == pool and one[0] == 2 * slot and why in one[1], one


@pytest.mark.parametrize(
    "change, first, signatures",
    [
        (_bad_boot({9}), 19, CertificateSignatures.COVERED),  # a worker's failure
        (_bad_boot({9}), 19, CertificateSignatures.VERIFIED),
        # a worker's failure, named by full validation
        (_bad_signature({6}), 12, CertificateSignatures.VERIFIED),
        (_bad_boot({3, 15}), 7, CertificateSignatures.COVERED),  # two: the earlier
        (_outside_targets(4), 8, CertificateSignatures.COVERED),  # the main process's failure
        (_outside_targets(4), 8, CertificateSignatures.VERIFIED),
    ],
)
def test_the_first_bad_record_is_the_same(
    world: SynthWorld,
    monkeypatch: pytest.MonkeyPatch,
    change: Any,
    first: int,
    signatures: CertificateSignatures,
) -> None:
    one, pool = _both(world, _items(world, _records(world, change)), monkeypatch, signatures)
    assert one == pool and one[0] == first, (one, pool)


def test_a_certificate_signature_is_covered_by_the_ledger_by_default(
    world: SynthWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A template-matched certificate whose production-CA signature does not verify, in a
    # ledger its key signed: only the appliance (ledger key and production-CA key in one
    # token) can record it, and it could sign it validly -- covered, it reconciles; with
    # every signature verified it is named.  The first certificate is always verified.
    base = _records(world)
    bad = list(base)
    bad[12] = _bad_signature({6})(6, base[12])  # device 6's provisioned record
    items = _items(world, bad)
    one, pool = _both(world, items, monkeypatch)
    assert one == pool and one.provisioned == DEVICES
    first = _items(world, _records(world, _bad_signature({0})))
    one, pool = _both(world, first, monkeypatch)
    assert one == pool and one[0] == 0 and "signature" in one[1], one
    # the same certificate put in an honest ledger (not re-signed): the chain refuses it
    at = [i for i, (tag, _raw) in enumerate(items) if tag == "r"][12]  # device 6's record
    spliced = _items(world, base)
    spliced[at] = items[at]
    one, pool = _both(world, spliced, monkeypatch)
    assert one == pool and one[0] == 12 and "altered" in one[1], one


def test_a_worker_failure_before_a_main_process_failure_wins(
    world: SynthWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_boot, outside = _bad_boot({2}), _outside_targets(10)

    def both(slot: int, rec: ledger.PendingRecord) -> Any:
        return outside(slot, bad_boot(slot, rec))

    one, pool = _both(world, _items(world, _records(world, both)), monkeypatch)
    assert one == pool and one[0] == 5 and "boot confirmation" in one[1]


def test_a_main_process_failure_before_a_worker_failure_wins(
    world: SynthWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_boot, outside = _bad_boot({12}), _outside_targets(1)

    def both(slot: int, rec: ledger.PendingRecord) -> Any:
        return outside(slot, bad_boot(slot, rec))

    one, pool = _both(world, _items(world, _records(world, both)), monkeypatch)
    assert one == pool and one[0] == 2 and "targets" in one[1]


def test_a_reader_failure_after_a_worker_failure_reports_the_worker_failure(
    world: SynthWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _items(world, _records(world, _bad_boot({1})))
    cut = [i for i, (tag, _p) in enumerate(items) if tag == "c"][4]
    items[cut] = ("c", items[cut][1][:-1] + bytes([items[cut][1][-1] ^ 1]))  # a bad checkpoint
    one, pool = _both(world, items, monkeypatch)
    assert one == pool and one[0] == 3 and "boot confirmation" in one[1]


def test_audit_reconcile_every_signature_verifies_what_the_ledger_covers(
    world: SynthWorld, tmp_path: Path
) -> None:
    # `securethread audit reconcile` accepts a re-signed ledger whose device 6 carries a
    # template-matched certificate with a bad production-CA signature (covered by the ledger,
    # the default); with --every-signature it names record 12 (exit 4, one line)
    base = _records(world)
    bad = list(base)
    bad[12] = _bad_signature({6})(6, base[12])
    files = world.write_public_files(tmp_path / "public")
    export = tmp_path / "ledger.bin"
    with open(export, "wb") as out:
        ledger.write_export(out, world.job_signed, _items(world, bad))
    args = [sys.executable, "-m", "securethread.cli", "audit", "reconcile", str(export)]
    for name in ("job", "root", "officers", "programmer_cert", "ledger_cert", "production_ca",
                 "manifest"):  # fmt: skip
        args += [f"--{name.replace('_', '-')}", files[name]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTHSM")}
    covered = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert covered.returncode == 0, covered.stderr
    every = subprocess.run([*args, "--every-signature"], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    assert every.returncode == 4, every.stderr
    assert len(every.stderr.strip().splitlines()) == 1 and "ledger record 12" in every.stderr
