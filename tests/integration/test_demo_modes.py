"""``securethread demo --mode``: the three places provisioning can happen, from the CLI.

The fab chain's world is built by tests/integration/test_fab_programming.py through
``securethread.demo.fab.run``; here the CLI reaches each mode's chain and refuses options that
belong to another mode (one line, exit 2, nothing made).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from securethread.demo import child_env

CLI = [sys.executable, "-m", "securethread.cli"]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "demo", *args], capture_output=True, text=True, env=child_env(), timeout=600
    )


def test_zero_secret_mode_runs_the_lot_chain_and_reports_it(tmp_path: Path) -> None:
    proc = _demo("--mode", "zero-secret", "--devices", "3", "--workdir", str(tmp_path / "zs"),
                 "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] is True and out["mode"] == "zero-secret"
    assert out["devices"] == 3
    # no token at the factory: its directory holds no token and no PIN
    factory = tmp_path / "zs" / "factory"
    assert (factory / "outbox" / "confirmations-lot-1.bin").is_file()
    assert not (factory / "hsm").exists() and not (factory / "pins").exists()
    assert out["flashed"] == 3 and out["outside_refused"] == 2


@pytest.mark.parametrize("mode", ["fab", "zero-secret"])
def test_each_mode_reaches_its_own_chain(mode: str, tmp_path: Path) -> None:
    """--devices 0 is refused by the mode's own chain (its message names the mode), before
    anything is made."""
    proc = _demo("--mode", mode, "--devices", "0", "--workdir", str(tmp_path / "d"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"securethread demo: ConfigurationError: --devices must be at least 1 (--mode {mode})"
    ], proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("option", [["--stations", "2"], ["--workers", "2"]])
def test_line_options_are_refused_in_other_modes(option: list[str], tmp_path: Path) -> None:
    proc = _demo("--mode", "fab", *option, "--workdir", str(tmp_path / "d"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "securethread demo: ConfigurationError: --workers and --stations are for --mode line, "
        "not fab"
    ], proc.stderr
    assert not (tmp_path / "d").exists()
