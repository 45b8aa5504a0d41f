"""The secure channel between the real `oem` and `programmer` SoftHSM tokens."""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import pytest
from cryptography import x509
from pkcs11 import Attribute

from securethread.channel.handshake import (
    ChannelSession,
    ChannelStateError,
    OemChannel,
    ProgrammerChannel,
    ReflectionError,
    WrongPeerError,
    signed_transcript,
)
from securethread.errors import (
    CertificateError,
    ChannelError,
    ConfirmationError,
    FormatError,
    ReplayError,
    SignatureError,
)
from securethread.hsm import Token


@attrs.frozen
class Enclave:
    token: Token
    identity: str  # label of the identity key (and its certificate)
    cert: x509.Certificate


@attrs.frozen
class Pki:
    root: x509.Certificate
    oem: Enclave
    programmer: Enclave
    programmer_ka: Enclave  # the programmer's static KEY_AGREEMENT key
    other_programmer: Enclave  # another certified programmer enclave (spare token)
    other_ka: Enclave  # ... and its KEY_AGREEMENT key
    rogue: Enclave  # role "programmer", but issued by a root that is not the OEM's
    rogue_root: x509.Certificate
    wrong_purpose: Enclave  # programmer LICENSE_SIGNING cert presented as identity
    wrong_role: Enclave  # a programmer-held key certified with role "oem"


def _enclave(
    token: Token,
    root_key: Any,
    root: x509.Certificate,
    *,
    name: str,
    purpose: Any,
    role: str,
    signer: Any = None,
) -> Enclave:
    from securethread.pki import certify_enclave, create_enclave_csr

    label = f"ch-{name}-{uuid.uuid4().hex[:8]}"
    csr = create_enclave_csr(token, label=label, enclave_name=name, purpose=purpose, signer=signer)
    cert = certify_enclave(
        root_key,
        root,
        csr,
        enclave_name=name,
        purpose=purpose,
        role=role,
        proof_key=signer.public_key() if signer is not None else None,
    )
    return Enclave(token, label, cert)


@pytest.fixture(scope="session")
def pki(oem: Token, programmer: Token, spare: Token) -> Pki:
    from securethread.pki import EnclavePurpose, create_root_ca

    tag = uuid.uuid4().hex[:8]
    root = create_root_ca(oem, label=f"ch-root-{tag}")
    root_key = oem.private_key(f"ch-root-{tag}")
    rogue_root = create_root_ca(spare, label=f"ch-rogue-root-{tag}")
    rogue_key = spare.private_key(f"ch-rogue-root-{tag}")
    ident = EnclavePurpose.IDENTITY
    oem_e = _enclave(oem, root_key, root, name="oem-1", purpose=ident, role="oem")
    prog = _enclave(programmer, root_key, root, name="prog-1", purpose=ident, role="programmer")
    other_id = _enclave(spare, root_key, root, name="prog-2", purpose=ident, role="programmer")
    return Pki(
        root=root,
        oem=oem_e,
        programmer=prog,
        other_programmer=other_id,
        programmer_ka=_enclave(
            programmer,
            root_key,
            root,
            name="prog-1",
            purpose=EnclavePurpose.KEY_AGREEMENT,
            role="programmer",
            signer=programmer.private_key(prog.identity),
        ),
        other_ka=_enclave(
            spare,
            root_key,
            root,
            name="prog-2",
            purpose=EnclavePurpose.KEY_AGREEMENT,
            role="programmer",
            signer=spare.private_key(other_id.identity),
        ),
        rogue=_enclave(
            spare, rogue_key, rogue_root, name="prog-1", purpose=ident, role="programmer"
        ),
        rogue_root=rogue_root,
        wrong_purpose=_enclave(
            programmer,
            root_key,
            root,
            name="prog-1",
            purpose=EnclavePurpose.LICENSE_SIGNING,
            role="programmer",
        ),
        wrong_role=_enclave(programmer, root_key, root, name="prog-1", purpose=ident, role="oem"),
    )


