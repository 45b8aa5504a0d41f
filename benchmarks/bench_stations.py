"""The ``stations`` group: one station server (the appliance's station API) on SoftHSM,
1, 2 and 4 station processes of simulated chips, beside the in-process line in the same run.

``python -m benchmarks.bench_stations [--devices N] [--json]`` or as part of ``python -m
benchmarks``.  Everything goes through the real CLI and real processes: two sites up to
opened jobs (one job per measurement, so each starts from an empty store), ``programmer
provision`` for the in-process line, ``python -m securethread.programmer.stations`` for the
server and ``securethread station run`` for each station (4 sockets each, disjoint chips).

Reported: devices/s end to end (provision and program: the stations' devices over the
longest station's run time, from its first call to its last, and over the wall time from the
first station's process start; the line's counted devices over its run time), the line's
provisioning-only rate, per-device p50/p99 at the stations (chip opened to Confirm answered;
nearest rank), and what the service adds to a device's latency: p50 and p99 of one station
driving one socket minus the same quantile of the in-process line's per-device time at batch
size 1 (workers=0), measured in six interleaved rounds on two jobs alike
(:func:`paired_latency`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
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


# --- the measurements --------------------------------------------------------------------------


def _line(sites: dict[str, Path], job: str, n: int, batch: int) -> dict[str, Any]:
    r = last_json(cli("programmer", "provision", "--workdir", str(sites["factory"]), "--job", job,
                      "--chips-from", str(sites["vendor"]), "--devices", str(n), "--batch-size",
                      str(batch), "--progress", "none", "--json"))  # fmt: skip
    assert r["provisioned"] == n and r["programmed"] == n, r
    return r


def _stations(sites: dict[str, Path], files: list[dict[str, str]], target: str, job: str,
              n: int, parallel: int, offset: int = 0) -> dict[str, Any]:  # fmt: skip
    per = n // len(files)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([*CLI, *station_args(f, target, job, devices=per, first=offset + i * per,
                                               chips=sites["vendor"], parallel=parallel)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env())  # fmt: skip
        for i, f in enumerate(files)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    done = sum(r["programmed"] for r in results)
    assert done == per * len(files), results
    # each station's own run time (from its first call): process start-up and imports
    # excluded, as the line's run time excludes them
    busy = max(r["elapsed_s"] for r in results)
    return {
        "stations": len(files),
        "devices": done,
        "devices_per_s": round(done / busy, 1),
        "devices_per_s_wall": round(done / wall, 1),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "wall_s": round(wall, 2),
    }


def _nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[max(0, math.ceil(q * len(s)) - 1)], 2)


def line_latency(workdir: str, vendor: str, job: str, n: int, first: int = 0) -> list[float]:
    """The in-process line's per-device latency in ms at batch size 1 (workers=0: no IPC),
    chips ``first`` .. ``first + n - 1``: the times between its progress callbacks (one per
    batch = one device: open the chip, identify, count, issue, commit, release, program,
    commit); the first device, which starts the run, is not among them."""
    from securethread.demo.line import provision_simulated

    stamps: list[float] = []
    r = provision_simulated(workdir, job_id=job, chips_from=vendor, devices=n, first=first,
                            workers=0, batch_size=1,
                            progress=lambda _p: stamps.append(time.perf_counter()))  # fmt: skip
    assert r.details["programmed"] == n, r.details
    return [1000 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]


def station_latency(files: dict[str, str], target: str, job: str, vendor: str, n: int,
                    first: int) -> list[float]:  # fmt: skip
    """One station socket's per-device latency in ms (chip opened to Confirm answered), chips
    ``first`` .. ``first + n - 1``, as ``securethread station run --parallel 1`` drives them
    (its heap frozen as the CLI freezes it); the first device, which opens the stream and asks
    its challenge without one asked ahead, is not among them (as the line's first is not)."""
    from securethread.demo.line import SimulatedFab
    from securethread.heap import freeze_startup_heap
    from securethread.station import SimulatedChips, StationCredentials, run_station

    creds = StationCredentials.from_files(cert=files["cert"], key=files["key"], ca=files["ca"])
    chips = SimulatedChips(SimulatedFab(vendor), range(FIRST_UID + first, FIRST_UID + first + n))
    freeze_startup_heap()
    r = run_station(creds, [target], job_id=job, chips=chips, parallel=1)
    assert r.programmed == n and len(r.latencies_ms) == n, r
    return list(r.latencies_ms[1:])


def _in_process(*args: str) -> list[float]:
    """:func:`line_latency` or :func:`station_latency` in a process of its own."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_stations", *args],
                          capture_output=True, text=True, env=child_env(), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def paired_latency(sites: dict[str, Path], files: dict[str, str], target: str,
                   jobs: tuple[str, str], n: int, rounds: int = 6) -> dict[str, Any]:  # fmt: skip
    """The line's and one station socket's per-device latency, ``n`` devices each, on two
    jobs alike (``jobs``: the line's, the station's; the appliance holds a job it serves, so
    the line cannot run one it is serving), in ``rounds`` interleaved rounds (line then
    station, station then line, ...; each a process of its own on fresh chips), so both
    sample the same stretch of the machine's load rather than one the first half and the
    other the second.  Each round's first device is left out on both sides."""
    per = max(2, n // rounds)
    line_job, station_job = jobs
    line: list[float] = []
    station: list[float] = []
    for r in range(rounds):
        runs = [("line", r * per), ("station", r * per)]
        for side, at in runs if r % 2 == 0 else runs[::-1]:
            if side == "line":
                line += _in_process("--line-latency", str(sites["factory"]), str(sites["vendor"]),
                                    line_job, str(per), str(at))  # fmt: skip
            else:
                station += _in_process("--station-latency", json.dumps(files), target,
                                       station_job, str(sites["vendor"]), str(per),
                                       str(at))  # fmt: skip
    return {"line": _quantiles(line),
            "station": {"stations": 1, "sockets": 1, **_quantiles(station)},
            "rounds": rounds}  # fmt: skip


def _quantiles(ms: list[float]) -> dict[str, Any]:
    """One side's per-device latencies (ms): how many, p50, p99 and mean."""
    return {"devices": len(ms), "p50_ms": _nearest_rank(ms, 0.50),
            "p99_ms": _nearest_rank(ms, 0.99), "mean_ms": round(sum(ms) / len(ms), 2)}  # fmt: skip


def run(n: int, log: Any, *, counts: tuple[int, ...] = (1, 2, 4), latency_n: int = 1200,
        work: Path | None = None) -> dict[str, Any]:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-stations-")) if work is None else work
    jobs = {"line": (n, n), "lat-line": (latency_n, latency_n),
            "lat-station": (latency_n, latency_n)}
    jobs.update({f"s{k}": (n, n) for k in counts})
    log(f"stations: two sites, {len(jobs)} jobs")
    sites = build_sites(tmp, jobs)
    files = [add_station(sites, f"st{i}") for i in range(max(counts))]
    log(f"stations: in-process line, {n} devices")
    line = _line(sites, "line", n, 32)
    line_rate = line["devices_per_s"]
    server = ServerProcess(sites["factory"])
    try:
        # Latency first: the line's per-device time at batch size 1 and one station socket's,
        # on two jobs alike and the same fab, in interleaved rounds (the machine's load drifts).
        log(f"stations: latency, in-process line at batch size 1 against 1 station socket, "
            f"{latency_n} devices each in 6 interleaved rounds")  # fmt: skip
        lat = paired_latency(sites, files[0], server.target, ("lat-line", "lat-station"),
                             latency_n)
        lat_line, one = lat["line"], lat["station"]
        line_ms_b1 = lat_line["mean_ms"]
        points = []
        for k in counts:
            log(f"stations: {k} station process(es), {n} devices")
            points.append(_stations(sites, files[:k], server.target, f"s{k}", n, 4))
    finally:
        server.stop()
    by_k = {p["stations"]: p for p in points}
    ratio = round(by_k[2]["devices_per_s"] / line_rate, 3) if 2 in by_k else None
    # What the service adds: one socket's per-device quantile minus the line's same quantile.
    added = round(one["p99_ms"] - lat_line["p99_ms"], 2)
    added_p50 = round(one["p50_ms"] - lat_line["p50_ms"], 2)
    return {
        "devices": n,
        "line": {"devices_per_s": line_rate,
                 "provision_devices_per_s": round(n / line["provision_s"], 1),
                 "ms_per_device_batch_1": round(line_ms_b1, 2),
                 "p50_ms_batch_1": lat_line["p50_ms"], "p99_ms_batch_1": lat_line["p99_ms"]},
        # fmt: skip
        "points": points,
        "one_socket": one,
        "ratio_2_stations_to_line": ratio,
        "service_added_p99_ms": added,
        "service_added_p50_ms": added_p50,
        "targets_met": {"2_stations>=0.8_line": ratio is not None and ratio >= 0.8,
                        "service_added_p99<=2ms": added <= 2.0},  # fmt: skip
        "note": "end to end (provision and program); stations: 4 sockets each",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_stations")
    ap.add_argument("--devices", type=int, default=400)
    ap.add_argument("--latency-devices", type=int, default=1200)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--latency-only", action="store_true",
                    help="the latency pair and the 2-station point only (no 1- or 4-station)")
    ap.add_argument("--line-latency", nargs=5, help=argparse.SUPPRESS)  # WORKDIR VENDOR JOB N FIRST
    ap.add_argument("--station-latency", nargs=6,
                    help=argparse.SUPPRESS)  # FILES(JSON) TARGET JOB VENDOR N FIRST
    args = ap.parse_args(argv)
    if args.line_latency:
        workdir, vendor, job, count, first = args.line_latency
        print(json.dumps(line_latency(workdir, vendor, job, int(count), int(first))))
        return 0
    if args.station_latency:
        files, target, job, vendor, count, first = args.station_latency
        print(json.dumps(station_latency(json.loads(files), target, job, vendor, int(count),
                                         int(first))))  # fmt: skip
        return 0
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    r = run(args.devices, log, latency_n=args.latency_devices,
            counts=(2,) if args.latency_only else (1, 2, 4))
    if args.json:
        print(json.dumps(r))
    else:
        print(format_lines(r))
    return 0


def format_lines(r: dict[str, Any]) -> str:
    out = [f"  in-process line        {r['line']['devices_per_s']:>8} devices/s "
           f"(provisioning only {r['line']['provision_devices_per_s']})"]  # fmt: skip
    for p in r["points"]:
        out.append(f"  {p['stations']} station process(es) {p['devices_per_s']:>8} devices/s, "
                   f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms")  # fmt: skip
    out.append(f"  2 stations / line      {r['ratio_2_stations_to_line']}")
    line = r["line"]
    out.append(f"  service adds to p50    {r.get('service_added_p50_ms')} ms (1 socket: p50 "
               f"{r['one_socket']['p50_ms']} ms; line at batch 1: p50 "
               f"{line.get('p50_ms_batch_1')} ms)")  # fmt: skip
    out.append(f"  service adds to p99    {r['service_added_p99_ms']} ms (1 socket: p99 "
               f"{r['one_socket']['p99_ms']} ms; line at batch 1: p99 "
               f"{line.get('p99_ms_batch_1')} ms, mean {line['ms_per_device_batch_1']} ms)")
    # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
