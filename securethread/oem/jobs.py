"""Flow 6 at the OEM: a production job is prepared by the OEM, approved by M officers -- each
in their own process, with their own token and PIN -- and then issued (docs/cli.md).

1. ``oem issue-job SPEC --ca-request FILE`` (:func:`prepare_job`, with the OEM token) checks
   that what the job names exists here (the programmer is certified and has received the
   image key, the image is mastered, the job id was never used), verifies the request under
   the programmer's certified identity key, certifies the production CA for this job under
   the root, signs the device-trust statement (it names the job's hash, the SHA-256 of what
   the officers will sign) and writes the unsigned job body, ``jobs/<id>/draft.bin``, last.
2. ``oem approve-job --job ID --officer N`` (:func:`approve_job`, officer N's token only)
   checks that the draft is the one the OEM prepared (the root-signed device-trust statement
   names its hash) and that every earlier approval is of this same draft, logs in to officer
   N's token with officer N's PIN -- never the OEM's ``pins`` -- and writes the draft sealed
   with officer N's key alone, ``jobs/<id>/approvals/officer-N.bin``.  Once per officer.
3. ``oem issue-job --job ID`` (:func:`issue_job`, the OEM token, no officer PIN) joins the
   approvals of at least the job's threshold of officers into the signed job (canonical
   order, S6), verifies it under the root-signed officer bundle, keeps it (``job.bin``:
   reconciliation checks the returned ledger against *this* job, never the copy the ledger
   carries) and writes the job package (with the vendor CA certificates the job names by
   their keys' hashes) and the encrypted image to the outbox.

No process holds two officers' PINs and the OEM's PIN file holds none, so M-of-N needs M
people.  :func:`securethread.formats.job.sign_job` with several keys stays the library's
one-process path (unit tests).
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import os
import sys
from collections.abc import Callable

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    ConfigurationError,
    Error,
    JobError,
    PinMissingError,
    VerificationError,
)
from securethread.formats import cbor, envelope
from securethread.formats.device_trust import (
    DeviceTrust,
    sign_device_trust,
    verify_device_trust,
)
from securethread.formats.identity import vendor_ca_id
from securethread.formats.job import (
    JOB_KIND,
    MAX_JOB_SIZE,
    STAGE_PROGRAM,
    STAGE_PROVISION,
    ProductionJob,
    job_hash,
    sign_job,
    verify_job_signatures,
)
from securethread.formats.jobpackage import JobPackage, ProductionCARequest
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.hsm.pin import env_var_for, env_var_names, harden_process, resolve_pin
from securethread.keys import fingerprint, load_spki
from securethread.keys.protocol import PrivateKey
from securethread.oem import layout as L
from securethread.oem.jobspec import JobSpec, load_job_spec
from securethread.oem.ocsp import make_responder_request
from securethread.oem.ocsp import request_file as ocsp_request_file
from securethread.oem.revoke import revoked_by_root
from securethread.pki import (
    cert_fingerprint,
    certify_production_ca,
    from_pem,
    job_id_of,
    to_der,
    untrusted,
)
from securethread.workdir import (
    PartyDir,
    StepOrderError,
    StepResult,
    copy_atomic,
    read_file,
    to_pem,
)

PinCallback = Callable[[str], str]


# --- 1. prepare ---------------------------------------------------------------------------------


def prepare_job(
    workdir: str | os.PathLike[str],
    spec_path: str | os.PathLike[str],
    *,
    ca_request: str | os.PathLike[str] | None,
) -> StepResult:
    """Prepare the job described by ``spec_path`` for the officers (see the module docstring).

    ``ca_request`` is the programmer's production-CA request; a "program" job has none (it
    certifies nothing: its chips carry the certificates of the provisioning jobs it names).

    Run again with the same spec it changes nothing and shows the draft awaiting approval;
    for a job issued but killed before its package reached the outbox, it writes the package
    from the record (nothing is signed again).  A job id is reused for nothing else.
    """
    work = L.open_oem(workdir)
    spec = load_job_spec(spec_path)
    spec_bytes = read_file(spec_path, "job spec")
    jdir = L.job_dir(spec.job_id)
    if work.exists(f"{jdir}/job.bin"):
        same_spec = work.read(f"{jdir}/spec.toml", "job spec") == spec_bytes
        if same_spec and not work.exists(f"outbox/job-{spec.job_id}.bin"):
            # Issued, then killed before the package reached the outbox: finish that, from
            # what was recorded (the same job, nothing signed again).
            written = _write_package(work, spec.job_id, spec.image)
            return work.finish("oem issue-job", written, (), {"job": spec.job_id})
        raise JobError(f"job id {spec.job_id!r} was already used by this OEM ({jdir} exists)")
    if work.exists(L.job_draft(spec.job_id)):
        if work.read(f"{jdir}/spec.toml", "job spec") != spec_bytes:
            raise JobError(
                f"job id {spec.job_id!r} was already used by this OEM (a draft of another "
                f"spec awaits approval in {jdir})"
            )
        # Prepared already (a second run, or one killed after the draft was written): the
        # draft the officers may be approving stays as it is.
        draft = read_draft(work, spec.job_id)
        return work.finish(
            "oem issue-job", (), (), _draft_details(draft, sorted(approvals(work, draft)))
        )
    pdir = L.programmer_dir(spec.programmer)
    work.require(
        f"{pdir}/identity.pem", step="issue-job", needs=f"certify-programmer ({spec.programmer})"
    )
    image = _job_image(work, spec, pdir)
    provisioning_cas = sorted(
        (_provisioning_ca(work, entry) for entry in spec.provisioned_by), key=cert_fingerprint
    )
    programmer_cert = from_pem(work.read(f"{pdir}/identity.pem", "programmer certificate"))
    csr = _ca_request(spec, programmer_cert, ca_request)
    from securethread.formats.image import verify_manifest

    fw_key = untrusted.load_public_key_pem(
        work.read(L.FIRMWARE_KEY, "firmware-signing key"), what="firmware-signing key"
    )
    manifest = verify_manifest(image[1], key=fw_key) if image is not None else None
    device_class = spec.device_class or (manifest.device_class if manifest else None)
    if device_class is None:  # load_job_spec requires it of a provision job
        raise JobError(f"job {spec.job_id!r} names no device class")
    if manifest is not None and device_class != manifest.device_class:
        raise JobError(
            f"the job's device class {device_class!r} is not the image's "
            f"({manifest.device_class!r})"
        )

    oem = work.open_token(L.TOKEN)
    for ca in provisioning_cas:  # a program job names no CA the root revoked
        if revoked_by_root(oem, ca):
            raise JobError(
                f"provisioned_by: the production CA of job {job_id_of(ca)!r} was revoked by "
                "this OEM's root (oem revoke): its devices are not to be programmed"
            )
    root_key = oem.private_key(L.L_ROOT)
    root = oem.certificate(L.L_ROOT)
    officers = OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), root.public_key())  # type: ignore[arg-type]
    threshold = spec.threshold or officers.threshold
    if not officers.threshold <= threshold <= len(officers.keys):
        raise JobError(
            f"threshold {threshold} is outside {officers.threshold}..{len(officers.keys)} "
            "(the officer bundle's floor .. the number of officers)"
        )
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before, not_after = spec.window(now)
    not_before = max(not_before, root.not_valid_before_utc)
    profile = spec.device_profile(default_organisation=work.name)
    # The production CA lives as long as the devices it certifies (docs/pki.md): the job
    # window limits issuing, enforced by the programmer, not certificate expiry.
    pca = None if csr is None else certify_production_ca(
        root_key,
        root,
        csr,
        job_id=spec.job_id,
        not_before=not_before,
        not_after=profile.not_after,
        organisation=profile.organisation,
        oem_arc=profile.oem_arc,
    )
    job = ProductionJob(
        job_id=spec.job_id,
        device_class=device_class,
        targets=spec.targets,
        quota=spec.quota,
        not_before=int(not_before.timestamp()),
        not_after=int(not_after.timestamp()),
        stage=spec.stage,
        image_id=image[0] if image is not None else None,
        manifest_sha256=hashlib.sha256(image[1]).digest() if image is not None else None,
        programmer=cert_fingerprint(programmer_cert),
        threshold=threshold,
        certificate=profile,
        production_ca=cert_fingerprint(pca) if pca is not None else None,
        vendors=tuple(vendor_ca_id(c) for c in spec.vendors),
        provisioned_by=tuple(cert_fingerprint(c) for c in provisioning_cas),
    )
    body = cbor.encode(job.to_obj())
    sha256 = draft_hash(body)
    # What the chips will trust for this job, signed by the root they have burnt in
    # (docs/device.md): the job (by the hash its officers will sign), its device class, the
    # firmware-signing key, the floor (the image's counter; 0 for a provision job, which
    # names no image).  It also binds the draft to this step: an officer
    # approves only the draft it names.
    trust = sign_device_trust(
        DeviceTrust(
            job_id=spec.job_id,
            job_sha256=sha256,
            device_class=device_class,
            firmware_signing_key=fw_key,
            min_security_counter=manifest.security_counter if manifest is not None else 0,
        ),
        root_key,
    )
    # The job's OCSP responder key, for the production CA to certify at open-job (oem/ocsp.py);
    # a "program" job has no production CA (its devices' CAs have their own responders).
    responder = (
        make_responder_request(oem, root_key, job_id=spec.job_id, job_sha256=sha256)
        if pca is not None
        else None
    )

    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "job-draft",
        certificates=[CertEntry.from_certificate(pca)] if pca is not None else [],
        artefacts={"job": sha256, "device-trust": hashlib.sha256(trust).digest()},
        details={
            "job": spec.job_id,
            "quota": spec.quota,
            "programmer": spec.programmer,
            "threshold": threshold,
        },
    )
    _clear_approvals(work, spec.job_id)  # of an earlier draft that never became the job
    written = [
        work.write(f"{jdir}/spec.toml", spec_bytes),
        *([work.write(f"{jdir}/production-ca.pem", to_pem(pca))] if pca is not None else []),
        work.write(f"{jdir}/device-trust.bin", trust),
        *(work.write(_vendor_file(jdir, c), to_pem(c)) for c in spec.vendors),
        *(work.write(_provisioned_by_file(jdir, c), to_pem(c)) for c in provisioning_cas),
        *([work.write(ocsp_request_file(spec.job_id), responder)] if responder else []),
        work.write(L.job_draft(spec.job_id), body),  # last: a draft is a complete one
    ]
    draft = Draft(
        job=job, body=body, sha256=sha256, officers=officers, programmer=spec.programmer
    )
    return work.finish("oem issue-job", written, [tx], _draft_details(draft))


def _job_image(work: PartyDir, spec: JobSpec, pdir: str) -> tuple[str, bytes] | None:
    """The image a job programs and its signed manifest, once mastered here and its key
    delivered to the programmer; None for a provision job (no image, no image key)."""
    if spec.image is None:
        return None
    idir = L.image_dir(spec.image)
    work.require(f"{idir}/manifest.bin", step="issue-job", needs=f"master-image ({spec.image})")
    if not (
        work.exists(f"{pdir}/keys-{spec.image}.ack")
        or work.exists(f"{pdir}/keys-{spec.image}.receipt")
    ):
        raise ConfigurationError(
            f"issue-job needs the key of image {spec.image!r} delivered to {spec.programmer!r} "
            "first (send-keys, or seal-keys and confirm-keys)"
        )
    return spec.image, work.read(f"{idir}/manifest.bin", "manifest")


def _provisioning_ca(work: PartyDir, entry: str | x509.Certificate) -> x509.Certificate:
    """The production CA of a provisioning job a program job names (by id, or by its
    production-CA certificate): a job this OEM issued, of stage "provision"."""
    if isinstance(entry, str):
        job_id = entry
    else:
        root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
        try:
            entry.verify_directly_issued_by(root)
            job_id = job_id_of(entry)
        except (ValueError, TypeError, InvalidSignature, Error) as exc:
            raise JobError(
                f"provisioned_by: the certificate {entry.subject.rfc4514_string()!r} is not "
                f"a production CA this OEM's root certified ({exc or type(exc).__name__})"
            ) from None
    jdir = L.job_dir(job_id)
    if not work.exists(f"{jdir}/job.bin"):
        raise JobError(f"provisioned_by: this OEM issued no job {job_id!r}")
    named = read_draft(work, job_id).job
    if named.stage != STAGE_PROVISION:
        raise JobError(
            f"provisioned_by: job {job_id!r} is a {named.stage!r} job, not a provisioning job"
        )
    pca = from_pem(work.read(f"{jdir}/production-ca.pem", "production CA"))
    if not isinstance(entry, str) and to_der(entry) != to_der(pca):
        raise JobError(
            f"provisioned_by: the certificate given is not job {job_id!r}'s production CA"
        )
    return pca


def draft_hash(body: bytes) -> bytes:
    """The hash of a job draft: what its officers sign, and so the issued job's identity
    (:func:`securethread.formats.job.job_hash` of every framing of the signed job)."""
    return envelope.body_content_id(JOB_KIND, body)


def _clear_approvals(work: PartyDir, job_id: str) -> None:
    adir = work.path(L.job_approvals(job_id))
    for stale in sorted(adir.iterdir()) if adir.is_dir() else []:
        stale.unlink()


# --- the draft as the officers see it -----------------------------------------------------------


@attrs.frozen(kw_only=True)
class Draft:
    """A job draft checked against what the OEM prepared: the body, its hash, the officers."""

    job: ProductionJob
    body: bytes
    sha256: bytes
    officers: OfficerBundle
    programmer: str  # the programmer's name here, or its fingerprint when none matches

    def officer_key(self, officer: int) -> ec.EllipticCurvePublicKey:
        """Officer ``officer``'s job-signing key (1-based), from the root-signed bundle."""
        return load_spki(self.officers.keys[officer - 1], what=f"officer {officer}'s key")

    def summary(self) -> list[str]:
        """What an officer approves, in a few lines."""
        j = self.job
        ranges = [f"{a:016x}..{b:016x}" for a, b in j.targets.ranges]
        count = sum(b - a + 1 for a, b in j.targets.ranges) + len(j.targets.explicit)
        listed = [f"{len(j.targets.explicit)} listed"] if j.targets.explicit else []
        targets = ", ".join(ranges + listed)
        return [
            f"job {j.job_id} for programmer {self.programmer} "
            f"(identity {j.programmer.hex()[:16]}…)",
            f"  device class {j.device_class}, quota {j.quota}, approved by {j.threshold} of "
            f"{len(self.officers.keys)} officers",
            f"  targets: {targets} ({count} device ids)",
            f"  window: {_utc(j.not_before)} .. {_utc(j.not_after)}",
            f"  stage {j.stage}: {_stage_summary(j)}",
            f"  job hash (what the officers sign): {self.sha256.hex()}",
        ]