def oem_channel(
    pki: Pki, enclave: Enclave | None = None, *, expected: bytes | x509.Certificate | None = None
) -> OemChannel:
    """The OEM side, naming pki.programmer (or ``expected``) as the peer it means to reach."""
    e = enclave or pki.oem
    return OemChannel(
        e.token,
        identity_key=e.token.private_key(e.identity),
        identity_cert=e.cert,
        root_cert=pki.root,
        expected_peer=pki.programmer.cert if expected is None else expected,
    )


def programmer_channel(pki: Pki, enclave: Enclave | None = None) -> ProgrammerChannel:
    e = enclave or pki.programmer
    return ProgrammerChannel(
        e.token,
        identity_key=e.token.private_key(e.identity),
        identity_cert=e.cert,
        root_cert=pki.root,
    )


@attrs.frozen
class Handshake:
    oem: ChannelSession
    programmer: ChannelSession
    messages: tuple[bytes, ...]


def handshake(pki: Pki) -> Handshake:
    o, p = oem_channel(pki), programmer_channel(pki)
    m1 = o.start()
    m2 = p.receive_hello(m1)
    m3 = o.receive_hello(m2)
    m4 = p.receive_finish(m3)
    return Handshake(o.receive_finish(m4), p.session, (m1, m2, m3, m4))


def _ephemeral_objects(token: Token) -> int:
    return len(list(token.session.get_objects({Attribute.LABEL: "securethread-channel-ephemeral"})))


# --- the good path -------------------------------------------------------------------------


def test_handshake_between_real_tokens(pki: Pki, oem: Token, programmer: Token) -> None:
    hs = handshake(pki)
    o, p = hs.oem, hs.programmer
    assert o.session_id == p.session_id and len(o.session_id) == 16
    assert o.transcript_hash == p.transcript_hash
    assert o.derivation == p.derivation == "ckd-null+aes-ecb-encrypt-data"
    assert o.peer_certificate == pki.programmer.cert
    assert p.peer_certificate == pki.oem.cert
    # Same keys on both sides: a CMAC by one token verifies in the other.
    assert o.mac_key.cmac(b"probe") == p.mac_key.cmac(b"probe")
    for key in (o.wrap_key, o.mac_key, p.wrap_key, p.mac_key):
        key.policy_report().check(transferable=False)
    # Ephemeral keys are gone once the handshake is over.
    assert _ephemeral_objects(oem) == 0 and _ephemeral_objects(programmer) == 0
    o.close()
    p.close()
    with pytest.raises(ChannelStateError):
        o.require_open()


def test_two_handshakes_give_unrelated_sessions(pki: Pki) -> None:
    a, b = handshake(pki), handshake(pki)
    assert a.oem.session_id != b.oem.session_id
    assert a.oem.mac_key.cmac(b"probe") != b.oem.mac_key.cmac(b"probe")


# --- wrong peers ---------------------------------------------------------------------------


def test_certificate_not_issued_by_oem_root(pki: Pki, oem: Token) -> None:
    o, p = oem_channel(pki), programmer_channel(pki, pki.rogue)
    p2 = p.receive_hello(o.start())  # the rogue accepts the genuine OEM...
    with pytest.raises(CertificateError):
        o.receive_hello(p2)  # ...the OEM refuses the rogue
    assert o.state == "failed" and _ephemeral_objects(oem) == 0
    with pytest.raises(ChannelStateError):
        o.receive_finish(b"")


def test_programmer_refuses_oem_certified_by_another_root(pki: Pki) -> None:
    o = oem_channel(pki)
    p = ProgrammerChannel(
        pki.programmer.token,
        identity_key=pki.programmer.token.private_key(pki.programmer.identity),
        identity_cert=pki.programmer.cert,
        root_cert=pki.rogue_root,  # this programmer pins another root
    )
    with pytest.raises(CertificateError):
        p.receive_hello(o.start())
    assert p.state == "failed"
    o.abort()


def test_enclave_cert_with_wrong_purpose(pki: Pki) -> None:
    from securethread.pki._errors import WrongPurposeError

    o, p = oem_channel(pki), programmer_channel(pki, pki.wrong_purpose)
    with pytest.raises(WrongPurposeError):
        o.receive_hello(p.receive_hello(o.start()))


