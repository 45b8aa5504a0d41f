"""Joint reconciliation (issue 20): a "program" job's ledger together with the ledgers of the
"provision" jobs whose chips it programmed.

Provisioning happened at a silicon vendor's fab appliance, programming at the programming
centre's; each returned its own closed ledger.  The OEM reconciles them together against its
own records, never against what the exports carry:

* each provisioning ledger on its own (:func:`securethread.formats.reconciliation.reconcile`:
  its job, its fab appliance's ledger key, its production CA, every certificate and chip);
  what it proved per device -- the certificate the fab issued, under which production CA -- is
  taken from the very records that verified (:class:`ProvisioningTap` watches the stream and
  is used only once that reconciliation returned);
* across the provisioning ledgers (:class:`ProvisionedDevices`): no chip provisioned twice
  (two fab ledgers claiming one chip), no chip key certified twice, each a job the
  programming job names in ``provisioned_by``;
* the programming ledger (:func:`reconcile_program`): the issued job under the officers at
  the OEM's M-of-N floor and the export carrying the same job; the ledger key of the
  programming appliance the job names; the manifest the job names (each by the very code of
  single-ledger reconciliation); chain, checkpoints and close record
  (:class:`~securethread.formats.ledger.LedgerReader`), the close record's quota the job's;
  per "licensed" record: time inside the job window, slot < quota, count <= quota, the
  device inside the job's targets and met once, its production CA one the job names and
  one of the provisioning ledgers given, the device in that ledger with the certificate whose
  SHA-256 the record names; per "programmed" record: after the device's "licensed" record
  (same slot), once, its boot confirmation signed by the key that certificate certifies and
  reporting this device and the job's image (:mod:`securethread.formats.boot`).

Any failure raises a :class:`~securethread.formats.reconciliation.ReconciliationError`: the
checks shared with single-ledger reconciliation raise its own classes
(:class:`~securethread.formats.reconciliation.WrongJobError`,
:class:`~securethread.formats.reconciliation.LedgerSignerError`, ...), the joint checks a
:class:`JointReconciliationError` naming the ledger and the first bad record.  Memory: the
provisioning ledgers' certificates are kept (about 0.7 KiB per device) while the programming
ledger streams.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import Error
from securethread.formats import cbor, ledger
from securethread.formats.boot import verify_recorded_boot_confirmation
from securethread.formats.image import Manifest
from securethread.formats.job import STAGE_PROGRAM, STAGE_PROVISION, ProductionJob
from securethread.formats.reconciliation import (
    ReconciliationError,
    ReconciliationReport,
    _job_manifest,
    closed_at_quota,
    job_ledger_signer,
    verify_returned_job,
)
from securethread.keys.ecutil import spki_der
from securethread.pki import cert_fingerprint, device_id_of, untrusted

__all__ = [
    "JointReconciliationError",
    "JointReport",
    "ProgramReport",
    "ProvisionedDevice",
    "ProvisionedDevices",
    "ProvisioningTap",
    "reconcile_program",
]


class JointReconciliationError(ReconciliationError):
    """A programming ledger and its provisioning ledgers do not reconcile together."""


@attrs.frozen
class ProvisionedDevice:
    """A chip as a reconciled provisioning ledger proved it: the job, the certificate (DER)
    its fab appliance issued, and that job's production CA (SHA-256 of its DER)."""

    job_id: str
    certificate: bytes
    production_ca: bytes


