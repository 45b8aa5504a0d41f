"""Reconciliation (flow 9): the OEM checks a ledger the programmer returned.

The OEM reconciles against *its own* records -- the signed job it issued, its root, the
programmer's identity certificate it certified, the job's production CA certificate it
issued, the manifest the job names -- never against what the returned export carries.
Checks, each of which either runs or fails (none is skipped), in one streaming pass:

* the issued job verifies under the officers at the OEM's M-of-N floor, and the export
  carries the same job (same identity, :func:`~securethread.formats.job.job_hash`);
* the programmer identity certificate is the one the job names (fingerprint) and
  validates under the OEM root; the ledger-signing certificate validates under the OEM
  root with the ledger-signing purpose and names the same programmer enclave;
* the production CA certificate is bound to the job (its job id; its validity inside the
  job's window) and validates under the root (at every record's time);
* the manifest is the one the job names (its SHA-256);
* chain, checkpoints and close record (:class:`~securethread.formats.ledger.LedgerReader`):
  no record is acted on before the checkpoint covering it verified, and a ledger cut
  anywhere or whose close record says otherwise is refused; the close record's quota is
  the job's;
* per provisioned record: time inside the job window, slot < quota, count <= quota,
  device id inside the job's targets, no device twice, the chip's vendor CA
  (``vendor_ca``, what the appliance proved at identification) one the job names, the
  certificate names the record's device id, no chip key certified twice, serial unique
  and encoding this job and the record's slot, certificate chains root -> this production
  CA -> device (its signature: see "The production CA's signature" below);
* per programmed record: follows the provisioned record of the same device and slot,
  once, and its boot confirmation verifies under that device's certified key and reports
  this device and the job's image (:mod:`securethread.formats.boot`).

Any failure raises a :class:`ReconciliationError` (a
:class:`~securethread.errors.LedgerError`) naming the first bad record where there is one.

The production CA's signature.  The first device certificate of the job is validated in
full (RFC 5280 path validation: its signature under the production CA included), and so is
every certificate that is not byte for byte that one but for its own serial, device id,
key and key identifier (:mod:`securethread.pki.fastcheck`): the issuer's name and key
identifier, the profile, every extension are then this job's.  What is left of such a
certificate is its signature value, and by default (:attr:`CertificateSignatures.COVERED`)
reconciliation does not verify it again: the record carrying the certificate is hash-chained
into checkpoints signed by the ledger key, verified before the record is acted on, so every
byte of it is what the appliance recorded; the appliance's token holds the production-CA key
beside the ledger key, so whoever can put a certificate in the ledger can also give it a
valid signature -- a signature that does not verify would be a fault of that token, never
an attack, and relying parties refuse such a certificate (fail closed).  That saves one
ECDSA verification per device (~64 us: half of reconciliation's cryptography).
:attr:`CertificateSignatures.VERIFIED` verifies every one as well (to detect a faulty
token); a boot confirmation is the device's own signature and is always verified.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from securethread.errors import Error, LedgerError
from securethread.formats import envelope, ledger
from securethread.formats.image import MANIFEST_KIND, Manifest
from securethread.formats.job import ProductionJob, VerifiedJob, job_hash, verify_job_signatures
from securethread.formats.reconcile_pool import JobContext, Verifications
from securethread.formats.seen import SeenDevices
from securethread.pki import (
    DeviceChainValidator,
    EnclavePurpose,
    cert_fingerprint,
    device_id_of,
    job_id_of,
    job_tag,
    parse_device_serial,
    untrusted,
    validate_enclave_certificate,
)
from securethread.pki.fastcheck import DeviceTemplate, Matched
from securethread.pki.serial import serial_from_tag

PROGRAMMER_ROLE = "programmer"


class ReconciliationError(LedgerError):
    """A returned ledger does not reconcile with the OEM's own records."""


class CertificateSignatures(enum.Enum):
    """How the production CA's signature of a device certificate that matched the job's
    template is checked (module docstring, "The production CA's signature")."""

    #: covered by the ledger's signed checkpoints (the first certificate and every other
    #: that does not match the template are verified)
    COVERED = "covered"
    #: verified (ECDSA) for every device as well: detects a token that signed wrongly
    VERIFIED = "verified"


