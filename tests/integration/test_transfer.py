"""Key transfer over the channel, and sealed packages, between the real SoftHSM tokens."""

from __future__ import annotations

import os
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

from securethread.channel.transfer import (
    KeyReceiver,
    KeySender,
    TokenPackageRegistry,
    WrongRecipientError,
    _mac_input,
    open_package,
    seal_package,
)
from securethread.errors import (
    CertificateError,
    ChannelError,
    DecryptionError,
    DuplicateObjectError,
    FormatError,
    KeyPolicyError,
    ReplayError,
    SignatureError,
)
from securethread.formats import cbor, envelope
from securethread.hsm import IMAGE_KEY, KEY_AGREEMENT, Curve, Token
from securethread.hsm.policy import secret_template
from securethread.keys.policy import KeyPolicy, Usage
from tests.integration import test_channel as _channel_tests
from tests.integration.test_channel import Pki, handshake

pki = _channel_tests.pki  # the session-scoped PKI fixture, shared with the channel tests

NONCE = b"\x01" * 12


def image_keys(oem: Token, n: int) -> list[str]:
    labels = [f"img-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    for lb in labels:
        oem.generate_aes(lb, policy=IMAGE_KEY)
    return labels


def assert_absent(token: Token, labels: list[str]) -> None:
    for lb in labels:
        assert not token.has_key(lb), lb


def test_transfer_and_use_in_programmer_token(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 3)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    msg = sender.send(labels, transferable={labels[2]: False})
    record = sender.verify_ack(receiver.receive(msg))
    assert record.session_id == hs.oem.session_id
    assert [k.label for k in record.keys] == labels
    assert [k.key_id for k in record.keys] == [oem.secret_key(lb).key_id for lb in labels]
    for lb in labels:
        ct = oem.secret_key(lb).encrypt_gcm(NONCE, b"image chunk " + lb.encode(), b"hdr")
        imported = programmer.secret_key(lb)
        assert imported.decrypt_gcm(NONCE, ct, b"hdr") == b"image chunk " + lb.encode()
        assert imported.key_id == oem.secret_key(lb).key_id
    # S1: sensitive everywhere; extractable only where the OEM said transferable.
    for lb in labels[:2]:
        rep = programmer.secret_key(lb).policy_report()
        rep.check(transferable=True)
        assert rep.sensitive and rep.extractable
    rep = programmer.secret_key(labels[2]).policy_report()
    rep.check(transferable=False)
    assert rep.sensitive and not rep.extractable and rep.never_extractable is False
    # The ack verifies offline with the programmer's certificate alone.
    body = envelope.open_envelope(
        record.ack, kind="key-transfer-ack", keys=pki.programmer.cert.public_key()
    )
    assert body["sid"] == hs.oem.session_id


def test_no_message_contains_the_plaintext_key(pki: Pki, oem: Token, programmer: Token) -> None:
    # The only place a key with a known value is created: to look for it on the wire.
    known = os.urandom(32)
    lb = f"known-{uuid.uuid4().hex[:10]}"
    oem.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: known,
            Attribute.LABEL: lb,
            Attribute.ID: b"known",
            **secret_template(IMAGE_KEY),
        }
    )
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    msg = sender.send([lb])
    ack = receiver.receive(msg)
    sender.verify_ack(ack)
    for m in (*hs.messages, msg, ack):
        assert known not in m
        assert known[:16] not in m and known[16:] not in m
    # ...and the programmer holds exactly that key.
    ct = AESGCM(known).encrypt(NONCE, b"payload", b"")
    assert programmer.secret_key(lb).decrypt_gcm(NONCE, ct, b"") == b"payload"


