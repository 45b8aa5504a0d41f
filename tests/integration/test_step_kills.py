"""Every step that creates token objects can be redone after a kill at any point.

The two-site chain is run step by step through the real command; each step that creates
token objects or files (both inits, enrol, certify-programmer, install-certs, master-image,
request-ca, issue-job, each officer's approve-job, open-job) is first SIGKILLed at a random
instant, then run again: the second run must succeed (reusing or cleaning up what the
killed run provably left), and the chain must then complete -- provision, close, reconcile
-- with every check of the ledger.
``SECURETHREAD_LONG=1`` repeats the chain with more kills per step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securethread.demo import child_env
from securethread.demo.line import create_vendor

LONG = os.environ.get("SECURETHREAD_LONG") == "1"
CLI = [sys.executable, "-m", "securethread.cli"]


_env = child_env  # a party's process: no SoftHSM config, no PINs of the test session


def _run(*args: str) -> dict[str, object]:
    proc = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, (args, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _killed_then_redone(rng: random.Random, kills: int, *args: str) -> dict[str, object]:
    """Start the step, SIGKILL it at a random instant (``kills`` times, while it has not
    finished), then run it to the end; return the final run's JSON."""
    for _ in range(kills):
        proc = subprocess.Popen(
            [*CLI, *args, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        time.sleep(rng.uniform(0.3, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            # Killed after it printed its whole answer (while the interpreter shut down): the
            # step is done and its caller has the result, as a run that exited would.
            answered = [x for x in out.splitlines() if x.startswith("{") and x.endswith("}")]
            if answered:
                return json.loads(answered[-1])  # type: ignore[no-any-return]
            continue
        # It ended on its own (also when it exited between poll() and the signal).
        assert proc.returncode == 0, (args, err)
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]
    return _run(*args)


@pytest.mark.parametrize("seed", range(3 if LONG else 1))
def test_token_creating_steps_can_be_redone_after_a_kill(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    kills = 3 if LONG else 1
    oem, fac = tmp_path / "oem", tmp_path / "factory"

    # Each officer's PIN goes to that officer's own file (created by the first run, read by
    # a redone one).
    officers = [f"{n}={tmp_path / f'officer-{n}' / 'pin'}" for n in (1, 2)]
    init = _killed_then_redone(
        rng, kills, "oem", "init", "--workdir", str(oem), "--name", "acme",
        *(arg for o in officers for arg in ("--officer-pin-file", o)),
    )  # fmt: skip
    _killed_then_redone(rng, kills, "programmer", "init", "--workdir", str(fac), "--name", "f-1")
    enrol = _killed_then_redone(rng, kills, "programmer", "enrol", "--workdir", str(fac))
    _killed_then_redone(
        rng, kills, "oem", "certify-programmer", "--workdir", str(oem),
        str(fac / "outbox" / "enrolment-request.bin"), "--fingerprint", str(enrol["fingerprint"]),
    )  # fmt: skip
    _killed_then_redone(
        rng, kills, "programmer", "install-certs", "--workdir", str(fac),
        str(oem / "outbox" / "certificates-f-1.bin"), "--root-fingerprint",
        str(init["root_fingerprint"]),
    )  # fmt: skip
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(os.urandom(64 << 10))
    _killed_then_redone(
        rng, kills, "oem", "master-image", "--workdir", str(oem), str(firmware), "--image-id",
        "fw", "--version", "1", "--security-counter", "1", "--device-class", "c",
    )  # fmt: skip
    # The key channel is not killed here (tests/integration/test_transport.py cuts it at
    # every message); the offline path is: seal, open (killed), confirm.
    package = tmp_path / "keys.sealed"
    _run("oem", "seal-keys", "--workdir", str(oem), "--to", "f-1", "--image", "fw", "--out",
         str(package))  # fmt: skip
    _killed_then_redone(rng, kills, "programmer", "open-keys", "--workdir", str(fac), str(package))
    receipts = sorted((fac / "outbox").glob("key-receipt-*.bin"))
    assert len(receipts) == 1
    _run("oem", "confirm-keys", "--workdir", str(oem), str(receipts[0]))
    _killed_then_redone(rng, kills, "programmer", "request-ca", "--workdir", str(fac), "--job", "j")
    create_vendor(tmp_path / "vendor", oem_root=oem / "root-ca.pem")  # the fab the job names
    spec = tmp_path / "j.toml"
    spec.write_text(
        'job_id = "j"\nprogrammer = "f-1"\nimage = "fw"\nquota = 3\n'
        f'vendors = ["{tmp_path / "vendor" / "root-ca.pem"}"]\n[targets]\n'
        'ranges = [["5ec0000000000000", "5ec0000000000002"]]\n[window]\ndays = 1\n'
    )
    _killed_then_redone(
        rng, kills, "oem", "issue-job", "--workdir", str(oem), str(spec), "--ca-request",
        str(fac / "outbox" / "production-ca-request-j.bin"),
    )  # fmt: skip
    for n in (1, 2):  # each officer approves in a process of their own
        _killed_then_redone(
            rng, kills, "oem", "approve-job", "--workdir", str(oem), "--job", "j", "--officer",
            str(n), "--pin-file", str(tmp_path / f"officer-{n}" / "pin"),
        )  # fmt: skip
    _killed_then_redone(rng, kills, "oem", "issue-job", "--workdir", str(oem), "--job", "j")
    _killed_then_redone(
        rng, kills, "programmer", "open-job", "--workdir", str(fac),
        str(oem / "outbox" / "job-j.bin"), "--image", str(oem / "outbox" / "image-fw.enc"),
    )  # fmt: skip

    # The chain completes on what the killed-and-redone steps left.
    prov = _run("programmer", "provision", "--workdir", str(fac), "--job", "j", "--vendor",
                str(tmp_path / "vendor"), "--devices", "3", "--progress", "none")  # fmt: skip
    assert prov["provisioned"] == prov["booted"] == 3
    _run("programmer", "close-job", "--workdir", str(fac), "--job", "j")
    rec = _run("oem", "reconcile", "--workdir", str(oem), str(fac / "outbox" / "ledger-j.bin"),
               "--job", "j")  # fmt: skip
    assert rec["reconciled"] and rec["quota_used"] == 3
