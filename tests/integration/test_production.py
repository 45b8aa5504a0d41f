"""Production runs on real SoftHSM tokens, in separate processes (flows 6, 7, 9; S3, S4).

A production setup (OEM ceremony, onboarding, mastering, key transfer, job, production CA)
is created once per module in its own work directory by a subprocess; worker processes
then provision against it, as they would in a factory.  The crash test SIGKILLs workers at
every fault point of the pipeline, several times each, and checks after every kill that
the quota was never exceeded, the ledger verifies, and every device that received secrets
is in the ledger.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from securethread.formats import ledger
from securethread.programmer.line import FAULT_POINTS

QUOTA = 60
CHIPS = QUOTA + 3  # the setup makes quota + 3 chips in the job's targets, plus one outsider


def _env(work: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SECURETHREAD_", "SOFTHSM2_CONF"))
    }
    env.update(extra)
    return env


SETUP = textwrap.dedent(
    """
    import pickle, sys
    from securethread.demo import run_demo
    work, quota = sys.argv[1], int(sys.argv[2])
    def hook(cfg, chips, outsider):
        with open(work + "/setup.pickle", "wb") as f:
            pickle.dump((cfg, chips, outsider), f)
    run_demo(work, devices=quota, setup_hook=hook, firmware_size=4096)
    """
)

WORKER = textwrap.dedent(
    """
    import json, pickle, sys
    from pathlib import Path
    from softhsm_config import TokenDirectory
    work, start, end, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    TokenDirectory(Path(work) / "hsm").activate()
    from securethread.demo import run_worker
    import attrs
    cfg, chips, outsider = pickle.load(open(work + "/setup.pickle", "rb"))
    cfg = attrs.evolve(cfg, release_log=work + "/released.log", batch_size=batch)
    print(json.dumps(run_worker(cfg, (chips + outsider)[start:end])))
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("production")
    subprocess.run(
        [sys.executable, "-c", SETUP, str(work), str(QUOTA)],
        env=_env(work),
        check=True,
        capture_output=True,
    )
    yield work


def _fresh_store(work: Path) -> None:
    """Each scenario starts from an empty production database and release log."""
    for name in ("production.sqlite", "production.sqlite-wal", "production.sqlite-shm"):
        (work / "programmer" / name).unlink(missing_ok=True)
    (work / "released.log").unlink(missing_ok=True)


