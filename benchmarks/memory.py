"""Memory per device: peak RSS of a whole production run at two sizes.

``python -m benchmarks.memory [--sizes 2000,20000] [--json]``

Each size runs in a fresh process: a token directory and a job of that many devices
(:func:`benchmarks.provision.make_world`), then one run through the runner
(:func:`securethread.programmer.runner.run`) over chips made one by one as the run asks for
them -- provisioned, certificate files written, programmed, ledger committed.  With
``--workers 1`` (the default, as ``programmer provision`` runs) the line runs in one worker
process, recycled every ``recycle_after`` devices; ``--workers 0`` runs it in the leader.
Peak RSS (``ru_maxrss``) is read after the run for the leader and for the largest worker
process.  A line whose memory is flat per device peaks at about the same RSS whatever the
number of devices; the figures are measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import provision as P


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(work: Path, n: int, batch: int, workers: int) -> dict[str, Any]:
    from softhsm_config import ensure_tokens

    ensure_tokens(work / "hsm", ("oem", "programmer"), generate_missing_pins=True).activate()
    from securethread.hsm import open_token
    from securethread.programmer import runner

    config, vendor, root_hash = P.make_world(open_token("oem"), open_token("programmer"),
                                             work, n)  # fmt: skip
    import attrs

    config = attrs.evolve(config, batch_size=batch, workers=workers)
    before = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    result = runner.run(config, P.chip_specs(vendor, root_hash, 0, n))
    elapsed = time.perf_counter() - t0
    leader = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest child
    return {
        "devices": n,
        "workers": workers,
        "provisioned": result.provisioned,
        "programmed": result.programmed,
        "rss_before_run_mib": round(before, 1),
        "leader_peak_rss_mib": round(leader, 1),
        "worker_peak_rss_mib": round(worker, 1) if workers else None,
        "peak_rss_mib": round(max(leader, worker if workers else 0), 1),
        "elapsed_s": round(elapsed, 1),
        "devices_per_s": round(n / elapsed, 1),
    }


def measure(sizes: list[int], batch: int, workers: int = 1) -> dict[str, Any]:
    points = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-memory-{n}-"))
        try:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", "_one", str(work), str(n),
                 str(batch), str(workers)],
                env=P.clean_env(), cwd=P.ROOT, check=True, capture_output=True, text=True,
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
        points.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, large = points[0], points[-1]
    return {
        "points": points,
        "batch_size": batch,
        "workers": workers,
        "peak_ratio_largest_to_smallest": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "command": "python -m benchmarks.memory --sizes " + ",".join(map(str, sizes))
        + f" --workers {workers}",
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_one":
        print(json.dumps(one(Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))),
              flush=True)  # fmt: skip
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="0: the line in the leader")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = measure([int(s) for s in args.sizes.split(",")], args.batch, args.workers)
    if args.json:
        print(json.dumps(r))
        return 0
    for p in r["points"]:
        print(f"{p['devices']:>7} devices: peak RSS {p['peak_rss_mib']} MiB (leader "
              f"{p['leader_peak_rss_mib']}, worker {p['worker_peak_rss_mib']}; before the run "
              f"{p['rss_before_run_mib']}), {p['devices_per_s']} devices/s")  # fmt: skip
    print(f"peak ratio largest/smallest: {r['peak_ratio_largest_to_smallest']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
