"""Ceremony transcripts on the software backend: round trip, chain continuation, tampering."""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.errors import (
    ConfigurationError,
    Error,
    FormatError,
    KeyPolicyError,
    TranscriptError,
)
from securethread.formats import cbor
from securethread.formats.transcript import (
    GENESIS,
    MAGIC,
    CeremonyRecord,
    CertEntry,
    KeyEntry,
    SignedRecord,
    Transcript,
    verify_transcript,
)
from securethread.hsm import IMAGE_KEY, SIGNING, Curve, SoftwareBackend, fingerprint
from securethread.keys.protocol import PrivateKey

T0 = 1_700_000_000


def clock(start: int = T0) -> Callable[[], int]:
    counter = itertools.count(start, 7)
    return lambda: next(counter)


@pytest.fixture
def backend() -> SoftwareBackend:
    return SoftwareBackend("oem")


@pytest.fixture
def signer(backend: SoftwareBackend) -> PrivateKey:
    return backend.generate_ec("transcript", curve=Curve.P256, policy=SIGNING)


def self_signed(key: PrivateKey, cn: str, serial: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key.as_cryptography(), hashes.SHA256())
    )


OPS = ["token-init", "root-ca", "signing-key", "job-issuance", "key-transfer"]


@pytest.fixture
def five(tmp_path: Path, backend: SoftwareBackend, signer: PrivateKey) -> Path:
    """A five-record OEM transcript; record i has operation OPS[i]."""
    path = tmp_path / "oem.transcript"
    t = Transcript(path, signer, "oem", clock=clock())
    t.append("token-init", keys=[KeyEntry.from_key(signer, attributes={"usage": ["sign"]})])
    root = backend.generate_ec("root-ca", curve=Curve.P256, policy=SIGNING)
    cert = self_signed(root, "OEM Root", (1 << 158) + 5)
    t.append(
        "root-ca", keys=[KeyEntry.from_key(root)], certificates=[CertEntry.from_certificate(cert)]
    )
    t.append(
        "signing-key",
        keys=[KeyEntry.from_key(backend.generate_ec("fw", curve=Curve.P256, policy=SIGNING))],
    )
    t.append("job-issuance", artefacts={"job": bytes(range(32))}, details={"quota": 10})
    t.append(
        "key-transfer", keys=[KeyEntry.from_key(backend.generate_aes("img", policy=IMAGE_KEY))]
    )
    return path


def frames(data: bytes) -> list[bytes]:
    """Split a transcript into its length-prefixed frames (prefix included)."""
    assert data.startswith(MAGIC)
    out, pos = [], len(MAGIC)
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append(data[pos : pos + 4 + n])
        pos += 4 + n
    return out


def join(parts: list[bytes]) -> bytes:
    return MAGIC + b"".join(parts)


def resign(frame: bytes, signer: PrivateKey, **changes: Any) -> bytes:
    """Re-sign a frame's record with ``changes`` applied: a forgery by the key holder."""
    record = CeremonyRecord.from_bytes(SignedRecord.from_bytes(frame[4:]).record)
    return SignedRecord.sign(attrs.evolve(record, **changes), signer).frame()


# --- round trip ------------------------------------------------------------------------


def test_round_trip(five: Path, signer: PrivateKey) -> None:
    summary = verify_transcript(five, public_key=signer.public_key())
    assert [r.operation for r in summary.records] == OPS
    assert [r.seq for r in summary.records] == list(range(5))
    assert summary.records[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in itertools.pairwise(summary.records))
    assert summary.enclave == "oem"
    assert summary.signer == fingerprint(signer.public_key())
    assert summary.head == summary.records[-1].hash
    assert summary.records[0].timestamp == "2023-11-14T22:13:20Z"
    # bytes and a path verify alike
    assert verify_transcript(five.read_bytes(), public_key=signer.public_key()) == summary


def test_key_entries_record_backend_attributes(five: Path, signer: PrivateKey) -> None:
    records = verify_transcript(five, public_key=signer.public_key()).records
    init = records[0].keys[0]
    assert init.label == "transcript" and init.key_id == signer.key_id
    assert init.fingerprint == fingerprint(signer.public_key())
    attrs = dict(init.attributes)
    assert attrs["sensitive"] is True and attrs["extractable"] is False
    assert attrs["curve"] == "P-256" and attrs["usage"] == ("sign",)
    image = dict(records[4].keys[0].attributes)
    assert records[4].keys[0].fingerprint is None
    assert image["type"] == "aes-256" and image["extractable"] is True
    assert dict(records[3].artefacts) == {"job": bytes(range(32))}
    assert dict(records[3].details) == {"quota": 10}
    assert records[1].certificates[0].serial == (1 << 158) + 5
    assert records[1].certificates[0].subject == "CN=OEM Root"