def _stage_summary(j: ProductionJob) -> str:
    image = "no image" if j.image_id is None else (
        f"image {j.image_id} (manifest {j.image()[1].hex()[:16]}…)"
    )  # fmt: skip
    if j.production_ca is None:
        return f"{image}, chips provisioned by {len(j.provisioned_by)} provisioning job(s)"
    return (
        f"{image}, {len(j.vendors)} silicon vendor CA(s), production CA "
        f"{j.production_ca.hex()[:16]}…"
    )


def _utc(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_draft(work: PartyDir, job_id: str) -> Draft:
    """Read ``jobs/<id>/draft.bin`` and check it is the draft the OEM prepared: a canonical
    job body for ``job_id`` whose hash the root-signed device-trust statement names, with the
    production CA recorded beside it.  Files are read only; no token is opened."""
    jdir = L.job_dir(job_id)
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    officers = OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), root.public_key())  # type: ignore[arg-type]
    body = work.read(L.job_draft(job_id), "job draft")
    obj = cbor.decode(body, what="job draft", max_size=MAX_JOB_SIZE)
    if not isinstance(obj, dict):
        raise JobError(f"the draft of job {job_id!r} is not a job body")
    job = ProductionJob.from_obj(obj)
    if cbor.encode(job.to_obj()) != body or job.job_id != job_id:
        raise JobError(f"the draft of job {job_id!r} is not a canonical body of that job")
    sha256 = draft_hash(body)
    trust = verify_device_trust(
        work.read(f"{jdir}/device-trust.bin", "device trust"), oem_root=root
    )
    if trust.job_id != job_id or trust.job_sha256 != sha256:
        raise JobError(
            f"the draft of job {job_id!r} is not the one the OEM prepared: its root-signed "
            f"device-trust statement names job hash {trust.job_sha256.hex()[:16]}…, the draft "
            f"hashes to {sha256.hex()[:16]}… (prepare it again with issue-job SPEC)"
        )
    if job.production_ca is not None:  # a "program" job has none
        pca = from_pem(work.read(f"{jdir}/production-ca.pem", "production CA"))
        if cert_fingerprint(pca) != job.production_ca_sha256():
            raise JobError(f"the draft of job {job_id!r} names another production CA")
    if not officers.threshold <= job.threshold <= len(officers.keys):
        raise JobError(
            f"the draft of job {job_id!r} asks for {job.threshold} officers, outside "
            f"{officers.threshold}..{len(officers.keys)}"
        )
    return Draft(
        job=job,
        body=body,
        sha256=sha256,
        officers=officers,
        programmer=_programmer_name(work, job.programmer),
    )


