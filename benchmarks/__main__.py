"""Run every benchmark in one go: ``python -m benchmarks [--quick] [--json]``.

Groups (each a key of the JSON object printed as the last line of stdout with --json):

provision      the real pipeline on SoftHSM: a setup subprocess (``python -m benchmarks.provision
               setup``: tokens, keys, job and line configuration; firmware 4 KiB), then
               worker subprocesses that build the line and the simulated
               chips before the clock and time only ``list(line.provision(ports))``: identify,
               count, certificate, license, ledger commit, release (programming excluded).  The
               chips answer identification inside the clock; the provisioning data released to
               them is queued and checked by each simulated SBM after the clock
               (``device_accept_ms``: chip-side work).  p50/p99 come from Provisioned.elapsed_s
               (per-batch time / batch size).  2-worker rate = all devices / the slowest
               worker's time; both workers are released together.
floor          per device, exactly the token calls the pipeline makes, alone, in the 1-worker
               process on the same token and keys: CA sign, ``agree_and_wrap`` (ECDH, KEK
               derivation, KWP wrap, two destroys), license sign, 1/batch checkpoint sign.
               ``floor_p11`` is the same with the three python-pkcs11 calls the pipeline used
               before hsm/direct.py, for comparison.
profile        ``python -m benchmarks.provision profile``: per-stage microseconds per device
               (timed without a profiler) and cProfile's top functions (a second run).
peer           bench_certs' openssl + libp11 loop on the same production CA key (certs only).
software       the same pipeline (full in-process setup) with every key in a SoftwareBackend.
image          benchmarks/bench_image.py --json (median of its reps; peak RSS growth for 64
               and 512 MiB images in fresh processes).
ledger_verify  verify_ledger streaming an export file of 10k and 100k records (full: 100k and
               1M), a checkpoint every 32 records: records/s at the larger, tracemalloc peak at
               both (memory must not grow with the ledger).
scaling        devices/s at 1k and 10k devices (full: 1k, 10k, 100k) on one growing store.
stations       benchmarks/bench_stations.py: one station server (the appliance's station API over
               gRPC with mutual TLS), 1, 2 and 4 station processes of simulated chips, devices/s
               end to end and p50/p99 per device, beside the in-process line in the same run.
registry       benchmarks/bench_registry.py: reconcile and registry ingest (SQLite and a
               PostgreSQL server it starts) of synthesised 10k and 100k-device ledgers (full:
               100k and 1M), devices or records/s and each phase's peak RSS, and OCSP
               responses/s of the HTTP responder signing in SoftHSM.
lot            benchmarks/bench_lot.py: zero-secret programming: a 100,000-chip lot manifest
               verified; ``oem prelicense`` devices/s (certificate and license per chip in the
               OEM's SoftHSM token; full: 100,000 chips, quick: 2,000; 1 and 2 workers) beside
               the line's provisioning rate in the same run.

Run on their own (longer): ``python -m benchmarks.memory --sizes 2000,20000`` (peak memory
of whole ``provision`` runs: flat per device) and ``python -m benchmarks.provision markcost``
(the quota mark's cost: the same line with and without it, alternated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import provision as P

BATCH = 32


def spread(values: list[float], nd: int = 1) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), nd),
        "min": round(min(values), nd),
        "max": round(max(values), nd),
        "runs": len(values),
    }


def bench_provision(work: Path, n: int, reps: int, floor_n: int, scaling: list[int],
                    peer_n: int, log: Any) -> dict[str, Any]:  # fmt: skip
    quota = max([n, *scaling])
    log(f"setup (quota {quota})")
    setup_s = P.run_setup(work, quota)
    one, two, p50, p99, floors, floors_p11, accept = [], [], [], [], [], [], []
    for r in range(reps):
        log(f"provision rep {r + 1}/{reps}: 1 worker, {n} devices")
        P.fresh_store(work)
        (res,) = P.start_workers(work, [(0, n)], BATCH, floor_n)
        assert res["provisioned"] == n, res
        one.append(n / res["provision_s"])
        p50.append(res["p50_ms"])
        p99.append(res["p99_ms"])
        floors.append(res["floor_devices_per_s"])
        floors_p11.append(res["floor_p11_devices_per_s"])
        accept.append(res["device_accept_ms"])
        log(f"provision rep {r + 1}/{reps}: 2 workers, {n} devices")
        P.fresh_store(work)
        half = n // 2
        res2 = P.start_workers(work, [(0, half), (half, n)], BATCH, 0)
        assert sum(x["provisioned"] for x in res2) == n, res2
        two.append(n / max(x["provision_s"] for x in res2))
    scal = []
    for size in scaling:
        log(f"scaling: {size} devices, 1 worker")
        P.fresh_store(work)
        (res,) = P.start_workers(work, [(0, size)], BATCH, 0)
        rate = round(size / res["provision_s"], 1)
        lo, hi = round(res["p50_ms"], 3), round(res["p99_ms"], 3)
        scal.append({"devices": size, "devices_per_s": rate, "p50_ms": lo, "p99_ms": hi})
    log(f"profile: stages and cProfile over {n} devices")
    prof = subprocess.run(
        [sys.executable, "-m", "benchmarks.provision", "profile", str(work), str(n), str(BATCH)],
        env=P.clean_env(), cwd=P.ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    profile = json.loads(prof.stdout.strip().splitlines()[-1])
    peers = []
    for r in range(reps):
        log(f"peer rep {r + 1}/{reps}: {peer_n} certs")
        peer = subprocess.run(
            [sys.executable, "-m", "benchmarks.provision", "peer", str(work), str(peer_n)],
            env=P.clean_env(), cwd=P.ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        peers.append(json.loads(peer.stdout.strip().splitlines()[-1])["peer_devices_per_s"])
    dps = statistics.median(one)
    fl = statistics.median(floors)
    pr = statistics.median(peers)
    out: dict[str, Any] = {
        "provision": {
            "devices": n,
            "batch_size": BATCH,
            "setup_s": round(setup_s, 2),
            "devices_per_s": spread(one),
            "devices_per_s_2w": spread(two),
            "ratio_2w_1w": round(statistics.median(two) / dps, 3),
            "p50_ms": spread(p50, 3),
            "p99_ms": spread(p99, 3),
            "latency_note": "Provisioned.elapsed_s = per-batch time / batch size",
            "device_accept_ms": spread(accept, 3),
            "device_accept_note": "the simulated SBM checking its provisioning data (chain "
            "validation), device-side work timed after the clock",
        },
        "floor": {
            "n": floor_n,
            "floor_devices_per_s": spread(floors),
            "efficiency": round(dps / fl, 3),
            "floor_p11_devices_per_s": spread(floors_p11),
            "floor_p11_note": "same operations with agree_and_wrap as 3 python-pkcs11 calls "
            "+ 2 destroys (the pipeline before hsm/direct.py)",
        },
        "peer": {
            "n": peer_n,
            "peer_devices_per_s": spread(peers, 2),
            "speedup_vs_peer": round(dps / pr, 1),
        },
    }
    out["profile"] = profile
    if scal:
        rates = [s["devices_per_s"] for s in scal]
        out["scaling"] = {
            "points": scal,
            "max_over_min": round(max(rates) / min(rates), 3),
            "single_run_each": True,
        }
    return out


def bench_software(n: int, reps: int, log: Any) -> dict[str, Any]:
    log(f"software backend pipeline, {n} devices x {reps}")
    with tempfile.TemporaryDirectory(prefix="bench-sw-") as tmp:
        runs = P.software_runs(Path(tmp), n, reps)
    rates = [r["provision_s"] and n / r["provision_s"] for r in runs]
    return {
        "devices": n,
        "what": "full pipeline (ProductionLine.provision) with all keys in a SoftwareBackend",
        "software_devices_per_s": spread(rates),
        "p50_ms": spread([r["p50_ms"] for r in runs], 3),
    }


def bench_image(log: Any) -> dict[str, Any]:
    log("image throughput")
    args = ["--json", "--size-mib", "64", "--reps", "3",
            "--peak-sizes", "64,512"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(P.ROOT / "benchmarks" / "bench_image.py"), *args],
        env=P.clean_env(), cwd=P.ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    t = rep["throughput"]
    return {
        "size_mib": t["size_mib"],
        "reps_median_of": t["reps"],
        "token_encrypt_mib_per_s": t["mib_per_s"]["encrypt_image"],
        "token_raw_mib_per_s": t["mib_per_s"]["token_raw"],
        "cryptography_mib_per_s": t["mib_per_s"]["cryptography"],
        "device_decrypt_mib_per_s": t["mib_per_s"]["decrypt_image"],
        "ratio": t["encrypt_image/token_raw"],
        "ratio_note": "encrypt_image / bare token AES-GCM (bench_image's target denominator)",
        "encrypt_vs_cryptography": t["encrypt_image/cryptography"],
        "peak_memory": rep.get("peak_memory"),
        "peak_note": "peak RSS growth over a fresh process's baseline, 64 and 512 MiB images",
    }


def _ledger_items(n: int, key: Any, job: bytes) -> Iterator[tuple[str, bytes]]:
    """A valid closed ledger of ``n`` records, a signed checkpoint every BATCH records and
    the close record, lazily."""
    from securethread.formats import ledger

    prev, seq = job, 0
    while seq < n:
        k = min(BATCH, n - seq)
        pend = [
            ledger.PendingRecord(
                kind=ledger.KIND_PROVISIONED,
                slot=i,
                device_id=f"{i:016x}",
                time=1_700_000_000 + i,
                cert=b"cert%d" % i,
                license_sha256=b"\x01" * 32,
                vendor_ca=b"\x02" * 32,
            )  # fmt: skip
            for i in range(seq, seq + k)
        ]
        for _rec, _seq, raw, head in ledger.chain(pend, job=job, start_seq=seq, prev=prev):
            yield "r", raw
            prev = head
        seq += k
        yield "c", ledger.sign_checkpoint(key, job=job, upto=seq - 1, head=prev, time=1)
    totals = ledger.LedgerTotals(
        records=n, provisioned=n, programmed=0, head=prev, quota=max(n, 1), quota_used=n
    )
    yield "e", ledger.sign_close(key, ledger.CloseRecord.of(totals, job=job, time=2))


def bench_ledger(sizes: list[int], reps: int, work: Path, log: Any) -> dict[str, Any]:
    """verify_ledger streaming a ledger export file, as the OEM does: records/s at the
    largest size (median of ``reps``) and the tracemalloc peak at each size."""
    from securethread.formats import ledger
    from securethread.hsm import SIGNING, Curve, SoftwareBackend

    key = SoftwareBackend("ledger").generate_ec("ledger", curve=Curve.P256, policy=SIGNING)
    pub = key.public_key()
    job_signed = b"benchmark job"
    job = ledger.sha256(job_signed)

    def verify(path: Path) -> Any:
        with open(path, "rb") as src:
            _job, items = ledger.read_export(src)
            return ledger.verify_ledger(items, job=job, ledger_key=pub)

    peaks, rates, cpu_rates, build = [], [], [], {}
    for n in sizes:
        log(f"ledger of {n} records: build, verify")
        path = work / f"ledger-{n}.bin"
        t = time.perf_counter()
        with open(path, "wb") as out:
            ledger.write_export(out, job_signed, _ledger_items(n, key, job))
        build[n] = round(time.perf_counter() - t, 2)
        tracemalloc.start()
        summary = verify(path)
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert summary.records == n, summary
        peaks.append({"records": n, "peak_mib": round(peak / 2**20, 3),
                      "file_mib": round(path.stat().st_size / 2**20, 1)})  # fmt: skip
        if n == max(sizes):
            for _ in range(reps):
                t, c = time.perf_counter(), time.process_time()
                verify(path)
                rates.append(n / (time.perf_counter() - t))
                cpu_rates.append(n / (time.process_time() - c))
        path.unlink()
    return {
        "records": max(sizes),
        "checkpoint_every": BATCH,
        "build_s": build,
        "records_per_s": spread(rates, 0),
        # CPU time of the verifying process: what the verifier costs, whatever else the
        # shared machine runs meanwhile (wall-clock rates follow the load).
        "records_per_cpu_s": spread(cpu_rates, 0),
        "peak_memory": peaks,
        "peak_note": "tracemalloc peak while verifying the export file as a stream",
    }


def targets(r: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {
        "efficiency>=0.7": r["floor"]["efficiency"] >= 0.7,
        "2w>=1.7x1w": r["provision"]["ratio_2w_1w"] >= 1.7,
        "speedup_vs_peer>=30": r["peer"]["speedup_vs_peer"] >= 30,
        "image_ratio>=0.8": r["image"]["ratio"] >= 0.8,
    }
    if "scaling" in r:
        t["scaling_flat_15%"] = r["scaling"]["max_over_min"] <= 1.15
    if "registry" in r:
        t.update({f"registry_{k}": v for k, v in r["registry"]["targets_met"].items()})
    if "stations" in r:
        t.update({f"stations_{k}": v for k, v in r["stations"]["targets_met"].items()})
    if "lot" in r:
        t.update({f"lot_{k}": v for k, v in r["lot"]["targets_met"].items()})
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (~2 minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    quick = args.quick
    reps = 3
    n = 500 if quick else 1000
    scaling = [1000, 10_000] if quick else [1000, 10_000, 100_000]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="securethread-bench-"))
    try:
        r = bench_provision(work, n, reps, floor_n=300 if quick else 1000, scaling=scaling,
                            peer_n=30 if quick else 50, log=log)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "scaling" in r:
        r["scaling"]["mode"] = "quick (1k, 10k)" if quick else "full (1k, 10k, 100k)"
    r["software"] = bench_software(n, reps, log)
    r["software"]["hsm_over_software"] = round(
        r["provision"]["devices_per_s"]["median"]
        / r["software"]["software_devices_per_s"]["median"],
        3,
    )
    r["image"] = bench_image(log)
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        sizes = [10_000, 100_000] if quick else [100_000, 1_000_000]
        r["ledger_verify"] = bench_ledger(sizes, reps, Path(tmp), log)
    from . import bench_registry

    r["registry"] = bench_registry.run(
        [10_000, 100_000] if quick else [100_000, 1_000_000], pg_url=None, pg=True,
        ocsp_n=2000, log=log,
    )  # fmt: skip
    from . import bench_stations

    r["stations"] = bench_stations.run(200 if quick else 1000, log,
                                       latency_n=150 if quick else 1200)  # fmt: skip
    from . import bench_lot

    r["lot"] = bench_lot.run(2000 if quick else 100_000, log, line_n=n)
    r["targets_met"] = targets(r)
    r["mode"] = "quick" if quick else "full"
    r["cpus"] = os.cpu_count()
    r["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(r))
        return 0
    pv, fl, pe = r["provision"], r["floor"], r["peer"]
    rows = [
        ("provision devices/s (1 worker)", pv["devices_per_s"]),
        ("provision devices/s (2 workers)", pv["devices_per_s_2w"]),
        ("per-device p50 ms (batch/size)", pv["p50_ms"]),
        ("per-device p99 ms (batch/size)", pv["p99_ms"]),
        ("HSM floor devices/s", fl["floor_devices_per_s"]),
        ("HSM floor, python-pkcs11 calls", fl["floor_p11_devices_per_s"]),
        ("peer openssl loop devices/s", pe["peer_devices_per_s"]),
        ("software backend devices/s", r["software"]["software_devices_per_s"]),
        ("ledger verify records/s", r["ledger_verify"]["records_per_s"]),
        ("ledger verify records/CPU-s", r["ledger_verify"]["records_per_cpu_s"]),
    ]
    print(f"securethread benchmarks ({r['mode']}, {r['cpus']} CPUs, {r['elapsed_s']} s)")
    for name, s in rows:
        print(f"  {name:34s} {s['median']:>10}  [{s['min']} .. {s['max']}]")
    print(f"  efficiency vs floor  {fl['efficiency']:.3f}")
    print(f"  2 workers / 1 worker {pv['ratio_2w_1w']:.3f}")
    print(f"  speedup vs peer      {pe['speedup_vs_peer']:.1f}x")
    im = r["image"]
    print(f"  image: token {im['token_encrypt_mib_per_s']} MiB/s, raw {im['token_raw_mib_per_s']}, "
          f"cryptography {im['cryptography_mib_per_s']}, device decrypt "
          f"{im['device_decrypt_mib_per_s']} MiB/s, ratio {im['ratio']}")  # fmt: skip
    for p in r["ledger_verify"]["peak_memory"]:
        print(f"  ledger verify {p['records']:>9} records: peak {p['peak_mib']} MiB")
    for p in im["peak_memory"]:
        print(
            f"  image {p['size_mib']:>4} MiB: encrypt peak RSS +{p['encrypt_rss_growth_mib']} MiB"
        )
    print(f"  where a device's time goes ({r['profile']['wall_us_per_device']} us/device):")
    for stage, us in r["profile"]["stages_us_per_device"].items():
        print(f"    {stage:34s} {us:8.1f} us")
    if "cbor_share_percent" in r["profile"]:
        print(f"    CBOR share of a device's time      {r['profile']['cbor_share_percent']:8.1f} %")
    if "scaling" in r:
        for p in r["scaling"]["points"]:
            print(f"  scaling {p['devices']:>7} devices: {p['devices_per_s']} devices/s")
    for p in r["registry"]["points"]:
        print(f"  registry {p['devices']:>9} devices: reconcile "
              f"{p['reconcile']['devices_per_s']} devices/s, ingest SQLite "
              f"{p['ingest_sqlite']['records_per_s']} records/s"
              + (f", PostgreSQL {p['ingest_postgresql']['records_per_s']} records/s"
                 if "ingest_postgresql" in p else ""))  # fmt: skip
    if r["registry"]["ocsp"]:
        print(f"  OCSP responder: {r['registry']['ocsp']['responses_per_s']} responses/s")
    print("  stations (end to end, provision and program):")
    print(bench_stations.format_lines(r["stations"]))
    print("  zero-secret programming (lot manifest, OEM pre-licensing):")
    print(bench_lot.format_lines(r["lot"]))
    for k, v in r["targets_met"].items():
        print(f"  target {k:24s} {'met' if v else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
