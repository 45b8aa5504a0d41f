"""The ``securethread`` command: a thin layer over the library (no logic of its own).

One subcommand per ceremony step (:mod:`securethread.ceremony`, on a work directory), the
whole demo, and the offline checks an auditor runs.  Exit codes: 0 success; 2 usage or
configuration (also a step run out of order); 3 token (HSM) error; 4 verification failure
(bad signature, tampered or malformed artefact, devices refused); 5 quota; 1 anything else
deliberate.  Every failure prints one line on stderr naming the problem, never a
traceback.  PINs come from the environment (``SECURETHREAD_PIN_<TOKEN>``) or a prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import (
    ConfigurationError,
    Error,
    HSMError,
    PinMissingError,
    QuotaExceededError,
    VerificationError,
)

if TYPE_CHECKING:
    from .ceremony import ProvisionProgress, StepResult

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_HSM, EXIT_VERIFY, EXIT_QUOTA = 0, 1, 2, 3, 4, 5


def _exit_code(exc: Error) -> int:
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIG
    if isinstance(exc, HSMError):
        return EXIT_HSM
    if isinstance(exc, VerificationError):
        return EXIT_VERIFY
    if isinstance(exc, QuotaExceededError):
        return EXIT_QUOTA
    return EXIT_ERROR


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _load_cert(path: str, what: str) -> Any:
    from .pki import from_pem, load_der

    data = _read(path, what)
    return from_pem(data) if data.lstrip().startswith(b"-----BEGIN") else load_der(data)


def _emit(args: argparse.Namespace, human: str, machine: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(machine, sort_keys=True, default=str))
    else:
        print(human)


def _fail_line(command: str, exc: Error) -> str:
    text = " ".join(str(exc).split())  # one line, whatever the message holds
    return f"securethread {command}: {type(exc).__name__}: {text}"


def _pin(label: str) -> str:
    """The token's PIN from the environment, else from a prompt on a terminal."""
    from .hsm import env_var_for, resolve_pin

    try:
        return resolve_pin(label)
    except PinMissingError:
        if not sys.stdin.isatty():
            raise
    pin = getpass.getpass(f"PIN for token {label!r}: ")
    os.environ[env_var_for(label)] = pin  # provision's worker processes inherit it
    return pin


class _Progress:
    """Provisioning progress on stderr: a bar redrawn in place, or plain lines."""

    def __init__(self, mode: str, label: str) -> None:
        self.mode = mode
        self.label = label
        self._last: ProvisionProgress | None = None
        self._shown = 0.0
        self._width = 0
        self._lock = threading.Lock()

    @classmethod
    @contextlib.contextmanager
    def shown(cls, mode: str, label: str) -> Iterator[_Progress | None]:
        """``mode`` auto: a bar when stderr is a terminal, nothing otherwise."""
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "none"
        bar = None if mode == "none" else cls(mode, label)
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()

    def _text(self, p: ProvisionProgress) -> str:
        counts = (
            f"{p.handled}/{p.total} devices: {p.provisioned} provisioned, "
            f"{p.refused} refused, {p.booted} booted"
        )
        if self.mode == "lines":
            return f"[{self.label}] {counts}"
        filled = 30 * p.handled // max(p.total, 1)
        return f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {counts}"

    def __call__(self, p: ProvisionProgress) -> None:
        with self._lock:
            self._last = p
            now = time.monotonic()
            if now - self._shown < (0.1 if self.mode == "bar" else 1.0):
                return
            self._shown = now
            self._draw(p)

    def _draw(self, p: ProvisionProgress) -> None:
        text = self._text(p)
        if self.mode == "bar":
            sys.stderr.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        with self._lock:
            if self._last is not None:
                self._draw(self._last)
            if self.mode == "bar" and self._width:
                sys.stderr.write("\n")
                sys.stderr.flush()