def _programmer_name(work: PartyDir, fp: bytes) -> str:
    programmers = work.path("programmers")
    for pdir in sorted(programmers.iterdir()) if programmers.is_dir() else []:
        cert = pdir / "identity.pem"
        if cert.is_file() and cert_fingerprint(from_pem(read_file(cert, "certificate"))) == fp:
            return pdir.name
    return fp.hex()


def _draft_details(draft: Draft, approvals: list[int] | None = None) -> dict[str, object]:
    j = draft.job
    return {
        "job": j.job_id,
        "job_sha256": draft.sha256.hex(),
        "quota": j.quota,
        "threshold": j.threshold,
        "officers": len(draft.officers.keys),
        "approvals": approvals or [],
        "draft": L.job_draft(j.job_id),
        "summary": draft.summary(),
    }


# --- approvals ----------------------------------------------------------------------------------


def check_approval(
    data: bytes, *, draft_sha256: bytes, officer: int, key: ec.EllipticCurvePublicKey
) -> None:
    """Refuse unless ``data`` is the job draft ``draft_sha256`` sealed by officer ``officer``'s
    key (``key``) and nothing else: one signature, that officer's, over that draft."""
    try:
        opened = envelope.open_signed(data, kind=JOB_KIND, keys=key, max_size=MAX_JOB_SIZE)
    except VerificationError as exc:
        raise JobError(f"officer {officer}'s approval is not officer {officer}'s: {exc}") from None
    if opened.content_id != draft_sha256:
        raise JobError(
            f"officer {officer}'s approval is of another draft (job hash "
            f"{opened.content_id.hex()[:16]}…, the draft's {draft_sha256.hex()[:16]}…): the "
            f"draft changed after officer {officer} approved it"
        )


