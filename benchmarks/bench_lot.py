"""Zero-secret programming at scale: ``python -m benchmarks.bench_lot [--quick] [--json]``.

lot_verify    :func:`securethread.formats.lot.verify_lot` of a 100,000-chip lot manifest (one
              COSE_Sign1 by the vendor CA, about 8.5 MB), in this process, median of 3: the
              signature once, then every chip's id, order, key uniqueness and curve check.
              Wall time, and the process's CPU time beside it (shared machines).
prelicense    ``securethread oem prelicense`` in a process of its own on a real OEM work
              directory (SoftHSM): per chip a device certificate and a license (ECDH-ES,
              KEK derivation and KWP wrap in the token, license signature).  devices/s over the
              step's own time (``elapsed_s``: lot verification, the lot's production CA,
              every chip, the package signed and written) and over the per-chip issuance alone
              (``issue_s``); 1 and 2 worker processes.  Full: a 100,000-chip lot; quick: 2,000.
line          the programming centre's line in the same run (benchmarks/provision.py's
              workers: identify, count, certificate, license, ledger; 1 worker).

Targets (issue 20): pre-licensing >= the line's provisioning rate; lot verification of
100,000 chips <= 2 s.
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
from pathlib import Path
from typing import Any

from . import provision as P

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "securethread.cli"]
FIRST = 0x5EC0_0000_0000_0000
VERIFY_N = 100_000


def _cli(work: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [*CLI, *args, "--json"], env=P.clean_env(), cwd=work, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"securethread {' '.join(args[:2])} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def make_lot(vendor_dir: Path, n: int, lot_id: str) -> bytes:
    """A lot of ``n`` chips signed by the simulated fab's CA (keys derived from their index:
    the chips' private keys are not needed to pre-license them)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from securethread.demo.line import SimulatedFab
    from securethread.formats.lot import LotManifest, sign_lot

    fab = SimulatedFab(vendor_dir)
    chips = (
        (f"{FIRST + i:016x}", ec.derive_private_key(7919 + i, ec.SECP256R1()).public_key())
        for i in range(n)
    )
    m = LotManifest.build(
        lot_id=lot_id, device_class="sensor-v1", vendor_ca=fab.root_certificate, chips=chips
    )
    return sign_lot(m, fab.vendor.private_key)


