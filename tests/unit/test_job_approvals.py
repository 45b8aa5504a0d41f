"""Officers' approvals, joined into one job (software backend, no token).

Each officer seals the job draft alone in their own process (``oem approve-job``); the OEM
joins the approvals (``envelope.merge``) into the signed job.  What is checked here is the
pure part: an approval is the draft sealed by that officer alone, the join is the one
canonical envelope of those signatures, and nothing else is accepted.
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, JobError, SignatureError
from securethread.formats import cbor, envelope
from securethread.formats.job import (
    JOB_KIND,
    ProductionJob,
    Targets,
    cosign_job,
    job_hash,
    sign_job,
    verify_job_signatures,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint
from securethread.oem.jobs import check_approval, draft_hash
from securethread.pki.profile import DeviceProfile


@pytest.fixture
def keys() -> SoftwareBackend:
    b = SoftwareBackend("oem")
    for n in (1, 2, 3):
        b.generate_ec(f"officer-{n}", curve=Curve.P256, policy=SIGNING)
    return b


def make_job(quota: int = 5, threshold: int = 2) -> ProductionJob:
    now = int(time.time())
    return ProductionJob(
        job_id="job-1",
        device_class="sensor-v1",
        targets=Targets(ranges=((0x1000, 0x1FFF),)),
        quota=quota,
        not_before=now - 60,
        not_after=now + 3600,
        image_id="fw-1",
        manifest_sha256=b"\x22" * 32,
        programmer=b"\x11" * 32,
        certificate=DeviceProfile(organisation="Test OEM"),
        production_ca=b"\x33" * 32,
        vendors=(b"\x0a" * 32,),
        threshold=threshold,
    )


def approval(keys: SoftwareBackend, n: int, job: ProductionJob) -> bytes:
    """What ``oem approve-job --officer n`` writes: the draft sealed with one key."""
    return sign_job(job, [keys.private_key(f"officer-{n}")])


def trusted(keys: SoftwareBackend) -> dict[bytes, ec.EllipticCurvePublicKey]:
    return {fingerprint(keys.public_key(f"officer-{n}")): keys.public_key(f"officer-{n}")
            for n in (1, 2, 3)}  # fmt: skip


def test_approvals_from_separate_signers_join_into_the_job_the_officers_saw(
    keys: SoftwareBackend,
) -> None:
    job = make_job()
    draft = cbor.encode(job.to_obj())
    one, three = approval(keys, 1, job), approval(keys, 3, job)
    joined = envelope.merge(JOB_KIND, [three, one])
    assert joined == envelope.merge(JOB_KIND, [one, three])  # one canonical order (S6)
    verified = verify_job_signatures(joined, officers=trusted(keys), min_threshold=2)
    assert verified.job == job
    # The issued job's identity is the hash the officers were shown for the draft.
    assert verified.sha256 == job_hash(joined) == job_hash(one) == draft_hash(draft)
    assert set(verified.signers) == {
        fingerprint(keys.public_key("officer-1")),
        fingerprint(keys.public_key("officer-3")),
    }
    # The library's one-process path (several keys in one call) gives the same job.
    both = cosign_job(sign_job(job, [keys.private_key("officer-1")]), keys.private_key("officer-3"))
    assert job_hash(both) == verified.sha256


def test_one_approval_alone_is_not_a_threshold_two_job(keys: SoftwareBackend) -> None:
    lone = envelope.merge(JOB_KIND, [approval(keys, 1, make_job())])
    with pytest.raises(SignatureError, match="required"):
        verify_job_signatures(lone, officers=trusted(keys), min_threshold=2)
    # ... nor under the job's own threshold, whatever floor the verifier brings
    with pytest.raises(SignatureError, match="the job requires 2"):
        verify_job_signatures(lone, officers=trusted(keys), min_threshold=1)


def test_merge_refuses_approvals_of_different_drafts_and_one_signer_twice(
    keys: SoftwareBackend,
) -> None:
    one = approval(keys, 1, make_job())
    with pytest.raises(FormatError, match="different bodies"):
        envelope.merge(JOB_KIND, [one, approval(keys, 2, make_job(quota=6))])
    # A second approval by the same officer (a fresh signature) is still one signer.
    with pytest.raises(FormatError, match="share a signer"):
        envelope.merge(JOB_KIND, [one, approval(keys, 1, make_job())])
    with pytest.raises(FormatError, match="expected a 'job' artefact"):
        other_kind = envelope.seal("ledger", make_job().to_obj(), [keys.private_key("officer-2")])
        envelope.merge(JOB_KIND, [other_kind])


def test_check_approval_takes_only_that_officers_seal_of_that_draft(
    keys: SoftwareBackend,
) -> None:
    job = make_job()
    sha = draft_hash(cbor.encode(job.to_obj()))
    key1 = keys.public_key("officer-1")
    check_approval(approval(keys, 1, job), draft_sha256=sha, officer=1, key=key1)
    # officer 2's approval filed as officer 1's
    with pytest.raises(JobError, match="approval is not officer 1's"):
        check_approval(approval(keys, 2, job), draft_sha256=sha, officer=1, key=key1)
    # an "approval" carrying a second officer's signature besides officer 1's
    pair = sign_job(job, [keys.private_key("officer-1"), keys.private_key("officer-2")])
    with pytest.raises(JobError, match="approval is not officer 1's"):
        check_approval(pair, draft_sha256=sha, officer=1, key=key1)
    # officer 1's approval of a draft that was changed afterwards
    with pytest.raises(JobError, match="draft changed after officer 1 approved it"):
        later = approval(keys, 1, make_job(quota=500))
        check_approval(later, draft_sha256=sha, officer=1, key=key1)
    # bytes that are no envelope at all
    with pytest.raises(JobError, match="approval is not officer 1's"):
        check_approval(b"\xa0", draft_sha256=sha, officer=1, key=key1)
