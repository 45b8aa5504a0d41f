"""Signals: SIGTERM and SIGINT finish the batch in flight (or drop it, if nothing of it was
counted yet), program what was released, and end the run with one line and exit code 128 +
the signal; workers ignore the terminal's SIGINT and stop through the leader; a killed
leader takes its workers with it.

Each run is a subprocess in its own session (``tests.integration.run_entry``) whose fault
hook sends the signal at a chosen point, as an operator or a terminal would.  Afterwards:
the ledger verifies, every device that received secrets is in it and was programmed, no
counted slot is stranded, and a resumed run finishes the job.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from securethread.programmer import runner
from tests.integration.line_support import (
    World,
    check_settled,
    finish,
    ledger_view,
    own_lines,
    run_sub,
    start_run,
)

QUOTA = 16


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(oem, programmer, tmp_path_factory.mktemp("signals"), chips=QUOTA)


SIGNALS = [
    # (fault point:nth:action, workers, exit code)
    ("after-identify:2:term", 0, 143),  # before the batch is counted: dropped
    ("after-commit:2:term", 0, 143),  # counted: released and programmed
    ("mid-release:6:int", 0, 130),
    ("mid-program:3:term", 1, 143),
    ("after-commit:1:int-group", 2, 130),  # Ctrl-C in a terminal: the whole group
    ("after-reserve:2:term", 2, 143),
    ("mid-release:2:term-self", 2, 143),  # a worker stopped on its own stops the run
]


@pytest.mark.parametrize(("fault", "workers", "code"), SIGNALS, ids=[s[0] for s in SIGNALS])
def test_signal_finishes_the_batch_in_flight(
    world: World, fault: str, workers: int, code: int
) -> None:
    job = world.job(quota=QUOTA, batch_size=3)
    chips = job.chips(world.specs)
    run = run_sub(job.dump(chips), fault=fault, workers=workers)
    assert run.returncode == code, run.stderr
    lines = own_lines(run.stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by SIG"), run.stderr
    assert "Traceback" not in run.stderr
    r = run.result
    assert r is not None and r["interrupted_by"] == signal.Signals(code - 128).name
    assert 0 < r["provisioned"] < QUOTA  # it stopped part way...
    assert r["programmed"] == r["provisioned"] and r["unprogrammed"] == 0  # ...all programmed
    view = ledger_view(job)
    assert set(job.log("released.log")) == set(view.provisioned) == set(view.programmed)
    assert view.used == len(view.provisioned)  # the run ended: no slot left reserved

    again = runner.run(job.config, chips)
    assert again.provisioned == QUOTA - r["provisioned"] and again.recovered == 0
    assert len(check_settled(job).provisioned) == QUOTA


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _workers_of(leader: int) -> list[int]:
    """Live worker processes started by ``leader`` (their command line ends with its pid)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_worker_main" in b" ".join(argv) and str(leader).encode() in argv[-3:]:
            if _alive(int(entry.name)):
                out.append(int(entry.name))
    return out


def test_killed_leader_takes_its_workers(world: World) -> None:
    job = world.job(quota=QUOTA, batch_size=2)
    chips = job.chips(world.specs)
    setup = job.dump(chips)
    proc = start_run(setup, fault="after-commit:2:kill-leader", workers=2)
    run = finish(proc)
    assert run.returncode == -signal.SIGKILL
    pids = [int(p) for p in Path(str(setup) + ".pids").read_text().split()]
    assert pids and proc.pid not in pids  # worker processes were at work
    deadline = time.monotonic() + 30
    while (_workers_of(proc.pid) or any(_alive(p) for p in pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _workers_of(proc.pid), "a worker outlived its leader"
    assert not any(_alive(p) for p in pids)
    # Nothing counted is lost: the next run programs what the dead run released.
    before = ledger_view(job)
    assert set(job.log("released.log")) <= set(before.provisioned)
    again = runner.run(job.config, chips)
    assert again.recovered == len(set(before.provisioned) - set(before.programmed))
    # The dead run's unused slots are burned, never reused (a kill cannot be told from a
    # store copied back): counted, with every other slot used by a record.
    view = check_settled(job)
    assert len(view.provisioned) + again.burned == QUOTA and view.burned == again.burned
    assert again.burned <= 2 * 2 + 1  # a batch in flight per worker, one block (16 // 16)