class WrongJobError(ReconciliationError):
    """The export carries another job than the one the OEM issued."""


class LedgerSignerError(ReconciliationError):
    """The ledger-signing certificate is not the OEM-certified ledger key of the programmer
    enclave the job names (or the programmer certificate is not the one the job names)."""


class ProductionCAError(ReconciliationError):
    """The production CA certificate is not the one bound to this job."""


@attrs.frozen
class ReconciliationReport:
    job_id: str
    job_sha256: str
    programmer: str
    quota: int
    quota_used: int
    records: int
    provisioned: int
    programmed: int
    checkpoints: int
    first_time: int | None
    last_time: int | None
    closed_at: int

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self) | {"reconciled": True}, sort_keys=True)

    def human(self) -> str:
        return (
            f"job {self.job_id} ({self.job_sha256[:16]}): closed ledger of {self.records} "
            f"records from programmer {self.programmer} verified "
            f"({self.checkpoints} signed checkpoints)\n"
            f"  provisioned {self.provisioned} of quota {self.quota} "
            f"({self.quota_used} slots counted); programmed {self.programmed}, every boot "
            "confirmation verified\n"
            "  every device in the job's targets, once, one key each, from a vendor CA the\n"
            "  job names; every certificate chains to the OEM root through the job's\n"
            "  production CA"
        )


def reconcile(
    issued_job: bytes,
    export_job: bytes,
    items: Iterable[tuple[str, bytes]],
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    min_threshold: int,
    root_cert: x509.Certificate,
    programmer_cert: x509.Certificate,
    ledger_cert: x509.Certificate,
    production_ca_cert: x509.Certificate,
    manifest: bytes | None,
    at: datetime.datetime | None = None,
    workers: int | None = None,
    certificate_signatures: CertificateSignatures = CertificateSignatures.COVERED,
) -> ReconciliationReport:
    """Verify a returned ledger against the job the OEM issued; raise naming the first
    bad record.

    ``issued_job`` is the signed job from the OEM's own records; ``export_job`` and
    ``items`` are what :func:`ledger.read_export` returned.  ``officers``/``min_threshold``
    are the OEM's officer keys and M-of-N floor; ``programmer_cert`` the identity
    certificate the OEM issued to the programmer enclave the job names; ``ledger_cert`` the
    ledger-signing certificate (from the OEM's records or the programmer: it is validated
    here); ``production_ca_cert`` the job's production CA the OEM certified; ``manifest``
    the signed manifest the job names (None for a "provision" job, which names none: its
    ledger holds provisioned records without a license and no programmed record).  Enclave
    certificates are validated at ``at`` (default: now), device certificates at each
    record's time.  ``workers``: processes for the signature verifications of a large
    ledger (default: one per CPU;
    :mod:`securethread.formats.reconcile_pool`), the same answer as one process.
    ``certificate_signatures``: see :class:`CertificateSignatures`.
    """
    verified = verify_returned_job(
        issued_job, export_job, officers=officers, min_threshold=min_threshold
    )
    enclave, ledger_key = job_ledger_signer(
        verified.job, root_cert, programmer_cert, ledger_cert, at=at
    )
    _check_production_ca(verified.job, production_ca_cert)
    image = _job_manifest(verified.job, manifest)
    reader = ledger.LedgerReader(job=verified.sha256, ledger_key=ledger_key)
    with _RecordChecks(
        verified, root_cert, production_ca_cert, image, workers, certificate_signatures
    ) as check:
        try:
            for rec in reader.records(items):
                check.record(rec)
        except Error as exc:
            check.verifications.before(exc)  # a failure of an earlier record comes first
            raise
        check.verifications.finish()
    close = closed_at_quota(reader, verified.job)
    return ReconciliationReport(
        job_id=verified.job.job_id,
        job_sha256=verified.sha256.hex(),
        programmer=enclave,
        quota=verified.job.quota,
        quota_used=close.quota_used,
        records=reader.count,
        provisioned=reader.provisioned,
        programmed=reader.programmed,
        checkpoints=reader.checkpoints,
        first_time=check.first_time,
        last_time=check.last_time,
        closed_at=close.time,
    )