def approvals(work: PartyDir, draft: Draft) -> dict[int, bytes]:
    """Every officer's approval of ``draft`` found in its approvals directory, each checked
    (:func:`check_approval`); an approval of anything else is refused, not skipped."""
    out = {}
    for n in range(1, len(draft.officers.keys) + 1):
        rel = L.job_approval(draft.job.job_id, n)
        if work.exists(rel):
            data = work.read(rel, f"officer {n}'s approval")
            check_approval(
                data, draft_sha256=draft.sha256, officer=n, key=draft.officer_key(n)
            )
            out[n] = data
    return out


def approve_job(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    officer: int,
    pin_file: str | os.PathLike[str] | None = None,
    pin: PinCallback | None = None,
    expect_sha256: bytes | None = None,
) -> StepResult:
    """Officer ``officer`` approves the prepared job ``job_id`` (see the module docstring).

    The officer's PIN comes from ``pin`` (a callback), else ``pin_file`` (its first line),
    else ``SECURETHREAD_PIN_OFFICER_<N>`` / ``…_FILE``, else a prompt on a terminal that
    first shows the job -- never from the OEM's ``pins``.  ``expect_sha256``: the job hash
    the officer was told; any other draft is refused.
    """
    work = L.open_oem(workdir)
    step = f"approve-job {job_id}"
    work.require(L.job_draft(job_id), step=step, needs=f"issue-job SPEC ({job_id})")
    if type(officer) is int and work.exists(L.job_approval(job_id, officer)):
        if (answer := work.undelivered(f"{step} officer {officer}")) is not None:
            return answer  # killed after its approval was written, before its answer
    if work.exists(f"{L.job_dir(job_id)}/job.bin"):
        raise StepOrderError(f"job {job_id!r} was issued already: there is nothing to approve")
    draft = read_draft(work, job_id)
    if type(officer) is not int or not 1 <= officer <= len(draft.officers.keys):
        raise ConfigurationError(
            f"--officer must be 1..{len(draft.officers.keys)} (this OEM's officers), "
            f"got {officer!r}"
        )
    if work.exists(L.job_approval(job_id, officer)):
        raise StepOrderError(
            f"officer {officer} approved job {job_id!r} already "
            f"({L.job_approval(job_id, officer)} exists): one signature per officer"
        )
    if expect_sha256 is not None and expect_sha256 != draft.sha256:
        raise JobError(
            f"the draft of job {job_id!r} hashes to {draft.sha256.hex()}, not the job hash "
            "you were given: it is not the job you were asked to approve"
        )
    earlier = approvals(work, draft)  # every earlier approval is of this very draft
    label = L.officer_token(officer)
    token = work.open_token(label, pin or officer_pin(officer, pin_file=pin_file, draft=draft))
    key: PrivateKey = token.private_key(L.L_OFFICER)
    if fingerprint(key.public_key()) != fingerprint(draft.officer_key(officer)):
        raise JobError(
            f"token {label!r} holds a job-signing key that is not officer {officer}'s in the "
            "root-signed officer bundle"
        )
    approval = sign_job(draft.job, [key])
    check_approval(approval, draft_sha256=draft.sha256, officer=officer, key=key.public_key())
    done = sorted([*earlier, officer])
    details = _draft_details(draft, done)
    details["officer"] = officer
    details["ready"] = len(done) >= draft.job.threshold
    result = work.finish("oem approve-job", [L.job_approval(job_id, officer)], (), details)
    result = work.pending(f"{step} officer {officer}", result)
    work.write(L.job_approval(job_id, officer), approval)  # last: marks the approval done
    return result


