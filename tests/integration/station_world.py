"""Shared setup for the station API tests: two sites up to opened jobs (through the real CLI,
as the factory does it), the station server in a process of its own, stations certified by
``programmer add-station``.  No pytest here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from securethread.demo import child_env

CLI = [sys.executable, "-m", "securethread.cli"]
FIRST_UID = 0x5EC0_0000_0000_0000


def cli(*args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=child_env(),
                          timeout=timeout)  # fmt: skip
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def build_sites(tmp: Path, jobs: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """OEM, factory and a simulated fab; ``jobs``: job id -> (quota, targets), each opened
    at the factory with targets ``FIRST_UID + 0 .. targets - 1``."""
    oem, fac, vendor = tmp / "oem", tmp / "factory", tmp / "vendor"
    pins = [tmp / f"officer-{n}" / "pin" for n in (1, 2)]
    init = last_json(cli("oem", "init", "--workdir", str(oem), "--name", "acme", "--json",
                         "--officer-pin-file", f"1={pins[0]}", "--officer-pin-file",
                         f"2={pins[1]}"))  # fmt: skip
    cli("programmer", "init", "--workdir", str(fac), "--name", "f-1")
    fp = last_json(cli("programmer", "enrol", "--workdir", str(fac), "--json"))["fingerprint"]
    cli("oem", "certify-programmer", "--workdir", str(oem),
        str(fac / "outbox/enrolment-request.bin"), "--fingerprint", fp)  # fmt: skip
    cli("programmer", "install-certs", "--workdir", str(fac),
        str(oem / "outbox/certificates-f-1.bin"), "--root-fingerprint",
        init["root_fingerprint"])  # fmt: skip
    (tmp / "fw.bin").write_bytes(os.urandom(16 << 10))
    cli("oem", "master-image", "--workdir", str(oem), str(tmp / "fw.bin"), "--image-id", "fw",
        "--version", "1", "--security-counter", "1", "--device-class", "c")  # fmt: skip
    package = tmp / "keys.sealed"
    cli("oem", "seal-keys", "--workdir", str(oem), "--to", "f-1", "--image", "fw", "--out",
        str(package))  # fmt: skip
    cli("programmer", "open-keys", "--workdir", str(fac), str(package))
    cli("oem", "confirm-keys", "--workdir", str(oem),
        str(next((fac / "outbox").glob("key-receipt-*.bin"))))  # fmt: skip
    cli("vendor", "init", "--workdir", str(vendor), "--oem-root", str(oem / "root-ca.pem"))
    for job, (quota, targets) in jobs.items():
        cli("programmer", "request-ca", "--workdir", str(fac), "--job", job)
        last = FIRST_UID + targets - 1
        spec = tmp / f"{job}.toml"
        spec.write_text(
            f'job_id = "{job}"\nprogrammer = "f-1"\nimage = "fw"\nquota = {quota}\n'
            f'vendors = ["{vendor / "root-ca.pem"}"]\n[targets]\n'
            f'ranges = [["{FIRST_UID:016x}", "{last:016x}"]]\n[window]\ndays = 1\n'
        )
        cli("oem", "issue-job", "--workdir", str(oem), str(spec), "--ca-request",
            str(fac / f"outbox/production-ca-request-{job}.bin"))  # fmt: skip
        for n in (1, 2):
            cli("oem", "approve-job", "--workdir", str(oem), "--job", job, "--officer", str(n),
                "--pin-file", str(pins[n - 1]))  # fmt: skip
        cli("oem", "issue-job", "--workdir", str(oem), "--job", job)
        cli("programmer", "open-job", "--workdir", str(fac), str(oem / f"outbox/job-{job}.bin"),
            "--image", str(oem / "outbox/image-fw.enc"))  # fmt: skip
    return {"tmp": tmp, "oem": oem, "factory": fac, "vendor": vendor}


def add_station(sites: dict[str, Path], name: str) -> dict[str, str]:
    """``station keygen`` and ``programmer add-station``: the station's files."""
    d = sites["tmp"] / "stations" / name
    d.mkdir(parents=True, exist_ok=True)
    cli("station", "keygen", "--name", name, "--key", str(d / "key.pem"),
        "--csr", str(d / "csr.pem"))  # fmt: skip
    cli("programmer", "add-station", "--workdir", str(sites["factory"]), str(d / "csr.pem"),
        "--name", name)  # fmt: skip
    out = sites["factory"] / "outbox"
    return {"cert": str(out / f"station-{name}.pem"), "key": str(d / "key.pem"),
            "ca": str(out / "station-ca.pem")}  # fmt: skip


class ServerProcess:
    """``python -m securethread.programmer.stations`` on 127.0.0.1, port chosen by the OS."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "securethread.programmer.stations", "--workdir",
             str(workdir), "--listen", "127.0.0.1:0", *extra],  # fmt: skip
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"station server did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.port = int(json.loads(line)["port"])
        self.target = f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM: drain and stop; the final status it prints."""
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=60)


def station_args(files: dict[str, str], target: str | list[str], job: str, *, devices: int,
                 first: int, chips: Path, parallel: int = 4) -> list[str]:  # fmt: skip
    targets = [target] if isinstance(target, str) else target
    out = ["station", "run"]
    for t in targets:
        out += ["--appliance", t]
    return out + ["--cert", files["cert"], "--key", files["key"], "--ca", files["ca"],
                  "--job", job, "--chips-from", str(chips), "--devices", str(devices),
                  "--first-device", str(FIRST_UID + first), "--parallel", str(parallel),
                  "--json"]  # fmt: skip