def test_replayed_transfer_is_refused(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    msg = sender.send(labels)
    receiver.receive(msg)
    programmer.destroy(labels[0])  # even with the label free again
    with pytest.raises(ReplayError, match="already received"):
        receiver.receive(msg)
    assert_absent(programmer, labels)


def test_transfer_from_an_older_session(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    old = handshake(pki)
    msg = KeySender(old.oem).send(labels)
    new = handshake(pki)
    with pytest.raises(ReplayError, match="another"):
        KeyReceiver(new.programmer).receive(msg)
    assert_absent(programmer, labels)


def test_tampered_transfer_fails_the_mac(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 2)
    hs = handshake(pki)
    msg = cbor.decode(KeySender(hs.oem).send(labels))
    body = cbor.decode(msg["body"])
    body["entries"][1]["transferable"] = False
    msg["body"] = cbor.encode(body)
    with pytest.raises(ChannelError, match="MAC"):
        KeyReceiver(hs.programmer).receive(cbor.encode(msg))
    assert_absent(programmer, labels)


def test_truncated_and_oversized_transfer(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)
    hs = handshake(pki)
    msg = KeySender(hs.oem).send(labels)
    receiver = KeyReceiver(hs.programmer)
    with pytest.raises(FormatError, match="truncated"):
        receiver.receive(msg[:-5])
    with pytest.raises(FormatError, match="exceeds"):
        receiver.receive(b"\x00" * (65 * 1024))
    receiver.receive(msg)  # neither spent the sequence number


def test_duplicate_label_imports_nothing(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 3)
    programmer.generate_aes(labels[1], policy=IMAGE_KEY)  # already there
    hs = handshake(pki)
    with pytest.raises(DuplicateObjectError, match=labels[1]):
        KeyReceiver(hs.programmer).receive(KeySender(hs.oem).send(labels))
    assert_absent(programmer, [labels[0], labels[2]])


def test_failed_entry_rolls_back_the_others(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 3)
    hs = handshake(pki)
    msg = cbor.decode(KeySender(hs.oem).send(labels))
    body = cbor.decode(msg["body"])
    body["entries"][2]["wrapped"] = os.urandom(40)  # authentic message, corrupt wrapped key
    msg["body"] = cbor.encode(body)
    msg["mac"] = hs.oem.mac_key.cmac(_mac_input(msg["body"]))
    with pytest.raises(DecryptionError):
        KeyReceiver(hs.programmer).receive(cbor.encode(msg))
    assert_absent(programmer, labels)


def test_non_extractable_key_is_not_sent(pki: Pki, oem: Token, label: str) -> None:
    oem.generate_aes(label, policy=KeyPolicy(usage=Usage.ENCRYPT))
    hs = handshake(pki)
    sender = KeySender(hs.oem)
    with pytest.raises(KeyPolicyError):
        sender.send([label])
    assert hs.oem.next_send_sequence == 0


def test_ack_checks(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    ack = receiver.receive(sender.send(labels))
    outer = cbor.decode(ack)
    forged = dict(outer, sigs=[dict(outer["sigs"][0], sig=outer["sigs"][0]["sig"][:-1] + b"\0")])
    with pytest.raises(SignatureError):
        sender.verify_ack(cbor.encode(forged))
    # An ack signed by someone else (the OEM's own identity key) counts for nothing.
    body = cbor.decode(outer["body"])
    own = envelope.seal("key-transfer-ack", body, [oem.private_key(pki.oem.identity)])
    with pytest.raises(SignatureError):
        sender.verify_ack(own)
    sender.verify_ack(ack)
    with pytest.raises(ReplayError):
        sender.verify_ack(ack)


def test_roles_are_enforced(pki: Pki) -> None:
    from securethread.errors import ConfigurationError

    hs = handshake(pki)
    with pytest.raises(ConfigurationError):
        KeySender(hs.programmer)
    with pytest.raises(ConfigurationError):
        KeyReceiver(hs.oem)


# --- sealed packages ----------------------------------------------------------------------


def _open(pki: Pki, data: bytes, registry: TokenPackageRegistry, **kw: object) -> object:
    ka = pki.programmer_ka
    args: dict[str, object] = dict(
        backend=ka.token,
        ka_key=ka.token.private_key(ka.identity),
        ka_cert=ka.cert,
        root_cert=pki.root,
        registry=registry,
    )
    args.update(kw)
    return open_package(data, **args)  # type: ignore[arg-type]


def _seal(pki: Pki, labels: list[str], recipient: object = None, sender: object = None) -> bytes:
    s = sender or pki.oem
    return seal_package(
        s.token,  # type: ignore[attr-defined]
        labels,
        identity_key=s.token.private_key(s.identity),  # type: ignore[attr-defined]
        identity_cert=s.cert,  # type: ignore[attr-defined]
        recipient_cert=recipient or pki.programmer_ka.cert,  # type: ignore[arg-type]
        root_cert=pki.root,
    )


def test_sealed_package_imports_once(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 2)
    data = _seal(pki, labels)
    registry = TokenPackageRegistry(programmer)
    receipt = _open(pki, data, registry)
    assert [k.label for k in receipt.keys] == labels  # type: ignore[attr-defined]
    assert registry.seen(receipt.package_id)  # type: ignore[attr-defined]
    for lb in labels:
        ct = oem.secret_key(lb).encrypt_gcm(NONCE, b"offline", b"")
        assert programmer.secret_key(lb).decrypt_gcm(NONCE, ct, b"") == b"offline"
        programmer.secret_key(lb).policy_report().check(transferable=True)
    for lb in labels:
        programmer.destroy(lb)  # even with the labels free, a second import is refused
    with pytest.raises(ReplayError, match="already imported"):
        _open(pki, data, registry)
    assert_absent(programmer, labels)
    # A fresh registry object reads the record from the token.
    with pytest.raises(ReplayError):
        _open(pki, data, TokenPackageRegistry(programmer))


def test_package_for_another_enclave(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    data = _seal(pki, labels, recipient=pki.other_ka.cert)
    with pytest.raises(WrongRecipientError):
        _open(pki, data, TokenPackageRegistry(programmer))
    assert_absent(programmer, labels)


def test_package_signed_outside_the_oem_root(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    # The rogue enclave cannot read the OEM's keys; it seals keys of its own token.
    rogue_labels = [f"rk-{uuid.uuid4().hex[:8]}"]
    pki.rogue.token.generate_aes(rogue_labels[0], policy=IMAGE_KEY)
    data = _seal(pki, rogue_labels, sender=pki.rogue)
    with pytest.raises(CertificateError):
        _open(pki, data, TokenPackageRegistry(programmer))
    assert_absent(programmer, rogue_labels + labels)


def test_package_sender_must_be_the_oem_role(pki: Pki, programmer: Token) -> None:
    lb = f"pk-{uuid.uuid4().hex[:8]}"
    pki.other_programmer.token.generate_aes(lb, policy=IMAGE_KEY)
    data = _seal(pki, [lb], sender=pki.other_programmer)  # role "programmer"
    with pytest.raises(CertificateError):
        _open(pki, data, TokenPackageRegistry(programmer))
    assert_absent(programmer, [lb])


def test_package_tampered_or_malformed(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    data = _seal(pki, labels)
    outer = cbor.decode(data)
    body = cbor.decode(outer["body"])
    body["entries"][0]["transferable"] = False
    with pytest.raises(SignatureError):
        _open(
            pki,
            cbor.encode(dict(outer, body=cbor.encode(body))),
            TokenPackageRegistry(programmer),
        )
    with pytest.raises(FormatError):
        _open(pki, data[:-3], TokenPackageRegistry(programmer))
    with pytest.raises(FormatError):
        _open(pki, data + b"\0" * (80 * 1024), TokenPackageRegistry(programmer))
    assert_absent(programmer, labels)


def test_seal_refuses_a_recipient_cert_with_wrong_purpose(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)
    with pytest.raises(CertificateError):
        _seal(pki, labels, recipient=pki.programmer.cert)  # IDENTITY, not KEY_AGREEMENT
    with pytest.raises(CertificateError):
        _seal(pki, labels, recipient=pki.rogue.cert)


def test_package_must_be_opened_with_the_certified_key(pki: Pki, programmer: Token) -> None:
    from securethread.errors import ConfigurationError

    other = programmer.generate_ec(
        f"ka-{uuid.uuid4().hex[:8]}", curve=Curve.P256, policy=KEY_AGREEMENT
    )
    with pytest.raises(ConfigurationError):
        _open(pki, b"", TokenPackageRegistry(programmer), ka_key=other)