def officer_pin(
    officer: int, *, pin_file: str | os.PathLike[str] | None = None, draft: Draft | None = None
) -> PinCallback:
    """Officer ``officer``'s PIN, for their token only: ``pin_file``'s first line, else
    ``SECURETHREAD_PIN_OFFICER_<N>`` (or ``…_FILE``), else a prompt on a terminal that first
    shows ``draft``.  The OEM's ``pins`` file is never read."""
    label = L.officer_token(officer)

    def pin_for(asked: str) -> str:
        if asked != label:
            raise PinMissingError(f"this step logs in to token {label!r} only, not {asked!r}")
        if pin_file is not None:
            return resolve_pin(label, pin_source=os.fspath(pin_file))
        names = env_var_names(label)
        if any(n in os.environ or n + "_FILE" in os.environ for n in names):
            return resolve_pin(label)  # the officer's variable: never a party's PIN file
        var = env_var_for(label)
        if not sys.stdin.isatty():
            raise PinMissingError(
                f"no PIN for officer {officer}: give --pin-file FILE (officer {officer}'s own "
                f"PIN file), set {var} or {var}_FILE, or run on a terminal"
            )
        harden_process()  # before the PIN is typed into this process
        shown = "\n".join(draft.summary()) + "\n" if draft is not None else ""
        return getpass.getpass(f"{shown}PIN of officer {officer} (token {label!r}) to approve: ")

    return pin_for