# --- subcommands -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    def progress(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)

    with _Progress.shown("auto", "provision") as bar:
        summary = run_demo(
            args.workdir,
            devices=args.devices,
            workers=args.workers,
            progress=progress,
            device_progress=bar,
        )
    human = "\n".join(
        [
            "securethread demo: the chain of trust, end to end",
            f"  provisioned {summary['provisioned']}/{summary['devices_requested']} devices, "
            f"{summary['booted']} booted the encrypted image",
            f"  refused: {summary['refused_over_quota']} over quota, "
            f"{summary['refused_not_targeted']} outside the job's targets; "
            f"tampered image rejected by the SBM: {summary['tampered_rejected']}",
            f"  ledger verified and reconciled: {summary['reconciled']}; "
            f"transcripts verified: {summary['transcripts_verified']}",
            f"  {summary['devices_per_s']} devices/s with {summary['workers']} worker(s); "
            f"artefacts in {summary['workdir']}",
        ]
    )
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(human)
    return EXIT_OK


def cmd_init_tokens(args: argparse.Namespace) -> int:
    from softhsm_config import ensure_tokens

    tdir = ensure_tokens(args.directory, args.labels, generate_missing_pins=args.generate_pins)
    _emit(args, f"SOFTHSM2_CONF={tdir.conf}", {"softhsm2_conf": str(tdir.conf)})
    return EXIT_OK


# --- ceremony steps (securethread.ceremony), one subcommand each ---------------------------------


def _step_result(args: argparse.Namespace, result: StepResult, lines: Sequence[str] = ()) -> int:
    """Print a step's result; a step that ran but left something undone exits non-zero."""
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True, default=str))
    else:
        out = [f"{result.step}: done in {result.workdir}", *lines]
        if result.written:
            out.append("  wrote " + ", ".join(result.written))
        for a in result.anchors:
            out.append(f"  transcript anchor {a.enclave} record #{a.seq}: {a.head.hex()}")
        if result.anchors:
            out.append("  (kept in minutes.txt; an auditor checks with verify-transcript --anchor)")
        print("\n".join(out))
    if result.problem is not None:
        print(_fail_line(args.command, result.problem), file=sys.stderr)
        return _exit_code(result.problem)
    return EXIT_OK


def cmd_oem_init(args: argparse.Namespace) -> int:
    from .ceremony import oem_init

    return _step_result(args, oem_init(args.workdir, pin=_pin))


def cmd_onboard_programmer(args: argparse.Namespace) -> int:
    from .ceremony import onboard_programmer

    return _step_result(args, onboard_programmer(args.workdir, pin=_pin))


def cmd_master_image(args: argparse.Namespace) -> int:
    from .ceremony import master_image

    r = master_image(args.workdir, firmware=args.firmware, pin=_pin)
    return _step_result(args, r, [f"  firmware of {r.details['firmware_bytes']} bytes mastered"])


def cmd_transfer_keys(args: argparse.Namespace) -> int:
    from .ceremony import transfer_keys

    r = transfer_keys(args.workdir, pin=_pin)
    return _step_result(args, r, [f"  transferred {', '.join(r.details['keys'])} (wrapped)"])


def cmd_issue_job(args: argparse.Namespace) -> int:
    from .ceremony import issue_job

    r = issue_job(args.workdir, quota=args.quota, targets=args.targets, pin=_pin)
    d = r.details
    return _step_result(
        args, r, [f"  job {d['job']}: quota {d['quota']} among {d['targets']} target devices"]
    )


def cmd_provision(args: argparse.Namespace) -> int:
    from .ceremony import provision

    with _Progress.shown(args.progress, "provision") as bar:
        r = provision(
            args.workdir,
            devices=args.devices,
            first=args.first,
            workers=args.workers,
            batch_size=args.batch_size,
            progress=bar,
            pin=_pin,
        )
    d = r.details
    refused = ", ".join(f"{n} {k}" for k, n in sorted(d["refused"].items())) or "none"
    lines = [
        f"  {d['devices']} devices: {d['provisioned']} provisioned, {d['booted']} booted, "
        f"{d['already_provisioned']} already provisioned; refused: {refused}",
        f"  quota: {d['quota_used']} of {d['quota']} used; {d['devices_per_s']} devices/s "
        f"with {d['workers']} worker(s)",
    ]
    if d["unprogrammed"]:
        lines.append(
            f"  {len(d['unprogrammed'])} device(s) in the ledger were never programmed "
            "(an earlier run stopped between provisioning and programming)"
        )
    return _step_result(args, r, lines)


def cmd_export_ledger(args: argparse.Namespace) -> int:
    from .ceremony import export_ledger

    r = export_ledger(args.workdir, pin=_pin)
    d = r.details
    return _step_result(
        args,
        r,
        [
            f"  ledger verified: {d['records']} records ({d['provisioned']} provisioned, "
            f"{d['programmed']} programmed), {d['checkpoints']} signed checkpoints; run closed"
        ],
    )