def test_from_key_refuses_contradicting_attributes(signer: PrivateKey) -> None:
    with pytest.raises(KeyPolicyError, match="extractable"):
        KeyEntry.from_key(signer, attributes={"extractable": True})


def test_lookup_index(five: Path, backend: SoftwareBackend, signer: PrivateKey) -> None:
    summary = verify_transcript(five, public_key=signer.public_key())
    root = backend.private_key("root-ca")
    cert = self_signed(root, "OEM Root", 1)  # a different cert: not in the transcript
    assert summary.what_created(signer.public_key()).operation == "token-init"
    assert summary.what_created(fingerprint(root.public_key())).operation == "root-ca"
    assert summary.what_created(root.key_id).operation == "root-ca"
    assert summary.what_created(backend.secret_key("img").key_id.hex()).operation == "key-transfer"
    cert_fp = summary.records[1].certificates[0].fingerprint
    assert summary.what_created(cert_fp).seq == 1
    assert summary.find(cert) is None
    with pytest.raises(TranscriptError, match="no ceremony step"):
        summary.what_created(cert)
    with pytest.raises(FormatError):
        summary.what_created("not hex")


def test_lookup_by_certificate_object(tmp_path: Path, signer: PrivateKey) -> None:
    cert = self_signed(signer, "T", 42)
    t = Transcript(tmp_path / "t", signer, "oem", clock=clock())
    t.append("token-init", keys=[KeyEntry.from_key(signer)])
    t.append("root-ca", certificates=[CertEntry.from_certificate(cert)])
    t.append("job-issuance", certificates=[CertEntry.from_certificate(cert)])  # used again
    summary = verify_transcript(tmp_path / "t", public_key=signer.public_key())
    assert summary.what_created(cert).operation == "root-ca"  # the first mention


# --- the file: continuation, concurrency, durability ----------------------------------


def test_reopen_continues_chain(five: Path, signer: PrivateKey) -> None:
    t = Transcript(five, signer, "oem", clock=clock(T0 + 1000))
    assert t.next_seq == 5 and t.last is not None and t.last.operation == "key-transfer"
    tail = t.last
    rec = t.append("production-run-opened", details={"job": "j1"})
    assert rec.seq == 5 and rec.prev == tail.hash and t.last == rec
    summary = verify_transcript(five, public_key=signer.public_key())
    assert len(summary.records) == 6 and summary.records[5].prev == summary.records[4].hash


def test_two_writers_share_one_chain(tmp_path: Path, signer: PrivateKey) -> None:
    path = tmp_path / "t"
    shared = clock()
    a = Transcript(path, signer, "oem", clock=shared)
    b = Transcript(path, signer, "oem", clock=shared)
    a.append("token-init")
    b.append("root-ca")  # b has not seen a's record yet: it must catch up under the lock
    a.append("signing-key")
    summary = verify_transcript(path, public_key=signer.public_key())
    assert [r.operation for r in summary.records] == ["token-init", "root-ca", "signing-key"]


def test_reopen_refuses_tampered_file(five: Path, signer: PrivateKey) -> None:
    parts = frames(five.read_bytes())
    five.write_bytes(join(parts[:2] + parts[3:]))
    with pytest.raises(TranscriptError) as exc:
        Transcript(five, signer, "oem")
    assert exc.value.index == 2


def test_reopen_refuses_partial_write(five: Path, signer: PrivateKey) -> None:
    data = five.read_bytes()
    five.write_bytes(data[:-10])
    with pytest.raises(TranscriptError, match="truncated"):
        Transcript(five, signer, "oem").append("root-ca")
    assert five.read_bytes() == data[:-10]  # refused, not repaired


def test_reopen_for_another_enclave(five: Path, signer: PrivateKey) -> None:
    with pytest.raises(ConfigurationError, match="belongs to enclave 'oem'"):
        Transcript(five, signer, "programmer")


def test_reopen_with_another_key(five: Path, backend: SoftwareBackend) -> None:
    other = backend.generate_ec("other", curve=Curve.P256, policy=SIGNING)
    with pytest.raises(TranscriptError) as exc:
        Transcript(five, other, "oem")
    assert exc.value.index == 0


def test_clock_going_backwards_is_refused(tmp_path: Path, signer: PrivateKey) -> None:
    times = iter([T0, T0 - 1])
    t = Transcript(tmp_path / "t", signer, "oem", clock=lambda: next(times))
    t.append("token-init")
    with pytest.raises(ConfigurationError, match="clock"):
        t.append("root-ca")


def test_empty_file_is_a_new_transcript(tmp_path: Path, signer: PrivateKey) -> None:
    (tmp_path / "t").write_bytes(b"")
    Transcript(tmp_path / "t", signer, "oem", clock=clock()).append("token-init")
    assert len(verify_transcript(tmp_path / "t", public_key=signer.public_key()).records) == 1


