"""Wire formats of the channel and transfer: canonical, versioned, strict, size-limited."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.channel.handshake import (
    MAX_FINISH_SIZE,
    MAX_HELLO_SIZE,
    ChannelStateError,
    Finish,
    Hello,
    Transcript,
    derivation_input,
    session_id_for,
    signed_transcript,
)
from securethread.channel.transfer import TransferMessage, WrappedEntry
from securethread.errors import FormatError, InvalidPointError
from securethread.formats import cbor
from securethread.keys.ecutil import point_of

POINT = point_of(ec.generate_private_key(ec.SECP256R1()).public_key())
POINT2 = point_of(ec.generate_private_key(ec.SECP256R1()).public_key())


def oem_hello(**kw: object) -> Hello:
    args: dict[str, object] = dict(
        role="oem",
        nonce=b"\x01" * 32,
        ephemeral=POINT,
        certificate=b"\x30" * 100,
        derivation="ckd-null+aes-ecb-encrypt-data",
    )
    args.update(kw)
    return Hello(**args)  # type: ignore[arg-type]


def test_hello_round_trip_both_roles() -> None:
    h = oem_hello()
    assert Hello.from_bytes(h.to_bytes(), role="oem") == h
    p = oem_hello(role="programmer", peer_nonce=b"\x02" * 32)
    assert Hello.from_bytes(p.to_bytes(), role="programmer") == p
    assert cbor.decode(p.to_bytes())["type"] == "programmer-hello"


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("nonce", b"\x01" * 31, FormatError),
        ("nonce", "not bytes", FormatError),
        ("ephemeral", b"\x04" + b"\x00" * 64, InvalidPointError),  # not on P-256
        # a fresh point each run: its id is fixed (pytest-xdist workers collect the same ids)
        pytest.param("ephemeral", POINT[:-1], FormatError, id="ephemeral-truncated-FormatError"),
        ("certificate", b"", FormatError),
        ("certificate", b"x" * 9000, FormatError),
        ("role", "device", FormatError),
        ("peer_nonce", b"\x02" * 32, FormatError),  # the OEM never echoes a nonce
        ("derivation", "x" * 65, FormatError),
    ],
)
def test_hello_rejects_bad_fields(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        oem_hello(**{field: value})


def test_programmer_hello_needs_peer_nonce() -> None:
    with pytest.raises(FormatError, match="peer_nonce"):
        oem_hello(role="programmer")


def test_hello_parse_rejects_wrong_version_extra_field_and_type() -> None:
    m = cbor.decode(oem_hello().to_bytes())
    for old_or_unknown in (1, 3):  # version 2 since issue 21: nothing reads version 1
        with pytest.raises(FormatError, match="version"):
            Hello.from_bytes(cbor.encode({**m, "v": old_or_unknown}), role="oem")
    with pytest.raises(FormatError, match="hello: unknown field 'extra'"):
        Hello.from_bytes(cbor.encode({**m, "extra": 1}), role="oem")
    with pytest.raises(FormatError, match="hello: missing field 'derivation'"):
        Hello.from_bytes(cbor.encode({k: v for k, v in m.items() if k != "derivation"}), role="oem")
    with pytest.raises(FormatError, match="carries a peer nonce"):
        Hello.from_bytes(cbor.encode({**m, "peer_nonce": b"\x02" * 32}), role="oem")
    with pytest.raises(ChannelStateError, match="expected a 'programmer-hello'"):
        Hello.from_bytes(oem_hello().to_bytes(), role="programmer")


def test_hello_truncated_and_oversized() -> None:
    data = oem_hello().to_bytes()
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(FormatError):
            Hello.from_bytes(data[:cut], role="oem")
    big = cbor.encode({**cbor.decode(data), "cert": b"\x30" * MAX_HELLO_SIZE})
    with pytest.raises(FormatError, match="exceeds the limit"):
        Hello.from_bytes(big, role="oem")


def test_finish_round_trip_and_limits() -> None:
    f = Finish(role="oem", session_id=b"s" * 16, signature=b"\x30" * 70, confirm=b"c" * 16)
    assert Finish.from_bytes(f.to_bytes(), role="oem") == f
    with pytest.raises(FormatError):
        Finish(role="oem", session_id=b"s" * 15, signature=b"x", confirm=b"c" * 16)
    with pytest.raises(FormatError):
        Finish(role="oem", session_id=b"s" * 16, signature=b"x", confirm=b"c" * 15)
    with pytest.raises(FormatError):
        Finish(role="oem", session_id=b"s" * 16, signature=b"x" * 200, confirm=b"c" * 16)
    with pytest.raises(FormatError, match="exceeds"):
        Finish.from_bytes(b"\x00" * (MAX_FINISH_SIZE + 1), role="oem")


def test_transcript_binds_every_field() -> None:
    oem = oem_hello()
    prog = oem_hello(role="programmer", nonce=b"\x03" * 32, ephemeral=POINT2, peer_nonce=oem.nonce)
    t = Transcript.of(oem, prog)
    base = t.digest()
    assert t.oem_certificate == hashlib.sha256(oem.certificate).digest()
    for field in ("oem_nonce", "programmer_nonce", "oem_certificate", "programmer_certificate"):
        changed = _replace(t, field)
        assert changed.digest() != base, field
    swapped = Transcript.of(
        oem_hello(ephemeral=POINT2),
        oem_hello(role="programmer", nonce=b"\x03" * 32, ephemeral=POINT, peer_nonce=oem.nonce),
    )
    assert swapped.digest() != base  # roles are positional: swapping keys changes the hash
    assert session_id_for(base) != session_id_for(swapped.digest())
    assert signed_transcript("oem", base) != signed_transcript("programmer", base)
    assert derivation_input("wrap", base) != derivation_input("confirm", base)
    assert len(derivation_input("mac", base)) == 32


def _replace(t: Transcript, field: str) -> Transcript:
    import attrs

    return attrs.evolve(t, **{field: b"\xff" * 32})  # type: ignore[arg-type]


def entry(**kw: object) -> WrappedEntry:
    args: dict[str, object] = dict(
        label="image-key",
        key_id=b"id",
        usage="encrypt",
        transferable=True,
        wrapped=b"w" * 40,
        kcv=b"k" * 8,
    )
    args.update(kw)
    return WrappedEntry(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("label", ""),
        ("label", "x" * 129),
        ("label", 5),
        ("key_id", b"i" * 65),
        ("usage", "sign"),
        ("transferable", 1),
        ("wrapped", b"w" * 24),  # an AES-128 key: not what we transfer
        ("kcv", b"k" * 16),
    ],
)
def test_wrapped_entry_rejects(field: str, value: object) -> None:
    with pytest.raises(FormatError):
        entry(**{field: value})


def test_transfer_body_round_trip_and_bad_bodies() -> None:
    msg = TransferMessage(
        session_id=b"s" * 16, sequence=3, transfer_id=b"t" * 16, entries=(entry(),)
    )
    assert TransferMessage.from_body(msg.body_bytes()) == msg
    m = cbor.decode(msg.body_bytes())
    with pytest.raises(FormatError, match="entries"):
        TransferMessage.from_body(cbor.encode({**m, "entries": []}))
    with pytest.raises(FormatError, match="twice"):
        TransferMessage.from_body(cbor.encode({**m, "entries": m["entries"] * 2}))
    with pytest.raises(FormatError, match="field 'seq' must be an integer"):
        TransferMessage.from_body(cbor.encode({**m, "seq": -1}))
    with pytest.raises(FormatError, match="field 'seq' must be an integer"):
        TransferMessage.from_body(cbor.encode({**m, "seq": True}))
    with pytest.raises(FormatError, match="unknown field 'more'"):
        TransferMessage.from_body(cbor.encode({**m, "more": 1}))
    with pytest.raises(FormatError, match="missing field 'transfer_id'"):
        TransferMessage.from_body(cbor.encode({k: v for k, v in m.items() if k != "transfer_id"}))
