"""Reconciliation (flow 9): the OEM checks a ledger the programmer returned.

Checks, in one streaming pass over the ledger export:

* the signed job is the OEM's own (officer signatures) and the ledger belongs to it;
* chain and signed checkpoints (:func:`securethread.ledger.iter_verified`);
* count of provisioned devices <= quota; every slot < quota;
* no device and no certificate serial appears twice; every serial encodes this job and the
  record's slot;
* every device certificate chains to the OEM root under this job's production CA;
* every "programmed" record follows a "provisioned" one for the same device and slot, and
  its boot confirmation verifies under that device's certificate key.

The result is a :class:`ReconciliationReport` with a human and a machine-readable form; any
failure raises a :class:`~securethread.errors.VerificationError` naming the first bad
record.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterable, Mapping

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import Error, LedgerError
from securethread.formats import ledger
from securethread.formats.job import ProductionJob, job_hash, verify_job

#: Verifies a boot confirmation given the device certificate; raises on failure.
BootCheck = Callable[[x509.Certificate, bytes], None]


@attrs.frozen
class ReconciliationReport:
    job_id: str
    quota: int
    records: int
    provisioned: int
    programmed: int
    checkpoints: int
    first_time: int | None
    last_time: int | None

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self) | {"reconciled": True}, sort_keys=True)

    def human(self) -> str:
        return (
            f"job {self.job_id}: ledger of {self.records} records verified "
            f"({self.checkpoints} signed checkpoints)\n"
            f"  provisioned {self.provisioned} of quota {self.quota}; "
            f"programmed {self.programmed}\n"
            "  no duplicate device or serial; every certificate chains to the OEM root\n"
            "  through the job's production CA"
        )


def reconcile(
    job_signed: bytes,
    items: Iterable[tuple[str, bytes]],
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey],
    programmer: bytes,
    ledger_key: ec.EllipticCurvePublicKey,
    root_cert: x509.Certificate,
    production_ca_cert: x509.Certificate,
    boot_check: BootCheck | None = None,
) -> ReconciliationReport:
    """Verify a returned ledger against the job it claims; raise naming the first bad record."""
    from securethread.pki import DeviceChainValidator, job_id_of, parse_device_serial
    from securethread.pki import job_tag as tag_of

    # The job may have expired by now: reconciliation checks it was valid when issued.
    body_job = _verified_job_any_time(job_signed, officers=officers, programmer=programmer)
    jh = job_hash(job_signed)
    job_id = body_job.job_id
    if job_id_of(production_ca_cert) != job_id:
        raise LedgerError(f"production CA certificate is not for job {job_id}")
    tag = tag_of(job_id)
    devices: dict[str, int] = {}
    programmed: set[str] = set()
    serials: set[int] = set()
    certs: dict[str, x509.Certificate] = {}
    first_t: int | None = None
    last_t: int | None = None
    # Each certificate is validated at its record's time.  A batch's records share one time,
    # so one validator (production CA checked against the root once) serves a whole batch.
    validator: DeviceChainValidator | None = None
    validator_t: int | None = None
    n = prov = prog = 0
    checkpoints = 0

    def counted(it: Iterable[tuple[str, bytes]]) -> Iterable[tuple[str, bytes]]:
        nonlocal checkpoints
        for item in it:
            checkpoints += item[0] == "c"
            yield item

    for rec in ledger.iter_verified(counted(items), job=jh, ledger_key=ledger_key):
        i = rec.index
        body = rec.body
        n += 1
        t = body["time"]
        first_t = t if first_t is None else first_t
        last_t = t
        device_id = rec.device_id
        slot = rec.slot
        if not isinstance(slot, int) or not 0 <= slot < body_job.quota:
            raise LedgerError(f"ledger record {i}: slot {slot!r} is outside the quota", index=i)
        if rec.kind == ledger.KIND_PROVISIONED:
            prov += 1
            if prov > body_job.quota:
                raise LedgerError(f"ledger record {i}: quota of {body_job.quota} exceeded", index=i)
            if device_id in devices:
                raise LedgerError(f"ledger record {i}: device {device_id} appears twice", index=i)
            try:
                cert = x509.load_der_x509_certificate(body["cert"])
            except ValueError:
                raise LedgerError(f"ledger record {i}: certificate is not DER", index=i) from None
            serial = cert.serial_number
            if serial in serials:
                raise LedgerError(f"ledger record {i}: serial {serial:#x} appears twice", index=i)
            try:
                parsed = parse_device_serial(serial)
                if parsed.job_tag != tag or parsed.sequence != slot:
                    raise LedgerError(
                        f"ledger record {i}: serial does not encode this job and slot {slot}",
                        index=i,
                    )
                if validator is None or validator_t != t:
                    validator = DeviceChainValidator(
                        production_ca_cert,
                        root_cert,
                        at=datetime.datetime.fromtimestamp(t, datetime.UTC),
                        job_id=job_id,
                    )
                    validator_t = t
                validator.validate(cert)
            except LedgerError:
                raise
            except Error as exc:
                raise LedgerError(f"ledger record {i}: {exc}", index=i) from None
            devices[device_id] = slot
            serials.add(serial)
            if boot_check is not None:
                certs[device_id] = cert
        else:
            prog += 1
            if devices.get(device_id) != slot:
                raise LedgerError(
                    f"ledger record {i}: device {device_id} programmed but not provisioned",
                    index=i,
                )
            if device_id in programmed:
                raise LedgerError(
                    f"ledger record {i}: device {device_id} programmed twice", index=i
                )
            programmed.add(device_id)
            if boot_check is not None:
                try:
                    boot_check(certs[device_id], body["boot"])
                except Error as exc:
                    raise LedgerError(
                        f"ledger record {i}: boot confirmation fails: {exc}", index=i
                    ) from None
    return ReconciliationReport(
        job_id=job_id,
        quota=body_job.quota,
        records=n,
        provisioned=prov,
        programmed=prog,
        checkpoints=checkpoints,
        first_time=first_t,
        last_time=last_t,
    )


def _verified_job_any_time(
    job_signed: bytes, *, officers: Mapping[bytes, ec.EllipticCurvePublicKey], programmer: bytes
) -> ProductionJob:
    from securethread.formats import envelope
    from securethread.formats.job import JOB_KIND

    body = envelope.open_envelope(job_signed, kind=JOB_KIND, keys=officers)
    job = ProductionJob.from_obj(body)
    return verify_job(
        job_signed,
        officers=officers,
        programmer=programmer,
        now=job.not_before,
    ).job