# --- 3. issue -----------------------------------------------------------------------------------


def issue_job(workdir: str | os.PathLike[str], job_id: str) -> StepResult:
    """Issue the prepared job ``job_id`` once its threshold of officers approved it (see the
    module docstring); run again after a kill, it finishes the outbox from the record."""
    work = L.open_oem(workdir)
    jdir = L.job_dir(job_id)
    step = f"issue-job --job {job_id}"
    work.require(L.job_draft(job_id), step=step, needs=f"issue-job SPEC ({job_id})")
    if work.exists(f"{jdir}/job.bin"):
        answer = work.undelivered(step)  # the answer of a run killed before it gave it
        if not work.exists(f"outbox/job-{job_id}.bin"):
            recorded = read_draft(work, job_id).job
            written = _write_package(work, job_id, recorded.image_id)
            return answer or work.finish("oem issue-job", written, (), {"job": job_id})
        if answer is not None:
            return answer
        raise StepOrderError(f"job {job_id!r} was issued already ({jdir}/job.bin exists)")
    draft = read_draft(work, job_id)
    found = approvals(work, draft)
    if len(found) < draft.job.threshold:
        have = ", ".join(f"officer {n}" for n in found) or "none"
        raise StepOrderError(
            f"job {job_id!r} needs the approval of {draft.job.threshold} officers, has "
            f"{len(found)} ({have}): each officer runs 'securethread oem approve-job "
            f"--workdir DIR --job {job_id} --officer N' with their own PIN"
        )
    signed = envelope.merge(JOB_KIND, found.values(), max_size=MAX_JOB_SIZE)
    verified = verify_job_signatures(
        signed, officers=draft.officers.public_keys(), min_threshold=draft.officers.threshold
    )
    if verified.sha256 != draft.sha256 or job_hash(signed) != draft.sha256:
        raise JobError(f"the approvals of job {job_id!r} do not sign its draft")

    oem = work.open_token(L.TOKEN)
    trust = work.read(f"{jdir}/device-trust.bin", "device trust")
    pcas = (
        [from_pem(work.read(f"{jdir}/production-ca.pem", "production CA"))]
        if draft.job.production_ca is not None
        else []
    )
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "job-issuance",
        keys=[
            KeyEntry.from_public_key(
                draft.officer_key(n), label=f"{L.officer_token(n)}/{L.L_OFFICER}"
            )
            for n in found
        ],
        certificates=[CertEntry.from_certificate(c) for c in pcas],
        artefacts={"job": draft.sha256, "device-trust": hashlib.sha256(trust).digest()},
        details={
            "job": job_id,
            "quota": draft.job.quota,
            "programmer": draft.programmer,
            "approvals": ",".join(L.officer_token(n) for n in found),
        },
    )
    image = [f"outbox/image-{draft.job.image_id}.enc"] if draft.job.image_id is not None else []
    result = work.finish(
        "oem issue-job",
        [f"{jdir}/job.bin", *image, f"outbox/job-{job_id}.bin"],  # what _write_package writes
        [tx],
        {
            "job": job_id,
            "job_sha256": draft.sha256.hex(),
            "quota": draft.job.quota,
            "threshold": draft.job.threshold,
            "approvals": sorted(found),
            "package": f"outbox/job-{job_id}.bin",
            "stage": draft.job.stage,
            "image": (
                f"outbox/image-{draft.job.image_id}.enc" if draft.job.image_id is not None else None
            ),
        },
    )
    result = work.pending(step, result)  # before job.bin: a done step has its answer
    work.write(f"{jdir}/job.bin", signed)  # issued: recorded before it leaves
    _write_package(work, job_id, draft.job.image_id)
    return result


