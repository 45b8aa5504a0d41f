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
from securethread.formats import envelope
from securethread.keys.ecutil import fingerprint
from securethread.keys.protocol import PrivateKey
from securethread.pki.profile import DeviceProfile

JOB_KIND = "job"
JOB_VERSION = 3  # 3: the vendor CAs the job accepts (``vendors``); the device profile's
# URI, revocation sources and OEM arc (pki.DeviceProfile, issue 19)
MAX_JOB_SIZE = 1 << 20
MAX_TARGET_ENTRIES = 10_000
MAX_QUOTA = 1 << 40
MAX_VENDORS = 64
#: Job ids, device ids (64-bit chip UIDs in lowercase hex) and names (device class, image id).
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_ID_RE = re.compile(r"[0-9a-f]{16}")
NAME_RE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
_JOB_ID, _DEVICE_ID, _NAME = JOB_ID_RE, DEVICE_ID_RE, NAME_RE


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


def _sorted_hashes(values: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(sorted(values))


def _sorted_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((r[0], r[1]) for r in ranges))


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int in Python, not in the job's schema


@attrs.frozen
class Targets:
    """Which devices a job may provision: inclusive UID ranges plus explicit identifiers.

    Ranges are kept sorted, so one set of targets has one encoding (S6)."""

    ranges: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=_sorted_ranges)
    explicit: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        if not self.ranges and not self.explicit:
            raise FormatError("job targets no device")
        if len(self.ranges) + len(self.explicit) > MAX_TARGET_ENTRIES:
            raise FormatError(f"job targets exceed {MAX_TARGET_ENTRIES} entries")
        for first, last in self.ranges:
            if not (_is_int(first) and _is_int(last) and 0 <= first <= last < 1 << 64):
                raise FormatError(f"bad target range {first!r}..{last!r}")
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
        if parsed != sorted(set(parsed)):
            raise FormatError("job targets: ranges not sorted and unique")
        if not all(type(d) is str for d in explicit) or explicit != sorted(set(explicit)):
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
    #: The device certificate profile: subject fields and the devices' notAfter (docs/pki.md).
    certificate: DeviceProfile
    #: SHA-256 of the job's production-CA certificate (DER): binds the CA to this job.
    production_ca: bytes
    programmer: bytes  # SHA-256 fingerprint of the programmer enclave identity certificate
    #: The silicon-vendor CAs whose chips the job accepts: SHA-256 of each CA's DER
    #: SubjectPublicKeyInfo (:func:`securethread.keys.ecutil.fingerprint`), sorted (S6).
    vendors: tuple[bytes, ...] = attrs.field(converter=_sorted_hashes)
    threshold: int = 1
    version: int = JOB_VERSION

    def __attrs_post_init__(self) -> None:
        # Exact types (S6): a bool is not an int here, bytearray is not bytes.
        for name in ("version", "not_before", "not_after", "threshold"):
            if not _is_int(getattr(self, name)):
                raise FormatError(f"job: {name} must be an integer")
        if not isinstance(self.targets, Targets):
            raise FormatError("job: targets must be a Targets")
        if self.version != JOB_VERSION:
            raise FormatError(f"unsupported job version {self.version}")
        if type(self.quota) is not int or not 1 <= self.quota <= MAX_QUOTA:
            raise JobError(f"job quota must be between 1 and {MAX_QUOTA}, got {self.quota!r}")
        if not 0 <= self.not_before < self.not_after < 1 << 63:
            raise JobError("job validity window is empty or out of range")
        if any(
            type(v) is not bytes or len(v) != 32
            for v in (self.manifest_sha256, self.programmer, self.production_ca)
        ):
            raise FormatError(
                "job: manifest hash, production-CA hash and programmer fingerprint are 32 bytes"
            )
        if not isinstance(self.certificate, DeviceProfile):
            raise FormatError("job: certificate must be a DeviceProfile")
        _check_vendors(self.vendors)
        if not 1 <= self.threshold <= 16:
            raise JobError("job threshold must be between 1 and 16")

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
            "certificate": self.certificate.to_map(),
            "production_ca": self.production_ca,
            "programmer": self.programmer,
            "vendors": list(self.vendors),
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
            "certificate",
            "production_ca",
            "programmer",
            "vendors",
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
                certificate=DeviceProfile.from_map(obj["certificate"]),
                production_ca=obj["production_ca"],
                programmer=obj["programmer"],
                vendors=_vendors_from_obj(obj["vendors"]),
                threshold=obj["threshold"],
            )
        except TypeError as exc:
            raise FormatError(f"job: field of the wrong type ({exc})") from None


def _check_vendors(vendors: tuple[bytes, ...]) -> None:
    """At least one vendor CA, at most :data:`MAX_VENDORS`, each a distinct 32-byte hash."""
    if not 1 <= len(vendors) <= MAX_VENDORS:
        raise FormatError(f"job: names {len(vendors)} vendor CAs, must name 1..{MAX_VENDORS}")
    if any(type(v) is not bytes or len(v) != 32 for v in vendors):
        raise FormatError("job: a vendor CA is named by the 32-byte SHA-256 of its key")
    if len(set(vendors)) != len(vendors):
        raise FormatError("job: a vendor CA is named twice")


def _vendors_from_obj(obj: Any) -> tuple[bytes, ...]:
    """The signed list as it is: sorted and unique already (one encoding per job, S6)."""
    if not isinstance(obj, list) or not all(type(v) is bytes for v in obj):
        raise FormatError("job: vendors must be a list of byte strings")
    if obj != sorted(set(obj)):
        raise FormatError("job: vendors not sorted and unique")
    return tuple(obj)


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