class ProvisioningTap:
    """Watches the items of one provisioning ledger while it is reconciled and notes its
    "provisioned" records (device id, certificate).  Nothing noted is trusted before that
    reconciliation returned: :meth:`ProvisionedDevices.add` takes the tap with its report."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def watch(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        for tag, payload in items:
            if tag == ledger.TAG_RECORD:
                body = cbor.decode(payload, what="ledger record", max_size=ledger.MAX_RECORD_SIZE)
                if isinstance(body, dict) and body.get("kind") == ledger.KIND_PROVISIONED:
                    self.records.append((str(body["device_id"]), bytes(body["cert"])))
            yield tag, payload


class ProvisionedDevices:
    """The chips of the provisioning ledgers a programming job's ledger is reconciled with,
    each ledger reconciled on its own first; refuses a chip two ledgers claim (or one key
    certified for two chips) and a provisioning job the programming job does not name."""

    def __init__(self, provisioned_by: Sequence[bytes]) -> None:
        self._named = frozenset(provisioned_by)
        self.devices: dict[str, ProvisionedDevice] = {}
        self.jobs: dict[bytes, str] = {}  # production CA hash -> provisioning job id
        self.reports: list[ReconciliationReport] = []
        self._keys: dict[bytes, str] = {}

    def add(
        self,
        report: ReconciliationReport,
        tap: ProvisioningTap,
        *,
        job_stage: str,
        production_ca: x509.Certificate,
    ) -> None:
        """One provisioning ledger, reconciled (``report``) as job ``report.job_id`` of
        stage ``job_stage`` under ``production_ca``; its chips join the set."""
        job_id = report.job_id
        if job_stage != STAGE_PROVISION:
            raise JointReconciliationError(
                f"job {job_id} is a {job_stage!r} job, not a provisioning job"
            )
        ca = cert_fingerprint(production_ca)
        if ca not in self._named:
            raise JointReconciliationError(
                f"provisioning job {job_id} (production CA {ca.hex()[:16]}) is not one the "
                "programming job names in provisioned_by"
            )
        if ca in self.jobs:
            raise JointReconciliationError(f"provisioning job {job_id}'s ledger is given twice")
        for device_id, der in tap.records:
            other = self.devices.get(device_id)
            if other is not None:
                raise JointReconciliationError(
                    f"provisioning ledger of job {job_id} claims device {device_id}, which "
                    f"job {other.job_id}'s ledger provisioned (a chip another fab made)"
                )
            key = spki_der(_certified_key(der, device_id))
            owner = self._keys.get(key)
            if owner is not None:
                raise JointReconciliationError(
                    f"provisioning ledger of job {job_id}: device {device_id}'s key is "
                    f"certified for device {owner} as well"
                )
            self._keys[key] = device_id
            self.devices[device_id] = ProvisionedDevice(job_id, der, ca)
        self.jobs[ca] = job_id
        self.reports.append(report)


def _certified_key(der: bytes, device_id: str) -> ec.EllipticCurvePublicKey:
    return untrusted.load_certificate_with_key(der, what=f"device {device_id}: certificate")[1]


@attrs.frozen
class ProgramReport:
    """What :func:`reconcile_program` proved of a programming job's ledger."""

    job_id: str
    job_sha256: str
    programmer: str
    quota: int
    quota_used: int
    records: int
    licensed: int
    programmed: int
    checkpoints: int
    closed_at: int


@attrs.frozen
class JointReport:
    """One report for a programming ledger and its provisioning ledgers (JSON and text)."""

    program: ProgramReport
    provisioning: tuple[ReconciliationReport, ...]

    def to_json(self) -> dict[str, Any]:
        prov = [json.loads(r.to_json()) for r in self.provisioning]
        provisioned = sum(r.provisioned for r in self.provisioning)
        return {
            "reconciled": True,
            "program": attrs.asdict(self.program),
            "provisioning": prov,
            "provisioned": provisioned,
            "programmed": self.program.programmed,
            "provisioned_not_programmed": provisioned - self.program.programmed,
        }

    def human(self) -> str:
        p = self.program
        lines = [
            f"programming job {p.job_id} ({p.job_sha256[:16]}): closed ledger of {p.records} "
            f"records from {p.programmer} verified ({p.checkpoints} signed checkpoints)",
            f"  licensed {p.licensed} of quota {p.quota} ({p.quota_used} slots counted); "
            f"programmed {p.programmed}, every boot confirmation verified",
        ]
        for r in self.provisioning:
            lines.append(
                f"  provisioning job {r.job_id} at {r.programmer}: {r.provisioned} of quota "
                f"{r.quota} provisioned, ledger reconciled"
            )
        lines.append(
            "  every programmed chip was provisioned under a job the programming job names, "
            "with the certificate in that job's ledger; no chip twice, each quota held"
        )
        return "\n".join(lines)


