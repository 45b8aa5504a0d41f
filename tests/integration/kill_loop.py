"""The kill loop: production runs killed at random instants and fault points, then resumed.

``python -m tests.integration.kill_loop --kills 300 [--seed 1]`` (long mode; the CI runs a
few rounds through ``test_production.py``).  Each round takes a fresh job, kills one to three
runs of it -- SIGKILL to the run's leader and its session at a random instant, or to one
process at a random fault point (the line in the leader, or in one of one or two worker
processes) -- then resumes it in this process and
counts:

* ``overruns``: a store that counted more slots, or a ledger with more provisioned devices,
  than the quota (S3);
* ``unrecorded``: devices that received their secrets but are not in the ledger (S4);
* ``stranded``: after the resumed run, devices counted and not programmed, or slots counted
  and neither used by a ledger record nor burned;
* ``overburned``: rounds whose store burned more slots than its kills may cost (per kill,
  the batches in flight and the rest of one block: runs after a killed leader burn those);
* ``failed``: resumed runs that did not finish the job (every device provisioned and
  programmed, the whole quota used or burned).

Prints one JSON object; exits 1 if any count but ``kills``, ``rounds`` and ``burned`` is not
zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from securethread.programmer import runner
from securethread.programmer.line import FAULT_POINTS
from securethread.programmer.quota_mark import block_for
from securethread.programmer.store import SQLiteStore
from tests.integration.line_support import World, finish, ledger_view, start_run

QUOTA = 24


def one_round(world: World, rng: random.Random, counts: dict[str, int]) -> None:
    batch = rng.choice([2, 3, 4, 8])
    job = world.job(quota=QUOTA, batch_size=batch)
    chips = job.chips(world.specs[: QUOTA + 2])
    setup = job.dump(chips)
    may_burn = 0
    for _ in range(rng.randint(1, 3)):
        workers = rng.choice([0, 1, 2])
        may_burn += batch * max(1, workers) + block_for(QUOTA)
        if rng.random() < 0.5:
            proc = start_run(setup, workers=workers)
            time.sleep(rng.uniform(0.2, 2.5))
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the run's whole session
            except ProcessLookupError:
                pass
            finish(proc)
        else:
            point = rng.choice(FAULT_POINTS)
            finish(start_run(setup, workers=workers, fault=f"{point}:{rng.randint(1, 6)}"))
        counts["kills"] += 1
        released = set(job.log("released.log"))
        if SQLiteStore.inspect(job.store, job.job_hash) is None:  # killed before the job
            counts["unrecorded"] += len(released)  # was opened in its store
            continue
        view = ledger_view(job)
        if view.used > QUOTA or len(view.provisioned) > QUOTA:
            counts["overruns"] += 1
        counts["unrecorded"] += len(released - set(view.provisioned))
    r = runner.run(job.config, chips)
    view = ledger_view(job)
    counts["unrecorded"] += len(set(job.log("released.log")) - set(view.provisioned))
    counts["stranded"] += len(set(view.provisioned) - set(view.programmed))
    counts["stranded"] += view.used - len(view.provisioned) - view.burned
    counts["overburned"] += view.burned > may_burn
    counts["burned"] += view.burned
    if len(view.provisioned) + view.burned != QUOTA or r.unprogrammed or view.used != QUOTA:
        counts["failed"] += 1
    counts["rounds"] += 1


def kill_loop(world: World, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = dict.fromkeys(
        ("rounds", "kills", "burned", "overruns", "unrecorded", "stranded", "overburned", "failed"),
        0,
    )
    while counts["kills"] < kills:
        one_round(world, rng, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    import tests.conftest  # noqa: F401 - a SoftHSM token directory in a temp dir, activated
    from securethread.hsm import open_token

    world = World(
        open_token("oem"), open_token("programmer"),
        Path(tempfile.mkdtemp(prefix="kill-loop-")), chips=QUOTA + 2,
    )  # fmt: skip
    t0 = time.perf_counter()
    counts: dict[str, Any] = kill_loop(world, args.kills, args.seed)
    counts["seconds"] = round(time.perf_counter() - t0)
    print(json.dumps(counts))
    bad = sum(counts[k] for k in ("overruns", "unrecorded", "stranded", "overburned", "failed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
