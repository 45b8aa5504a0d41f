"""The ``securethread`` command: a thin layer over the library (no logic of its own).

Exit codes: 0 success; 2 usage or configuration; 3 token (HSM) error; 4 verification
failure (bad signature, tampered or malformed artefact); 5 quota; 1 anything else
deliberate.  Every failure prints one line on stderr naming the problem, never a
traceback.  PINs come from the environment (``SECURETHREAD_PIN_<TOKEN>``) or a prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigurationError, Error, HSMError, QuotaExceededError, VerificationError

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


# --- subcommands -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    def progress(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)

    summary = run_demo(args.workdir, devices=args.devices, workers=args.workers, progress=progress)
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


def cmd_verify_ledger(args: argparse.Namespace) -> int:
    from . import ledger
    from .job import job_hash

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


def cmd_reconcile(args: argparse.Namespace) -> int:
    from . import envelope, ledger
    from .hsm import fingerprint, load_spki
    from .pki import cert_fingerprint
    from .reconcile import reconcile

    root = _load_cert(args.root, "OEM root certificate")
    bundle = envelope.open_envelope(
        _read(args.officers, "officer bundle"), kind="officer-keys", keys=root.public_key()
    )
    officers = {fingerprint(k): k for k in (load_spki(d) for d in bundle["keys"])}
    try:
        src = open(args.ledger, "rb")
    except OSError as exc:
        raise ConfigurationError(f"cannot read ledger {args.ledger!r}: {exc.strerror}") from None
    with src:
        job_signed, items = ledger.read_export(src)
        report = reconcile(
            job_signed,
            items,
            officers=officers,
            programmer=cert_fingerprint(_load_cert(args.programmer_cert, "programmer cert")),
            ledger_key=_load_cert(args.ledger_cert, "ledger certificate").public_key(),
            root_cert=root,
            production_ca_cert=_load_cert(args.production_ca, "production CA certificate"),
        )
    if args.json:
        print(report.to_json())
    else:
        print(report.human())
    return EXIT_OK


def cmd_verify_transcript(args: argparse.Namespace) -> int:
    from .transcript import verify_transcript

    cert = _load_cert(args.cert, "signer certificate")
    _read(args.transcript, "transcript")
    s = verify_transcript(Path(args.transcript), public_key=cert.public_key())
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
    _emit(
        args, "\n".join(lines), {"transcript_verified": True, "enclave": s.enclave, "records": out}
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import cbor, envelope, ledger

    data = _read(args.file, "artefact")
    if data.startswith(ledger.EXPORT_MAGIC):
        import io

        job_signed, items = ledger.read_export(io.BytesIO(data))
        records = []
        for tag, payload in items:
            if tag == "r":
                body = cbor.decode(payload, what="ledger record")
                records.append(
                    {
                        k: (v.hex() if isinstance(v, bytes) and k != "cert" else v)
                        for k, v in body.items()
                        if k != "cert"
                    }
                )
        _emit(
            args,
            "\n".join(json.dumps(r, sort_keys=True) for r in records),
            {"kind": "ledger", "records": records},
        )
        return EXIT_OK
    try:
        kind, body, signers = envelope.peek_body(data)
    except Error as exc:
        raise type(exc)(f"{args.file}: not a securethread artefact ({exc})") from None

    def show(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.hex() if len(v) <= 64 else f"<{len(v)} bytes>"
        if isinstance(v, dict):
            return {k: show(x) for k, x in v.items()}
        if isinstance(v, list):
            return [show(x) for x in v]
        return v

    shown = {"kind": kind, "signers": [s.hex() for s in signers], "body (unverified)": show(body)}
    _emit(args, json.dumps(shown, indent=2, sort_keys=True), shown)
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

    v = add("verify-ledger", cmd_verify_ledger, "verify a ledger export offline")
    v.add_argument("ledger")
    v.add_argument("--ledger-cert", required=True, help="the programmer's ledger-signing cert")

    r = add("reconcile", cmd_reconcile, "OEM-side reconciliation of a returned ledger")
    r.add_argument("ledger")
    r.add_argument("--root", required=True)
    r.add_argument("--officers", required=True, help="officer-key bundle signed by the root")
    r.add_argument("--programmer-cert", required=True)
    r.add_argument("--ledger-cert", required=True)
    r.add_argument("--production-ca", required=True)

    x = add("verify-transcript", cmd_verify_transcript, "verify a ceremony transcript offline")
    x.add_argument("transcript")
    x.add_argument("--cert", required=True, help="the enclave identity certificate")

    i = add("inspect", cmd_inspect, "print an artefact (job, manifest, license, ledger)")
    i.add_argument("file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Error as exc:
        print(f"securethread {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
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
