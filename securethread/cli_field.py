"""The OEM's commands for the field (docs/cli.md, "The field"): ``oem registry``,
``oem install-responder`` and ``oem ocsp``.

Each is a few lines over :mod:`securethread.oem.registry` and :mod:`securethread.oem.ocsp`;
:func:`add_commands` hangs them under ``securethread oem`` (called by
:func:`securethread.cli.build_parser`).  Exit codes are the CLI's; ``registry check`` adds
its own meaning to two of them: 0 the certificate is *known* (in a reconciled ledger, not
revoked, its serial unique), 4 it is *revoked*, *duplicate* or *unknown* -- an onboarding
script refuses the device on anything but 0 (``--json`` says which).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from securethread import cli as C

DATABASE_HELP = (
    "the registry: a SQLite file or a postgresql:// URL (default: registry.sqlite in the "
    "OEM's work directory)"
)


def registry_ingest(a: argparse.Namespace) -> int:
    from securethread.oem.registry import ingest_ledger

    r = ingest_ledger(a.workdir, a.ledger, job_id=a.job, database=a.database, crls=a.crl or ())
    d = r.details
    if d["ingested"]:
        line = f"  ingested job {d['job_id']}: {d['devices']} devices ({d['records']} records)"
    else:
        line = f"  job {d['job_id']}: this ledger was in the registry already; nothing changed"
    lines = [line]
    if d["duplicate_serials"]:
        lines.append(
            f"  WARNING: {d['duplicate_serials']} serials are in another ledger with another "
            f"certificate: {', '.join(d['duplicates'])}"
        )
    return C._step(a, r, lines)


def registry_check(a: argparse.Namespace) -> int:
    from securethread.oem.registry import Status, check_certificate

    result = check_certificate(a.workdir, a.cert, database=a.database)
    known = result.status is Status.KNOWN
    C._emit(a, result.human(), {"ok": known, **result.to_json()})
    if not known:
        print(f"securethread oem registry check: {result.human()}", file=sys.stderr)
        return C.EXIT_VERIFY
    return C.EXIT_OK


def registry_crl(a: argparse.Namespace) -> int:
    from securethread.oem.registry import apply_crl_file

    r = apply_crl_file(a.workdir, a.crl, job_id=a.job, database=a.database)
    return C._step(a, r, [f"  {r.details['new_revocations']} new revocations from {a.crl}"])


def registry_revoke(a: argparse.Namespace) -> int:
    from securethread.oem.registry import revoke_device

    r = revoke_device(
        a.workdir,
        job_id=a.job,
        serial=a.serial,
        device_id=a.device_id,
        reason=a.reason,
        database=a.database,
    )
    d = r.details
    state = "revoked" if d["newly_revoked"] else "was revoked already"
    return C._step(a, r, [f"  serial {d['serial']} of job {d['job']}: {state}"])


def install_responder(a: argparse.Namespace) -> int:
    from securethread.oem.ocsp import install_responder

    return C._step(a, install_responder(a.workdir, a.cert, job_id=a.job))


def ocsp(a: argparse.Namespace) -> int:
    from securethread.oem.ocsp import serve

    host, port = C._hostport(a.listen)

    def ready(addr: tuple[str, int]) -> None:
        # The bound address, for scripts that listen on port 0: one line on stderr.
        print(f"listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

    serve(a.workdir, host=host, port=port, database=a.database, ready=ready)
    return C.EXIT_OK


def add_commands(
    oem: Any,
    command: Callable[..., Any],
    *,
    workdir: str,
    reasons: Sequence[str],
    parser_class: type[argparse.ArgumentParser],
) -> None:
    """Add ``registry``, ``install-responder`` and ``ocsp`` to the ``oem`` subcommands."""
    c = command(
        oem,
        "install-responder",
        install_responder,
        "install the OCSP responder certificate a job's production CA issued at open-job",
        workdir=workdir,
    )
    c.add_argument("cert", help="the programmer's outbox/ocsp-responder-<job>.pem")
    c.add_argument("--job", required=True, help="the job whose production CA issued it")
    c = command(
        oem,
        "ocsp",
        ocsp,
        "serve OCSP (RFC 6960, HTTP GET and POST) from the registry until SIGINT/SIGTERM",
        workdir=workdir,
    )
    c.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="address (port 0: any free port)"
    )
    c.add_argument("--database", metavar="DB", help=DATABASE_HELP)

    registry = oem.add_parser(
        "registry", help="the registry of reconciled devices (for the field)"
    ).add_subparsers(dest="registry_cmd", required=True, parser_class=parser_class)
    c = command(
        registry,
        "ingest",
        registry_ingest,
        "store every device of a reconciled ledger (once; a killed ingest leaves nothing)",
        workdir=workdir,
    )
    c.add_argument("ledger", help="the ledger export 'oem reconcile' verified")
    c.add_argument("--job", required=True, help="the job id")
    c.add_argument(
        "--crl", action="append", metavar="CRL", help="a CRL of the job's production CA; repeatable"
    )
    c.add_argument("--database", metavar="DB", help=DATABASE_HELP)
    c = command(
        registry,
        "check",
        registry_check,
        "known, revoked, duplicate or unknown: where a device certificate stands (exit 0: known)",
        workdir=workdir,
    )
    c.add_argument("cert", help="the device certificate (PEM or DER)")
    c.add_argument("--database", metavar="DB", help=DATABASE_HELP)
    c = command(
        registry,
        "crl",
        registry_crl,
        "record a CRL's revocations: a job's production CA's (--job) or the OEM root's",
        workdir=workdir,
    )
    c.add_argument("crl", help="the CRL (PEM or DER)")
    c.add_argument("--job", help="the job whose production CA signed it (default: the root's)")
    c.add_argument("--database", metavar="DB", help=DATABASE_HELP)
    c = command(
        registry,
        "revoke",
        registry_revoke,
        "revoke a device in the registry: the OCSP responder answers revoked from now on",
        workdir=workdir,
    )
    c.add_argument("--job", required=True, help="the job of the device")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="the certificate serial (hex)")
    which.add_argument("--device-id", help="the device id (16 hex digits)")
    c.add_argument(
        "--reason", default="unspecified", choices=reasons, help="RFC 5280 §5.3.1 reason code"
    )
    c.add_argument("--database", metavar="DB", help=DATABASE_HELP)