def cmd_verify_ledger(args: argparse.Namespace) -> int:
    from securethread.formats import ledger
    from securethread.formats.job import job_hash

    key = _load_cert(args.ledger_cert, "ledger certificate").public_key()
    try:
        src = open(args.ledger, "rb")
    except OSError as exc:
        raise ConfigurationError(f"cannot read ledger {args.ledger!r}: {exc.strerror}") from None
    with src:
        job_signed, items = ledger.read_export(src)
        s = ledger.verify_ledger(items, job=job_hash(job_signed), ledger_key=key)
    _emit(
        args,
        f"ledger verified: {s.records} records ({s.provisioned} provisioned, "
        f"{s.programmed} programmed), {s.checkpoints} signed checkpoints",
        {
            "ledger_verified": True,
            **{k: getattr(s, k) for k in ("records", "provisioned", "programmed", "checkpoints")},
        },
    )
    return EXIT_OK


_RECONCILE_FILES = ("ledger", "root", "officers", "programmer_cert", "ledger_cert", "production_ca")


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .ceremony import reconcile as reconcile_step
    from .ceremony import reconcile_files

    given = [name for name in _RECONCILE_FILES if getattr(args, name) is not None]
    if args.workdir is not None:
        if given:
            raise ConfigurationError("give either --workdir or the ledger and its certificates")
        r = reconcile_step(args.workdir, pin=_pin)
        d = r.details
        return _step_result(
            args,
            r,
            [
                f"  job {d['job_id']}: {d['records']} ledger records verified; provisioned "
                f"{d['provisioned']} of quota {d['quota']}, programmed {d['programmed']}"
            ],
        )
    missing = [n for n in _RECONCILE_FILES if n not in given]
    if missing:
        names = ", ".join(
            "LEDGER" if n == "ledger" else "--" + n.replace("_", "-") for n in missing
        )
        raise ConfigurationError(f"missing {names} (or give --workdir DIR)")
    report = reconcile_files(
        args.ledger,
        root=args.root,
        officers=args.officers,
        programmer_cert=args.programmer_cert,
        ledger_cert=args.ledger_cert,
        production_ca=args.production_ca,
    )
    if args.json:
        print(report.to_json())
    else:
        print(report.human())
    return EXIT_OK


def cmd_verify_transcript(args: argparse.Namespace) -> int:
    from securethread.formats.transcript import verify_transcript

    anchor = None
    if args.anchor is not None:
        try:
            anchor = bytes.fromhex(args.anchor)
        except ValueError:
            anchor = b""
        if len(anchor) != 32:
            raise ConfigurationError("--anchor must be 64 hex digits (a transcript record hash)")
    cert = _load_cert(args.cert, "signer certificate")
    _read(args.transcript, "transcript")
    s = verify_transcript(Path(args.transcript), public_key=cert.public_key(), anchor=anchor)
    lines = [f"transcript of {s.enclave!r}: {len(s.records)} records verified"]
    out = []
    for r in s.records:
        keys = ", ".join(k.label for k in r.keys)
        certs = ", ".join(c.subject for c in r.certificates)
        lines.append(
            f"  #{r.seq} {r.timestamp} {r.operation}"
            + (f"  keys: {keys}" if keys else "")
            + (f"  certs: {certs}" if certs else "")
        )
        out.append(
            {
                "seq": r.seq,
                "operation": r.operation,
                "time": r.timestamp,
                "keys": [k.label for k in r.keys],
                "certificates": [c.subject for c in r.certificates],
            }
        )
    last = s.records[-1].seq
    lines.append(
        f"head: record #{last} {s.head.hex()}"
        + (" (the anchor given is in the chain)" if anchor else " (no anchor given)")
    )
    _emit(
        args,
        "\n".join(lines),
        {
            "transcript_verified": True,
            "enclave": s.enclave,
            "records": out,
            "head": s.head.hex(),
            "anchor_checked": anchor is not None,
        },
    )
    return EXIT_OK


_VERIFY_WITH = {
    "ledger": "verify-ledger or reconcile",
    "ledger-record": "verify-ledger or reconcile on its ledger",
    "transcript": "verify-transcript",
}


