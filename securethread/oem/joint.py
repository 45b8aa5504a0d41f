"""Joint reconciliation at the OEM: ``securethread oem reconcile-joint LEDGER --job PROG
--provisioned JOB=LEDGER ...`` (issue 20).

A "program" job's ledger (the programming centre's appliance) is reconciled together with the
ledgers of the "provision" jobs whose chips it programmed (the silicon vendor's fab appliances),
each against the job *this OEM* issued -- its own ``jobs/<job>/job.bin``, root, officer bundle,
the certificates it issued to each appliance, each provisioning job's production CA and the
programming job's manifest -- with every check of :mod:`securethread.formats.joint`.  The one
report (JSON and text) is kept in ``jobs/<prog>/reconciliation.json`` and recorded in the
transcript with the hash of every ledger it covers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from cryptography import x509

from securethread.errors import ConfigurationError
from securethread.formats import ledger
from securethread.formats.job import ProductionJob, verify_job_signatures
from securethread.formats.joint import (
    JointReconciliationError,
    JointReport,
    ProvisionedDevices,
    ProvisioningTap,
    reconcile_program,
)
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.reconciliation import reconcile
from securethread.hsm import Token
from securethread.oem import layout as L
from securethread.oem.reconcile import _programmer_of
from securethread.oem.registry import HashingReader
from securethread.oem.revoke import revoked_by_root
from securethread.pki import from_pem
from securethread.workdir import PartyDir, StepResult, open_file


def _issued(work: PartyDir, job_id: str, officers: OfficerBundle) -> tuple[bytes, ProductionJob]:
    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"reconcile-joint {job_id}", needs=f"issue-job ({job_id})")
    issued = work.read(f"{jdir}/job.bin", "issued job")
    job = verify_job_signatures(
        issued, officers=officers.public_keys(), min_threshold=officers.threshold
    ).job
    return issued, job


_T = TypeVar("_T")


def _read_ledger(
    path: str | os.PathLike[str], check: Callable[[bytes, Iterator[tuple[str, bytes]]], _T]
) -> tuple[_T, bytes]:
    """``check(export_job, items)`` over the ledger export at ``path``, streamed; its answer
    and the SHA-256 of the very bytes it verified (what the transcript records)."""
    src = open_file(path, "ledger")
    hashed = HashingReader(src)
    with src:
        export_job, items = ledger.read_export(hashed)  # type: ignore[arg-type]  # read() only
        answer = check(export_job, items)
    return answer, hashed.digest()


def _certs(work: PartyDir, job: ProductionJob) -> dict[str, Any]:
    """The certificates this OEM issued to the appliance the job names."""
    pdir = L.programmer_dir(_programmer_of(work, job.programmer))
    return {
        "programmer_cert": from_pem(work.read(f"{pdir}/identity.pem", "programmer certificate")),
        "ledger_cert": from_pem(work.read(f"{pdir}/ledger-signing.pem", "ledger certificate")),
    }


def _add_provisioning(
    work: PartyDir,
    oem: Token,
    root: x509.Certificate,
    officers: OfficerBundle,
    devices: ProvisionedDevices,
    prov_id: str,
    path: str | os.PathLike[str],
) -> bytes:
    """Provisioning job ``prov_id``'s ledger at ``path`` reconciled on its own (unless the
    root revoked its production CA), its chips added to ``devices``; the ledger's SHA-256."""
    prov_issued, prov_job = _issued(work, prov_id, officers)
    pca = from_pem(work.read(f"{L.job_dir(prov_id)}/production-ca.pem", "production CA"))
    if revoked_by_root(oem, pca):
        raise JointReconciliationError(
            f"provisioning job {prov_id}'s production CA was revoked by this OEM's root: "
            "its devices do not reconcile"
        )
    tap = ProvisioningTap()
    report, digest = _read_ledger(
        path,
        lambda export_job, items: reconcile(
            prov_issued,
            export_job,
            tap.watch(items),
            officers=officers.public_keys(),
            min_threshold=officers.threshold,
            root_cert=root,
            production_ca_cert=pca,
            manifest=None,  # a provisioning job names no image
            **_certs(work, prov_job),
        ),
    )
    devices.add(report, tap, job_stage=prov_job.stage, production_ca=pca)
    return digest


def reconcile_joint(
    workdir: str | os.PathLike[str],
    ledger_path: str | os.PathLike[str],
    *,
    job_id: str,
    provisioned: Sequence[tuple[str, str | os.PathLike[str]]],
) -> StepResult:
    """Reconcile programming job ``job_id``'s ledger with the ledgers of the provisioning
    jobs ``provisioned`` (``(job id, ledger path)`` pairs), as this OEM issued them."""
    if not provisioned:
        raise ConfigurationError(
            "reconcile-joint needs the ledger of at least one provisioning job (--provisioned)"
        )
    work = L.open_oem(workdir)
    jdir = L.job_dir(job_id)
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    officers = OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), root.public_key())  # type: ignore[arg-type]
    issued, job = _issued(work, job_id, officers)
    step = f"reconcile-joint {job_id}"
    if (earlier := work.done_before(f"{jdir}/reconciliation.json", step=step)) is not None:
        return earlier  # done, but killed before its answer was out: that answer
    devices = ProvisionedDevices(job.provisioned_by)
    digests: dict[str, bytes] = {}
    oem = work.open_token(L.TOKEN)
    for prov_id, path in provisioned:
        digests[prov_id] = _add_provisioning(work, oem, root, officers, devices, prov_id, path)
    manifest = work.read(f"{L.image_dir(job.image()[0])}/manifest.bin", "manifest")
    program, digests[job_id] = _read_ledger(
        ledger_path,
        lambda export_job, items: reconcile_program(
            issued,
            export_job,
            items,
            officers=officers.public_keys(),
            min_threshold=officers.threshold,
            root_cert=root,
            manifest=manifest,
            provisioned=devices,
            **_certs(work, job),
        ),
    )
    joint = JointReport(program=program, provisioning=tuple(devices.reports))
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append_unless_last(  # a rerun after a kill right after it: recorded once
        "joint-reconciliation",
        artefacts={f"ledger-{j}": d for j, d in sorted(digests.items())},
        details={
            "job": job_id,
            "provisioning": ",".join(j for j, _p in provisioned),
            "licensed": program.licensed,
            "programmed": program.programmed,
            "quota_used": program.quota_used,
        },
    )
    record = joint.to_json() | {"ledger_sha256": {j: d.hex() for j, d in digests.items()}}
    text = json.dumps(record, sort_keys=True) + "\n"
    result = work.finish("oem reconcile-joint", [f"{jdir}/reconciliation.json"], [tx],
                         {"job": job_id, **record, "lines": joint.human()})  # fmt: skip
    result = work.pending(step, result)  # the answer recorded before the step is marked done
    work.write(f"{jdir}/reconciliation.json", text.encode())  # last: marks the step done
    return result


__all__ = ["reconcile_joint"]
