"""The ``securethread`` command: one subcommand group per party, each a few lines over the
library (docs/cli.md).

``securethread oem ...`` runs at the OEM on the OEM's work directory, ``securethread
programmer ...`` at the programming centre on its own, ``securethread audit ...`` anywhere
with public files only, and ``securethread demo`` runs the two sites side by side.

Exit codes: 0 success; 2 usage, configuration or a step out of order; 3 token (HSM) error;
4 verification failure (bad signature, tampered or malformed artefact, devices refused);
5 quota used up; 6 the production store cannot be used (missing, replaced, older than the
token's quota mark, corrupt, locked: restore it); 130 / 143 interrupted by SIGINT / SIGTERM
(a run stops after its batch in flight: run it again to resume); 1 an OS error (disk full)
or a dead worker process; 70 an internal error (a bug: please report it).  Every failure
prints one line on stderr naming the problem, never a traceback; with ``--json`` it also
prints a JSON error object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from securethread import __version__
from securethread.errors import EXIT_CONFIG as EXIT_CONFIG
from securethread.errors import EXIT_INTERNAL as EXIT_INTERNAL
from securethread.errors import EXIT_OK as EXIT_OK
from securethread.errors import EXIT_OS as EXIT_OS
from securethread.errors import EXIT_VERIFY as EXIT_VERIFY
from securethread.errors import (
    ConfigurationError,
    Error,
    QuotaExceededError,
    describe,
    exit_code_for,
)
from securethread.errors import Interrupted as Interrupted

# The exit-code map and the one-line description live in securethread.errors (the appliance
# answers its operators with them too); the CLI's own names for them:
exit_code = exit_code_for
_describe = describe

if TYPE_CHECKING:
    from securethread.workdir import StepResult


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- output -------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, human: str | Sequence[str], machine: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(machine, sort_keys=True, default=str))
    else:
        print(human if isinstance(human, str) else "\n".join(human))


def _finish(
    args: argparse.Namespace,
    human: Sequence[str],
    machine: dict[str, Any],
    problem: Error | None,
) -> int:
    """Print a run's result; its ``problem`` (devices refused, quota used up), if any, is
    its one stderr line and sets the exit code."""
    _emit(args, human, {"ok": problem is None, **machine})
    if problem is not None:
        print(f"securethread: {_describe(problem)}", file=sys.stderr)
        return exit_code(problem)
    return EXIT_OK


def _step(args: argparse.Namespace, result: StepResult, lines: Sequence[str] = ()) -> int:
    """Print a step's result; its ``problem`` (devices refused, quota) sets the exit code."""
    human = [f"{result.step}: done in {result.workdir}", *lines]
    human += [f"  wrote {w}" for w in result.written]
    human += [
        f"  transcript anchor ({a.enclave}): record #{a.seq} {a.head.hex()}" for a in result.anchors
    ]
    machine = {"ok": result.problem is None, **result.to_json()}
    if result.problem is not None:
        machine["error"] = {
            "type": type(result.problem).__name__,
            "message": str(result.problem),
            "exit_code": exit_code(result.problem),
        }
    _emit(args, human, machine)
    sys.stdout.flush()
    result.delivered()  # printed: a second run is refused as done from now on
    if result.problem is not None:
        print(f"securethread: {_describe(result.problem)}", file=sys.stderr)
        return exit_code(result.problem)
    return EXIT_OK


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


# --- oem ----------------------------------------------------------------------------------------


def oem_init(a: argparse.Namespace) -> int:
    from securethread.oem import init
    from securethread.oem.ceremony import prompt_officer_pin

    files: dict[int, str] = {}
    for item in a.officer_pin_file or ():
        n, eq, path = item.partition("=")
        if not eq or not n.strip().isdigit() or not path:
            raise ConfigurationError(
                f"--officer-pin-file takes N=PATH (officer N's file), got {item!r}"
            )
        if int(n) in files:
            raise ConfigurationError(f"--officer-pin-file names officer {int(n)} twice")
        files[int(n)] = path
    r = init(
        a.workdir,
        name=a.name,
        officers=a.officers,
        threshold=a.threshold,
        officer_pin_files=files,
        officer_pin=prompt_officer_pin if sys.stdin.isatty() else None,
    )
    lines = [f"  OEM root fingerprint (give it to programmers): {r.details['root_fingerprint']}"]
    lines += [f"  {label}'s PIN: {src}" for label, src in r.details["officer_pins"].items()]
    return _step(a, r, lines)


def oem_certify_programmer(a: argparse.Namespace) -> int:
    from securethread.oem import certify_programmer

    return _step(a, certify_programmer(a.workdir, a.request, fingerprint=a.fingerprint))


