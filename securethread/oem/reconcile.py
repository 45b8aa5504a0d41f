"""Flow 9 at the OEM: ``securethread oem reconcile LEDGER --job J``.

The OEM reconciles the programmer's closed ledger against the job *it* issued (its own
``jobs/<job>/job.bin``, never the copy the ledger carries), its own root and officer bundle,
the programmer's certificates it issued at onboarding, the job's production CA and the
image's manifest -- every check of :func:`securethread.formats.reconciliation.reconcile`.
The report is kept in ``jobs/<job>/reconciliation.json`` and recorded in the transcript.
"""

from __future__ import annotations

import json
import os

import attrs

from securethread.errors import ConfigurationError
from securethread.formats.job import verify_job_signatures
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.reconciliation import reconcile_export
from securethread.oem import layout as L
from securethread.oem.registry import HashingReader
from securethread.pki import from_pem
from securethread.workdir import StepResult, open_file


def reconcile(
    workdir: str | os.PathLike[str], ledger_path: str | os.PathLike[str], *, job_id: str
) -> StepResult:
    """Reconcile ``ledger_path`` against job ``job_id`` as this OEM issued it."""
    work = L.open_oem(workdir)
    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"reconcile {job_id}", needs=f"issue-job ({job_id})")
    step = f"reconcile {job_id}"
    if (earlier := work.done_before(f"{jdir}/reconciliation.json", step=step)) is not None:
        return earlier
    issued = work.read(f"{jdir}/job.bin", "issued job")
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    officers = OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), root.public_key())  # type: ignore[arg-type]
    job = verify_job_signatures(
        issued, officers=officers.public_keys(), min_threshold=officers.threshold
    ).job
    programmer = _programmer_of(work, job.programmer)
    pdir = L.programmer_dir(programmer)
    src = open_file(ledger_path, "ledger")
    # The hash of the very bytes verified: registry ingest admits only this ledger.
    hashed = HashingReader(src)
    with src:
        report = reconcile_export(
            hashed,  # type: ignore[arg-type]  # read() is all reconcile_export uses
            issued_job=issued,
            officers=officers.public_keys(),
            min_threshold=officers.threshold,
            root_cert=root,
            programmer_cert=from_pem(work.read(f"{pdir}/identity.pem", "programmer certificate")),
            ledger_cert=from_pem(work.read(f"{pdir}/ledger-signing.pem", "ledger certificate")),
            production_ca_cert=from_pem(
                work.read(f"{jdir}/production-ca.pem", "production-CA certificate")
            ),
            manifest=(  # none for a "provision" job (the fab's: no image)
                work.read(f"{L.image_dir(job.image()[0])}/manifest.bin", "manifest")
                if job.programs
                else None
            ),
        )
    oem = work.open_token(L.TOKEN)
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    ledger_sha256 = hashed.digest()
    tx.append_unless_last(  # a rerun after a kill right after it: recorded once
        "reconciliation",
        artefacts={"ledger": ledger_sha256},
        details={
            "job": job_id,
            "provisioned": report.provisioned,
            "programmed": report.programmed,
            "quota_used": report.quota_used,
        },
    )
    record = json.loads(report.to_json()) | {"ledger_sha256": ledger_sha256.hex()}
    text = json.dumps(record, sort_keys=True) + "\n"
    result = work.finish(
        "oem reconcile",
        [f"{jdir}/reconciliation.json"],
        [tx],
        {"job": job_id, "reconciled": True, **attrs.asdict(report),
         "ledger_sha256": ledger_sha256.hex()},  # fmt: skip
    )
    result = work.pending(step, result)
    work.write(f"{jdir}/reconciliation.json", text.encode())  # last: marks the step done
    return result


def _programmer_of(work: object, fingerprint: bytes) -> str:
    """The certified programmer whose identity certificate has this SHA-256."""
    from securethread.pki import cert_fingerprint

    root = work.path("programmers")  # type: ignore[attr-defined]
    for pdir in sorted(root.iterdir()) if root.is_dir() else []:
        cert = pdir / "identity.pem"
        if cert.is_file() and cert_fingerprint(from_pem(cert.read_bytes())) == fingerprint:
            return str(pdir.name)
    raise ConfigurationError("the job names a programmer this OEM has no certificate for")
