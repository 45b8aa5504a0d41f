"""One run per job at a time, and reservations never strand slots.

A double-click starts a second run while the first is in flight: the second is refused at
once (in this process and as a second command), the first finishes, and at the quota
boundary no slot is lost -- every slot counted is used by a ledger record.  Slots reserved
by a worker that was killed are reclaimed when its leader ends the run (a clean end); those
of a run whose leader was killed are burned by the next run -- they might have been handed
out by a copy of the store -- and that run starts above the killed run's block: counted,
never used twice.  Slots of a batch refused at commit (the same device met twice by two
workers) go back to the pool.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from securethread.programmer import runner
from securethread.programmer.store import SQLiteStore
from tests.integration.line_support import World, check_settled, finish, run_sub, start_run


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(oem, programmer, tmp_path_factory.mktemp("concurrent"), chips=30)


def _wait_for(path: Path, proc: Any) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)


@pytest.mark.parametrize("workers", [0, 2])
def test_second_run_on_the_job_is_refused_at_once(world: World, workers: int) -> None:
    job = world.job(quota=20, targets=30, batch_size=4)
    chips = job.chips(world.specs[:30])  # 10 more than the quota: the boundary is crossed
    setup = job.dump(chips)
    first = start_run(setup, fault="after-commit:2:pause", workers=workers)
    try:
        _wait_for(Path(str(setup) + ".go.paused"), first)  # in flight, between two batches
        with pytest.raises(runner.RunLockedError) as info:
            runner.run(job.config, chips[10:])  # the double-click, in this process
        text = str(info.value)
        assert "another run of job line-job is going on" in text and "\n" not in text
        assert f"process {first.pid}" in text
        second = run_sub(setup, workers=workers)  # ... and as a second command
        assert second.returncode == 5 and "one run per job at a time" in second.stderr
    finally:
        Path(str(setup) + ".go").touch()
    done = finish(first)
    assert done.returncode == 0, done.stderr
    assert done.result is not None
    assert done.result["provisioned"] == 20 and done.result["refused"] == {"QuotaExceededError": 10}
    again = runner.run(job.config, chips[10:])  # the second click, after the first run
    assert (again.provisioned, again.quota_used) == (0, 20)
    assert again.already_done + again.refused["QuotaExceededError"] == 20
    view = check_settled(job)
    assert sorted(view.slots) == list(range(20))  # no slot lost at the boundary


def _state(job: Any) -> Any:
    store = SQLiteStore(job.store, create=False)
    try:
        return store.state(job.job_hash)
    finally:
        store.close()


def test_slots_reserved_by_a_killed_worker_are_reclaimed(world: World) -> None:
    """The worker dies, its leader ends the run cleanly: nothing is wasted."""
    job = world.job(quota=12, targets=30, batch_size=4, mark_block=4)
    chips = job.chips(world.specs[:16])
    killed = run_sub(job.dump(chips), fault="after-reserve:2", workers=1)
    assert killed.returncode == 4, killed.stderr  # the worker died, the leader said so
    state = _state(job)
    assert (state.committed, state.used, state.free) == (4, 4, 4)  # 4 back in the pool
    r = runner.run(job.config, chips)
    assert (r.reclaimed, r.burned) == (0, 0)
    assert (r.provisioned, r.quota_used) == (8, 12)  # the whole quota, nothing wasted
    view = check_settled(job)
    assert sorted(view.slots) == list(range(12))


def test_slots_reserved_by_a_killed_run_are_burned_never_reused(world: World) -> None:
    """The leader dies: the next run cannot tell a kill from a store copied back, so it
    burns the dead reservations and the rest of the block, and counts on above them."""
    job = world.job(quota=20, targets=30, batch_size=4, mark_block=4)
    chips = job.chips(world.specs[:16])
    killed = run_sub(job.dump(chips), fault="after-reserve:2")
    assert killed.returncode == -signal.SIGKILL
    state = _state(job)
    assert (state.committed, state.used) == (4, 8)  # 4 slots reserved and never used
    r = runner.run(job.config, chips)
    # slots 4-7 reserved by the dead run, 8-11 the rest of its block (mark limit 4 + 4 + 4)
    assert (r.reclaimed, r.burned) == (0, 8)
    assert (r.provisioned, r.quota_used) == (8, 20)  # counted, never used twice
    assert r.refused == {"QuotaExceededError": 4}
    view = check_settled(job)
    assert sorted(view.slots) == [0, 1, 2, 3, *range(12, 20)] and view.burned == 8


def test_duplicates_between_workers_give_their_slots_back(world: World) -> None:
    job = world.job(quota=30, targets=30, batch_size=3, workers=2)
    chips = job.chips(world.specs[:12])
    r = runner.run(job.config, chips + chips)  # every device twice
    assert r.provisioned == 12 and r.quota_used == 12
    assert r.already_done + sum(r.refused.values()) == 12
    view = check_settled(job)
    store = SQLiteStore(job.store, create=False)
    try:
        state = store.state(job.job_hash)
    finally:
        store.close()
    assert state.used == state.committed == 12 == len(view.provisioned)