def _number(text: str) -> int:
    """An integer in decimal or 0x hex (addresses and sizes, as imgtool takes them)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal or 0x integer") from None


def oem_master_image(a: argparse.Namespace) -> int:
    from securethread.oem import master_image

    r = master_image(
        a.workdir,
        a.firmware,
        image_id=a.image_id,
        version=a.version,
        security_counter=a.security_counter,
        device_class=a.device_class,
        load_address=a.load_address,
        header_size=a.header_size,
        mcuboot_input=a.mcuboot,
    )
    return _step(a, r)


def oem_send_keys(a: argparse.Namespace) -> int:
    from securethread.oem import send_keys

    host, port = _hostport(a.connect)
    r = send_keys(a.workdir, to=a.to, image=a.image, host=host, port=port, timeout=a.timeout)
    return _step(a, r)


def oem_seal_keys(a: argparse.Namespace) -> int:
    from securethread.oem import seal_keys

    return _step(a, seal_keys(a.workdir, to=a.to, image=a.image, out=a.out))


def oem_confirm_keys(a: argparse.Namespace) -> int:
    from securethread.oem import confirm_keys

    return _step(a, confirm_keys(a.workdir, a.receipt))


def oem_issue_job(a: argparse.Namespace) -> int:
    from securethread.oem import issue_job, prepare_job

    if a.spec is None:
        if a.ca_request is not None:
            raise ConfigurationError("--ca-request goes with SPEC (preparing a job), not --job")
        return _step(a, issue_job(a.workdir, a.job))
    # --ca-request: required unless the spec is a "program" job (prepare_job says which)
    r = prepare_job(a.workdir, a.spec, ca_request=a.ca_request)
    if "summary" not in r.details:  # an issued job's outbox finished
        return _step(a, r)
    job = r.details["job"]
    lines = [
        *r.details["summary"],
        f"  approvals so far: {', '.join(map(str, r.details['approvals'])) or 'none'}; each "
        f"of {r.details['threshold']} officers runs, with their own PIN:",
        f"    securethread oem approve-job --workdir {a.workdir} --job {job} --officer N "
        f"--job-hash {r.details['job_sha256']}",
        f"  then: securethread oem issue-job --workdir {a.workdir} --job {job}",
    ]
    return _step(a, r, lines)


def oem_approve_job(a: argparse.Namespace) -> int:
    from securethread.oem import approve_job
    from securethread.workdir import parse_fingerprint

    expect = parse_fingerprint(a.job_hash) if a.job_hash is not None else None
    r = approve_job(
        a.workdir, job_id=a.job, officer=a.officer, pin_file=a.pin_file, expect_sha256=expect
    )
    d = r.details
    lines = [
        *d["summary"],
        f"  approved by officer {d['officer']}; approvals: "
        f"{', '.join(map(str, d['approvals']))} of the {d['threshold']} needed",
    ]
    if d["ready"]:
        lines.append(f"  the OEM issues it: securethread oem issue-job --workdir DIR --job {a.job}")
    return _step(a, r, lines)


def oem_reconcile(a: argparse.Namespace) -> int:
    from securethread.oem import reconcile

    r = reconcile(a.workdir, a.ledger, job_id=a.job)
    d = r.details
    return _step(
        a,
        r,
        [
            f"  reconciled: job {d['job']}: {d['provisioned']} provisioned, "
            f"{d['programmed']} programmed, quota {d['quota_used']} of {d['quota']}"
        ],
    )


def oem_reconcile_joint(a: argparse.Namespace) -> int:
    from securethread.oem import reconcile_joint

    pairs = []
    for item in a.provisioned:
        job, sep, path = item.partition("=")
        if not sep or not job or not path:
            raise ConfigurationError(f"--provisioned {item!r}: expected JOB=LEDGER")
        pairs.append((job, path))
    r = reconcile_joint(a.workdir, a.ledger, job_id=a.job, provisioned=pairs)
    return _step(a, r, str(r.details["lines"]).splitlines())


def oem_revoke(a: argparse.Namespace) -> int:
    from securethread.oem import revoke

    return _step(a, revoke(a.workdir, job_id=a.job, out=a.out, reason=a.reason))


# --- programmer -----------------------------------------------------------------------------------


def programmer_init(a: argparse.Namespace) -> int:
    from securethread.programmer import init

    return _step(a, init(a.workdir, name=a.name))


def _programmer(
    a: argparse.Namespace,
    command: str,
    direct: Callable[[], StepResult],
    options: dict[str, Any] | None = None,
    files: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    *,
    keep: Callable[[str, bytes], str | None] | None = None,
) -> StepResult:
    """Run a programmer step: on the work directory itself (``--workdir``: the library's
    direct mode), else as an operation of the appliance on ``--appliance SOCKET`` (or
    ``$SECURETHREAD_APPLIANCE``), sending the options and the input files' bytes and writing
    the files it returns into ``--outbox`` (docs/appliance.md)."""
    if a.workdir is not None:
        return direct()
    from securethread.programmer.operator_api import (
        RemoteError,
        Request,
        call,
        socket_path,
        write_outbox,
    )
    from securethread.workdir import Anchor
    from securethread.workdir import StepResult as Result

    path = socket_path(a.appliance)
    payload = [(name, _read_input(src)) for name, src in files]

    def event(e: Any) -> None:
        if e.get("event") == "listening":  # receive-keys: where the appliance listens
            print(f"listening on {e['host']}:{e['port']}", file=sys.stderr, flush=True)

    ans = call(path, Request(command, options or {}, payload), on_event=event)
    problem = None
    if ans.error is not None:
        problem = RemoteError(
            str(ans.error.get("type")), str(ans.error.get("message")),
            int(ans.error.get("exit_code", EXIT_INTERNAL)),
        )  # fmt: skip
        if "step" not in ans.result:
            raise problem
    written: list[str] = []
    rest = []
    for name, data in ans.files:
        where = keep(name, data) if keep is not None else None
        if where is not None:
            written.append(where)
        else:
            rest.append((name, data))
    written += write_outbox(a.outbox, rest)
    details = {
        k: v for k, v in ans.result.items() if k not in ("step", "workdir", "written", "anchors")
    }
    anchors = tuple(
        Anchor(e, int(v["seq"]), bytes.fromhex(v["head"]))
        for e, v in (ans.result.get("anchors") or {}).items()
    )
    return Result(
        str(ans.result["step"]), Path(f"appliance:{path}"), tuple(written), anchors, details,
        problem,
    )  # fmt: skip


def _read_input(src: str | os.PathLike[str]) -> bytes:
    from securethread.workdir import read_file

    return read_file(src, "input file", limit=256 << 20)


def programmer_enrol(a: argparse.Namespace) -> int:
    from securethread.programmer import enrol

    r = _programmer(a, "enrol", lambda: enrol(a.workdir))
    return _step(a, r, [f"  identity fingerprint (read it to the OEM): {r.details['fingerprint']}"])


def programmer_install_certs(a: argparse.Namespace) -> int:
    from securethread.programmer import install_certs

    r = _programmer(
        a,
        "install-certs",
        lambda: install_certs(a.workdir, a.bundle, root_fingerprint=a.root_fingerprint),
        {"root_fingerprint": a.root_fingerprint},
        [("bundle", a.bundle)],
    )
    return _step(a, r)


def programmer_receive_keys(a: argparse.Namespace) -> int:
    from securethread.programmer import receive_keys

    host, port = _hostport(a.listen)

    def ready(addr: tuple[str, int]) -> None:
        # The bound address, for scripts that listen on port 0: one line on stderr.
        print(f"listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

    r = _programmer(
        a,
        "receive-keys",
        lambda: receive_keys(a.workdir, host=host, port=port, timeout=a.timeout, ready=ready),
        {"host": host, "port": port, "timeout": a.timeout},
    )
    return _step(a, r)


def programmer_open_keys(a: argparse.Namespace) -> int:
    from securethread.programmer import open_keys

    r = _programmer(
        a, "open-keys", lambda: open_keys(a.workdir, a.package), {}, [("package", a.package)]
    )
    return _step(a, r)


def programmer_request_ca(a: argparse.Namespace) -> int:
    from securethread.programmer import request_ca

    r = _programmer(a, "request-ca", lambda: request_ca(a.workdir, job_id=a.job), {"job": a.job})
    return _step(a, r)


def programmer_open_job(a: argparse.Namespace) -> int:
    from securethread.programmer import open_job

    r = _programmer(
        a,
        "open-job",
        lambda: open_job(a.workdir, a.package, image=a.image),
        {},
        [("package", a.package), *([("image", a.image)] if a.image is not None else [])],
    )
    return _step(a, r)


class _Progress:
    """Provisioning progress on stderr: a bar redrawn in place, or a line a second."""

    def __init__(self, mode: str) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "none"
        self.mode = mode
        self._shown = 0.0

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if self.mode == "none" or now - self._shown < (0.1 if self.mode == "bar" else 1.0):
            return
        self._shown = now
        text = (
            f"{p.handled} devices handled: {p.provisioned} provisioned, "
            f"{p.recovered} recovered, {p.programmed} programmed"
        )
        if self.mode == "bar":
            sys.stderr.write("\r" + text)
        else:
            sys.stderr.write(f"[provision] {text}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.mode == "bar" and self._shown:
            sys.stderr.write("\n")


def programmer_provision(a: argparse.Namespace) -> int:
    from securethread.demo.line import FAB_FILES, provision_simulated

    bar = _Progress("none" if a.json else a.progress)
    try:
        r = _programmer(
            a,
            "provision",
            lambda: provision_simulated(
                a.workdir,
                job_id=a.job,
                chips_from=a.chips_from,
                devices=a.devices,
                first=a.first,
                workers=a.workers,
                batch_size=a.batch_size,
                progress=bar,
            ),
            {"job": a.job, "devices": a.devices, "first": a.first, "workers": a.workers,
             "batch_size": a.batch_size},
            [(name, Path(a.chips_from) / name) for name in FAB_FILES],
        )  # fmt: skip
    finally:
        bar.close()
    d = r.details
    return _step(
        a,
        r,
        [
            f"  {d['provisioned']} provisioned, {d['booted']} booted, "
            f"{d.get('recovered', 0)} recovered from an earlier run, "
            f"quota {d['quota_used']} of {d['quota']}"
            + (
                f" ({d['burned']} slots burned: the last run was killed or the store copied "
                "back)"
                if d.get("burned")
                else ""
            )
        ],
    )


def programmer_close_job(a: argparse.Namespace) -> int:
    from securethread.programmer import close_job

    r = _programmer(a, "close-job", lambda: close_job(a.workdir, job_id=a.job), {"job": a.job})
    return _step(a, r)


def programmer_revoke(a: argparse.Namespace) -> int:
    from securethread.programmer import revoke
    from securethread.workdir import write_atomic

    def keep(name: str, data: bytes) -> str | None:
        if name != "crl.pem":
            return None
        write_atomic(Path(a.out), data)
        return str(a.out)

    r = _programmer(
        a,
        "revoke",
        lambda: revoke(a.workdir, job_id=a.job, devices=a.device, out=a.out, reason=a.reason),
        {"job": a.job, "reason": a.reason, "devices": len(a.device)},
        [(f"device-{i}.pem", d) for i, d in enumerate(a.device)],
        keep=keep,
    )
    return _step(a, r)


def programmer_status(a: argparse.Namespace) -> int:
    from securethread.programmer.appliance import status, status_lines

    r = _programmer(a, "status", lambda: status(a.workdir))
    return _step(a, r, status_lines(r.details))


# --- the appliance --------------------------------------------------------------------------------


def appliance_init(a: argparse.Namespace) -> int:
    from securethread.programmer.appliance import init

    return _step(a, init(a.state, name=a.name))


def appliance_serve(a: argparse.Namespace) -> int:
    from securethread.demo.line import simulated_chips
    from securethread.programmer.appliance import Appliance

    def ready(app: Any) -> None:
        # one line on stderr once operators (and stations) can connect
        where = f"; stations on {app.stations_address}" if app.stations_address else ""
        print(f"appliance serving {app.socket_path}{where}", file=sys.stderr, flush=True)

    app = Appliance(
        a.state,
        socket_path=a.socket,
        operators=a.operators,
        stations=a.stations,
        chips=simulated_chips,
        log=None,
    )
    return app.serve(ready=ready)


# --- audit ----------------------------------------------------------------------------------------


def audit_verify_ledger(a: argparse.Namespace) -> int:
    from securethread.audit import verify_ledger_file

    s = verify_ledger_file(
        a.ledger, ledger_cert=a.ledger_cert, root=a.root, programmer_cert=a.programmer_cert
    )
    _emit(
        a,
        f"ledger of programmer {s['programmer']} (job {s['job_id']}) verified: "
        f"{s['records']} records ({s['provisioned']} provisioned, "
        f"{s['programmed']} programmed), closed, {s['checkpoints']} checkpoints",
        {"ok": True, "verified": True, **s},
    )
    return EXIT_OK


def audit_verify_transcript(a: argparse.Namespace) -> int:
    from securethread.audit import verify_transcript_file

    s = verify_transcript_file(a.transcript, cert=a.cert, anchor=a.anchor)
    _emit(
        a,
        [f"transcript verified: {s['records']} records, head #{s['seq']} {s['head']}", *s["lines"]],
        {"ok": True, "verified": True, **{k: v for k, v in s.items() if k != "lines"}},
    )
    return EXIT_OK


def audit_reconcile(a: argparse.Namespace) -> int:
    from securethread.audit import reconcile_files

    report = reconcile_files(
        a.ledger,
        job=a.job,
        root=a.root,
        officers=a.officers,
        programmer_cert=a.programmer_cert,
        ledger_cert=a.ledger_cert,
        production_ca=a.production_ca,
        manifest=a.manifest,
        every_signature=a.every_signature,
    )
    _emit(
        a,
        f"reconciled: {report['provisioned']} provisioned, {report['programmed']} programmed, "
        f"quota {report['quota_used']} of {report['quota']}",
        {"ok": True, "reconciled": True, **report},
    )
    return EXIT_OK


def audit_inspect(a: argparse.Namespace) -> int:
    from securethread.audit import inspect_file

    view = inspect_file(a.file, record=a.record)
    if a.json:
        print(json.dumps({"ok": True, **view}, sort_keys=True, default=str))
    else:
        print(json.dumps(view, indent=2, sort_keys=True, default=str))
    return EXIT_OK


# --- stations: the line's clients of the appliance (docs/station.md) ----------------------------


def programmer_add_station(a: argparse.Namespace) -> int:
    from securethread.programmer.stations import add_station_step

    r = _programmer(
        a,
        "add-station",
        lambda: add_station_step(a.workdir, name=a.name, csr_pem=_read_input(a.csr)),
        {"name": a.name},
        [("station.csr", a.csr)],
    )
    return _step(a, r)


def programmer_remove_station(a: argparse.Namespace) -> int:
    from securethread.programmer.stations import remove_station_step

    r = _programmer(
        a, "remove-station", lambda: remove_station_step(a.workdir, name=a.name), {"name": a.name}
    )
    return _step(a, r)


def station_keygen(a: argparse.Namespace) -> int:
    from securethread.station import keygen
    from securethread.workdir import write_atomic

    key, csr = Path(a.key), Path(a.csr)
    if key.resolve() == csr.resolve():
        raise ConfigurationError("--key and --csr name the same file")
    if key.exists():  # the station's key may be certified already: never replaced here
        raise ConfigurationError(f"--key {a.key!r} exists: a station keeps its key (move it "
                                 "away first to make a new one)")  # fmt: skip
    key_pem, csr_pem = keygen(a.name)
    write_atomic(key, key_pem, mode=0o600)
    write_atomic(csr, csr_pem)
    _emit(
        a,
        [f"station keygen: key {a.key} (keep it), request {a.csr} (for 'programmer "
         "add-station')"],  # fmt: skip
        {"ok": True, "step": "station keygen", "key": a.key, "csr": a.csr},
    )
    return EXIT_OK


def station_run(a: argparse.Namespace) -> int:
    from securethread.demo.line import SimulatedFab
    from securethread.errors import DeviceRefusedError
    from securethread.heap import freeze_startup_heap
    from securethread.station import SimulatedChips, StationCredentials, run_station
    from securethread.station.client import progress_bar

    if a.devices < 1 or a.first_device < 0 or a.first_device + a.devices > 1 << 64:
        raise ConfigurationError("--devices must be at least 1, --first-device 0..2^64-1")
    if a.keep_flash is not None and Path(a.keep_flash).exists() and not Path(a.keep_flash).is_dir():
        raise ConfigurationError(f"--keep-flash {a.keep_flash!r} is not a directory")
    creds = StationCredentials.from_files(cert=a.cert, key=a.key, ca=a.ca)
    fab = SimulatedFab(a.chips_from)
    if a.keep_flash is not None:  # before any device: one that cannot be made is named now
        Path(a.keep_flash).mkdir(parents=True, exist_ok=True)
    chips = SimulatedChips(fab, range(a.first_device, a.first_device + a.devices),
                           keep_flash=a.keep_flash)  # fmt: skip
    bar, close = progress_bar(a.devices, enabled=not a.json and sys.stderr.isatty())
    freeze_startup_heap()  # a run is long: collections walk only what devices allocate
    try:
        r = run_station(creds, a.appliance, job_id=a.job, chips=chips, parallel=a.parallel,
                        progress=bar)  # fmt: skip
    finally:
        close()
    human = [
        f"station run: job {r.job_id}: {r.programmed} programmed ({r.provisioned} new, "
        f"{r.recovered} recovered) of {r.devices} in {r.elapsed_s} s"
        + (f", {r.devices_per_s} devices/s" if r.devices_per_s else ""),
    ]
    if r.already_done:
        human.append(f"  {r.already_done} already provisioned and programmed (a resumed run)")
    human += [f"  refused: {n} {code}" for code, n in sorted(r.refused.items())]
    human += [f"  {note}" for note in r.notes[:5]]
    if a.keep_flash is not None:
        human.append(f"  installed images: {a.keep_flash}/<device_id>.img")
    problem: Error | None = None
    if r.quota_exhausted:
        problem = QuotaExceededError(f"job {r.job_id}: the quota is used up")
    elif r.refused:
        problem = DeviceRefusedError(f"{sum(r.refused.values())} device(s) refused")
    return _finish(a, human, {"step": "station run", **r.to_json(), "keep_flash": a.keep_flash},
                   problem)  # fmt: skip


# --- the simulated silicon vendor ---------------------------------------------------------------


def vendor_init(a: argparse.Namespace) -> int:
    from securethread.demo.line import create_vendor

    d = create_vendor(a.workdir, oem_root=a.oem_root)
    _emit(
        a,
        f"vendor init: a simulated fab in {d}, taking the order of the OEM root {a.oem_root}",
        {"ok": True, "step": "vendor init", "workdir": str(d)},
    )
    return EXIT_OK


# --- demo -----------------------------------------------------------------------------------------


def demo(a: argparse.Namespace) -> int:
    log = None if a.json else (lambda m: print(m, file=sys.stderr, flush=True))
    if a.mode != "line":
        if a.workers is not None or a.stations is not None:
            raise ConfigurationError(f"--workers and --stations are for --mode line, not {a.mode}")
        # Where provisioning happens (README): at the vendor's fab, or zero-secret from a lot.
        from securethread.demo import fab, zero_secret

        chain = fab if a.mode == "fab" else zero_secret
        result = chain.run(a.workdir, a.devices, log=log)
        _emit(a, result.lines, {"ok": result.ok, **result.to_json()})
        return EXIT_OK if result.ok else EXIT_VERIFY

    from securethread.demo import run_demo

    summary = run_demo(
        a.workdir,
        devices=a.devices,
        workers=1 if a.workers is None else a.workers,
        stations=2 if a.stations is None else a.stations,
        log=log,
    )
    _emit(
        a,
        summary["lines"],
        {"ok": summary["ok"], **{k: v for k, v in summary.items() if k != "lines"}},
    )
    return EXIT_OK if summary["ok"] else EXIT_VERIFY


# --- the parser -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2 (and a JSON error under --json)."""

    def error(self, message: str) -> NoReturn:
        if "--json" in sys.argv[1:]:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "error": {
                            "type": "UsageError",
                            "message": message,
                            "exit_code": EXIT_CONFIG,
                        },
                    }
                )
            )
        print(f"{self.prog}: usage error: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


Handler = Callable[[argparse.Namespace], int]

#: RFC 5280 §5.3.1 reason codes by name (certificateHold/removeFromCRL are refused later:
#: a revocation here is final).
REASONS = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
    "aACompromise",
)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="securethread",
        description="Secure production of IoT devices: OEM, programming centre, audit.",
    )
    p.add_argument("--version", action="version", version=f"securethread {__version__}")
    roles = p.add_subparsers(
        dest="role",
        required=True,
        metavar="{oem,programmer,appliance,audit,station,vendor,demo}",
        parser_class=_Parser,
    )

    def command(group: Any, name: str, handler: Handler, help: str, *, workdir: str | None) -> Any:
        sp = group.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        if workdir is not None:
            sp.add_argument("--workdir", required=True, metavar="DIR", help=workdir)
        return sp

    oem_dir = "the OEM's work directory (made by 'oem init')"
    oem = roles.add_parser("oem", help="steps that run at the OEM").add_subparsers(
        dest="cmd", required=True, parser_class=_Parser
    )
    c = command(
        oem,
        "init",
        oem_init,
        "flow 1: create the OEM's tokens, root CA, identity, firmware-signing and officer keys",
        workdir="a new, empty directory for the OEM's work",
    )
    c.add_argument("--name", required=True, help="the OEM's name (letters, digits, . _ -)")
    c.add_argument(
        "--officers", type=int, default=2, help="job-signing officers, one token each (default 2)"
    )
    c.add_argument(
        "--threshold", type=int, default=2, help="officers who must sign every job (default 2)"
    )
    c.add_argument(
        "--officer-pin-file",
        action="append",
        metavar="N=PATH",
        help="officer N's own PIN file, outside DIR: its first line is the PIN (not readable by "
        "others); if PATH does not exist it is created (0600) holding a new PIN. Once per "
        "officer; an officer without one types a PIN on the terminal",
    )
    c = command(
        oem,
        "certify-programmer",
        oem_certify_programmer,
        "flow 2: certify a programmer enclave from its enrolment request",
        workdir=oem_dir,
    )
    c.add_argument("request", help="the programmer's enrolment-request.bin")
    c.add_argument(
        "--fingerprint",
        required=True,
        help="the enclave's identity fingerprint, as given out of band",
    )
    c = command(
        oem,
        "master-image",
        oem_master_image,
        "flow 3: sign a firmware as an MCUboot image in the OEM token, encrypt it there and "
        "sign its manifest",
        workdir=oem_dir,
    )
    c.add_argument("firmware", help="the plaintext firmware (or, with --mcuboot, its image)")
    c.add_argument("--image-id", required=True, help="the image's name")
    c.add_argument(
        "--version", required=True, help="MCUboot version major[.minor[.revision[+build]]]"
    )
    c.add_argument(
        "--security-counter",
        type=int,
        required=True,
        help="anti-rollback counter (MCUboot's protected TLV 0x50)",
    )
    c.add_argument(
        "--load-address",
        type=_number,
        default=0,
        help="RAM load address (sets IMAGE_F_RAM_LOAD); default 0: execute in place",
    )
    c.add_argument(
        "--header-size",
        type=_number,
        default=0x200,
        help="bytes reserved for the MCUboot header, as imgtool's --header-size (default 0x200)",
    )
    c.add_argument(
        "--mcuboot",
        action="store_true",
        help="FIRMWARE is already an unsigned MCUboot image (imgtool create): sign it as it is",
    )
    c.add_argument("--device-class", required=True, help="the device class the image is for")
    c = command(
        oem,
        "send-keys",
        oem_send_keys,
        "flows 4-5: send an image key to a programmer over the authenticated channel (TCP)",
        workdir=oem_dir,
    )
    c.add_argument("--to", required=True, help="the programmer to send to (refuses any other peer)")
    c.add_argument("--image", required=True, help="the image whose key is sent")
    c.add_argument(
        "--connect", required=True, metavar="HOST:PORT", help="where the programmer listens"
    )
    c.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each message (default 30)"
    )
    c = command(
        oem,
        "seal-keys",
        oem_seal_keys,
        "offline flow 5: seal an image key to a programmer's certified key",
        workdir=oem_dir,
    )
    c.add_argument("--to", required=True, help="the programmer the package is for")
    c.add_argument("--image", required=True, help="the image whose key is sealed")
    c.add_argument("--out", required=True, help="where to write the sealed package")
    c = command(
        oem,
        "confirm-keys",
        oem_confirm_keys,
        "verify a programmer's signed receipt for a sealed key package",
        workdir=oem_dir,
    )
    c.add_argument("receipt", help="the programmer's key-receipt file")
    c = command(
        oem,
        "issue-job",
        oem_issue_job,
        "flow 6: with SPEC, certify the job's production CA and write the draft the officers "
        "approve; with --job, issue the job once its officers approved it",
        workdir=oem_dir,
    )
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("spec", nargs="?", help="the job spec (TOML, docs/cli.md): prepare it")
    which.add_argument("--job", help="the prepared job to issue from its officers' approvals")
    c.add_argument(
        "--ca-request", help="with SPEC: the programmer's production-CA request for this job"
    )
    c = command(
        oem,
        "approve-job",
        oem_approve_job,
        "flow 6: one officer approves a prepared job with their own token and PIN",
        workdir=oem_dir,
    )
    c.add_argument("--job", required=True, help="the job id issue-job SPEC prepared")
    c.add_argument("--officer", type=int, required=True, help="your officer number N")
    c.add_argument(
        "--pin-file",
        help="your PIN file (first line; not readable by others); else "
        "SECURETHREAD_PIN_OFFICER_<N>[_FILE] or a prompt on a terminal, never the OEM's pins",
    )
    c.add_argument(
        "--job-hash",
        metavar="HEX",
        help="the job hash issue-job printed, as given to you: any other draft is refused",
    )
    c = command(
        oem,
        "reconcile",
        oem_reconcile,
        "flow 9: reconcile a returned ledger against the job this OEM issued",
        workdir=oem_dir,
    )
    c.add_argument("ledger", help="the programmer's ledger export")
    c.add_argument("--job", required=True, help="the job id")
    c = command(
        oem,
        "reconcile-joint",
        oem_reconcile_joint,
        "reconcile a 'program' job's ledger together with the ledgers of the provisioning "
        "jobs whose chips it programmed",
        workdir=oem_dir,
    )
    c.add_argument("ledger", help="the programming appliance's ledger export")
    c.add_argument("--job", required=True, help="the 'program' job id")
    c.add_argument(
        "--provisioned",
        action="append",
        default=[],
        metavar="JOB=LEDGER",
        help="a provisioning job and its fab appliance's ledger export (repeat for each)",
    )
    c = command(
        oem,
        "revoke",
        oem_revoke,
        "revoke a job's production CA (and so all its devices): the root's CRL",
        workdir=oem_dir,
    )
    c.add_argument("--job", required=True, help="the job whose production CA is revoked")
    c.add_argument(
        "--reason", default="unspecified", choices=REASONS, help="RFC 5280 §5.3.1 reason code"
    )
    c.add_argument("--out", required=True, help="where to write the CRL (PEM)")
    # The field: oem registry, oem install-responder, oem ocsp (securethread/cli_field.py).
    from securethread.cli_field import add_commands as add_field_commands

    add_field_commands(oem, command, workdir=oem_dir, reasons=REASONS, parser_class=_Parser)
    # Zero-secret programming: oem prelicense, oem reconcile-lot (securethread/cli_zero.py).
    from securethread import cli_zero

    cli_zero.add_oem_commands(oem, command, workdir=oem_dir)

    prog_dir = "the programming centre's work directory (made by 'programmer init')"
    prog = roles.add_parser(
        "programmer", help="steps that run at the programming centre"
    ).add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = command(
        prog,
        "init",
        programmer_init,
        "create the programmer's work directory and token",
        workdir="a new, empty directory for the programmer's work",
    )
    c.add_argument("--name", required=True, help="the programmer enclave's name")
    command(
        prog,
        "enrol",
        programmer_enrol,
        "flow 2: generate the enclave's keys and write the enrolment request",
        workdir=prog_dir,
    )
    c = command(
        prog,
        "install-certs",
        programmer_install_certs,
        "install the OEM's certificate bundle",
        workdir=prog_dir,
    )
    c.add_argument("bundle", help="the OEM's certificates-<name>.bin")
    c.add_argument(
        "--root-fingerprint", required=True, help="the OEM root's fingerprint, as given out of band"
    )
    c = command(
        prog,
        "receive-keys",
        programmer_receive_keys,
        "flows 4-5: wait for one OEM key session on HOST:PORT",
        workdir=prog_dir,
    )
    c.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="address to listen on (port 0: any free port)",
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the OEM and for each message (default 300)",
    )
    c = command(
        prog,
        "open-keys",
        programmer_open_keys,
        "offline flow 5: open a sealed key package, write a signed receipt",
        workdir=prog_dir,
    )
    c.add_argument("package", help="the sealed key package")
    c = command(
        prog,
        "request-ca",
        programmer_request_ca,
        "generate a job's production-CA key and write its request",
        workdir=prog_dir,
    )
    c.add_argument("--job", required=True, help="the job id the OEM will issue")
    c = command(
        prog,
        "open-job",
        programmer_open_job,
        "verify a job package and open the job's quota",
        workdir=prog_dir,
    )
    c.add_argument("package", help="the OEM's job-<id>.bin")
    c.add_argument(
        "--image",
        help="the encrypted image that came with it (none for a 'provision' job: the fab)",
    )
    c = command(
        prog,
        "provision",
        programmer_provision,
        "flows 7-8: provision and program simulated chips; run again to resume",
        workdir=prog_dir,
    )
    c.add_argument("--job", required=True, help="the job to produce")
    c.add_argument(
        "--chips-from",
        "--vendor",
        dest="chips_from",
        required=True,
        metavar="DIR",
        help="the simulated fab's directory the chips on the line come from (it decides no "
        "trust: the line accepts only chips of the vendor CAs the job names)",
    )
    c.add_argument("--devices", type=int, required=True, help="chips in the batch")
    c.add_argument(
        "--first", type=int, default=0, help="index of the batch's first chip (default 0)"
    )
    c.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    c.add_argument(
        "--batch-size", type=int, default=32, help="devices per ledger commit (default 32)"
    )
    c.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress on stderr (default: a bar on a terminal)",
    )
    c = command(
        prog,
        "close-job",
        programmer_close_job,
        "close a job: signed close record, ledger export in the outbox",
        workdir=prog_dir,
    )
    c.add_argument("--job", required=True, help="the job to close")
    c = command(
        prog,
        "add-station",
        programmer_add_station,
        "certify a station's key (its CSR) for the station API: its certificate and the "
        "station CA in the outbox",
        workdir=prog_dir,
    )
    c.add_argument("csr", help="the station's certificate request ('station keygen')")
    c.add_argument("--name", required=True, help="the station's name (1-64 of [A-Za-z0-9._-])")
    c = command(
        prog,
        "remove-station",
        programmer_remove_station,
        "withdraw a station: refused on its next call, even on a live connection",
        workdir=prog_dir,
    )
    c.add_argument("--name", required=True, help="the station to withdraw")
    c = command(
        prog,
        "revoke",
        programmer_revoke,
        "revoke device certificates of a job: its production CA's CRL",
        workdir=prog_dir,
    )
    c.add_argument("--job", required=True, help="the job that certified the devices")
    c.add_argument(
        "--device", action="append", required=True, help="a device certificate (PEM); repeatable"
    )
    c.add_argument(
        "--reason", default="unspecified", choices=REASONS, help="RFC 5280 §5.3.1 reason code"
    )
    c.add_argument("--out", required=True, help="where to write the CRL (PEM)")
    command(
        prog,
        "status",
        programmer_status,
        "the status view: jobs, quota used and left, stations connected, devices/s",
        workdir=prog_dir,
    )
    # Every programmer step but init runs on the work directory (--workdir, the library's
    # direct mode) or as an operation of the appliance (--appliance SOCKET or
    # $SECURETHREAD_APPLIANCE): docs/appliance.md.
    for name, sp in prog.choices.items():
        if name == "init":
            continue
        for action in sp._actions:
            if action.dest == "workdir":
                action.required = False
                action.default = None
        sp.add_argument(
            "--appliance",
            metavar="SOCKET",
            help="run the step on the appliance listening on this UNIX socket "
            "(default $SECURETHREAD_APPLIANCE) instead of on --workdir",
        )
        sp.add_argument(
            "--outbox",
            metavar="DIR",
            default="outbox",
            help="with --appliance: where to write the files the step returns (default "
            "./outbox)",
        )

    appl = roles.add_parser(
        "appliance", help="the programmer appliance: the one process that holds the token's PIN"
    ).add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = command(
        appl,
        "init",
        appliance_init,
        "create the appliance's state directory (0700) and its token",
        workdir=None,
    )
    c.add_argument("--state", required=True, metavar="DIR", help="the new state directory")
    c.add_argument("--name", required=True, help="the programmer enclave's name")
    c = command(
        appl,
        "serve",
        appliance_serve,
        "serve operators on a UNIX socket (and stations over gRPC) until SIGTERM",
        workdir=None,
    )
    c.add_argument("--state", required=True, metavar="DIR", help="the state directory")
    c.add_argument("--socket", required=True, metavar="PATH", help="the operators' UNIX socket")
    c.add_argument(
        "--operators",
        metavar="GROUP",
        help="the operators' group: the socket's group (mode 0660)",
    )
    c.add_argument(
        "--stations",
        metavar="HOST:PORT",
        help="also serve the station API (gRPC, mutual TLS) on HOST:PORT",
    )

    audit = roles.add_parser(
        "audit", help="offline verification with public keys only"
    ).add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = command(
        audit,
        "verify-ledger",
        audit_verify_ledger,
        "verify a ledger export of the programmer you expect: chain, checkpoints, close record",
        workdir=None,
    )
    c.add_argument("ledger", help="the ledger export")
    c.add_argument(
        "--programmer-cert",
        required=True,
        help="the identity certificate of the programmer whose ledger this must be "
        "(a ledger signed by any other programmer is refused)",
    )
    c.add_argument(
        "--ledger-cert", required=True, help="the programmer's ledger-signing certificate"
    )
    c.add_argument(
        "--root",
        required=True,
        help="the OEM root certificate the ledger certificate must chain to",
    )
    c = command(
        audit,
        "verify-transcript",
        audit_verify_transcript,
        "verify a party's ceremony transcript",
        workdir=None,
    )
    c.add_argument("transcript", help="the transcript file")
    c.add_argument("--cert", required=True, help="the party's identity certificate")
    c.add_argument(
        "--anchor", help="a record hash written down earlier (minutes): must be in the chain"
    )
    c = command(
        audit,
        "reconcile",
        audit_reconcile,
        "reconcile a ledger export against the job, from files",
        workdir=None,
    )
    c.add_argument("ledger", help="the ledger export")
    c.add_argument("--job", required=True, help="the signed job as the OEM issued it (job.bin)")
    c.add_argument("--root", required=True, help="the OEM root certificate")
    c.add_argument("--officers", required=True, help="the officer bundle signed by the root")
    c.add_argument("--programmer-cert", required=True, help="the programmer's identity certificate")
    c.add_argument(
        "--ledger-cert", required=True, help="the programmer's ledger-signing certificate"
    )
    c.add_argument("--production-ca", required=True, help="the job's production-CA certificate")
    c.add_argument("--manifest", required=True, help="the image's signed manifest (boot checks)")
    c.add_argument(
        "--every-signature",
        action="store_true",
        help="also verify the production CA's signature of each device certificate the "
        "signed ledger covers (detects a faulty token; ~1.4x the CPU)",
    )
    c = command(
        audit,
        "inspect",
        audit_inspect,
        "print any securethread artefact, marked UNVERIFIED",
        workdir=None,
    )
    c.add_argument("file", help="the artefact")
    c.add_argument("--record", type=int, help="one record of a ledger export, in full")

    station = roles.add_parser(
        "station", help="the reference station: the line's client of the appliance"
    ).add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = command(station, "keygen", station_keygen, "a station key and its CSR", workdir=None)
    c.add_argument("--name", required=True, help="the station's name")
    c.add_argument("--key", required=True, help="where to write the key (PEM, 0600)")
    c.add_argument("--csr", required=True, help="where to write the CSR (PEM)")
    c = command(
        station,
        "run",
        station_run,
        "drive simulated chips through the appliances' station API; run again to resume",
        workdir=None,
    )
    c.add_argument(
        "--appliance",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="an appliance's station API; repeatable (round-robin, unreachable ones skipped)",
    )
    c.add_argument("--cert", required=True, help="this station's certificate (add-station)")
    c.add_argument("--key", required=True, help="this station's key (station keygen)")
    c.add_argument("--ca", required=True, help="the appliance's station CA (add-station)")
    c.add_argument("--job", required=True, help="the job to produce")
    c.add_argument(
        "--chips-from", required=True, metavar="DIR", help="the simulated fab's directory"
    )
    c.add_argument("--devices", type=int, required=True, help="chips to drive")
    c.add_argument(
        "--first-device",
        type=int,
        default=0,
        help="UID of the first chip, as an offset in the fab (default 0)",
    )
    c.add_argument(
        "--parallel", type=int, default=4, help="sockets driven at once (default 4, at most 16)"
    )
    c.add_argument(
        "--keep-flash",
        metavar="DIR",
        help="write each chip's installed image (its flash, an MCUboot image) to "
        "DIR/<device_id>.img once it is programmed (simulated chips only)",
    )
    cli_zero.add_station_commands(station, command)

    vendor = roles.add_parser(
        "vendor", help="the simulated silicon vendor (chips for the demo and the tests)"
    ).add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = command(
        vendor,
        "init",
        vendor_init,
        "set up a simulated fab that takes the OEM's order (burns its root's hash into chips)",
        workdir="a new directory for the simulated fab",
    )
    c.add_argument("--oem-root", required=True, help="the OEM root certificate (PEM) of the order")
    cli_zero.add_vendor_commands(vendor, command)

    c = command(
        roles,
        "demo",
        demo,
        "the two-site demo: OEM, factory and vendor on local SoftHSM tokens",
        workdir="a new directory for the demo (it refuses any other)",
    )
    c.add_argument("--devices", type=int, default=100, help="devices to produce (default 100)")
    c.add_argument(
        "--mode",
        choices=("line", "fab", "zero-secret"),
        default="line",
        help="where provisioning happens: 'line' (default) at the programming centre's "
        "appliance; 'fab' at the silicon vendor's appliance, programming at the factory; "
        "'zero-secret' from the vendor's signed lot, no token at the factory",
    )
    c.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes of the in-process line (--stations 0; default 1)",
    )
    c.add_argument(
        "--stations",
        type=int,
        default=None,
        help="station processes sharing the job over the station API (default 2; 0: the "
        "appliance's in-process line)",
    )
    return p


