"""One signed job, one identity, one quota (S6).

A job used to be identified by the hash of its whole envelope, signatures included, so
every byte string that still verified was a new job to the quota store.  Each re-framing an
attacker outside the officers can make from a genuine job -- reorder the signature entries,
replace an ECDSA ``s`` by ``n - s``, duplicate an entry, append an entry by an unknown key
-- must now be refused, or map to the same identity (and so the same quota).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from securethread.errors import (
    Error,
    ImageError,
    LedgerError,
    QuotaExceededError,
    VerificationError,
)
from securethread.formats import cbor, envelope, ledger
from securethread.formats.boot import BootConfirmationError, open_boot_confirmation
from securethread.formats.image import verify_manifest
from securethread.formats.job import (
    JOB_KIND,
    ProductionJob,
    Targets,
    cosign_job,
    job_hash,
    sign_job,
    verify_job,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint
from securethread.keys.protocol import PrivateKey
from securethread.pki.profile import DeviceProfile
from securethread.programmer.store import UNGUARDED, SQLiteStore
from tests import cose_edit

PROGRAMMER = b"\x11" * 32
N256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def keys() -> SoftwareBackend:
    b = SoftwareBackend("reframing")
    for name in ("officer-1", "officer-2", "officer-3", "outsider"):
        b.generate_ec(name, curve=Curve.P256, policy=SIGNING)
    return b


def _officers(b: SoftwareBackend) -> dict[bytes, Any]:
    names = ("officer-1", "officer-2", "officer-3")
    return {fingerprint(b.public_key(n)): b.public_key(n) for n in names}


def _job(**kw: Any) -> ProductionJob:
    now = int(time.time())
    args: dict[str, Any] = dict(
        job_id="job-1", device_class="sensor-v1", targets=Targets(ranges=((0x1000, 0x1FFF),)),
        quota=5, not_before=now - 60, not_after=now + 3600, image_id="fw-1",
        manifest_sha256=b"\x22" * 32, programmer=PROGRAMMER, threshold=2,
        certificate=DeviceProfile(organisation="Test OEM"), production_ca=b"\x33" * 32,
        vendors=(b"\x0a" * 32,),
    )  # fmt: skip
    args.update(kw)
    return ProductionJob(**args)


@pytest.fixture(scope="module")
def genuine(keys: SoftwareBackend) -> bytes:
    return cosign_job(
        sign_job(_job(), [keys.private_key("officer-1")]), keys.private_key("officer-2")
    )


def _verify(signed: bytes, keys: SoftwareBackend) -> Any:
    return verify_job(signed, officers=_officers(keys), programmer=PROGRAMMER, min_threshold=2)


def _n_minus_s(sig: bytes) -> bytes:
    """The twin (r, n - s) of a P-256 r||s signature (RFC 9053 §2.1 layout)."""
    s = int.from_bytes(sig[32:], "big")
    return sig[:32] + (N256 - s).to_bytes(32, "big")


def _reframe(variant: str, genuine: bytes, keys: SoftwareBackend) -> bytes:
    tag, items = cose_edit.parts(genuine)
    sigs = items[3]  # COSE_Signature entries [protected, {}, r||s]
    if variant == "reordered":
        sigs.reverse()
    elif variant == "n-minus-s":
        sigs[0][2] = _n_minus_s(sigs[0][2])
    elif variant == "duplicated entry":
        sigs.append(list(sigs[0]))
    else:  # a valid signature by a key the programmer does not trust, in canonical order
        outsider = keys.private_key("outsider")
        sprot = envelope.protected_signature(outsider.public_key())
        tbs = envelope.sig_structure(items[0], sprot, items[2])
        sigs.append([sprot, {}, envelope.sign(outsider, tbs)])
        sigs.sort(key=lambda e: cbor.decode(e[0], int_keys=True)[4])
    return cose_edit.build(tag, items)


@pytest.mark.parametrize(
    "variant",
    ["reordered", "n-minus-s", "duplicated entry", "unknown signer appended"],
)
def test_reframed_job_is_refused_or_maps_to_the_same_identity(
    keys: SoftwareBackend, genuine: bytes, variant: str
) -> None:
    reframed = _reframe(variant, genuine, keys)
    assert reframed != genuine
    identity = _verify(genuine, keys).sha256
    with pytest.raises(VerificationError):
        _verify(reframed, keys)
    try:
        same = job_hash(reframed) == identity
    except Error:
        same = True  # refused outright: not even an identity to open a quota under
    assert same


def test_job_identity_is_the_hash_of_what_the_officers_sign(
    keys: SoftwareBackend, genuine: bytes
) -> None:
    import hashlib

    tag, items = cose_edit.parts(genuine)
    # SHA-256 of CBOR([body protected header, payload]): what every officer signs.
    expected = hashlib.sha256(cbor.encode([items[0], items[2]])).digest()
    assert expected == envelope.body_content_id(JOB_KIND, items[2])
    assert job_hash(genuine) == _verify(genuine, keys).sha256 == expected
    assert job_hash(genuine) != hashlib.sha256(genuine).digest()


def test_every_valid_framing_of_one_job_opens_one_quota(
    keys: SoftwareBackend, genuine: bytes, tmp_path: Path
) -> None:
    """Other co-signers, or the same officers signing again, are the same job to the store."""
    o1, o2, o3 = (keys.private_key(f"officer-{i}") for i in (1, 2, 3))
    framings = [
        genuine,
        cosign_job(sign_job(_job(), [o3]), o1),
        sign_job(_job(), [o2, o1]),  # fresh signatures: other bytes
    ]
    assert len(set(framings)) == 3
    verified = [_verify(f, keys) for f in framings]
    assert len({v.sha256 for v in verified}) == 1
    store = SQLiteStore(tmp_path / "store.sqlite")
    try:
        for v in verified:
            store.open_job(job=v.sha256, job_id=v.job.job_id, quota=v.job.quota, signed=v.signed)
        assert list(store.reserve(verified[0].sha256, 5, guard=UNGUARDED)) == list(range(5))
        for v in verified:
            with pytest.raises(QuotaExceededError):
                store.reserve(v.sha256, 1, guard=UNGUARDED)
    finally:
        store.close()


def test_another_job_body_is_another_identity(keys: SoftwareBackend, genuine: bytes) -> None:
    o1, o2 = keys.private_key("officer-1"), keys.private_key("officer-2")
    other = cosign_job(sign_job(_job(quota=6), [o1]), o2)
    assert job_hash(other) != job_hash(genuine)


# --- every artefact kind opens strictly --------------------------------------------------------


def _twin(env: bytes) -> bytes:
    return cose_edit.with_signature(env, _n_minus_s(cose_edit.signature(env)))


def _seal(kind: str, body: dict[str, Any], key: PrivateKey) -> bytes:
    return envelope.seal(kind, body, [key])


@pytest.mark.parametrize(
    ("kind", "body", "opener", "error"),
    [
        (
            "manifest",
            {},
            lambda data, key: verify_manifest(data, key=key),
            ImageError,
        ),
        (
            ledger.CLOSE_KIND,
            {},
            lambda data, key: ledger.open_close(data, ledger_key=key),
            VerificationError,
        ),
        (
            "boot-confirmation",
            {},
            lambda data, key: open_boot_confirmation(data, device_public_key=key),
            BootConfirmationError,
        ),
    ],
)
def test_high_s_twin_is_refused_for_every_kind(
    keys: SoftwareBackend, kind: str, body: dict[str, Any], opener: Any, error: type[Exception]
) -> None:
    key = keys.private_key("officer-3")
    env = _seal(kind, {"x": 1, **body}, key)
    with pytest.raises(error, match="high s"):
        opener(_twin(env), key.public_key())


def test_high_s_twin_of_a_checkpoint_is_refused(keys: SoftwareBackend) -> None:
    key = keys.private_key("officer-3")
    job = b"\x44" * 32
    rec = ledger.PendingRecord(
        kind=ledger.KIND_PROVISIONED, slot=0, device_id="0000000000001000", time=1,
        cert=b"c", license_sha256=b"\x01" * 32, vendor_ca=b"\x0a" * 32,
    )  # fmt: skip
    ((_r, _s, raw, head),) = ledger.chain([rec], job=job, start_seq=0, prev=job)
    cp = ledger.sign_checkpoint(key, job=job, upto=0, head=head, time=1)
    with pytest.raises(LedgerError, match="high s"):
        ledger.verify_open_ledger(
            [("r", raw), ("c", _twin(cp))], job=job, ledger_key=key.public_key()
        )
