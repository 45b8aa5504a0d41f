"""Programming jobs on chips provisioned at a fab, and the OEM's joint reconciliation
(issue 20), on real SoftHSM tokens with the real CLI, each step a process of its own.

The module's world is ``demo --mode fab`` (securethread/demo/fab.py) run once with 5 chips:
the OEM, the silicon vendor's appliance (a provision job), the programming centre's appliance
(a program job naming it), the joint reconciliation.  On top of it: a second provisioning
job ``lot-2`` at the same fab (one chip), and a second program job ``prog-2`` naming only the
demo's provisioning job, for the bad inputs -- each refused with one line, nothing counted:
a chip provisioned under a job the programming job does not name, a chip programmed twice, a
blank chip, and returned ledgers that do not reconcile (a provisioning ledger of a job the
programming job does not name, a programming ledger whose record names another certificate
or production CA, re-signed with the programming appliance's own ledger key as its PIN holder
could).  Replayed certificates and unknown CAs at identification: tests/unit/
test_provisioned_identity.py; the joint checks one by one: tests/unit/
test_joint_reconciliation.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securethread.demo import FIRST_UID, IMAGE_ID, child_env
from securethread.demo import fab as fab_demo
from securethread.demo.fab import FAB, FACTORY, PROGRAM_JOB, PROVISION_JOB, token_labels
from securethread.demo.line import SimulatedFab
from securethread.formats import ledger
from securethread.formats.identity import IdentificationResponse
from securethread.formats.transcript import verify_transcript
from securethread.pki import cert_fingerprint, from_pem
from tests.integration.fab_support import (
    CLI,
    EXIT_CONFIG,
    EXIT_VERIFY,
    issue_job,
    run,
)
from tests.integration.fab_support import answer as _json
from tests.integration.fab_support import one_line as _one_line

DEVICES = 5
ROOT = Path(__file__).parents[2]


def _run(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """:func:`~tests.integration.fab_support.run` in the demo's directory (relative paths)."""
    return run(*args, ok=ok, cwd=root)


def _issue(root: Path, spec: str, name: str, *extra: str) -> None:
    path = root / "oem" / f"{name}.toml"
    path.write_text(spec)
    pins = [root / f"officer-{n}" / "pin" for n in (1, 2)]
    issue_job(Path("oem"), path, pins, *extra, cwd=root)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fab") / "demo"
    result = fab_demo.run(root, DEVICES, log=None)
    assert result.ok, result.to_json()
    last = FIRST_UID + DEVICES + 2
    # lot-2: the same fab, another provisioning job, one chip (UID FIRST + DEVICES + 2).
    _run(root, "programmer", "request-ca", "--workdir", "fab", "--job", "lot-2")
    _issue(root, f'job_id = "lot-2"\nprogrammer = "{FAB}"\nstage = "provision"\n'
                 f'device_class = "sensor-v1"\nquota = 1\n'
                 f'vendors = ["{root / "vendor" / "root-ca.pem"}"]\n[targets]\n'
                 f'ranges = [["{last:016x}", "{last:016x}"]]\n[window]\ndays = 1\n',
           "lot-2", "--ca-request", str(root / "fab/outbox/production-ca-request-lot-2.bin"))
    _run(root, "programmer", "open-job", "--workdir", "fab", "oem/outbox/job-lot-2.bin")
    _run(root, "programmer", "provision", "--workdir", "fab", "--job", "lot-2", "--chips-from",
         "vendor", "--devices", "1", "--progress", "none")  # fmt: skip
    _run(root, "programmer", "close-job", "--workdir", "fab", "--job", "lot-2")
    # prog-2: the same programming centre, naming only the demo's provisioning job.
    _issue(root, f'job_id = "prog-2"\nprogrammer = "{FACTORY}"\nstage = "program"\n'
                 f'image = "{IMAGE_ID}"\nquota = 3\nprovisioned_by = ["{PROVISION_JOB}"]\n'
                 f'[targets]\nranges = [["{FIRST_UID:016x}", "{last:016x}"]]\n'
                 '[window]\ndays = 1\n', "prog-2")  # fmt: skip
    _run(root, "programmer", "open-job", "--workdir", "factory", "oem/outbox/job-prog-2.bin",
         "--image", f"oem/outbox/image-{IMAGE_ID}.enc")  # fmt: skip
    return {"root": root, "result": result}