# --- tampering: each names the first bad record ----------------------------------------


def tamper_delete(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return parts[:2] + parts[3:]


def tamper_reorder(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return [parts[0], parts[2], parts[1], *parts[3:]]


def tamper_duplicate(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return parts[:3] + [parts[2]] + parts[3:]


def tamper_body(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    assert b"signing-key" in parts[2]
    return parts[:2] + [parts[2].replace(b"signing-key", b"signing-kez")] + parts[3:]


def tamper_signature(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    s = SignedRecord.from_bytes(parts[3][4:])
    sig = bytearray(s.signature)
    sig[10] ^= 0x01  # inside r: still DER, no longer valid
    bad = SignedRecord(record=s.record, signature=bytes(sig), signer=s.signer).frame()
    return parts[:3] + [bad] + parts[4:]


def tamper_truncate_middle(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return parts[:2] + [parts[2][:-20]] + parts[3:]


def tamper_truncate_end(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return parts[:4] + [parts[4][: len(parts[4]) // 2]]


def tamper_truncate_prefix(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return parts[:4] + [parts[4][:2]]


def tamper_length(parts: list[bytes], _: PrivateKey) -> list[bytes]:
    return parts[:1] + [b"\xff\xff\xff\xff" + parts[1][4:]] + parts[2:]


def forge_time(parts: list[bytes], signer: PrivateKey) -> list[bytes]:
    return parts[:3] + [resign(parts[3], signer, time=T0)] + parts[4:]


def forge_fork(parts: list[bytes], signer: PrivateKey) -> list[bytes]:
    # Right sequence number, signed by the right key, but not chained to record 2.
    return parts[:3] + [resign(parts[3], signer, prev=bytes(32))] + parts[4:]


def forge_enclave(parts: list[bytes], signer: PrivateKey) -> list[bytes]:
    return parts[:1] + [resign(parts[1], signer, enclave="programmer")] + parts[2:]


@pytest.mark.parametrize(
    ("tamper", "index", "reason"),
    [
        (tamper_delete, 2, "sequence number 3, expected 2"),
        (tamper_reorder, 1, "sequence number 2, expected 1"),
        (tamper_duplicate, 3, "sequence number 2, expected 3"),
        (tamper_body, 2, "signature does not verify"),
        (tamper_signature, 3, "signature does not verify"),
        (tamper_truncate_middle, 2, "record 2"),
        (tamper_truncate_end, 4, "truncated"),
        (tamper_truncate_prefix, 4, "truncated length prefix"),
        (tamper_length, 1, "impossible length"),
        (forge_time, 3, "precedes record 2"),
        (forge_fork, 3, "does not chain"),
        (forge_enclave, 1, "enclave 'programmer'"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_tampering_names_first_bad_record(
    five: Path, signer: PrivateKey, tamper: Callable[..., list[bytes]], index: int, reason: str
) -> None:
    data = join(tamper(frames(five.read_bytes()), signer))
    with pytest.raises(TranscriptError, match=reason) as exc:
        verify_transcript(data, public_key=signer.public_key())
    assert exc.value.index == index
    assert isinstance(exc.value, Error)


def test_wrong_public_key(five: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TranscriptError, match="another key") as exc:
        verify_transcript(five, public_key=other)
    assert exc.value.index == 0


def test_tail_removal_caught_by_anchor(five: Path, signer: PrivateKey) -> None:
    head = verify_transcript(five, public_key=signer.public_key()).head
    verify_transcript(five, public_key=signer.public_key(), anchor=head)
    cut = join(frames(five.read_bytes())[:3])
    verify_transcript(cut, public_key=signer.public_key())  # a clean cut verifies alone...
    with pytest.raises(TranscriptError, match="anchor") as exc:  # ...but not against an anchor
        verify_transcript(cut, public_key=signer.public_key(), anchor=head)
    assert exc.value.index == 3


@pytest.mark.parametrize(
    ("data", "reason", "index"),
    [
        (b"", "empty", 0),
        (MAGIC[:5], "empty or its header is truncated", 0),
        (MAGIC, "no records", 0),
        (b"PK\x03\x04" + bytes(40), "not a securethread transcript", None),
    ],
)
def test_not_a_transcript(signer: PrivateKey, data: bytes, reason: str, index: int | None) -> None:
    with pytest.raises(TranscriptError, match=reason) as exc:
        verify_transcript(data, public_key=signer.public_key())
    assert exc.value.index == index


def test_missing_file(tmp_path: Path, signer: PrivateKey) -> None:
    with pytest.raises(TranscriptError, match="does not exist"):
        verify_transcript(tmp_path / "nope", public_key=signer.public_key())


# --- value objects ----------------------------------------------------------------------


def record(**kw: object) -> CeremonyRecord:
    base: dict[str, object] = dict(
        seq=0, prev=GENESIS, time=T0, enclave="oem", operation="token-init"
    )
    base.update(kw)
    return CeremonyRecord(**base)  # type: ignore[arg-type]


def test_record_round_trip_and_hash() -> None:
    r = record(
        keys=[KeyEntry(label="k", key_id=b"\x01", fingerprint=bytes(32), attributes={"u": ["a"]})],
        certificates=[CertEntry(fingerprint=bytes(32), subject="CN=x", issuer="CN=y", serial=0)],
        artefacts={"b": bytes(32), "a": bytes(32)},
        details={"n": 1, "s": "x"},
    )
    assert CeremonyRecord.from_bytes(r.to_bytes()) == r
    assert r.hash == hashlib.sha256(r.to_bytes()).digest()
    assert [n for n, _ in r.artefacts] == ["a", "b"]
    assert r.to_json()["keys"][0]["attributes"] == {"u": ["a"]}


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"prev": b"\x00" * 31}, "field 'prev' must be 32 bytes"),
        ({"operation": "Root CA"}, "field 'op' must match"),
        ({"enclave": ""}, "field 'enclave' must be text of 1..64"),
        ({"seq": -1}, "field 'seq' must be an integer"),
        ({"details": {"flag": True}}, "field 'details' 'flag' must be text"),
        ({"details": {"d": {"nested": 1}}}, "field 'details' 'd' must be text"),
        ({"artefacts": {"img": b"short"}}, "field 'artefacts' 'img' must be 32 bytes"),
        ({"keys": ["not a key"]}, "field 'keys' item 0 must be a key entry"),
    ],
)
def test_record_validated_on_construction(kw: dict[str, object], reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        record(**kw)


def test_record_from_bytes_refuses_bad_shapes() -> None:
    good = cbor.decode(record().to_bytes())
    with pytest.raises(FormatError, match="unknown field 'extra'"):
        CeremonyRecord.from_bytes(cbor.encode({**good, "extra": 1}))
    for old_or_unknown in (1, 3):  # version 2 since issue 21
        with pytest.raises(FormatError, match="unsupported version"):
            CeremonyRecord.from_bytes(cbor.encode({**good, "v": old_or_unknown}))
    with pytest.raises(FormatError, match="field 'keys' must be an array"):
        CeremonyRecord.from_bytes(cbor.encode({**good, "keys": {}}))
    bad_serial = {"fp": bytes(32), "subject": "", "issuer": "", "serial": b"\x00\x01"}
    with pytest.raises(FormatError, match="serial"):
        CeremonyRecord.from_bytes(cbor.encode({**good, "certs": [bad_serial]}))
    with pytest.raises(FormatError, match="truncated"):
        CeremonyRecord.from_bytes(record().to_bytes()[:-1])


def test_serial_of_twenty_octets_round_trips() -> None:
    c = CertEntry(fingerprint=bytes(32), subject="", issuer="", serial=(1 << 160) - 1)
    assert CertEntry.from_cbor(c.to_cbor()) == c
    with pytest.raises(FormatError):
        CertEntry(fingerprint=bytes(32), subject="", issuer="", serial=1 << 160)


def test_signed_record_round_trip(signer: PrivateKey) -> None:
    s = SignedRecord.sign(record(), signer)
    assert SignedRecord.from_bytes(s.to_bytes()) == s
    s.verify(signer.public_key())
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert s.signer == hashlib.sha256(spki).digest()


def test_append_unless_last_records_a_rerun_step_once(tmp_path: Path, signer: PrivateKey) -> None:
    """A step killed right after appending its record, run again, finds that record newest
    and does not sign a second; other details, another operation, or a record in between and
    it is appended (a second record, never a missing one)."""
    path = tmp_path / "oem.transcript"
    t = Transcript(path, signer, "oem", clock=clock())
    t.append("root-ca")
    ledger = {"ledger": bytes(range(32))}
    first = t.append_unless_last("reconciliation", artefacts=ledger, details={"job": "j"})
    # the rerun opens the file afresh, as a new process would
    again = Transcript(path, signer, "oem", clock=clock(T0 + 60))
    assert again.append_unless_last("reconciliation", artefacts=ledger,
                                    details={"job": "j"}) == first  # fmt: skip
    assert [r.operation for r in verify_transcript(path, public_key=signer.public_key()).records] \
        == ["root-ca", "reconciliation"]  # fmt: skip
    other = again.append_unless_last("reconciliation", artefacts=ledger, details={"job": "k"})
    assert other.seq == first.seq + 1
    again.append("job-issuance")
    third = again.append_unless_last("reconciliation", artefacts=ledger, details={"job": "k"})
    assert third.seq == other.seq + 2
    assert len(verify_transcript(path, public_key=signer.public_key()).records) == 5
