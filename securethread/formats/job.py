"""Production jobs (flow 6): what the OEM allows one programmer to produce, signed.

A job is a signed envelope of kind ``"job"`` over a canonical CBOR body.  It names the
device class, the device identifiers it may target (inclusive ranges of 64-bit chip UIDs
and/or an explicit list), the quota, a validity window, the image, the certificate
profile and the programmer enclave it is for (the SHA-256 fingerprint of that enclave's
identity certificate), and the silicon vendors whose chips it accepts (``vendors``: the
SHA-256 of each vendor CA's SubjectPublicKeyInfo, so the operator never chooses which fab
the line trusts).  It may require M-of-N officer signatures: ``threshold`` is inside
the signed body and the verifier also applies its own floor (a required argument of
:func:`verify_job`), so neither side alone can lower it.

Identity (invariant S6): a job is identified by :func:`job_hash`, the SHA-256 of the exact
bytes the officers sign (the envelope's signed body), never by the envelope's bytes.  Every
framing of one signed body -- other co-signers, a fresh signature by the same officers --
is the same job: one quota, one ledger, one serial space.  Envelopes are opened strictly
(:mod:`securethread.formats.envelope`), so a framing an outsider could vary is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, JobError, NotTargetedError, SignatureError
from securethread.formats import envelope, fields
from securethread.keys.ecutil import fingerprint
from securethread.keys.protocol import PrivateKey
from securethread.pki.profile import DeviceProfile

JOB_KIND = "job"
JOB_VERSION = 4  # 4: COSE_Sign framing, cbor2 (issue 21); 3: the vendor CAs the job accepts
# (``vendors``); the device profile's URI, revocation sources and OEM arc (issue 19)
MAX_JOB_SIZE = 1 << 20
MAX_TARGET_ENTRIES = 10_000
MAX_QUOTA = 1 << 40
MAX_VENDORS = 64
MAX_PROVISIONED_BY = 64
#: The job stages (:attr:`ProductionJob.stage`, docs/formats.md "Job stages").
STAGE_FULL, STAGE_PROVISION, STAGE_PROGRAM = "full", "provision", "program"
STAGES = (STAGE_FULL, STAGE_PROVISION, STAGE_PROGRAM)
STAGE_RE = re.compile("|".join(STAGES))
#: Job ids, device ids (64-bit chip UIDs in lowercase hex) and names (device class, image id).
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_ID_RE = re.compile(r"[0-9a-f]{16}")
NAME_RE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


def check_device_id(device_id: object) -> str:
    """A device identifier is a 64-bit chip UID written as 16 lowercase hex digits."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise FormatError(f"device id {device_id!r} is not 16 lowercase hex digits")
    return device_id


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise FormatError(f"job id {job_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    return job_id


_UID = fields.int_rule()  # a 64-bit chip UID as an integer


@fields.body("job targets")
@attrs.frozen
class Targets:
    """Which devices a job may provision: inclusive UID ranges plus explicit identifiers.

    Ranges are kept sorted, so one set of targets has one encoding (S6); on the wire both
    lists must already be sorted and unique."""

    ranges: tuple[tuple[int, int], ...] = fields.list_of(
        "ranges", fields.tuple_rule(_UID, _UID), max_len=MAX_TARGET_ENTRIES,
        order=fields.Order.SORTED, sort=True, default=(),
    )  # fmt: skip
    explicit: frozenset[str] = fields.set_of(
        "explicit", fields.text_rule(min_len=16, max_len=16, pattern=DEVICE_ID_RE.pattern),
        max_len=MAX_TARGET_ENTRIES, default=frozenset(),
    )  # fmt: skip

    def __attrs_post_init__(self) -> None:
        if not self.ranges and not self.explicit:
            raise FormatError("job targets no device")
        if len(self.ranges) + len(self.explicit) > MAX_TARGET_ENTRIES:
            raise FormatError(f"job targets exceed {MAX_TARGET_ENTRIES} entries")
        for first, last in self.ranges:
            if first > last:
                raise FormatError(f"bad target range {first!r}..{last!r}")

    def __contains__(self, device_id: str) -> bool:
        if device_id in self.explicit:
            return True
        uid = int(device_id, 16)
        return any(first <= uid <= last for first, last in self.ranges)

    def check(self, device_id: str) -> None:
        if device_id not in self:
            raise NotTargetedError(f"device {device_id} is outside the job's targets")

    def to_obj(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_obj(cls, obj: Any) -> Targets:
        return fields.decode(cls, obj)


@attrs.frozen
class _Profile(fields.Rule):
    """The device certificate profile: its own strict map (pki.DeviceProfile)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, DeviceProfile) else "must be a DeviceProfile"

    def to_cbor(self, value: Any) -> Any:
        return value.to_map()

    def from_cbor(self, raw: Any) -> Any:
        return DeviceProfile.from_map(raw)


_HASH = fields.bytes_rule(size=32)


@fields.body("job")
@attrs.frozen(kw_only=True)
class ProductionJob:
    """The body of a signed job; valid once constructed."""

    job_id: str = fields.text("job_id", max_len=64, pattern=JOB_ID_RE)
    device_class: str = fields.text("device_class", max_len=64, pattern=NAME_RE)
    targets: Targets = fields.nested("targets", Targets)
    quota: int = fields.integer("quota", lo=-(1 << 64))  # 1..MAX_QUOTA: a JobError below
    not_before: int = fields.integer("not_before")
    not_after: int = fields.integer("not_after")
    #: Where the job sits in production: ``"full"`` (identify, certify, license, program on
    #: one appliance), ``"provision"`` (the silicon vendor's fab: identify against a vendor
    #: CA, certify, burn provisioning data; no image, no license) or ``"program"`` (the
    #: programming centre: chips provisioned under the jobs ``provisioned_by`` names).
    stage: str = fields.text("stage", max_len=16, pattern=STAGE_RE, default=STAGE_FULL)
    #: The image and its signed manifest: absent (the keys left out) iff stage "provision".
    image_id: str | None = fields.text(
        "image_id", max_len=64, pattern=NAME_RE, absent=fields.Absent.OMIT
    )
    manifest_sha256: bytes | None = fields.byte_string(
        "manifest_sha256", size=32, absent=fields.Absent.OMIT
    )
    #: The device certificate profile: subject fields and the devices' notAfter (docs/pki.md).
    certificate: DeviceProfile = fields.custom("certificate", _Profile())
    #: SHA-256 of the job's production-CA certificate (DER): binds the CA to this job.
    #: Absent (the key left out) iff stage "program": that appliance issues no certificate.
    production_ca: bytes | None = fields.byte_string(
        "production_ca", size=32, absent=fields.Absent.OMIT
    )
    #: SHA-256 fingerprint of the programmer enclave identity certificate.
    programmer: bytes = fields.byte_string("programmer", size=32)
    #: The silicon-vendor CAs whose chips the job accepts: SHA-256 of each CA's DER
    #: SubjectPublicKeyInfo (:func:`securethread.keys.ecutil.fingerprint`), sorted (S6).
    #: Non-empty for stages "full" and "provision"; empty for "program", whose chips are
    #: identified by their OEM device certificate (the fab checked the vendor chain).
    vendors: tuple[bytes, ...] = fields.list_of(
        "vendors", _HASH, max_len=MAX_VENDORS, order=fields.Order.SORTED, sort=True
    )
    #: Stage "program" only (else empty): SHA-256 of the DER production-CA certificates of
    #: the provisioning jobs whose devices this job accepts, sorted (S6).
    provisioned_by: tuple[bytes, ...] = fields.list_of(
        "provisioned_by", _HASH, max_len=MAX_PROVISIONED_BY, order=fields.Order.SORTED,
        sort=True, default=(),
    )  # fmt: skip
    threshold: int = fields.integer("threshold", default=1)  # 1..16: checked below
    version: int = fields.version(JOB_VERSION)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.quota <= MAX_QUOTA:
            raise JobError(f"job quota must be between 1 and {MAX_QUOTA}, got {self.quota!r}")
        if not 0 <= self.not_before < self.not_after < 1 << 63:
            raise JobError("job validity window is empty or out of range")
        if not 1 <= self.threshold <= 16:
            raise JobError("job threshold must be between 1 and 16")
        self._check_stage()

    def _check_stage(self) -> None:
        """The fields each stage needs, and only those (docs/formats.md, "Job stages")."""
        stage = self.stage
        provision, program = stage == STAGE_PROVISION, stage == STAGE_PROGRAM
        if (self.image_id is None, self.manifest_sha256 is None) != (provision, provision):
            want = "carry no" if provision else "name both"
            raise JobError(f"job {self.job_id}: a {stage!r} job must {want} image_id and "
                           "manifest_sha256")  # fmt: skip
        if (self.production_ca is None) != program:
            want = "name no" if program else "name its"
            raise JobError(f"job {self.job_id}: a {stage!r} job must {want} production_ca")
        if bool(self.provisioned_by) != program:
            want = "non-empty" if program else "empty"
            raise JobError(f"job {self.job_id}: provisioned_by must be {want} for a {stage!r} job")
        if bool(self.vendors) == program:
            want = "no vendor CA (its chips show OEM device certificates)" if program else (
                "at least one vendor CA"
            )  # fmt: skip
            raise JobError(f"job {self.job_id}: a {stage!r} job must name {want}")

    @property
    def provisions(self) -> bool:
        """The job's line identifies chips against a vendor CA and issues device
        certificates (stages "full" and "provision")."""
        return self.stage != STAGE_PROGRAM

    @property
    def programs(self) -> bool:
        """The job's line licenses and writes the image (stages "full" and "program")."""
        return self.stage != STAGE_PROVISION

    def image(self) -> tuple[str, bytes]:
        """``(image_id, manifest_sha256)`` of a job that programs; a :class:`JobError` for
        a "provision" job, which names no image (for the steps that need one)."""
        if self.image_id is None or self.manifest_sha256 is None:
            raise JobError(f"job {self.job_id} is a {self.stage!r} job: it names no image")
        return self.image_id, self.manifest_sha256

    def production_ca_sha256(self) -> bytes:
        """The production-CA hash of a job that issues device certificates; a
        :class:`JobError` for a "program" job, which has no production CA."""
        if self.production_ca is None:
            raise JobError(f"job {self.job_id} is a {self.stage!r} job: it has no production CA")
        return self.production_ca

    def to_obj(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> ProductionJob:
        return fields.decode(cls, obj)


def sign_job(job: ProductionJob, officers: Sequence[PrivateKey]) -> bytes:
    """Seal ``job`` with the first officers' job-signing keys (M-of-N: pass M keys, or
    collect further signatures with :func:`cosign_job`)."""
    return envelope.seal(JOB_KIND, job.to_obj(), officers)


def cosign_job(signed: bytes, officer: PrivateKey) -> bytes:
    return envelope.add_signature(signed, JOB_KIND, officer)


def job_hash(signed: bytes) -> bytes:
    """The job's identity: SHA-256 of the bytes its officers sign (S6).

    The same for every valid framing of one signed body, so re-framing a job never opens a
    second quota.  Nothing is verified here: use :func:`verify_job` before acting on a job.
    """
    return envelope.content_id(signed, kind=JOB_KIND, max_size=MAX_JOB_SIZE)


@attrs.frozen
class VerifiedJob:
    """A job whose signatures, threshold, programmer binding and validity were checked.

    ``sha256`` is the job identity (:func:`job_hash`); ``signed`` is the framing that was
    verified; ``signers`` the fingerprints of the officers who signed it."""

    job: ProductionJob
    signed: bytes
    sha256: bytes
    signers: tuple[bytes, ...] = ()


def verify_job_signatures(
    signed: bytes,
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    min_threshold: int,
) -> VerifiedJob:
    """Verify a job's officer signatures at ``max(min_threshold, job.threshold)``, at any
    time and for any programmer (the OEM re-reading a job it issued, reconciliation)."""
    if type(min_threshold) is not int or min_threshold < 1:
        raise ValueError("min_threshold (the verifier's M-of-N floor) must be an int >= 1")
    if not isinstance(officers, Mapping):
        officers = {fingerprint(k): k for k in officers}
    opened = envelope.open_signed(
        signed, kind=JOB_KIND, keys=officers, threshold=min_threshold, max_size=MAX_JOB_SIZE
    )
    job = ProductionJob.from_obj(opened.body)
    if len(opened.signers) < job.threshold:
        raise SignatureError(
            f"job {job.job_id}: {len(opened.signers)} officer signature(s), "
            f"the job requires {job.threshold}"
        )
    return VerifiedJob(job=job, signed=signed, sha256=opened.content_id, signers=opened.signers)


def verify_job(
    signed: bytes,
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    programmer: bytes,
    min_threshold: int,
    now: int | None = None,
) -> VerifiedJob:
    """Verify a signed job for this programmer; raise :class:`JobError` (or a
    :class:`~securethread.errors.SignatureError`/:class:`FormatError`) saying why not.

    ``officers`` are the OEM job-signing keys the programmer trusts; every signature on the
    job must be by one of them.  ``min_threshold`` is the verifier's own M-of-N floor (no
    default: a job signed by fewer officers is refused whatever its own ``threshold``
    says).  ``programmer`` is the fingerprint of this programmer's identity certificate.
    """
    verified = verify_job_signatures(signed, officers=officers, min_threshold=min_threshold)
    if verified.job.programmer != programmer:
        raise JobError(f"job {verified.job.job_id} is for another programmer enclave")
    check_job_window(verified.job, now)
    return verified


def check_job_window(job: ProductionJob, now: int | None = None) -> None:
    t = int(time.time()) if now is None else now
    if t < job.not_before:
        raise JobError(f"job {job.job_id} is not valid yet")
    if t >= job.not_after:
        raise JobError(f"job {job.job_id} expired")
