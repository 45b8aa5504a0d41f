"""The systemd unit shipped in contrib/systemd (docs/appliance.md): what it promises about
the appliance's process (its own user, a 0700 state directory, no core files, a read-only
system, SIGTERM to drain), and that ``systemd-analyze verify`` accepts it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = (
    Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "securethread-appliance.service"
)


def _service() -> dict[str, str]:
    section, out = "", {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section == "Service":
            out[key] = value
    return out


def test_the_unit_says_what_the_appliance_needs() -> None:
    s = _service()
    assert s["User"] == "securethread-appliance"
    assert s["StateDirectory"] == "securethread-appliance" and s["StateDirectoryMode"] == "0700"
    assert s["RuntimeDirectory"] == "securethread"
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["ReadWritePaths"] == "/var/lib/securethread-appliance"
    assert s["LimitCORE"] == "0"
    assert s["KillSignal"] == "SIGTERM" and int(s["TimeoutStopSec"]) >= 60
    argv = s["ExecStart"].split()
    assert argv[1:3] == ["appliance", "serve"]
    assert "${STATE_DIRECTORY}" in argv and "${RUNTIME_DIRECTORY}/appliance.sock" in argv


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    # systemd-analyze checks that ExecStart's program exists: point it at this install's.
    program = shutil.which("securethread") or str(Path(sys.executable).with_name("securethread"))
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(_service()["ExecStart"].split()[0], program))
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    proc = _verify(tmp_path, UNIT.read_text())
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    # the check can fail: a bad value is reported (systemd ignores it with a warning)
    bad = _verify(tmp_path, UNIT.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
    assert "kill mode" in bad.stderr.lower(), bad.stderr