def reconcile_export(
    src: BinaryIO,
    *,
    issued_job: bytes,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    min_threshold: int,
    root_cert: x509.Certificate,
    programmer_cert: x509.Certificate,
    ledger_cert: x509.Certificate,
    production_ca_cert: x509.Certificate,
    manifest: bytes | None,
    at: datetime.datetime | None = None,
    workers: int | None = None,
    certificate_signatures: CertificateSignatures = CertificateSignatures.COVERED,
) -> ReconciliationReport:
    """:func:`reconcile` a ledger export read (streamed) from ``src``."""
    export_job, items = ledger.read_export(src)
    return reconcile(
        issued_job,
        export_job,
        items,
        officers=officers,
        min_threshold=min_threshold,
        root_cert=root_cert,
        programmer_cert=programmer_cert,
        ledger_cert=ledger_cert,
        production_ca_cert=production_ca_cert,
        manifest=manifest,
        at=at,
        workers=workers,
        certificate_signatures=certificate_signatures,
    )


# --- what is checked before the first record and after the last -------------------------------
# (shared with joint reconciliation, securethread.formats.joint.reconcile_program)


def verify_returned_job(
    issued_job: bytes,
    export_job: bytes,
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    min_threshold: int,
) -> VerifiedJob:
    """The job the OEM issued (``issued_job``, from its own records) verified under its
    officers at the M-of-N floor, once the ledger export's job is that same job (its
    identity, :func:`~securethread.formats.job.job_hash`); else :class:`WrongJobError`."""
    verified = verify_job_signatures(issued_job, officers=officers, min_threshold=min_threshold)
    try:
        same = hmac.compare_digest(job_hash(export_job), verified.sha256)
    except Error as exc:
        raise WrongJobError(f"the ledger export's job is malformed: {exc}") from None
    if not same:
        raise WrongJobError(
            f"the ledger export carries another job than job {verified.job.job_id} the OEM issued"
        )
    return verified


def closed_at_quota(reader: ledger.LedgerReader, job: ProductionJob) -> ledger.CloseRecord:
    """The close record of a ledger ``reader`` read to its end, once it states the job's
    quota."""
    close = reader.close
    assert close is not None  # LedgerReader.records raises if the ledger is not closed
    if close.quota != job.quota:
        raise ReconciliationError(
            f"ledger close record states a quota of {close.quota}, the job's is {job.quota}"
        )
    return close


def job_ledger_signer(
    job: ProductionJob,
    root: x509.Certificate,
    programmer_cert: x509.Certificate,
    ledger_cert: x509.Certificate,
    *,
    at: datetime.datetime | None,
) -> tuple[str, ec.EllipticCurvePublicKey]:
    """The ledger key, once its certificate is the OEM-certified ledger-signing key of the
    programmer enclave the job names; returns the enclave's name and the key."""
    if not hmac.compare_digest(cert_fingerprint(programmer_cert), job.programmer):
        raise LedgerSignerError(
            f"the programmer certificate given is not the enclave job {job.job_id} names"
        )
    return ledger_signer(root, programmer_cert, ledger_cert, at=at, expected="the job names")


def ledger_signer(
    root: x509.Certificate,
    programmer_cert: x509.Certificate,
    ledger_cert: x509.Certificate,
    *,
    at: datetime.datetime | None = None,
    expected: str = "the programmer expected is",
) -> tuple[str, ec.EllipticCurvePublicKey]:
    """The ledger key, once ``ledger_cert`` is the OEM-certified ledger-signing key *of the
    programmer enclave* ``programmer_cert`` certifies: both validate under ``root`` (identity
    and ledger-signing purposes, programmer role) and name the same enclave.  A ledger key the
    same root certified for another programmer is refused.  Returns the enclave's name and
    the key (reconciliation and ``audit verify-ledger`` both require it)."""
    try:
        validate_enclave_certificate(
            programmer_cert, root, purpose=EnclavePurpose.IDENTITY, role=PROGRAMMER_ROLE, at=at
        )
    except Error as exc:
        raise LedgerSignerError(f"programmer certificate: {exc}") from None
    try:
        validate_enclave_certificate(
            ledger_cert, root, purpose=EnclavePurpose.LEDGER_SIGNING, role=PROGRAMMER_ROLE, at=at
        )
    except Error as exc:
        raise LedgerSignerError(f"ledger-signing certificate not trusted: {exc}") from None
    if ledger_cert.subject != programmer_cert.subject:
        raise LedgerSignerError(
            f"ledger-signing certificate is for {ledger_cert.subject.rfc4514_string()}, "
            f"{expected} {programmer_cert.subject.rfc4514_string()}"
        )
    key = ledger_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # pragma: no cover - profile checked
        raise LedgerSignerError("ledger-signing certificate holds no EC key")
    cn = ledger_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value), key


