"""One demo world per test session, copied for each module that uses it.

``securethread demo`` (both sites, the appliance, two stations, a job run, closed and
reconciled, the registry ingested) takes about 30 s of CPU.  Six modules need its result and
each changes it (revocations, a second job, kills), so each gets a copy of its own: the world is
built once, under a lock, in the session's base temporary directory (shared by the pytest-xdist
workers of one run), and :func:`demo_copy` copies it with ``shutil.copytree`` into the caller's
directory.  A copy is a valid world: SoftHSM2 tokens are plain files, and every open of a work
directory points its SoftHSM configuration at that directory's own tokens
(tests/integration/test_workdir_copy.py); the copy's job specs and the summary name the copy.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securethread.demo import child_env

DEVICES = 4  # the demo job's devices (and quota) in every copy


def _shared_base(factory: pytest.TempPathFactory) -> Path:
    """The run's base temporary directory: under pytest-xdist each worker's basetemp is a
    child of it (``popen-gwN``), so every worker finds the same cache."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _built(factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The session's demo world and its ``--json`` summary, built by the first caller."""
    cache = _shared_base(factory) / "demo-world"
    cache.mkdir(exist_ok=True)
    root, summary_file = cache / "demo", cache / "summary.json"
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building it: wait for its result
        if not summary_file.is_file():
            proc = subprocess.run(
                [sys.executable, "-m", "securethread.cli", "demo", "--devices", str(DEVICES),
                 "--workdir", str(root), "--json"],
                capture_output=True, text=True, env=child_env(), timeout=900,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            assert summary["ok"] and summary["provisioned"] == summary["booted"] == DEVICES
            summary_file.write_text(json.dumps(summary))  # last: marks the world complete
    return root, json.loads(summary_file.read_text())


def demo_copy(factory: pytest.TempPathFactory, name: str) -> tuple[Path, dict[str, Any]]:
    """A fresh copy of the session's demo world at ``<mktemp(name)>/demo`` and its summary
    (every path in it names the copy)."""
    src, summary = _built(factory)
    dst = factory.mktemp(name) / "demo"
    shutil.copytree(src, dst, symlinks=True)
    old, new = str(src), str(dst)
    # Text files naming the original by absolute path: the job specs (their vendor file) and
    # SoftHSM's configurations (localised again at every open anyway).
    for p in [*dst.rglob("*.toml"), *dst.rglob("softhsm2.conf")]:
        text = p.read_text()
        if old in text:
            p.write_text(text.replace(old, new))
    copied: dict[str, Any] = json.loads(json.dumps(summary).replace(old, new))
    return dst, copied