def _prog2(world: dict[str, Any], first: int, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(world["root"], "programmer", "provision", "--workdir", "factory", "--job",
                "prog-2", "--chips-from", "vendor", "--first", str(first), "--devices", "1",
                "--progress", "none", ok=ok)  # fmt: skip


def _records(path: Path) -> list[ledger.LedgerRecord]:
    with open(path, "rb") as src:
        _signed, items = ledger.read_export(src)
        raws = [raw for tag, raw in items if tag == ledger.TAG_RECORD]
    return [ledger.parse_record(raw, i) for i, raw in enumerate(raws)]


def test_the_fab_demo_provisions_at_the_fab_programs_at_the_factory_and_reconciles(
    world: dict[str, Any],
) -> None:
    root, result = world["root"], world["result"]
    out = result.to_json()
    assert out["mode"] == "fab" and out["ok"] is True
    assert (out["provisioned"], out["licensed"], out["programmed"]) == (DEVICES,) * 3
    assert (out["fab_quota_used"], out["factory_quota_used"]) == (DEVICES, DEVICES)
    assert out["blank_refused"] == 1 and out["fab_image_keys"] == 0
    assert out["reconciliation"] == {"reconciled": True, "provisioned": DEVICES,
                                     "programmed": DEVICES, "provisioned_not_programmed": 0}
    assert any("OEM joint reconciliation: yes" in line for line in result.lines)
    # The programming ledger names each chip's fab certificate by hash; no certificate issued.
    fab_ledger = root / "oem/inbox" / f"ledger-{PROVISION_JOB}.bin"
    certs = {r.device_id: hashlib.sha256(r.body["cert"]).digest() for r in _records(fab_ledger)}
    prog = _records(root / "oem/inbox" / f"ledger-{PROGRAM_JOB}.bin")
    licensed = [r for r in prog if r.kind == ledger.KIND_LICENSED]
    assert len(licensed) == DEVICES and len(prog) == 2 * DEVICES
    pca = from_pem((root / "oem/jobs" / PROVISION_JOB / "production-ca.pem").read_bytes())
    for r in licensed:
        assert r.body["cert_sha256"] == certs[r.device_id]
        assert r.body["production_ca"] == cert_fingerprint(pca)
    assert not (root / "factory/jobs" / PROGRAM_JOB / "production-ca.pem").exists()
    # A chip that left the fab answers with its OEM certificate, as the factory met it.
    chip = SimulatedFab(root / "vendor").chip(FIRST_UID).open()
    answer = IdentificationResponse.from_bytes(chip.identify(b"\x01" * 32))
    assert hashlib.sha256(answer.device_certificate or b"").digest() == certs[chip.device_id]
    # The programming appliance's PIN holder can license, never mint: no production-CA key.
    labels = token_labels(root / "factory")
    assert not [k for k in labels["private"] if k.startswith("production-ca")], labels
    assert f"image-{IMAGE_ID}" in " ".join(labels["secret"]), labels
    report = json.loads((root / "oem/jobs" / PROGRAM_JOB / "reconciliation.json").read_text())
    assert report["reconciled"] and set(report["ledger_sha256"]) == {PROGRAM_JOB, PROVISION_JOB}


def test_the_programming_line_refuses_what_its_job_does_not_name(world: dict[str, Any]) -> None:
    """One line each, nothing counted: a chip of a provisioning job the program job does not
    name, a blank chip; a chip programmed twice is done, counted once."""
    unnamed = _prog2(world, DEVICES + 2, ok=False)
    assert unnamed.returncode == EXIT_VERIFY
    line = _one_line(unnamed)
    assert "UnknownProductionCAError" in line and "this programming job does not name" in line
    assert _json(unnamed)["quota_used"] == 0
    blank = _prog2(world, DEVICES + 1, ok=False)
    assert blank.returncode == EXIT_VERIFY and "NotProvisionedChipError" in _one_line(blank)
    assert _json(blank)["quota_used"] == 0
    first = _json(_prog2(world, 0))
    assert (first["provisioned"], first["programmed"], first["quota_used"]) == (1, 1, 1)
    again = _json(_prog2(world, 0))
    assert (again["provisioned"], again["already_done"], again["quota_used"]) == (0, 1, 1)


def test_a_station_programs_a_provisioned_chip_through_the_station_api(
    world: dict[str, Any],
) -> None:
    """The station API (gRPC, mTLS) for a program job: no provisioning data is released (the
    chip keeps its fab's), the chip is licensed and programmed; a blank chip is refused."""
    from tests.integration.station_world import ServerProcess, add_station, last_json

    root = world["root"]
    files = add_station({"tmp": root.parent, "factory": root / "factory"}, "station-1")
    server = ServerProcess(root / "factory")
    try:
        common = ["station", "run", "--appliance", server.target, "--cert", files["cert"],
                  "--key", files["key"], "--ca", files["ca"], "--job", "prog-2",
                  "--chips-from", str(root / "vendor"), "--devices", "1"]  # fmt: skip
        ok = _run(root, *common, "--first-device", str(FIRST_UID + 1))
        out = last_json(ok)
        assert (out["provisioned"], out["programmed"]) == (1, 1), out
        blank = _run(root, *common, "--first-device", str(FIRST_UID + DEVICES + 1), ok=False)
        assert blank.returncode == EXIT_VERIFY, blank.stderr
        assert "NotProvisionedChipError" in blank.stdout + blank.stderr
    finally:
        server.stop()  # SIGTERM: drains, exits 0


def test_joint_reconciliation_refuses_ledgers_that_do_not_belong_together(
    world: dict[str, Any],
) -> None:
    root = world["root"]
    prog = root / "oem/inbox" / f"ledger-{PROGRAM_JOB}.bin"
    fab = root / "oem/inbox" / f"ledger-{PROVISION_JOB}.bin"
    lot2 = root / "fab/outbox/ledger-lot-2.bin"
    before = (root / "oem/transcript.bin").read_bytes()

    def joint(ledger_path: Path, *provisioned: str) -> str:
        args = [a for p in provisioned for a in ("--provisioned", p)]
        proc = _run(root, "oem", "reconcile-joint", "--workdir", "oem", str(ledger_path),
                    "--job", PROGRAM_JOB, *args, ok=False)  # fmt: skip
        assert proc.returncode in (EXIT_CONFIG, EXIT_VERIFY), proc.stderr
        return _one_line(proc)

    # Done already: the demo reconciled this job.
    assert "already" in joint(prog, f"{PROVISION_JOB}={fab}")
    (root / "oem/jobs" / PROGRAM_JOB / "reconciliation.json").rename(root / "done.json")
    try:
        line = joint(prog, f"{PROVISION_JOB}={fab}", f"lot-2={lot2}")
        assert "lot-2" in line and "is not one the programming job names" in line, line
        assert "--provisioned" in joint(prog)
        # The programming appliance's PIN holder re-signs its ledger: record 0 names another
        # certificate (a chip's certificate it replayed), or lot-2's production CA.
        lot2_ca = from_pem((root / "oem/jobs/lot-2/production-ca.pem").read_bytes())
        for field, value, why in (
            ("cert_sha256", b"\x11" * 32, "is not the one provisioning job"),
            ("production_ca", cert_fingerprint(lot2_ca), f"which job {PROGRAM_JOB} does not"),
        ):
            forged = root / f"forged-{field}.bin"
            proc = subprocess.run(
                [sys.executable, "-m", "tests.integration.resign_child", str(root / "factory"),
                 str(prog), str(forged), "0", field, value.hex()],
                capture_output=True, text=True, env=child_env(), cwd=ROOT,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            line = joint(forged, f"{PROVISION_JOB}={fab}")
            assert "programming ledger record 0" in line and why in line, line
        assert (root / "oem/transcript.bin").read_bytes() == before  # nothing recorded
        assert not (root / "oem/jobs" / PROGRAM_JOB / "reconciliation.json").exists()
    finally:
        (root / "done.json").rename(root / "oem/jobs" / PROGRAM_JOB / "reconciliation.json")


def test_a_revoked_provisioning_ca_is_named_by_no_program_job_and_reconciles_nothing(
    world: dict[str, Any],
) -> None:
    """The OEM revokes lot-2's production CA (oem revoke): a program job naming lot-2 is
    refused at issue-job, and lot-2's ledger at joint reconciliation, one line each."""
    root = world["root"]
    _run(root, "oem", "revoke", "--workdir", "oem", "--job", "lot-2", "--out", "lot-2.crl")
    spec = root / "oem" / "prog-3.toml"
    spec.write_text(f'job_id = "prog-3"\nprogrammer = "{FACTORY}"\nstage = "program"\n'
                    f'image = "{IMAGE_ID}"\nquota = 1\nprovisioned_by = ["lot-2"]\n'
                    f'[targets]\nranges = [["{FIRST_UID:016x}", "{FIRST_UID:016x}"]]\n'
                    '[window]\ndays = 1\n')  # fmt: skip
    proc = _run(root, "oem", "issue-job", "--workdir", "oem", str(spec), ok=False)
    assert proc.returncode in (EXIT_CONFIG, EXIT_VERIFY), proc.stderr
    assert "was revoked by this OEM's root" in _one_line(proc)
    assert not (root / "oem/jobs/prog-3/draft.bin").exists()
    proc = _run(root, "oem", "reconcile-joint", "--workdir", "oem",
                f"oem/inbox/ledger-{PROGRAM_JOB}.bin", "--job", "prog-2", "--provisioned",
                "lot-2=fab/outbox/ledger-lot-2.bin", ok=False)  # fmt: skip
    assert proc.returncode in (EXIT_CONFIG, EXIT_VERIFY), proc.stderr
    assert "revoked by this OEM's root" in _one_line(proc)


def test_reconcile_joint_killed_before_its_answer_answers_the_next_run(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """``oem reconcile-joint`` SIGKILLed right after its transcript record (the rerun adds no
    second record), then once everything is written, before it printed (as
    tests/integration/test_step_answers.py does to every other step): the next run prints
    that answer, appending no second transcript record; the run after is refused, one line.
    On a copy of the demo's OEM directory (the same token, a transcript of its own) whose
    joint reconciliation is undone."""
    from tests.integration.test_step_answers import (
        _killed_before_printing,
        killed_before_its_answer_is_recorded,
    )

    root = world["root"]
    oem = tmp_path / "oem"
    shutil.copytree(root / "oem", oem)
    (oem / "jobs" / PROGRAM_JOB / "reconciliation.json").unlink()
    inbox = root / "oem" / "inbox"
    args = ("oem", "reconcile-joint", "--workdir", str(oem),
            str(inbox / f"ledger-{PROGRAM_JOB}.bin"), "--job", PROGRAM_JOB, "--provisioned",
            f"{PROVISION_JOB}={inbox / f'ledger-{PROVISION_JOB}.bin'}")  # fmt: skip
    identity = from_pem((oem / "oem-identity.pem").read_bytes()).public_key()

    def joint_records() -> int:
        summary = verify_transcript(oem / "transcript.bin", public_key=identity)  # type: ignore[arg-type]
        return sum(r.operation == "joint-reconciliation" for r in summary.records)

    before = joint_records()
    # Killed right after its transcript record, before its answer is recorded: the rerun
    # records nothing more (the record it finds newest is its own).
    killed_before_its_answer_is_recorded(*args)
    assert joint_records() == before + 1
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=child_env(),
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert joint_records() == before + 1
    (oem / "jobs" / PROGRAM_JOB / "reconciliation.json").unlink()  # undone once more
    lost = _killed_before_printing(tmp_path, *args)
    assert lost["ok"] and lost["job"] == PROGRAM_JOB and joint_records() == before + 1
    again = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True,
                           env=child_env(), timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == lost  # the answer it lost
    assert joint_records() == before + 1
    twice = subprocess.run([*CLI, *args], capture_output=True, text=True, env=child_env(),
                           timeout=300)  # fmt: skip
    assert twice.returncode == EXIT_CONFIG and "already done" in _one_line(twice), twice.stderr
    assert joint_records() == before + 1
