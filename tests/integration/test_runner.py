"""The runner's contract: a device the line refuses never stops the line, token trouble
does (with every unused slot given back), PINs reach workers through their start pipe, and
progress is reported per batch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from securethread.errors import ConfigurationError, HSMError, KeyNotFoundError
from securethread.hsm.pin import env_var_for
from securethread.programmer import runner
from securethread.programmer.store import SQLiteStore
from tests.integration.line_support import HostileChip, World, check_settled, ledger_view

HOSTILE = ["garbage", "raise", "not-bytes", "evil-cert", "open"]
AFTER_COUNT = ["release-raise", "program-raise", "program-garbage"]


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(oem, programmer, tmp_path_factory.mktemp("runner"), chips=20)


@pytest.mark.parametrize("workers", [0, 2])
def test_malicious_chips_in_a_batch_of_good_ones(world: World, workers: int) -> None:
    job = world.job(quota=20, targets=20, batch_size=6, workers=workers)
    good = job.chips(world.specs[:12])
    subject = world.vendor.root_certificate.subject.rfc4514_string()
    hostile = [HostileChip(f"{0xBAD0 + i:016x}", how, vendor_subject=subject)
               for i, how in enumerate(HOSTILE)]  # fmt: skip
    flaky = [HostileChip(s.device_id, how, spec=s)
             for s, how in zip(world.specs[12:], AFTER_COUNT, strict=False)]  # fmt: skip
    devices = good[:4] + hostile[:3] + good[4:8] + flaky + hostile[3:] + good[8:]
    r = runner.run(job.config, devices)
    # the good ones: all provisioned and programmed, in the same batches as the bad ones
    # counted: the good ones and the flaky ones (one of which hung up during its release)
    assert (r.quota_used, r.provisioned, r.programmed) == (15, 14, 12)
    assert sum(r.refused.values()) == len(HOSTILE)  # refused before counting, each...
    assert {n.stage for n in r.notes if n.device_id is None or n.stage != "program"} >= {
        "identify", "open", "release"
    }
    assert all(n.message and "\n" not in n.message for n in r.notes)  # ...with its reason
    assert any("DuplicateExtension" in n.message for n in r.notes)
    assert r.not_programmed == {
        "ReleaseError": 1, "ProgrammingError": 1, "BootConfirmationError": 1
    }  # fmt: skip
    view = ledger_view(job)
    assert set(c.device_id for c in good) <= set(view.programmed)
    # the counted flaky ones are programmed by a later run, once healthy
    again = runner.run(job.config, job.chips([f.spec for f in flaky if f.spec is not None]))
    assert again.recovered == len(flaky) and again.programmed == len(flaky)
    check_settled(job)


class _TokenFails:
    """A hook standing in for a token that fails part way through a batch."""

    def __call__(self, point: str) -> None:
        if point == "after-license":
            raise HSMError("token 'programmer': C_Sign failed: DeviceError")


def test_token_trouble_stops_the_run_and_gives_slots_back(world: World) -> None:
    job = world.job(quota=10, batch_size=5)
    with pytest.raises(HSMError, match="DeviceError"):
        runner.run(job.config, job.chips(world.specs[:10]), faults=_TokenFails())
    store = SQLiteStore(job.store, create=False)
    try:
        state = store.state(job.job_hash)
    finally:
        store.close()
    assert state.committed == 0 and state.used == 0  # the batch's 5 slots were given back
    assert not job.log("released.log")
    r = runner.run(job.config, job.chips(world.specs[:10]))
    assert (r.provisioned, r.quota_used, r.reclaimed) == (10, 10, 0)


def test_missing_key_is_token_trouble_before_anything(world: World) -> None:
    job = world.job(quota=3)
    cfg = attrs.evolve(job.config, labels=attrs.evolve(job.config.labels, image_key="no-such"))
    with pytest.raises(KeyNotFoundError):
        runner.run(cfg, job.chips(world.specs[:3]))
    assert not job.log("released.log")


def test_bad_configuration_is_refused(world: World) -> None:
    job = world.job(quota=3)
    for change in ({"workers": -1}, {"batch_size": 0}, {"mark_block": -1},
                   {"recycle_after": 0}):  # fmt: skip
        with pytest.raises(ConfigurationError):
            runner.run(attrs.evolve(job.config, **change), job.chips(world.specs[:1]))
    assert not job.store.exists()


class _Environ:
    """A hook that notes, in each worker, whether the token PIN is in its environment."""

    def __init__(self, path: str, var: str, pin: str) -> None:
        self.path, self.var, self.pin = path, var, pin

    def __call__(self, point: str) -> None:
        if point == "after-identify":
            environ = Path("/proc/self/environ").read_bytes()
            leak = self.pin.encode() in environ or self.var.encode() in environ
            with open(self.path, "a") as f:
                f.write(f"{os.getpid()} {'leak' if leak else 'clean'}\n")


def test_workers_get_the_pin_through_their_start_pipe(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    var = env_var_for("programmer")
    pin = os.environ[var]
    monkeypatch.delenv(var)  # the leader is given the PIN by a prompt, not the environment
    monkeypatch.delenv(var + "_FILE", raising=False)
    asked: list[str] = []

    def prompt(label: str) -> str:
        asked.append(label)
        return pin

    job = world.job(quota=8, batch_size=2, workers=2)
    notes = tmp_path / "environ.txt"
    progress: list[runner.Progress] = []
    r = runner.run(job.config, job.chips(world.specs[:8]), pin=prompt,
                   faults=_Environ(str(notes), var, pin), progress=progress.append)  # fmt: skip
    assert r.provisioned == 8 and asked == ["programmer"]  # one prompt for all processes
    # Both workers logged in (a worker that cannot stops the run); those that took a
    # batch looked at their environment: no PIN there.
    seen = notes.read_text().split("\n")[:-1]
    assert seen and all(line.endswith("clean") for line in seen)
    assert os.getpid() not in {int(line.split()[0]) for line in seen}
    assert [p.handled for p in progress] == sorted(p.handled for p in progress)
    assert progress[-1].handled == 8 and progress[-1].programmed == 8


class _Pids:
    """A hook that notes which process handles each batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, point: str) -> None:
        if point == "after-identify":
            with open(self.path, "a") as f:
                f.write(f"{os.getpid()}\n")


def test_worker_processes_are_recycled(world: World, tmp_path: Path) -> None:
    """A fresh worker process replaces one that handled ``recycle_after`` devices (SoftHSM
    keeps every temporary key until its module is finalised); nothing is lost in between."""
    job = world.job(quota=12, batch_size=2, workers=1, recycle_after=4)
    notes = tmp_path / "pids.txt"
    r = runner.run(job.config, job.chips(world.specs[:12]), faults=_Pids(str(notes)))
    assert (r.provisioned, r.programmed, r.quota_used) == (12, 12, 12)
    pids = notes.read_text().split()
    assert len(pids) == 6 and len(set(pids)) == 3  # two batches of two per process
    check_settled(job)