def bench_verify(lot: bytes, vendor_dir: Path, reps: int, n: int) -> dict[str, Any]:
    from securethread.demo.line import SimulatedFab
    from securethread.formats.lot import verify_lot

    ca = SimulatedFab(vendor_dir).root_certificate
    times, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        v = verify_lot(lot, vendor_cas=[ca])
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        assert len(v) == n
    med = statistics.median(times)
    return {
        "chips": n,
        "bytes": len(lot),
        "seconds": round(med, 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "us_per_chip": round(med / n * 1e6, 2),
        "cpu_s": round(statistics.median(cpu), 3),
        "cpu_note": "this process's CPU time: the wall time less what other load took",
        "runs": reps,
    }


def oem_world(work: Path) -> None:
    """An OEM (real SoftHSM tokens), a simulated fab that took its order, a mastered image."""
    _cli(work, "oem", "init", "--workdir", "oem", "--name", "bench-oem", "--officers", "1",
         "--threshold", "1", "--officer-pin-file", f"1={work / 'officer.pin'}")  # fmt: skip
    _cli(work, "vendor", "init", "--workdir", "vendor", "--oem-root", "oem/root-ca.pem")
    (work / "fw.bin").write_bytes(os.urandom(4096))
    _cli(work, "oem", "master-image", "--workdir", "oem", "fw.bin", "--image-id", "fw-1",
         "--version", "1.0.0", "--security-counter", "1",
         "--device-class", "sensor-v1")  # fmt: skip


def bench_prelicense(work: Path, n: int, workers: int, lot_id: str) -> dict[str, Any]:
    (work / f"{lot_id}.bin").write_bytes(make_lot(work / "vendor", n, lot_id))
    r = _cli(work, "oem", "prelicense", "--workdir", "oem", f"{lot_id}.bin", "--vendor-ca",
             "vendor/root-ca.pem", "--image", "fw-1", "--factory", "factory-1",
             "--workers", str(workers))  # fmt: skip
    assert r["chips"] == n, r
    package = work / "oem" / "lots" / lot_id / "package.bin"
    out = {
        "chips": n,
        "workers": workers,
        "elapsed_s": r["elapsed_s"],
        "issue_s": r["issue_s"],
        "lot_verify_s": r["lot_verify_s"],
        "devices_per_s": round(n / r["elapsed_s"], 1),
        "issue_devices_per_s": round(n / r["issue_s"], 1),
        "package_mib": round(package.stat().st_size / (1 << 20), 1),
    }
    for p in (work / "oem" / "lots" / lot_id / "package.bin", work / "oem" / "outbox"
              / f"package-{lot_id}.bin"):  # fmt: skip
        p.unlink()  # the disk a 100k package takes, twice
    return out


def bench_line(n: int, log: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-lot-line-"))
    try:
        log(f"line: setup and 1 worker over {n} devices")
        P.run_setup(work, n)
        P.fresh_store(work)
        (res,) = P.start_workers(work, [(0, n)], 32, 0)
        return {"devices": n, "devices_per_s": round(n / res["provision_s"], 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(
    n: int, log: Any, *, line_n: int = 500, reps: int = 3, verify_n: int = VERIFY_N
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-lot-"))
    try:
        log("lot: OEM world (oem init, vendor init, master-image)")
        oem_world(work)
        log(f"lot: a {verify_n}-chip lot manifest, verified x{reps}")
        lot = make_lot(work / "vendor", verify_n, "verify")
        verify = bench_verify(lot, work / "vendor", reps, verify_n)
        pre = []
        for k, workers in enumerate((1, 2)):
            log(f"lot: oem prelicense of {n} chips, {workers} worker(s)")
            pre.append(bench_prelicense(work, n, workers, f"bench-{k}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    line = bench_line(line_n, log)
    best = max(p["devices_per_s"] for p in pre)
    return {
        "lot_verify": verify,
        "prelicense": pre,
        "line": line,
        "prelicense_over_line": round(best / line["devices_per_s"], 2),
        "targets_met": {
            "prelicense_ge_line": best >= line["devices_per_s"],
            "lot_verify_100k_le_2s": verify["seconds"] <= 2.0 * verify_n / VERIFY_N,
        },
    }


def format_lines(r: dict[str, Any]) -> str:
    v = r["lot_verify"]
    out = [
        f"    lot verify {v['chips']} chips ({v['bytes'] / 1e6:.1f} MB): {v['seconds']} s "
        f"[{v['min_s']} .. {v['max_s']}], {v['us_per_chip']} us/chip; CPU {v['cpu_s']} s"
    ]
    for p in r["prelicense"]:
        out.append(
            f"    prelicense {p['chips']} chips, {p['workers']} worker(s): {p['devices_per_s']} "
            f"devices/s (step {p['elapsed_s']} s; issuance alone {p['issue_devices_per_s']} "
            f"devices/s); package {p['package_mib']} MiB"
        )
    out.append(
        f"    line (1 worker, {r['line']['devices']} devices): {r['line']['devices_per_s']} "
        f"devices/s; best pre-licensing / line {r['prelicense_over_line']}"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_lot", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2,000 chips pre-licensed (~1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--chips", type=int, help="chips pre-licensed (default 100,000; quick 2,000)")
    args = ap.parse_args(argv)
    n = args.chips or (2000 if args.quick else 100_000)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    r = run(n, log, line_n=500 if args.quick else 1000)
    r["mode"] = "quick" if args.quick else "full"
    r["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"zero-secret programming ({r['mode']}, {r['elapsed_s']} s)")
        print(format_lines(r))
        for k, ok in r["targets_met"].items():
            print(f"  target {k:24s} {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
