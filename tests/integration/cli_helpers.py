"""Running the ``securethread`` console script in subprocesses, and checking what it did.

Shared by the CLI tests: every failure must exit with the code class documented in
:mod:`securethread.cli`, print exactly one line on stderr naming the problem, never a
traceback, and change nothing on disk (:func:`snapshot` before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SCRIPT = Path(sys.executable).parent / "securethread"
CLI = str(_SCRIPT) if _SCRIPT.exists() else shutil.which("securethread")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the conftest's token directory and PINs."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SECURETHREAD_", "SOFTHSM2_CONF"))
    }
    env.update(extra)
    return env


def run(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert CLI is not None
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else clean_env(),
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    out = ok(proc)
    return json.loads(out.strip().splitlines()[-1])


def assert_failure(
    proc: subprocess.CompletedProcess[str], code: int, command: str, *needles: str
) -> str:
    """Exit ``code``, one stderr line ``securethread <command>: ...`` containing ``needles``."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{text}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"securethread {command}: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert proc.stdout == "", proc.stdout
    return line


Snapshot = dict[str, tuple[str, int, int]]


def snapshot(*roots: Path, mtimes: bool = True) -> Snapshot:
    """path -> (sha256, size, mtime_ns) of every file under ``roots``, plus directories.
    ``mtimes=False`` for token directories: SoftHSM rewrites its ``generation`` file (same
    bytes) whenever a token is opened."""
    out: Snapshot = {}
    for root in roots:
        if not root.exists():
            continue
        items = [root, *root.rglob("*")] if root.is_dir() else [root]
        for p in items:
            st = p.stat()
            if p.is_dir():
                out[str(p)] = ("dir", 0, 0)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = (digest, st.st_size, st.st_mtime_ns if mtimes else 0)
    return out


def workdir_state(work: Path) -> Snapshot:
    """:func:`snapshot` of a ceremony work directory, for "nothing changed" checks.

    SoftHSM rewrites each token's ``token.object`` (a generation counter) whenever the token
    is opened, even by a login that fails; those files are compared by presence only.  Every
    key, certificate and other object file is compared by content.
    """
    snap = snapshot(work, mtimes=False)
    return {
        path: (("token", 0, 0) if path.endswith("/token.object") else state)
        for path, state in snap.items()
    }


def copy_workdir(src: Path, dst: Path) -> Path:
    """A copy of a work directory whose SoftHSM config points at the copy's own tokens."""
    shutil.copytree(src, dst)
    conf = dst / "hsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(src), str(dst)))
    return dst


def token_dir(work: Path, label: str) -> Path:
    """The SoftHSM directory holding the token ``label`` in a work directory."""
    for obj in (work / "hsm" / "tokens").glob("*/token.object"):
        if label.encode().ljust(32, b" ") in obj.read_bytes():
            return obj.parent
    raise AssertionError(f"no token {label!r} under {work}")


def verify_ledger(work: Path) -> Any:
    """``verify-ledger --json`` on a work directory's ledger export (it must verify)."""
    export, cert = work / "job" / "ledger.bin", work / "programmer" / "ledger-signing.pem"
    return last_json(run("--json", "verify-ledger", str(export), "--ledger-cert", str(cert)))
