"""The benchmark suite's pieces run end to end on small sizes (real SoftHSM, subprocesses).

Throughput is never asserted here (shared, noisy machines); these tests only keep
``python -m benchmarks`` working: every field it reports exists and is sane.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as suite
from benchmarks import provision as P


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("bench")
    P.run_setup(w, 48)
    return w


def test_worker_times_the_pipeline_and_the_floor(work: Path) -> None:
    P.fresh_store(work)
    (res,) = P.start_workers(work, [(0, 40)], 8, 10)
    assert res["provisioned"] == 40
    for field in ("provision_s", "p50_ms", "p99_ms", "device_accept_ms"):
        assert res[field] > 0
    assert res["floor_n"] == 10
    assert res["floor_devices_per_s"] > 0 and res["floor_p11_devices_per_s"] > 0


def test_two_workers_share_the_job_without_overlap(work: Path) -> None:
    P.fresh_store(work)
    results = P.start_workers(work, [(0, 20), (20, 40)], 8, 0)
    assert sum(r["provisioned"] for r in results) == 40


def test_profile_accounts_for_each_stage(work: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.provision", "profile", str(work), "24", "8"],
        env=P.clean_env(),
        cwd=P.ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    prof = json.loads(out.stdout.strip().splitlines()[-1])
    stages = prof["stages_us_per_device"]
    for stage in ("token calls", "identity verification", "certificate", "license", "store"):
        assert stages[stage] > 0, stage
    assert stages["token calls"] < stages["certificate"] + stages["license"] + stages["store"]
    # CBOR is timed once per call however deep (cbor.encode calling cbor2.dumps): a share.
    assert 0 < prof["cbor_share_percent"] < 50
    assert prof["cprofile_top_tottime"]


def test_ledger_benchmark_streams_and_reports_peaks(tmp_path: Path) -> None:
    r = suite.bench_ledger([100, 300], 2, tmp_path, lambda _msg: None)
    assert r["records"] == 300
    assert [p["records"] for p in r["peak_memory"]] == [100, 300]
    assert r["records_per_s"]["runs"] == 2 and r["records_per_cpu_s"]["runs"] == 2
    assert not list(tmp_path.iterdir())  # export files removed


def test_registry_benchmark_runs_each_phase_and_reports_peaks() -> None:
    from benchmarks import bench_registry

    r = bench_registry.run([60, 120], pg_url=None, pg=False, ocsp_n=20, log=lambda _m: None)
    assert [p["devices"] for p in r["points"]] == [60, 120]
    for p in r["points"]:
        assert p["reconcile"]["devices_per_s"] > 0 and p["reconcile"]["maxrss_mib"] > 0
        assert p["ingest_sqlite"]["records_per_s"] > 0 and "ingest_postgresql" not in p
    assert r["ocsp"]["responses"] == 20 and r["ocsp"]["responses_per_s"] > 0
    assert set(r["targets_met"]) == {
        "ingest_sqlite>=50000_records_per_s", "reconcile>=10000_devices_per_s", "rss_flat_10%",
    }  # fmt: skip


def test_lot_benchmark_prelicenses_and_verifies() -> None:
    from benchmarks import bench_lot

    r = bench_lot.run(12, lambda _m: None, line_n=16, reps=1, verify_n=300)
    assert r["lot_verify"]["chips"] == 300 and r["lot_verify"]["cpu_s"] > 0
    assert [(p["chips"], p["workers"]) for p in r["prelicense"]] == [(12, 1), (12, 2)]
    for p in r["prelicense"]:
        assert p["devices_per_s"] > 0 and 0 < p["issue_s"] < p["elapsed_s"]
    assert r["line"]["devices_per_s"] > 0
    assert set(r["targets_met"]) == {"prelicense_ge_line", "lot_verify_100k_le_2s"}
