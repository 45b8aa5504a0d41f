"""A ceremony transcript signed inside a real SoftHSM token, verified with the public key only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from securethread.errors import TranscriptError
from securethread.formats.transcript import (
    MAGIC,
    KeyEntry,
    SignedRecord,
    Transcript,
    verify_transcript,
)
from securethread.hsm import IMAGE_KEY, SIGNING, Curve, Token, fingerprint
from securethread.keys.protocol import PrivateKey


@pytest.fixture
def signer(oem: Token, label: str) -> Iterator[PrivateKey]:
    key = oem.generate_ec(label, curve=Curve.P256, policy=SIGNING)
    yield key
    oem.destroy(label)


def test_token_signed_transcript(
    oem: Token, signer: PrivateKey, label: str, tmp_path: Path
) -> None:
    path = tmp_path / "oem.transcript"
    image_label = label + "-img"
    t = Transcript(path, signer, "oem")
    # Bootstrapping: record 0 names the transcript key, created just before it.
    t.append("token-init", keys=[KeyEntry.from_key(signer, attributes={"usage": ["sign"]})])
    image = oem.generate_aes(image_label, policy=IMAGE_KEY)
    try:
        t.append("image-mastering", keys=[KeyEntry.from_key(image)], artefacts={"img": bytes(32)})
        # A second process opening the same file continues the chain.
        Transcript(path, oem.private_key(label), "oem").append("job-issuance")
    finally:
        oem.destroy(image_label)

    summary = verify_transcript(path, public_key=signer.public_key())
    assert [r.operation for r in summary.records] == [
        "token-init",
        "image-mastering",
        "job-issuance",
    ]
    init = summary.what_created(fingerprint(signer.public_key()))
    assert init.seq == 0
    attrs = dict(init.keys[0].attributes)
    # What the token reports, not what the caller claims (invariant S1).
    assert attrs["sensitive"] is True and attrs["extractable"] is False
    assert attrs["never-extractable"] is True and attrs["curve"] == "P-256"
    assert summary.what_created(signer.key_id).seq == 0
    img = summary.what_created(image.key_id)
    assert img.operation == "image-mastering" and img.keys[0].fingerprint is None
    assert dict(img.keys[0].attributes)["extractable"] is True

    # A flipped bit in the token's signature on record 1 is caught, naming record 1.
    data = path.read_bytes()
    first = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    start = len(MAGIC) + 4 + first
    n = int.from_bytes(data[start : start + 4], "big")
    s = SignedRecord.from_bytes(data[start + 4 : start + 4 + n])
    sig = bytearray(s.signature)
    sig[-1] ^= 0x01
    forged = SignedRecord(record=s.record, signature=bytes(sig), signer=s.signer).frame()
    tampered = data[:start] + forged + data[start + 4 + n :]
    with pytest.raises(TranscriptError, match="signature") as exc:
        verify_transcript(tampered, public_key=signer.public_key())
    assert exc.value.index == 1