def _vendor_file(jdir: str, cert: x509.Certificate) -> str:
    """The job's record of a vendor CA it names (the package ships these to the programmer)."""
    return f"{jdir}/vendors/{vendor_ca_id(cert).hex()}.pem"


def _provisioned_by_file(jdir: str, cert: x509.Certificate) -> str:
    """The job's record of a production CA a "program" job names (shipped in its package)."""
    return f"{jdir}/provisioned-by/{cert_fingerprint(cert).hex()}.pem"


def _ca_request(
    spec: JobSpec, programmer_cert: x509.Certificate, ca_request: str | os.PathLike[str] | None
) -> x509.CertificateSigningRequest | None:
    """The CSR of the production CA the programmer asked for, from its signed request; None
    for a "program" job, which must come without one (it certifies nothing)."""
    if spec.stage == STAGE_PROGRAM:
        if ca_request is not None:
            raise ConfigurationError(
                f"job {spec.job_id!r} is a 'program' job: it takes no production-CA request "
                "(its chips carry their certificates)"
            )
        return None
    if ca_request is None:
        raise ConfigurationError(
            "issue-job SPEC needs --ca-request FILE (the programmer's production-CA request)"
        )
    request = ProductionCARequest.open(
        read_file(ca_request, "production-CA request", limit=64 << 10),
        programmer_key=programmer_cert.public_key(),  # type: ignore[arg-type]
    )
    if request.programmer != spec.programmer:
        raise JobError(
            f"the production-CA request comes from {request.programmer!r}, the job is for "
            f"{spec.programmer!r}"
        )
    if request.job_id != spec.job_id:
        raise JobError(
            f"the production-CA request is for job {request.job_id!r}, not {spec.job_id!r}"
        )
    return request.certificate_request()