def _start_worker(
    work: Path, start: int, end: int, fault: str | None = None, batch: int = 32
) -> subprocess.Popen[str]:
    extra = {"SECURETHREAD_FAULT_INJECT": fault} if fault else {}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(work), str(start), str(end), str(batch)],
        env=_env(work, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_invariants(work: Path) -> tuple[int, int, set[str]]:
    """S3 and S4 after whatever happened: returns (reserved, provisioned, ledger devices)."""
    from securethread.formats.job import job_hash
    from securethread.pki import from_pem
    from securethread.programmer.store import SQLiteStore

    cfg, _chips, _out = pickle.load(open(work / "setup.pickle", "rb"))
    jh = job_hash(cfg.job_signed)
    store = SQLiteStore(work / "programmer" / "production.sqlite")
    try:
        try:
            quota, reserved = store.counts(jh)
        except Exception:  # job never opened: the worker died before its first batch
            return 0, 0, set()
        assert quota == QUOTA
        assert reserved <= quota, "S3: more slots counted than the quota"
        items = list(store.export(jh))
    finally:
        store.close()
    ledger_key = from_pem((work / "programmer" / "ledger-signing.pem").read_bytes()).public_key()
    summary = ledger.verify_ledger(items, job=jh, ledger_key=ledger_key)
    devices = {
        ledger.parse_record(raw, i).device_id
        for i, raw in enumerate(p for t, p in items if t == "r")
    }
    assert summary.provisioned <= reserved <= QUOTA
    released = set()
    log = work / "released.log"
    if log.exists():
        released = set(log.read_text().split())
    missing = released - devices
    assert not missing, f"S4: devices received secrets but are not in the ledger: {missing}"
    return reserved, summary.provisioned, devices


def test_whole_flow_two_and_four_workers(setup: Path) -> None:
    """Job -> devices provisioned and programmed by 2 and 4 concurrent workers -> ledger."""
    for workers in (2, 4):
        _fresh_store(setup)
        n = CHIPS + 1
        shares = [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]
        procs = [_start_worker(setup, a, b) for a, b in shares]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        import json

        results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
        provisioned = sum(r["provisioned"] for r in results)
        booted = sum(r["booted"] for r in results)
        refused = sum(sum(r["refused"].values()) for r in results)
        reserved, in_ledger, devices = _check_invariants(setup)
        assert provisioned == in_ledger == QUOTA == reserved
        assert booted == QUOTA
        # every chip is accounted for: provisioned, over quota, or the outsider
        assert provisioned + refused == CHIPS + 1
        assert len(devices) == QUOTA


def test_ledger_serials_are_unique_across_workers(setup: Path) -> None:
    from cryptography import x509

    from securethread.formats.job import job_hash
    from securethread.programmer.store import SQLiteStore

    _fresh_store(setup)
    procs = [_start_worker(setup, i * 16, (i + 1) * 16) for i in range(4)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    cfg, _c, _o = pickle.load(open(setup / "setup.pickle", "rb"))
    store = SQLiteStore(setup / "programmer" / "production.sqlite")
    items = list(store.export(job_hash(cfg.job_signed)))
    store.close()
    serials, slots = [], []
    for i, raw in enumerate(p for t, p in items if t == "r"):
        rec = ledger.parse_record(raw, i)
        if rec.kind == ledger.KIND_PROVISIONED:
            serials.append(x509.load_der_x509_certificate(rec.body["cert"]).serial_number)
            slots.append(rec.slot)
    assert len(serials) == len(set(serials)) == QUOTA
    assert sorted(slots) == list(range(QUOTA))


def test_already_provisioned_device_is_refused(setup: Path) -> None:
    _fresh_store(setup)
    first = _start_worker(setup, 0, 5)
    first.communicate(timeout=300)
    again = _start_worker(setup, 0, 5)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    import json

    r = json.loads(out.strip().splitlines()[-1])
    assert r["provisioned"] == 0
    assert r["refused"] == {"AlreadyProvisionedError": 5}
    reserved, provisioned, _ = _check_invariants(setup)
    assert (reserved, provisioned) == (5, 5)  # nothing counted for the refused devices


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_sigkill_at_every_fault_point(setup: Path, point: str) -> None:
    """8 fault points x 7 occurrences = 56 kill points; plus random-time kills below."""
    for nth in (1, 2, 3, 4, 6, 9, 13):
        _fresh_store(setup)
        # batches of 4 devices: every point is reached at least 13 times in a run
        proc = _start_worker(setup, 0, CHIPS, fault=f"{point}:{nth}", batch=4)
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, f"{point}:{nth} was never reached"
        reserved, provisioned, _ = _check_invariants(setup)
        # a restarted worker finishes the job without ever exceeding the quota
        resume = _start_worker(setup, 0, CHIPS)
        out, err = resume.communicate(timeout=300)
        assert resume.returncode == 0, err[-2000:]
        reserved2, provisioned2, _ = _check_invariants(setup)
        assert provisioned2 >= provisioned
        assert reserved2 <= QUOTA
        # only slots counted before the crash may be wasted
        assert QUOTA - provisioned2 <= reserved - provisioned


def test_sigkill_at_random_times(setup: Path) -> None:
    import random
    import time

    rng = random.Random(7)
    for _ in range(6):
        _fresh_store(setup)
        procs = [_start_worker(setup, 0, CHIPS // 2), _start_worker(setup, CHIPS // 2, CHIPS)]
        time.sleep(rng.uniform(0.3, 1.5))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.communicate(timeout=300)
        _check_invariants(setup)