def test_peer_with_role_oem_is_refused(pki: Pki) -> None:
    # Reflection by certificate: the "programmer" holds an identity cert with role "oem".
    o, p = oem_channel(pki), programmer_channel(pki, pki.wrong_role)
    with pytest.raises(CertificateError, match="role|oem"):
        o.receive_hello(p.receive_hello(o.start()))


def test_programmer_refuses_oem_with_role_programmer(pki: Pki) -> None:
    # The "OEM" presents another programmer's identity (role "programmer").
    o = oem_channel(pki, pki.other_programmer)
    with pytest.raises(CertificateError):
        programmer_channel(pki).receive_hello(o.start())


def test_oem_refuses_a_certified_programmer_it_did_not_name(
    pki: Pki, oem: Token, spare: Token
) -> None:
    # prog-2 (spare token) is a genuine programmer under the same root: the OEM named prog-1.
    before = _ephemeral_objects(oem), _ephemeral_objects(spare)
    o, p = oem_channel(pki), programmer_channel(pki, pki.other_programmer)
    m2 = p.receive_hello(o.start())
    with pytest.raises(WrongPeerError, match="not the named programmer"):
        o.receive_hello(m2)
    assert o.state == "failed"
    with pytest.raises(ChannelStateError):
        _ = o.session
    p.abort()
    assert (_ephemeral_objects(oem), _ephemeral_objects(spare)) == before


def test_oem_names_its_peer_by_fingerprint(pki: Pki) -> None:
    from securethread.pki import cert_fingerprint

    fp = cert_fingerprint(pki.programmer.cert)
    o, p = oem_channel(pki, expected=fp), programmer_channel(pki)
    m4 = p.receive_finish(o.receive_hello(p.receive_hello(o.start())))
    with o.receive_finish(m4) as session:
        assert session.peer_fingerprint == fp
    p.session.close()
    other = cert_fingerprint(pki.other_programmer.cert)
    o, p = oem_channel(pki, expected=other), programmer_channel(pki)
    with pytest.raises(WrongPeerError):
        o.receive_hello(p.receive_hello(o.start()))
    p.abort()


@pytest.mark.parametrize("bad", [b"", b"\x00" * 31, "ab" * 32, None])
def test_oem_must_name_a_peer(pki: Pki, bad: object) -> None:
    from securethread.errors import ConfigurationError

    with pytest.raises((ConfigurationError, TypeError)):
        OemChannel(
            pki.oem.token,
            identity_key=pki.oem.token.private_key(pki.oem.identity),
            identity_cert=pki.oem.cert,
            root_cert=pki.root,
            expected_peer=bad,  # type: ignore[arg-type]
        )


# --- tampered, reflected, replayed, malformed messages ---------------------------------------


def test_wrong_transcript_signature(pki: Pki) -> None:
    from securethread.formats import cbor

    o, p = oem_channel(pki), programmer_channel(pki)
    m3 = o.receive_hello(p.receive_hello(o.start()))
    fin = cbor.decode(m3)
    # A valid signature by the right key, but over another transcript.
    key = pki.oem.token.private_key(pki.oem.identity)
    fin["sig"] = key.sign(signed_transcript("oem", b"\x00" * 32))
    with pytest.raises(SignatureError):
        p.receive_finish(cbor.encode(fin))
    assert p.state == "failed"


def test_signature_of_the_other_role_is_refused(pki: Pki) -> None:
    from securethread.formats import cbor

    o, p = oem_channel(pki), programmer_channel(pki)
    m3 = o.receive_hello(p.receive_hello(o.start()))
    fin = cbor.decode(m3)
    key = pki.oem.token.private_key(pki.oem.identity)
    fin["sig"] = key.sign(signed_transcript("programmer", o._th))
    with pytest.raises(SignatureError):
        p.receive_finish(cbor.encode(fin))


def test_confirmation_mismatch(pki: Pki) -> None:
    from securethread.formats import cbor

    o, p = oem_channel(pki), programmer_channel(pki)
    m3 = o.receive_hello(p.receive_hello(o.start()))
    m4 = p.receive_finish(m3)
    fin = cbor.decode(m4)
    fin["confirm"] = bytes(16)
    with pytest.raises(ConfirmationError):
        o.receive_finish(cbor.encode(fin))
    assert o.state == "failed"