def _on_sigterm(signum: int, _frame: object) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)


#: The CLI's own answer to each signal it documents (exit 130 / 143, one line).
_HANDLERS = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _on_sigterm))


def main(argv: Sequence[str] | None = None) -> int:
    previous: dict[int, Any] = {}
    args: argparse.Namespace | None = None
    try:
        # Installed inside the last-resort try (a signal at any instant is one line), over
        # whatever was inherited: a shell starts a background job with SIGINT ignored, and
        # the exit codes above hold all the same.
        for signum, handler in _HANDLERS:
            previous[signum] = signal.signal(signum, handler)
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except BaseException as exc:  # the last-resort handler: one line, never a traceback
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, BrokenPipeError):  # `securethread ... | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OS
        code = exit_code(exc)
        line = _describe(exc)
        if args is not None and getattr(args, "json", False):
            print(
                json.dumps(
                    {
                        "ok": False,
                        "error": {"type": type(exc).__name__, "message": line, "exit_code": code},
                    }
                )
            )
        where = "securethread"
        if args is not None:
            cmd = getattr(args, "cmd", None)
            where += f" {args.role}" + (f" {cmd}" if cmd else "")
        print(f"{where}: {line}", file=sys.stderr)
        if os.environ.get("SECURETHREAD_DEBUG") and code == EXIT_INTERNAL:
            import traceback

            traceback.print_exc()
        return code
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


if __name__ == "__main__":
    sys.exit(main())
