"""Handshake and transfer logic on the software backend (no token): the same protocol code."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securethread.channel.handshake import ChannelStateError, OemChannel, ProgrammerChannel
from securethread.channel.transfer import KeyReceiver, KeySender
from securethread.errors import ConfirmationError, KeyPolicyError, ReplayError
from securethread.hsm import IMAGE_KEY, SoftwareBackend
from securethread.pki import EnclavePurpose, certify_enclave, create_enclave_csr, create_root_ca
from tests.license_probe import licensed_value


@pytest.fixture(scope="module")
def world() -> dict[str, object]:
    oem, prog = SoftwareBackend("oem"), SoftwareBackend("programmer")
    root = create_root_ca(oem, label="root")
    out: dict[str, object] = {"oem": oem, "prog": prog, "root": root}
    for backend, role in ((oem, "oem"), (prog, "programmer")):
        csr = create_enclave_csr(
            backend, label="id", enclave_name=role, purpose=EnclavePurpose.IDENTITY
        )
        out[f"{role}-cert"] = certify_enclave(
            oem.private_key("root"),
            root,
            csr,
            enclave_name=role,
            purpose=EnclavePurpose.IDENTITY,
            role=role,
        )
    return out


def channels(w: dict[str, object]) -> tuple[OemChannel, ProgrammerChannel]:
    oem, prog = w["oem"], w["prog"]
    assert isinstance(oem, SoftwareBackend) and isinstance(prog, SoftwareBackend)
    return (
        OemChannel(
            oem,
            identity_key=oem.private_key("id"),
            identity_cert=w["oem-cert"],  # type: ignore[arg-type]
            root_cert=w["root"],  # type: ignore[arg-type]
            expected_peer=w["programmer-cert"],  # type: ignore[arg-type]
        ),
        ProgrammerChannel(
            prog,
            identity_key=prog.private_key("id"),
            identity_cert=w["programmer-cert"],  # type: ignore[arg-type]
            root_cert=w["root"],  # type: ignore[arg-type]
        ),
    )


def test_software_handshake_and_transfer(world: dict[str, object]) -> None:
    o, p = channels(world)
    m4 = p.receive_finish(o.receive_hello(p.receive_hello(o.start())))
    so, sp = o.receive_finish(m4), p.session
    assert so.session_id == sp.session_id and so.transcript_hash == sp.transcript_hash
    oem, prog = world["oem"], world["prog"]
    assert isinstance(oem, SoftwareBackend) and isinstance(prog, SoftwareBackend)
    key = oem.generate_aes("image-1", policy=IMAGE_KEY)
    sender, receiver = KeySender(so), KeyReceiver(sp)
    msg = sender.send(["image-1"])
    record = sender.verify_ack(receiver.receive(msg))
    assert record.keys[0].label == "image-1" and not record.committed
    assert not prog.has_key("image-1")  # acknowledged in session copies only
    final = sender.verify_committed(receiver.commit(sender.commit(record)))
    assert final.committed and final.keys == record.keys
    ct = key.encrypt_gcm(b"\0" * 12, b"data", b"")
    # The programmer's copy cannot decrypt (PROGRAMMER_IMAGE_KEY); licensed, it opens ct.
    imported = prog.secret_key("image-1")
    with pytest.raises(KeyPolicyError, match="not allowed to decrypt"):
        imported.decrypt_gcm(b"\0" * 12, ct, b"")
    assert AESGCM(licensed_value(prog, imported)).decrypt(b"\0" * 12, ct, b"") == b"data"
    with pytest.raises(ReplayError):
        receiver.receive(msg)


def test_software_confirmation_and_state(world: dict[str, object]) -> None:
    from securethread.formats import cbor

    o, p = channels(world)
    m3 = cbor.decode(o.receive_hello(p.receive_hello(o.start())))
    m3["confirm"] = bytes(16)
    with pytest.raises(ConfirmationError):
        p.receive_finish(cbor.encode(m3))
    assert p.state == "failed"
    with pytest.raises(ChannelStateError):
        p.receive_finish(cbor.encode(m3))