def _check_production_ca(job: ProductionJob, pca: x509.Certificate) -> None:
    """The production CA is the one certified for this job: the officer-signed job names it
    (the SHA-256 of its certificate), its subject names the job's id and its validity starts
    inside the job's window (certify_production_ca starts it with the job).  Every device
    certificate must moreover carry this job's tag in its serial (checked per record), which
    no production CA of another job can give it."""
    der = pca.public_bytes(serialization.Encoding.DER)
    if not hmac.compare_digest(hashlib.sha256(der).digest(), job.production_ca_sha256()):
        raise ProductionCAError(
            f"the production CA given is not the one job {job.job_id} names (its hash differs)"
        )
    try:
        pca_job = job_id_of(pca)
    except Error as exc:
        raise ProductionCAError(f"production CA certificate names no job: {exc}") from None
    if pca_job != job.job_id:
        raise ProductionCAError(f"production CA is for job {pca_job!r}, not {job.job_id!r}")
    nb = int(pca.not_valid_before_utc.timestamp())
    if not job.not_before <= nb < job.not_after:
        raise ProductionCAError(
            f"production CA validity starts at {nb}, not inside job {job.job_id}'s window "
            f"{job.not_before}..{job.not_after}: not the CA certified for this job"
        )


def _job_manifest(job: ProductionJob, manifest: bytes | None) -> Manifest | None:
    """The manifest the job names (its hash is in the officer-signed job); None for a
    "provision" job, which names none."""
    if (manifest is None) == job.programs:
        want = "the manifest the job names" if job.programs else "no manifest"
        raise ReconciliationError(f"job {job.job_id} is a {job.stage!r} job: give {want}")
    if manifest is None:
        return None
    if not hmac.compare_digest(hashlib.sha256(manifest).digest(), job.image()[1]):
        raise ReconciliationError(f"the manifest given is not the one job {job.job_id} names")
    kind, body, _signers = envelope.peek_body(manifest)  # authenticated by the hash above
    if kind != MANIFEST_KIND:
        raise ReconciliationError(f"job {job.job_id} names a {kind!r}, not a manifest")
    return Manifest.from_body(body)


# --- per record -------------------------------------------------------------------------------


