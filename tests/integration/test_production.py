"""Production runs on real SoftHSM tokens, through the runner (flows 7 and 8; S3, S4).

A world (OEM root, officers, programmer keys, production CA, mastered image, simulated fab)
is made once per module on the session tokens; each test takes a fresh job of it.  The
crash tests SIGKILL a run (a subprocess, ``tests.integration.run_entry``) at every fault
point of the pipeline and check after every kill that the quota was never exceeded and every
device that received secrets is in the ledger, then resume in this process and check that
the job is finished: every slot used by a record or burned (a killed leader's reservations
and the rest of its block: at most a batch and a block; a killed worker's are reclaimed by
its leader), every device programmed.

``SECURETHREAD_LONG=1`` kills at more instants (every point several times, one and two
workers) and runs the random kill loop longer (see ``tests.integration.kill_loop``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from cryptography import x509

from securethread.programmer import runner
from securethread.programmer.line import FAULT_POINTS
from securethread.programmer.quota_mark import block_for
from tests.integration.kill_loop import kill_loop
from tests.integration.line_support import World, check_settled, ledger_view, run_sub

LONG = os.environ.get("SECURETHREAD_LONG") == "1"
QUOTA = 24
# Long mode: a job big enough that every point is passed 13 times in each of 2 workers.
KILL_QUOTA, KILL_BATCH = (60, 2) if LONG else (QUOTA, 3)


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    # quota + 3 chips in the targets, and one more outside them
    chips = max(QUOTA, KILL_QUOTA) + 4
    return World(oem, programmer, tmp_path_factory.mktemp("production"), chips=chips)


@pytest.mark.parametrize("workers", [2, 4])
def test_whole_flow(world: World, workers: int) -> None:
    """Job -> devices provisioned and programmed by concurrent workers -> ledger."""
    job = world.job(quota=QUOTA, targets=QUOTA + 3, batch_size=4, workers=workers)
    progress: list[runner.Progress] = []
    r = runner.run(job.config, job.chips(world.specs[: QUOTA + 4]), progress=progress.append)
    assert (r.provisioned, r.programmed, r.quota_used) == (QUOTA, QUOTA, QUOTA)
    # every chip is accounted for: provisioned, over quota, or outside the targets
    assert r.refused == {"QuotaExceededError": 3, "NotTargetedError": 1}
    assert r.devices == QUOTA + 4 and progress[-1].handled == QUOTA + 4
    view = check_settled(job)
    serials = [x509.load_der_x509_certificate(d).serial_number for d in view.certificates.values()]
    assert len(set(serials)) == QUOTA  # unique across workers
    assert sorted(view.slots) == list(range(QUOTA))


def test_already_provisioned_device_is_refused(world: World) -> None:
    job = world.job(quota=QUOTA)
    chips = job.chips(world.specs[:5])
    runner.run(job.config, chips)
    again = runner.run(job.config, chips)
    assert (again.provisioned, again.already_done, again.quota_used) == (0, 5, 5)
    assert again.refused == {}  # nothing counted for them, nothing refused for a reason


NTHS = (1, 2, 3, 4, 6, 9, 13) if LONG else (1, 3, 5)
KILLS = [
    (point, nth, workers)
    for i, point in enumerate(FAULT_POINTS)
    for nth in (NTHS if LONG else NTHS[i % len(NTHS) : i % len(NTHS) + 1])
    for workers in ((0, 1, 2) if LONG else (0,))
]


@pytest.mark.parametrize(("point", "nth", "workers"), KILLS)
def test_sigkill_at_every_fault_point(world: World, point: str, nth: int, workers: int) -> None:
    job = world.job(quota=KILL_QUOTA, batch_size=KILL_BATCH)
    chips = job.chips(world.specs[: KILL_QUOTA + 2])
    killed = run_sub(job.dump(chips), fault=f"{point}:{nth}", workers=workers)
    expected = -signal.SIGKILL if workers == 0 else 4  # a worker died: the leader says so
    assert killed.returncode == expected, f"{point}:{nth} was never reached: {killed.stderr}"
    view = ledger_view(job)
    assert view.used <= KILL_QUOTA, "S3: more slots counted than the quota"
    missing = set(job.log("released.log")) - set(view.provisioned)
    assert not missing, f"S4: devices received secrets but are not in the ledger: {missing}"
    # A resumed run finishes the job: nothing the kill interrupted is lost or counted twice;
    # a killed leader's reservations and the rest of its block are burned, not reused.
    r = runner.run(job.config, chips)
    assert r.quota_used == KILL_QUOTA and r.unprogrammed == 0
    view = check_settled(job)
    assert len(view.provisioned) + r.burned == KILL_QUOTA
    assert r.burned <= (KILL_BATCH + block_for(KILL_QUOTA) if workers == 0 else 0)


def test_sigkill_at_random_times(world: World) -> None:
    counts = kill_loop(world, kills=40 if LONG else 3, seed=7)
    assert counts["kills"] >= 3
    assert counts["overruns"] == counts["unrecorded"] == counts["stranded"] == 0, counts
    assert counts["overburned"] == 0, counts
    assert counts["failed"] == 0, counts