def test_reflected_hello_and_finish(pki: Pki) -> None:
    o = oem_channel(pki)
    m1 = o.start()
    with pytest.raises(ReflectionError):
        o.receive_hello(m1)
    o, p = oem_channel(pki), programmer_channel(pki)
    m2 = p.receive_hello(o.start())
    with pytest.raises(ReflectionError):
        p.receive_finish(m2)  # its own hello, sent back
    m3 = o.receive_hello(m2)
    with pytest.raises(ReflectionError):
        o.receive_finish(m3)  # its own finish, sent back


def test_reflected_hello_with_role_rewritten(pki: Pki) -> None:
    from securethread.formats import cbor

    o = oem_channel(pki)
    m = cbor.decode(o.start())
    m.update(type="programmer-hello", peer_nonce=m["nonce"])
    with pytest.raises(ReflectionError):
        o.receive_hello(cbor.encode(m))


def test_messages_from_an_older_session(pki: Pki) -> None:
    old = handshake(pki)
    o, p = oem_channel(pki), programmer_channel(pki)
    o.start()
    with pytest.raises(ReplayError, match="nonce"):
        o.receive_hello(old.messages[1])  # an old programmer hello
    o, p = oem_channel(pki), programmer_channel(pki)
    m3 = o.receive_hello(p.receive_hello(o.start()))
    with pytest.raises(ReplayError, match="another session"):
        o.receive_finish(old.messages[3])
    with pytest.raises(ReplayError, match="another session"):
        p.receive_finish(old.messages[2])
    assert m3  # the current finish was never delivered; both sides have aborted


def test_replayed_finish_after_establishment(pki: Pki) -> None:
    o, p = oem_channel(pki), programmer_channel(pki)
    m3 = o.receive_hello(p.receive_hello(o.start()))
    m4 = p.receive_finish(m3)
    o.receive_finish(m4)
    with pytest.raises(ChannelStateError):
        o.receive_finish(m4)
    with pytest.raises(ChannelStateError):
        p.receive_finish(m3)


@pytest.mark.parametrize("cut", [1, 10, -1])
def test_truncated_hello(pki: Pki, cut: int) -> None:
    o = oem_channel(pki)
    m1 = o.start()
    p = programmer_channel(pki)
    with pytest.raises(FormatError):
        p.receive_hello(m1[:cut])
    assert p.state == "failed"


def test_oversized_and_garbage_messages(pki: Pki) -> None:
    p = programmer_channel(pki)
    with pytest.raises(FormatError, match="exceeds"):
        p.receive_hello(b"\x00" * (64 * 1024))
    o = oem_channel(pki)
    o.start()
    with pytest.raises(FormatError):
        o.receive_hello(b"\xff\xff")


def test_out_of_order_messages(pki: Pki) -> None:
    o, p = oem_channel(pki), programmer_channel(pki)
    with pytest.raises(ChannelStateError):
        o.receive_hello(b"")  # before start()
    with pytest.raises(ChannelStateError):
        o.receive_finish(b"")
    m1 = o.start()
    with pytest.raises(ChannelStateError):
        o.start()
    assert m1
    with pytest.raises(ChannelStateError, match="expected 'oem-hello'"):
        p.receive_hello(_finish_like())  # a finish before any hello
    with pytest.raises(ChannelStateError):
        _ = p.session


def _finish_like() -> bytes:
    from securethread.channel.handshake import Finish

    return Finish(role="oem", session_id=b"s" * 16, signature=b"x", confirm=b"c" * 16).to_bytes()


def test_identity_cert_must_match_key(pki: Pki) -> None:
    from securethread.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        OemChannel(
            pki.oem.token,
            identity_key=pki.oem.token.private_key(pki.oem.identity),
            identity_cert=pki.programmer.cert,
            root_cert=pki.root,
            expected_peer=pki.programmer.cert,
        )


def test_unsupported_derivation_is_refused(pki: Pki) -> None:
    from securethread.formats import cbor

    o = oem_channel(pki)
    m = cbor.decode(o.start())
    m["derivation"] = "ckd-sha1-kdf"
    with pytest.raises(ChannelError, match="derivation"):
        programmer_channel(pki).receive_hello(cbor.encode(m))