class _RecordChecks:
    """The per-record checks, with the little state they need: what must be remembered per
    device is on disk (:class:`~securethread.formats.seen.SeenDevices`), so memory stays the
    same whatever the job's size."""

    def __init__(
        self,
        verified: VerifiedJob,
        root: x509.Certificate,
        pca: x509.Certificate,
        manifest: Manifest | None,
        workers: int | None = None,
        signatures: CertificateSignatures = CertificateSignatures.COVERED,
    ) -> None:
        self.job = verified.job
        self.verify_signatures = signatures is CertificateSignatures.VERIFIED
        self.root = root
        self.pca = pca
        self.manifest = manifest
        self.identity = verified.sha256
        self.tag = job_tag(verified.sha256)
        self._serial_base = serial_from_tag(self.tag, 0)  # | slot: the slot's serial
        self.vendors = frozenset(verified.job.vendors)
        self.seen = SeenDevices()
        # The signature verifications, in worker processes for a large ledger
        # (reconcile_pool: results and failures in record order, as in one process).
        self.verifications = Verifications(
            JobContext(
                root_der=root.public_bytes(serialization.Encoding.DER),
                pca_der=pca.public_bytes(serialization.Encoding.DER),
                job_id=verified.job.job_id,
                identity=verified.sha256,
                profile=verified.job.certificate,
                manifest=manifest,
            ),
            workers=workers,
        )
        self.provisioned = 0
        self.first_time: int | None = None
        self.last_time: int | None = None
        # One validator (production CA checked against the root once) serves every record
        # whose time gives the same answer as its own (see _validate); another time gets its
        # own validator, as before.
        self._shared: DeviceChainValidator | None = None
        self._shared_t = 0
        # The first device certificate that passed full validation, as a template that
        # later ones of the job are compared with (pki.fastcheck), and its record's time.
        self._template: DeviceTemplate | None = None
        self._template_times = (1.0, 0.0)  # (first, last) record time it answers for
        self._windows = tuple(
            (c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp())
            for c in (root, pca)
        )
        self._validator: DeviceChainValidator | None = None
        self._validator_t: int | None = None

    def __enter__(self) -> _RecordChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.verifications.close()
        self.seen.close()

    def record(self, rec: ledger.LedgerRecord) -> None:
        t = rec.time
        self.first_time = t if self.first_time is None else self.first_time
        self.last_time = t
        if not rec.slot < self.job.quota:
            raise _bad(rec, f"slot {rec.slot} is outside the quota")
        if rec.kind == ledger.KIND_PROVISIONED:
            self._provisioned(rec)
        else:
            self._programmed(rec)

    def _provisioned(self, rec: ledger.LedgerRecord) -> None:
        job, device_id, slot = self.job, rec.device_id, rec.slot
        self.provisioned += 1
        if self.provisioned > job.quota:
            raise _bad(rec, f"quota of {job.quota} exceeded")
        if not job.not_before <= rec.time < job.not_after:
            raise _bad(rec, f"provisioned at {rec.time}, outside the job's window")
        if device_id not in job.targets:
            raise _bad(rec, f"device {device_id} is outside the job's targets")
        if ("license_sha256" in rec.body) != job.programs:  # the record its stage writes
            has = "names no license" if job.programs else "names a license"
            raise _bad(rec, f"the record {has}: job {job.job_id} is a {job.stage!r} job")
        if self.seen.has_device(device_id):
            raise _bad(rec, f"device {device_id} appears twice")
        if rec.vendor_ca not in self.vendors:
            raise _bad(
                rec,
                f"device {device_id} was certified by vendor CA {rec.vendor_ca.hex()[:16]}, "
                f"which job {job.job_id} does not name",
            )
        fast = self._matched(rec)
        try:
            if fast is not None:  # the same checks, on the fields the template located
                point = fast.point
                self._unique(rec, point, fast.serial)
                tpl = self._template
                assert tpl is not None
                if self.verify_signatures:  # else covered by the ledger (module docstring)
                    self.verifications.add(
                        ("cert", rec.index, rec.time, rec.body["cert"], fast.tbs,
                         fast.signature, tpl.hash.name, point)
                    )  # fmt: skip
            else:
                cert = untrusted.load_certificate(rec.body["cert"], what="device certificate")
                if device_id_of(cert) != device_id:
                    raise _bad(
                        rec, f"certificate is for device {device_id_of(cert)}, not {device_id}"
                    )
                key = cert.public_key()
                assert isinstance(key, ec.EllipticCurvePublicKey)  # untrusted: EC keys only
                point = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
                self._unique(rec, point, cert.serial_number)
                self._validate(cert, rec.time)
                if self._template is None:
                    self._learn(cert, device_id, rec.time)
        except LedgerError:
            raise
        except Error as exc:
            raise _bad(rec, str(exc)) from None
        self.seen.add(device_id, slot, point)

    def _unique(self, rec: ledger.LedgerRecord, point: bytes, serial: int) -> None:
        """No chip key twice; the serial unique and encoding this job and the record's slot."""
        if self.seen.has_point(point):
            raise _bad(rec, "chip key already certified for another device")
        if serial == self._serial_base | rec.slot:  # this job's tag, this record's slot
            if self.seen.has_slot(rec.slot):
                raise _bad(rec, f"serial {serial:#x} appears twice")
            return
        parsed = parse_device_serial(serial)
        # Every serial seen encodes this job and its record's slot (checked below), so a
        # serial seen before is this job's tag with a slot seen before.
        if parsed.job_tag == self.tag and self.seen.has_slot(parsed.sequence):
            raise _bad(rec, f"serial {serial:#x} appears twice")
        if parsed.job_tag != self.tag or parsed.sequence != rec.slot:
            raise _bad(rec, f"serial does not encode this job and slot {rec.slot}")

    def _learn(self, cert: x509.Certificate, device_id: str, t: int) -> None:
        """Keep ``cert`` (validated in full at ``t``) as the template, with the times at
        which it gives the answer validation at ``t`` gave: inside every validity period of
        the chain, as ``t`` is (:meth:`_matched`)."""
        tpl = DeviceTemplate.learn(cert, self.pca, device_id=device_id)
        self._template = tpl
        if tpl is not None:
            spans = (*self._windows, (tpl.not_before, tpl.not_after))
            lo, hi = max(nb for nb, _na in spans), min(na for _nb, na in spans)
            self._template_times = (lo, hi) if lo <= t <= hi else (1.0, 0.0)  # else: none

    def _matched(self, rec: ledger.LedgerRecord) -> Matched | None:
        """The record's certificate through the template of the first certificate that
        passed full validation (:mod:`securethread.pki.fastcheck`), when it matches, names
        the record's device and the record's time gives the answer the template's time gave
        (both inside the root's, the production CA's and the template's validity periods);
        None sends it through full validation."""
        tpl = self._template
        if tpl is None:
            return None
        lo, hi = self._template_times
        if not lo <= rec.time <= hi:
            return None
        # the point and the signature: checked in self.verifications when every signature
        # is verified; else the point here, the signature covered by the ledger
        m = tpl.unsigned(rec.body["cert"])
        if m is None or m.device_id != rec.device_id:
            return None
        if not self.verify_signatures:
            try:  # on the curve (SEC 1 §3.2.2)
                ec.EllipticCurvePublicKey.from_encoded_point(tpl.curve, m.point)
            except ValueError:
                return None  # full validation names it
        return m

    def _validate(self, cert: x509.Certificate, t: int) -> None:
        """Validate ``cert`` at time ``t``.  Validation at two times differs only through
        the validity periods of the chain (RFC 5280 §6.1.3 (a)(2)): when ``t`` and the shared
        validator's time both lie inside the root's, the production CA's and this
        certificate's periods, the shared validator gives the answer validation at ``t``
        would; otherwise a validator at ``t`` does."""
        if self._shared is None:
            self._shared, self._shared_t = self._validator_at(t), t
        t0 = self._shared_t
        if t != t0:
            for c in (self.root, self.pca, cert):
                nb = c.not_valid_before_utc.timestamp()
                na = c.not_valid_after_utc.timestamp()
                if not (nb <= t <= na and nb <= t0 <= na):
                    self._validator_at(t).validate(cert)
                    return
        self._shared.validate(cert)

    def _validator_at(self, t: int) -> DeviceChainValidator:
        if self._validator is None or self._validator_t != t:
            self._validator = DeviceChainValidator(
                self.pca,
                self.root,
                at=datetime.datetime.fromtimestamp(t, datetime.UTC),
                job_id=self.job.job_id,
                job_tag=self.identity,
                profile=self.job.certificate,  # each device exactly as the job's profile says
            )
            self._validator_t = t
        return self._validator

    def _programmed(self, rec: ledger.LedgerRecord) -> None:
        device_id = rec.device_id
        if not self.job.programs:
            raise _bad(rec, f"job {self.job.job_id} is a 'provision' job: it programs nothing")
        known = self.seen.provisioned(device_id)
        if known is None or known[0] != rec.slot:
            raise _bad(rec, f"device {device_id} programmed but not provisioned")
        if known[2]:
            raise _bad(rec, f"device {device_id} programmed twice")
        # The device's signature under its certified key (verify_recorded_boot_confirmation),
        # reporting this device and the job's image
        self.verifications.add(("boot", rec.index, rec.body["boot"], known[1], device_id))
        self.seen.mark_programmed(device_id)


def _bad(rec: ledger.LedgerRecord, why: str) -> ReconciliationError:
    return ReconciliationError(f"ledger record {rec.index}: {why}", index=rec.index)