def reconcile_program(
    issued_job: bytes,
    export_job: bytes,
    items: Iterable[tuple[str, bytes]],
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    min_threshold: int,
    root_cert: x509.Certificate,
    programmer_cert: x509.Certificate,
    ledger_cert: x509.Certificate,
    manifest: bytes,
    provisioned: ProvisionedDevices,
    at: datetime.datetime | None = None,
) -> ProgramReport:
    """Verify a "program" job's returned ledger against the job the OEM issued and the
    provisioning ledgers already reconciled into ``provisioned`` (module docstring)."""
    verified = verify_returned_job(
        issued_job, export_job, officers=officers, min_threshold=min_threshold
    )
    job = verified.job
    if job.stage != STAGE_PROGRAM:
        raise JointReconciliationError(f"job {job.job_id} is a {job.stage!r} job, not 'program'")
    enclave, ledger_key = job_ledger_signer(job, root_cert, programmer_cert, ledger_cert, at=at)
    image = _job_manifest(job, manifest)
    if image is None:  # pragma: no cover - a "program" job names its image (job.py)
        raise JointReconciliationError(f"job {job.job_id} names no manifest")
    reader = ledger.LedgerReader(job=verified.sha256, ledger_key=ledger_key)
    named = frozenset(job.provisioned_by)
    licensed: dict[str, tuple[int, bool]] = {}  # device id -> (slot, programmed)
    for rec in reader.records(items):
        if not rec.slot < job.quota:
            raise _bad(rec, f"slot {rec.slot} is outside the quota")
        if rec.kind == ledger.KIND_LICENSED:
            _licensed(rec, job, named, provisioned, licensed)
        elif rec.kind == ledger.KIND_PROGRAMMED:
            _programmed(rec, provisioned, licensed, image)
        else:
            raise _bad(rec, f"a {rec.kind!r} record in a 'program' job's ledger")
    close = closed_at_quota(reader, job)
    return ProgramReport(
        job_id=job.job_id,
        job_sha256=verified.sha256.hex(),
        programmer=enclave,
        quota=job.quota,
        quota_used=close.quota_used,
        records=reader.count,
        licensed=reader.provisioned,  # the reader counts every counted kind there
        programmed=reader.programmed,
        checkpoints=reader.checkpoints,
        closed_at=close.time,
    )


def _licensed(
    rec: ledger.LedgerRecord,
    job: ProductionJob,
    named: frozenset[bytes],
    provisioned: ProvisionedDevices,
    licensed: dict[str, tuple[int, bool]],
) -> None:
    device_id = rec.device_id
    if len(licensed) + 1 > job.quota:
        raise _bad(rec, f"quota of {job.quota} exceeded")
    if not job.not_before <= rec.time < job.not_after:
        raise _bad(rec, f"licensed at {rec.time}, outside the job's window")
    if device_id not in job.targets:
        raise _bad(rec, f"device {device_id} is outside the job's targets")
    if device_id in licensed:
        raise _bad(rec, f"device {device_id} appears twice (programmed twice)")
    ca = bytes(rec.body["production_ca"])
    if ca not in named:
        raise _bad(
            rec,
            f"device {device_id} was provisioned under production CA {ca.hex()[:16]}, which "
            f"job {job.job_id} does not name",
        )
    if ca not in provisioned.jobs:
        raise _bad(
            rec, f"device {device_id}: the ledger of its provisioning job was not given"
        )
    dev = provisioned.devices.get(device_id)
    if dev is None or dev.production_ca != ca:
        raise _bad(
            rec,
            f"device {device_id} is not in the ledger of provisioning job "
            f"{provisioned.jobs[ca]}",
        )
    if not hmac.compare_digest(hashlib.sha256(dev.certificate).digest(), rec.body["cert_sha256"]):
        raise _bad(
            rec,
            f"device {device_id}'s certificate is not the one provisioning job {dev.job_id} "
            "issued",
        )
    licensed[device_id] = (rec.slot, False)


def _programmed(
    rec: ledger.LedgerRecord,
    provisioned: ProvisionedDevices,
    licensed: dict[str, tuple[int, bool]],
    manifest: Manifest,
) -> None:
    device_id = rec.device_id
    known = licensed.get(device_id)
    if known is None or known[0] != rec.slot:
        raise _bad(rec, f"device {device_id} programmed but not licensed")
    if known[1]:
        raise _bad(rec, f"device {device_id} programmed twice")
    der = provisioned.devices[device_id].certificate
    try:
        cert, key = untrusted.load_certificate_with_key(
            der, what=f"device {device_id}: certificate"
        )
        if device_id_of(cert) != device_id:
            raise _bad(rec, f"device {device_id}'s certificate names another device")
        verify_recorded_boot_confirmation(
            rec.body["boot"],
            device_public_key=key,
            device_id=device_id,
            manifest=manifest,
        )
    except JointReconciliationError:
        raise
    except Error as exc:
        raise _bad(rec, f"boot confirmation: {exc}") from None
    licensed[device_id] = (rec.slot, True)


def _bad(rec: ledger.LedgerRecord, why: str) -> JointReconciliationError:
    return JointReconciliationError(
        f"programming ledger record {rec.index}: {why}", index=rec.index
    )
