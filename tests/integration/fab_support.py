"""What the fab tests share (test_fab_provisioning, test_fab_programming, test_vendor_trust):
the real CLI, one process per step with only the environment a party's process gets
(:func:`securethread.demo.child_env`: no SoftHSM configuration or PIN from outside), and the
steps their worlds are built from -- the OEM's ceremony, onboarding a programmer
installation, an M-of-N job issue.  Each is the CLI's own step; nothing here is a shortcut.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securethread.demo import child_env

CLI = [sys.executable, "-m", "securethread.cli"]
EXIT_CONFIG, EXIT_VERIFY = 2, 4


def run(*args: str, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``securethread ARGS --json`` in a process of its own; with ``ok``, it must exit 0."""
    proc = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True,
                          env=child_env(), cwd=cwd)  # fmt: skip
    if ok:
        assert proc.returncode == 0, (args, proc.stderr)
    return proc


def answer(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """A step's ``--json`` answer (its last line)."""
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """A refused step's stderr: exactly one line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def files(d: Path) -> list[tuple[str, int]]:
    """Every file below ``d`` but the token's, with its size: what a refused step must not
    change."""
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*")
                  if p.is_file() and "hsm" not in p.parts)  # fmt: skip


def oem_init(oem: Path, pins: Sequence[Path], *, cwd: Path | None = None) -> str:
    """``oem init`` with one officer per PIN file (each officer's own); the root fingerprint."""
    officers = [a for n, pin in enumerate(pins, 1) for a in ("--officer-pin-file", f"{n}={pin}")]
    init = answer(run("oem", "init", "--workdir", str(oem), "--name", "acme", *officers, cwd=cwd))
    return str(init["root_fingerprint"])


def onboard(oem: Path, site: Path, name: str, root_fingerprint: str) -> None:
    """A programmer installation ``name`` in ``site``, onboarded by the OEM (init, enrol,
    certify-programmer with the fingerprint given out of band, install-certs): the same
    for a programming centre and a fab."""
    run("programmer", "init", "--workdir", str(site), "--name", name)
    fp = answer(run("programmer", "enrol", "--workdir", str(site)))["fingerprint"]
    run("oem", "certify-programmer", "--workdir", str(oem),
        str(site / "outbox/enrolment-request.bin"), "--fingerprint", fp)  # fmt: skip
    run("programmer", "install-certs", "--workdir", str(site),
        str(oem / f"outbox/certificates-{name}.bin"), "--root-fingerprint",
        root_fingerprint)  # fmt: skip


def issue_job(
    oem: Path, spec: Path, pins: Sequence[Path], *extra: str, cwd: Path | None = None
) -> dict[str, Any]:
    """The job of ``spec`` drafted (``extra``: e.g. ``--ca-request``), approved by each
    officer with their own PIN file and the draft's hash, issued; issue-job's answer."""
    draft = answer(run("oem", "issue-job", "--workdir", str(oem), str(spec), *extra, cwd=cwd))
    job = draft["job"]
    for n, pin in enumerate(pins, 1):
        run("oem", "approve-job", "--workdir", str(oem), "--job", job, "--officer", str(n),
            "--pin-file", str(pin), "--job-hash", draft["job_sha256"], cwd=cwd)  # fmt: skip
    return answer(run("oem", "issue-job", "--workdir", str(oem), "--job", job, cwd=cwd))
