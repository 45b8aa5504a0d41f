"""The README's walkthrough of the factory as deployed (the block between the
``walkthrough:appliance`` markers) runs as written: the OEM, the appliance as a service
process, every programmer step as an operator's client over its socket, two stations sharing
the job through the station API, the status view, the close, and the OEM's reconciliation."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from securethread.demo import child_env

README = Path(__file__).resolve().parents[2] / "README.md"


def _block() -> str:
    text = README.read_text()
    m = re.search(
        r"<!-- walkthrough:appliance -->\n```sh\n(.*?)```\n<!-- /walkthrough:appliance -->",
        text,
        re.S,
    )
    assert m is not None, "the README lost its appliance walkthrough"
    return m.group(1)


def test_the_readme_appliance_walkthrough_runs(tmp_path: Path) -> None:
    env = dict(child_env(), S=f"{shlex.quote(sys.executable)} -m securethread.cli")
    env.pop("SECURETHREAD_APPLIANCE", None)
    script = "set -euo pipefail\n" + _block()
    proc = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "job job-1 (open): quota 20 used of 20, 0 left, 20 provisioned" in out, out
    assert out.count("station run: job job-1: 10 programmed") == 2, out  # two stations
    assert "programmer close-job: done" in out
    assert re.search(r"reconcil", out, re.I), out
    assert (tmp_path / "outbox" / "ledger-job-1.bin").is_file()
    assert not (tmp_path / "appliance.sock").exists()  # the appliance stopped cleanly