def _write_package(work: PartyDir, job_id: str, image_id: str | None) -> list[str]:
    """The job package and the encrypted image, into the outbox, from the job as recorded
    (a provision job, ``image_id`` None, has neither manifest nor image)."""
    jdir = L.job_dir(job_id)
    idir = L.image_dir(image_id) if image_id is not None else None
    package = JobPackage(
        job=work.read(f"{jdir}/job.bin", "job"),
        production_ca=(
            to_der(from_pem(work.read(f"{jdir}/production-ca.pem", "production CA")))
            if work.exists(f"{jdir}/production-ca.pem")  # none for a "program" job
            else None
        ),
        manifest=work.read(f"{idir}/manifest.bin", "manifest") if idir is not None else None,
        device_trust=work.read(f"{jdir}/device-trust.bin", "device trust"),
        vendors=tuple(
            to_der(from_pem(p.read_bytes()))
            for p in sorted(work.path(f"{jdir}/vendors").glob("*.pem"))
        ),
        ocsp_responder=(
            work.read(ocsp_request_file(job_id), "OCSP responder request")
            if work.exists(ocsp_request_file(job_id))
            else None
        ),
        provisioned_by=tuple(  # sorted by hash: the job's provisioned_by order
            to_der(from_pem(p.read_bytes()))
            for p in sorted(work.path(f"{jdir}/provisioned-by").glob("*.pem"))
        ),
    )
    written = []
    if idir is not None:
        written.append(f"outbox/image-{image_id}.enc")
        copy_atomic(work.path(f"{idir}/image.enc"), work.path(written[0]))
    return [*written, work.write(f"outbox/job-{job_id}.bin", package.to_bytes())]


__all__ = ["Draft", "approve_job", "issue_job", "prepare_job", "read_draft"]