def cmd_inspect(args: argparse.Namespace) -> int:
    from securethread.audit.inspect import describe

    data = _read(args.file, "artefact")
    try:
        view = describe(data, record=args.record)
    except VerificationError as exc:
        raise type(exc)(f"{args.file}: {exc}") from None
    kind = view["kind"]
    how = _VERIFY_WITH.get(kind, "its signer's key")
    head = f"{kind} {args.file}: UNVERIFIED (inspect checks no signature; verify with {how})"
    if kind == "ledger":
        body = "\n".join(json.dumps(r, sort_keys=True) for r in view["records"])
    else:
        body = json.dumps(view, indent=2, sort_keys=True)
    _emit(args, f"{head}\n{body}", view)
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2 (the CLI's contract)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: usage error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="securethread", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        sp.set_defaults(func=fn)
        return sp

    d = add("demo", cmd_demo, "run the end-to-end production demo on local SoftHSM tokens")
    d.add_argument("--devices", type=int, default=100)
    d.add_argument("--workdir", required=True)
    d.add_argument("--workers", type=int, default=1)

    t = add("init-tokens", cmd_init_tokens, "create a project-local SoftHSM2 token directory")
    t.add_argument("directory")
    t.add_argument("labels", nargs="*", default=["oem", "programmer"])
    t.add_argument("--generate-pins", action="store_true")

    def step(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp = add(name, fn, help)
        sp.add_argument("--workdir", required=True, help="the ceremony's work directory")
        return sp

    step("oem-init", cmd_oem_init, "OEM key ceremony: tokens, root CA, signing and image keys")
    step(
        "onboard-programmer",
        cmd_onboard_programmer,
        "programmer identity and signing keys, certified by the OEM root",
    )
    m = step("master-image", cmd_master_image, "encrypt the firmware and sign its manifest")
    m.add_argument("--firmware", help="plaintext image (default: random 256 KiB)")
    step(
        "transfer-keys",
        cmd_transfer_keys,
        "secure channel between the tokens; the image key moves wrapped",
    )
    j = step("issue-job", cmd_issue_job, "production CA and a job signed by two officers")
    j.add_argument("--quota", type=int, required=True, help="devices the job allows")
    j.add_argument("--targets", type=int, help="chip UIDs the job targets (default: the quota)")
    pr = step("provision", cmd_provision, "provision and program a batch of simulated chips")
    pr.add_argument("--devices", type=int, required=True, help="chips in the batch")
    pr.add_argument("--first", type=int, default=0, help="index of the batch's first chip")
    pr.add_argument("--workers", type=int, default=1)
    pr.add_argument("--batch-size", type=int, default=32, help="devices per ledger commit")
    pr.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="on stderr; auto: a bar on a terminal, nothing otherwise",
    )
    step("export-ledger", cmd_export_ledger, "export and verify the ledger; close the run")

    v = add("verify-ledger", cmd_verify_ledger, "verify a ledger export offline")
    v.add_argument("ledger")
    v.add_argument("--ledger-cert", required=True, help="the programmer's ledger-signing cert")

    r = add("reconcile", cmd_reconcile, "OEM-side reconciliation of a returned ledger")
    r.add_argument("ledger", nargs="?")
    r.add_argument("--root")
    r.add_argument("--officers", help="officer-key bundle signed by the root")
    r.add_argument("--programmer-cert")
    r.add_argument("--ledger-cert")
    r.add_argument("--production-ca")
    r.add_argument(
        "--workdir", help="the ceremony step: files from DIR, report kept, OEM transcript"
    )

    x = add("verify-transcript", cmd_verify_transcript, "verify a ceremony transcript offline")
    x.add_argument("transcript")
    x.add_argument("--cert", required=True, help="the enclave identity certificate")
    x.add_argument("--anchor", help="a record hash written down earlier: must be in the chain")

    i = add(
        "inspect",
        cmd_inspect,
        "print an artefact (job, manifest, license, ledger, ledger record, transcript), unverified",
    )
    i.add_argument("file")
    i.add_argument("--record", type=int, help="one record of a ledger export, in full")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Error as exc:
        print(_fail_line(args.command, exc), file=sys.stderr)
        return _exit_code(exc)
    except OSError as exc:  # a path that is not what it should be (file vs directory...)
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"securethread {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print(f"securethread {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
