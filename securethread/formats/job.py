"""Production jobs (flow 6): what the OEM allows one programmer to produce, signed.

A job is a signed envelope of kind ``"job"`` over a canonical CBOR body.  It names the
device class, the device identifiers it may target (inclusive ranges of 64-bit chip UIDs
and/or an explicit list), the quota, a validity window, the image, the certificate
profile and the programmer enclave it is for (the SHA-256 fingerprint of that enclave's
identity certificate).  It may require M-of-N officer signatures: ``threshold`` is inside
the signed body and the programmer also enforces its own configured minimum, so neither
side alone can lower it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, JobError, NotTargetedError
from securethread.formats import envelope
from securethread.keys.ecutil import fingerprint
from securethread.keys.protocol import PrivateKey

JOB_KIND = "job"
JOB_VERSION = 1
MAX_JOB_SIZE = 1 << 20
MAX_TARGET_ENTRIES = 10_000
MAX_QUOTA = 1 << 40
_JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DEVICE_ID = re.compile(r"[0-9a-f]{16}")
_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


def check_device_id(device_id: object) -> str:
    """A device identifier is a 64-bit chip UID written as 16 lowercase hex digits."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise FormatError(f"device id {device_id!r} is not 16 lowercase hex digits")
    return device_id


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise FormatError(f"job id {job_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    return job_id


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise FormatError(f"{what} {value!r} is not a valid name")
    return value


@attrs.frozen
class Targets:
    """Which devices a job may provision: inclusive UID ranges plus explicit identifiers."""

    ranges: tuple[tuple[int, int], ...] = ()
    explicit: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        if not self.ranges and not self.explicit:
            raise FormatError("job targets no device")
        if len(self.ranges) + len(self.explicit) > MAX_TARGET_ENTRIES:
            raise FormatError(f"job targets exceed {MAX_TARGET_ENTRIES} entries")
        for first, last in self.ranges:
            if not (0 <= first <= last < 1 << 64):
                raise FormatError(f"bad target range {first:#x}..{last:#x}")
        for d in self.explicit:
            check_device_id(d)

    def __contains__(self, device_id: str) -> bool:
        if device_id in self.explicit:
            return True
        uid = int(device_id, 16)
        return any(first <= uid <= last for first, last in self.ranges)

    def check(self, device_id: str) -> None:
        if device_id not in self:
            raise NotTargetedError(f"device {device_id} is outside the job's targets")

    def to_obj(self) -> dict[str, Any]:
        return {"ranges": [list(r) for r in self.ranges], "explicit": sorted(self.explicit)}

    @classmethod
    def from_obj(cls, obj: Any) -> Targets:
        if not isinstance(obj, dict) or set(obj) != {"ranges", "explicit"}:
            raise FormatError("job targets: malformed")
        ranges = obj["ranges"]
        explicit = obj["explicit"]
        if not isinstance(ranges, list) or not isinstance(explicit, list):
            raise FormatError("job targets: malformed")
        parsed = []
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
                raise FormatError("job targets: a range is not [first, last]")
            parsed.append((r[0], r[1]))
        if explicit != sorted(set(explicit)):
            raise FormatError("job targets: explicit list not sorted and unique")
        return cls(ranges=tuple(parsed), explicit=frozenset(explicit))


@attrs.frozen(kw_only=True)
class ProductionJob:
    """The body of a signed job; valid once constructed."""

    job_id: str = attrs.field(validator=lambda _i, _a, v: check_job_id(v))
    device_class: str = attrs.field(validator=lambda _i, _a, v: _check_name(v, "device class"))
    targets: Targets
    quota: int
    not_before: int
    not_after: int
    image_id: str = attrs.field(validator=lambda _i, _a, v: _check_name(v, "image id"))
    manifest_sha256: bytes
    certificate_profile: str = "device-p256-v1"
    certificate_days: int = 3650
    programmer: bytes  # SHA-256 fingerprint of the programmer enclave identity certificate
    threshold: int = 1
    version: int = JOB_VERSION

    def __attrs_post_init__(self) -> None:
        if self.version != JOB_VERSION:
            raise FormatError(f"unsupported job version {self.version}")
        if type(self.quota) is not int or not 1 <= self.quota <= MAX_QUOTA:
            raise JobError(f"job quota must be between 1 and {MAX_QUOTA}, got {self.quota!r}")
        if self.not_after <= self.not_before:
            raise JobError("job validity window is empty")
        if len(self.manifest_sha256) != 32 or len(self.programmer) != 32:
            raise FormatError("job: manifest hash and programmer fingerprint are 32 bytes")
        if not 1 <= self.threshold <= 16:
            raise JobError("job threshold must be between 1 and 16")
        if not 1 <= self.certificate_days <= 36500:
            raise JobError("job certificate validity must be 1..36500 days")
        if self.certificate_profile != "device-p256-v1":
            raise JobError(f"unknown certificate profile {self.certificate_profile!r}")

    def to_obj(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "job_id": self.job_id,
            "device_class": self.device_class,
            "targets": self.targets.to_obj(),
            "quota": self.quota,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "image_id": self.image_id,
            "manifest_sha256": self.manifest_sha256,
            "certificate_profile": self.certificate_profile,
            "certificate_days": self.certificate_days,
            "programmer": self.programmer,
            "threshold": self.threshold,
        }

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> ProductionJob:
        expected = {
            "v",
            "job_id",
            "device_class",
            "targets",
            "quota",
            "not_before",
            "not_after",
            "image_id",
            "manifest_sha256",
            "certificate_profile",
            "certificate_days",
            "programmer",
            "threshold",
        }
        if set(obj) != expected:
            raise FormatError(f"job: fields {sorted(set(obj) ^ expected)} missing or unexpected")
        try:
            return cls(
                version=obj["v"],
                job_id=obj["job_id"],
                device_class=obj["device_class"],
                targets=Targets.from_obj(obj["targets"]),
                quota=obj["quota"],
                not_before=obj["not_before"],
                not_after=obj["not_after"],
                image_id=obj["image_id"],
                manifest_sha256=obj["manifest_sha256"],
                certificate_profile=obj["certificate_profile"],
                certificate_days=obj["certificate_days"],
                programmer=obj["programmer"],
                threshold=obj["threshold"],
            )
        except TypeError as exc:
            raise FormatError(f"job: field of the wrong type ({exc})") from None


def sign_job(job: ProductionJob, officers: Sequence[PrivateKey]) -> bytes:
    """Seal ``job`` with the first officers' job-signing keys (M-of-N: pass M keys, or
    collect further signatures with :func:`cosign_job`)."""
    return envelope.seal(JOB_KIND, job.to_obj(), officers)


def cosign_job(signed: bytes, officer: PrivateKey) -> bytes:
    return envelope.add_signature(signed, JOB_KIND, officer)


def job_hash(signed: bytes) -> bytes:
    """SHA-256 of the signed job as issued: the job's identity in the ledger."""
    return hashlib.sha256(signed).digest()


@attrs.frozen
class VerifiedJob:
    """A job whose signatures, programmer binding and validity were checked."""

    job: ProductionJob
    signed: bytes
    sha256: bytes


def verify_job(
    signed: bytes,
    *,
    officers: Mapping[bytes, ec.EllipticCurvePublicKey] | Iterable[ec.EllipticCurvePublicKey],
    programmer: bytes,
    min_threshold: int = 1,
    now: int | None = None,
) -> VerifiedJob:
    """Verify a signed job for this programmer; raise :class:`JobError` (or a
    :class:`~securethread.errors.SignatureError`/:class:`FormatError`) saying why not.

    ``officers`` are the OEM job-signing keys the programmer trusts; ``programmer`` is the
    fingerprint of this programmer's identity certificate.
    """
    if not isinstance(officers, Mapping):
        officers = {fingerprint(k): k for k in officers}
    body = envelope.open_envelope(
        signed, kind=JOB_KIND, keys=officers, threshold=min_threshold, max_size=MAX_JOB_SIZE
    )
    job = ProductionJob.from_obj(body)
    if job.threshold > min_threshold:
        # The job asks for more approvals than our floor: verify again at its threshold.
        envelope.open_envelope(
            signed, kind=JOB_KIND, keys=officers, threshold=job.threshold, max_size=MAX_JOB_SIZE
        )
    if job.programmer != programmer:
        raise JobError(f"job {job.job_id} is for another programmer enclave")
    check_job_window(job, now)
    return VerifiedJob(job=job, signed=signed, sha256=job_hash(signed))


def check_job_window(job: ProductionJob, now: int | None = None) -> None:
    t = int(time.time()) if now is None else now
    if t < job.not_before:
        raise JobError(f"job {job.job_id} is not valid yet")
    if t >= job.not_after:
        raise JobError(f"job {job.job_id} expired")
