"""Counted devices get programmed: a device counted but not programmed -- killed between
release and programming, refused its release, failed its programming -- is programmed by a
later run with the same certificate and license and without a second count.

Kills happen in a subprocess (``tests.integration.run_entry`` with a fault hook); the resumed
runs happen in this process.  Every check reads the ledger back and verifies it, and reads
what the simulated chips noted on their side of the wire.
"""

from __future__ import annotations

import signal
import ssl
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.programmer import runner
from securethread.programmer.store import SQLiteStore
from tests.integration.line_support import (
    HostileChip,
    World,
    check_settled,
    ledger_view,
    own_lines,
    run_sub,
)


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(oem, programmer, tmp_path_factory.mktemp("recovery"), chips=24)


def test_failed_programming_is_recovered_without_a_second_count(world: World) -> None:
    job = world.job(quota=6, targets=24, batch_size=3)
    spec = world.specs[1]
    flaky = HostileChip(spec.device_id, "program-raise", spec=spec)
    chips = job.chips(world.specs[:6])
    r = runner.run(job.config, [chips[0], flaky, *chips[2:6]])
    assert (r.provisioned, r.programmed) == (6, 5)
    assert r.not_programmed == {"ProgrammingError": 1}
    assert (r.unprogrammed, r.unprogrammed_ids) == (1, (spec.device_id,))
    assert r.notes[0].device_id == spec.device_id and r.notes[0].stage == "program"
    cert_file = Path(job.config.certificates) / f"{spec.device_id}.pem"
    first_cert = cert_file.read_bytes()

    again = runner.run(job.config, chips)
    assert (again.recovered, again.programmed, again.provisioned) == (1, 1, 0)
    assert again.already_done == 5 and again.quota_used == 6 and again.unprogrammed == 0
    assert cert_file.read_bytes() == first_cert  # the same certificate
    view = check_settled(job)  # the same license, one count
    assert view.provisioned[spec.device_id] == 1


def test_failed_release_is_released_again(world: World) -> None:
    job = world.job(quota=4, targets=24, batch_size=4)
    spec = world.specs[2]
    chips = job.chips(world.specs[:4])
    hangs_up = HostileChip(spec.device_id, "release-raise", spec=spec)
    r = runner.run(job.config, [chips[0], chips[1], hangs_up, chips[3]])
    assert (r.provisioned, r.programmed) == (3, 3)
    assert r.not_programmed == {"ReleaseError": 1} and r.unprogrammed == 1
    again = runner.run(job.config, [chips[2]])
    assert (again.recovered, again.programmed, again.quota_used) == (1, 1, 4)
    check_settled(job)


def test_recovery_needs_the_key_that_was_certified(world: World) -> None:
    """A chip with a counted device's id and a genuine vendor certificate, but another key
    than the one certified on the first run, gets nothing of what was released then."""
    job = world.job(quota=2, targets=24)
    spec = world.specs[3]
    runner.run(job.config, [HostileChip(spec.device_id, "program-raise", spec=spec)])
    key = ec.generate_private_key(ec.SECP256R1())
    impostor = attrs.evolve(
        spec,
        private_key_der=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        vendor_certificate_der=world.vendor.certify(spec.device_id, key.public_key()).public_bytes(
            serialization.Encoding.DER
        ),
    )
    r = runner.run(job.config, job.chips([impostor]))
    assert (r.recovered, r.programmed, r.refused) == (0, 0, {"DeviceRefusedError": 1})
    assert "another key than the one certified" in r.notes[0].message
    assert r.unprogrammed == 1 and not job.log("released.log")


KILLS = [
    # (fault, workers): the release point and its neighbours
    ("after-release:1", 0),
    ("mid-release:3", 0),
    ("after-commit:2", 0),  # counted, certificate files not written yet
    ("mid-program:2", 0),  # flashed, the boot not recorded
    ("after-release:1", 1),  # the worker process is killed, its leader says so
    ("after-release:1", 2),
]


@pytest.mark.parametrize(("fault", "workers"), KILLS, ids=[f"{f}-w{w}" for f, w in KILLS])
def test_killed_between_release_and_programming(world: World, fault: str, workers: int) -> None:
    job = world.job(quota=16, targets=24, batch_size=4)
    chips = job.chips(world.specs[:16])
    setup = job.dump(chips)
    killed = run_sub(setup, fault=fault, workers=workers)
    if workers == 0:  # the line runs in the process that was killed
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    else:
        assert killed.returncode == 4 and "worker died" in killed.stderr, killed.stderr
        assert len(own_lines(killed.stderr)) == 1, killed.stderr
    before = ledger_view(job)
    released = set(job.log("released.log"))
    assert released <= set(before.provisioned)  # S4 after the kill
    waiting = set(before.provisioned) - set(before.programmed)
    assert waiting, "the kill left no device counted and unprogrammed"

    r = runner.run(job.config, chips)
    assert r.recovered == len(waiting)
    # A killed leader's unused slots (the rest of its block) are burned, never reused.
    assert r.burned <= (1 if workers == 0 else 0)  # block_for(16) == 1; a worker's: reclaimed
    assert r.provisioned == 16 - len(before.provisioned) - r.burned
    assert r.programmed == 16 - len(before.programmed) - r.burned
    assert (r.quota_used, r.unprogrammed) == (16, 0)
    view = check_settled(job)
    assert len(view.provisioned) + view.burned == 16  # no slot lost beyond the block
    for device_id in waiting:
        assert view.certificates[device_id] == before.certificates[device_id]
        pem = (Path(job.config.certificates) / f"{device_id}.pem").read_text()
        assert ssl.PEM_cert_to_DER_cert(pem) == before.certificates[device_id]


def test_store_keeps_release_until_programmed(world: World) -> None:
    job = world.job(quota=3, targets=24)
    spec = world.specs[5]
    runner.run(job.config, [HostileChip(spec.device_id, "program-garbage", spec=spec)])
    store = SQLiteStore(job.store, create=False)
    try:
        kept = store.unprogrammed(job.job_hash, [spec.device_id, "0000000000000000"])
        assert list(kept) == [spec.device_id]
        rel = kept[spec.device_id]
        view = ledger_view(job)
        assert rel.certificate == view.certificates[spec.device_id]
        assert rel.license and rel.provisioning
        runner.run(job.config, job.chips([spec]))
        assert store.unprogrammed(job.job_hash, [spec.device_id]) == {}
    finally:
        store.close()
