"""Key transfer over the channel, and sealed packages, between the real SoftHSM tokens."""

from __future__ import annotations

import os
import uuid

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

from securethread.channel.transfer import (
    KeyReceiver,
    KeySender,
    PackageReceipt,
    TokenPackageRegistry,
    TransferRecord,
    WrongRecipientError,
    _mac_input,
    open_package,
    seal_package,
    verify_receipt,
)
from securethread.errors import (
    CertificateError,
    ChannelError,
    ConfigurationError,
    ConfirmationError,
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
from tests import cose_edit
from tests.integration import test_channel as _channel_tests
from tests.integration.channel_net import object_census
from tests.integration.test_channel import Enclave, Pki, handshake
from tests.license_probe import licensed_value

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


def deliver(sender: KeySender, receiver: KeyReceiver, msg: bytes) -> TransferRecord:
    """One transfer message, the whole way: ack, commit, confirmation."""
    record = sender.verify_ack(receiver.receive(msg))
    return sender.verify_committed(receiver.commit(sender.commit(record)))


def test_transfer_and_use_in_programmer_token(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 3)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    msg = sender.send(labels, transferable={labels[2]: False})
    acked = sender.verify_ack(receiver.receive(msg))
    assert_absent(programmer, labels)  # acknowledged from session copies: nothing stored yet
    assert not acked.committed and receiver.staged
    record = sender.verify_committed(receiver.commit(sender.commit(acked)))
    assert record.committed and not receiver.staged
    assert record.session_id == hs.oem.session_id
    assert [k.label for k in record.keys] == labels
    assert [k.key_id for k in record.keys] == [oem.secret_key(lb).key_id for lb in labels]
    for lb in labels:
        ct = oem.secret_key(lb).encrypt_gcm(NONCE, b"image chunk " + lb.encode(), b"hdr")
        imported = programmer.secret_key(lb)
        with pytest.raises(KeyPolicyError, match="not allowed to decrypt"):
            imported.decrypt_gcm(NONCE, ct, b"hdr")  # PROGRAMMER_IMAGE_KEY: no usage
        if lb != labels[2]:  # licensed to a device, the programmer's copy opens the image
            value = licensed_value(programmer, imported)
            assert AESGCM(value).decrypt(NONCE, ct, b"hdr") == b"image chunk " + lb.encode()
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
    commit = sender.commit(sender.verify_ack(ack))
    committed = receiver.commit(commit)
    sender.verify_committed(committed)
    for m in (*hs.messages, msg, ack, commit, committed):
        assert known not in m
        assert known[:16] not in m and known[16:] not in m
    # ...and the programmer holds exactly that key.
    assert licensed_value(programmer, programmer.secret_key(lb)) == known


def test_replayed_transfer_is_refused(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    msg = sender.send(labels)
    deliver(sender, receiver, msg)
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
    receiver.abort()


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
    before = object_census(programmer)
    with pytest.raises(DecryptionError):
        KeyReceiver(hs.programmer).receive(cbor.encode(msg))
    assert_absent(programmer, labels)
    assert object_census(programmer) == before  # the two good session copies went too


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
    forged = cose_edit.with_signature(ack, cose_edit.signature(ack)[:-1] + b"\1")
    with pytest.raises(SignatureError):
        sender.verify_ack(forged)
    # An ack signed by someone else (the OEM's own identity key) counts for nothing.
    body = cose_edit.body(ack)
    own = envelope.seal("key-transfer-ack", body, [oem.private_key(pki.oem.identity)])
    with pytest.raises(SignatureError):
        sender.verify_ack(own)
    sender.verify_ack(ack)
    with pytest.raises(ReplayError):
        sender.verify_ack(ack)
    receiver.abort()


def test_roles_are_enforced(pki: Pki) -> None:
    hs = handshake(pki)
    with pytest.raises(ConfigurationError):
        KeySender(hs.programmer)
    with pytest.raises(ConfigurationError):
        KeyReceiver(hs.oem)


# --- the commit: nothing is stored before the OEM verified the ack ----------------------------


def test_nothing_stored_until_the_commit(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 2)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    before = object_census(programmer)
    sender.verify_ack(receiver.receive(sender.send(labels)))
    assert_absent(programmer, labels)
    receiver.abort()  # the session ends without a commit
    assert object_census(programmer) == before
    with pytest.raises(ChannelError, match="no acknowledged transfer"):
        receiver.commit(b"")


def test_commit_must_be_authentic_and_for_this_ack(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    before = object_census(programmer)
    cases: list[tuple[type[Exception], str]] = []
    for tamper in ("mac", "ack", "sid", "type", "truncate"):
        hs = handshake(pki)
        sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
        commit = cbor.decode(
            sender.commit(sender.verify_ack(receiver.receive(sender.send(labels))))
        )
        if tamper == "truncate":
            data = cbor.encode(commit)[:-3]
        else:
            commit[tamper] = {
                "mac": bytes(16),
                "ack": bytes(32),  # a commit for another acknowledgement
                "sid": bytes(16),
                "type": "key-transfer-committed",  # the programmer's own reply, reflected
            }[tamper]
            data = cbor.encode(commit)
        with pytest.raises((ChannelError, FormatError)) as err:
            receiver.commit(data)
        cases.append((type(err.value), tamper))
        assert not receiver.staged  # a refused commit ends the transfer: no second try
        assert_absent(programmer, labels)
        hs.oem.close()
        hs.programmer.close()
    assert object_census(programmer) == before
    assert [c for c, _ in cases] == [
        ChannelError,  # MAC
        ChannelError,  # the MAC covers the ack digest
        ReplayError,  # another session
        FormatError,  # a committed message is not a commit
        FormatError,
    ]


def test_a_commit_from_another_session_is_refused(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    a, b = handshake(pki), handshake(pki)
    sa, ra = KeySender(a.oem), KeyReceiver(a.programmer)
    sb, rb = KeySender(b.oem), KeyReceiver(b.programmer)
    sa.verify_ack(ra.receive(sa.send(labels)))
    commit_b = sb.commit(sb.verify_ack(rb.receive(sb.send(labels))))
    with pytest.raises(ReplayError, match="another session"):
        ra.commit(commit_b)
    rb.abort()
    assert_absent(programmer, labels)


def test_oem_commits_only_what_was_acknowledged(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    record = sender.verify_ack(receiver.receive(sender.send(labels)))
    forged = attrs.evolve(record, transfer_id=bytes(16))  # never sent
    with pytest.raises(ChannelError, match="not acknowledged"):
        sender.commit(forged)
    commit = sender.commit(record)
    with pytest.raises(ChannelError, match="not acknowledged"):
        sender.commit(record)  # one commit per acknowledgement
    with pytest.raises(FormatError):
        sender.verify_committed(commit)  # its own commit, reflected
    committed = receiver.commit(commit)
    assert sender.verify_committed(committed).committed
    with pytest.raises(ReplayError):
        sender.verify_committed(committed)


def test_label_taken_between_ack_and_commit(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 2)
    hs = handshake(pki)
    sender, receiver = KeySender(hs.oem), KeyReceiver(hs.programmer)
    before = object_census(programmer)
    commit = sender.commit(sender.verify_ack(receiver.receive(sender.send(labels))))
    programmer.generate_aes(labels[1], policy=IMAGE_KEY)
    with pytest.raises(DuplicateObjectError, match=labels[1]):
        receiver.commit(commit)
    assert not programmer.has_key(labels[0])  # all or nothing
    # ...and the session copies are gone: only the key made meanwhile is new.
    assert object_census(programmer) - before == {(4, labels[1]): 1}
    assert not before - object_census(programmer)


# --- sealed packages ----------------------------------------------------------------------


def _open(
    pki: Pki,
    data: bytes,
    registry: TokenPackageRegistry,
    *,
    to: tuple[Enclave, Enclave] | None = None,
    **kw: object,
) -> PackageReceipt:
    """Open ``data`` as the programmer ``to`` = (identity, key agreement), prog-1 by default."""
    ident, ka = to or (pki.programmer, pki.programmer_ka)
    args: dict[str, object] = dict(
        backend=ka.token,
        ka_key=ka.token.private_key(ka.identity),
        ka_cert=ka.cert,
        identity_key=ident.token.private_key(ident.identity),
        identity_cert=ident.cert,
        root_cert=pki.root,
        registry=registry,
    )
    args.update(kw)
    return open_package(data, **args)  # type: ignore[arg-type]


def _seal(
    pki: Pki,
    labels: list[str],
    recipient: x509.Certificate | None = None,
    sender: Enclave | None = None,
    programmer: x509.Certificate | None = None,
) -> bytes:
    """Seal ``labels`` to the named ``programmer`` (prog-1) at its KA cert ``recipient``."""
    s = sender or pki.oem
    return seal_package(
        s.token,
        labels,
        identity_key=s.token.private_key(s.identity),
        identity_cert=s.cert,
        expected_programmer=programmer or pki.programmer.cert,
        recipient_cert=recipient or pki.programmer_ka.cert,
        root_cert=pki.root,
    )


def test_sealed_package_imports_once_and_the_oem_verifies_the_receipt(
    pki: Pki, oem: Token, programmer: Token
) -> None:
    labels = image_keys(oem, 2)
    data = _seal(pki, labels)
    registry = TokenPackageRegistry(programmer)
    receipt = _open(pki, data, registry)
    assert [k.label for k in receipt.keys] == labels
    assert registry.seen(receipt.package_id)
    for lb in labels:
        ct = oem.secret_key(lb).encrypt_gcm(NONCE, b"offline", b"")
        value = licensed_value(programmer, programmer.secret_key(lb))
        assert AESGCM(value).decrypt(NONCE, ct, b"") == b"offline"
        programmer.secret_key(lb).policy_report().check(transferable=True)
    # The OEM, offline, with the package it sealed and the programmer it named.
    checked = verify_receipt(
        receipt.signed, package=data, programmer_cert=pki.programmer.cert, root_cert=pki.root
    )
    assert checked == receipt
    assert checked.keys == tuple(
        k for k in checked.keys if k.label in labels and k.kcv and k.key_id
    )
    for lb in labels:
        programmer.destroy(lb)  # even with the labels free, a second import is refused
    with pytest.raises(ReplayError, match="already imported"):
        _open(pki, data, registry)
    assert_absent(programmer, labels)
    # A fresh registry object reads the record from the token.
    with pytest.raises(ReplayError):
        _open(pki, data, TokenPackageRegistry(programmer))


def test_package_for_another_programmer_is_refused(
    pki: Pki, oem: Token, programmer: Token, spare: Token
) -> None:
    labels = image_keys(oem, 1)
    # Sealed to prog-2 (spare token), certified by the same root; prog-1 tries to open it.
    data = _seal(pki, labels, recipient=pki.other_ka.cert, programmer=pki.other_programmer.cert)
    before = object_census(programmer)
    with pytest.raises(WrongRecipientError, match="another programmer"):
        _open(pki, data, TokenPackageRegistry(programmer))
    assert_absent(programmer, labels)
    assert object_census(programmer) == before
    # prog-2 opens it, and its receipt verifies for prog-2 only.
    receipt = _open(pki, data, TokenPackageRegistry(spare), to=(pki.other_programmer, pki.other_ka))
    verify_receipt(
        receipt.signed, package=data, programmer_cert=pki.other_programmer.cert, root_cert=pki.root
    )
    with pytest.raises(SignatureError):
        verify_receipt(
            receipt.signed, package=data, programmer_cert=pki.programmer.cert, root_cert=pki.root
        )


def test_package_for_another_key_agreement_key_is_refused(
    pki: Pki, oem: Token, programmer: Token
) -> None:
    """Right programmer identity, but opened with a KA certificate the package is not for."""
    labels = image_keys(oem, 1)
    data = _seal(pki, labels)
    other_ka = _channel_tests._enclave(
        programmer,
        oem.private_key(_root_label(pki)),
        pki.root,
        name="prog-1",
        purpose=_ka_purpose(),
        role="programmer",
        signer=programmer.private_key(pki.programmer.identity),
    )
    with pytest.raises(WrongRecipientError, match="another enclave"):
        _open(pki, data, TokenPackageRegistry(programmer), to=(pki.programmer, other_ka))
    assert_absent(programmer, labels)


def _root_label(pki: Pki) -> str:
    from securethread.pki import cert_fingerprint

    oem = pki.oem.token
    for label in oem.labels():
        if oem.has_certificate(label) and cert_fingerprint(oem.certificate(label)) == (
            cert_fingerprint(pki.root)
        ):
            return label
    raise AssertionError("root key not found")


def _ka_purpose() -> object:
    from securethread.pki import EnclavePurpose

    return EnclavePurpose.KEY_AGREEMENT


def test_seal_refuses_a_ka_certificate_of_another_programmer(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)
    with pytest.raises(WrongRecipientError, match="does not belong to the named programmer"):
        _seal(pki, labels, recipient=pki.other_ka.cert)  # prog-2's KA key, prog-1 named
    with pytest.raises(CertificateError):
        _seal(pki, labels, programmer=pki.programmer_ka.cert)  # a KA cert named as identity
    with pytest.raises(CertificateError):
        _seal(pki, labels, programmer=pki.rogue.cert)  # a programmer under another root


def test_receipt_checks(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 1)
    data = _seal(pki, labels)
    receipt = _open(pki, data, TokenPackageRegistry(programmer))
    other_data = _seal(pki, image_keys(oem, 1))

    def check(signed: bytes, package: bytes = data) -> PackageReceipt:
        return verify_receipt(
            signed, package=package, programmer_cert=pki.programmer.cert, root_cert=pki.root
        )

    check(receipt.signed)
    with pytest.raises(ConfirmationError, match="another sealed package"):
        check(receipt.signed, other_data)
    body = cose_edit.body(receipt.signed)
    with pytest.raises(SignatureError):  # tampered
        check(cose_edit.with_body(receipt.signed, dict(body, opened=0)))
    with pytest.raises(FormatError):
        check(receipt.signed[:-2])
    # Signed by the programmer's key, but claiming other keys or another package id.
    ident = programmer.private_key(pki.programmer.identity)
    fewer = dict(body, keys=[dict(body["keys"][0], kcv=bytes(8))])
    with pytest.raises(ConfirmationError, match="differ"):
        check(envelope.seal("sealed-key-package-receipt", fewer, [ident]))
    with pytest.raises(ConfirmationError, match="package id"):
        check(
            envelope.seal("sealed-key-package-receipt", dict(body, package_id=bytes(16)), [ident])
        )
    # A receipt signed by another programmer (even one under the same root) is no receipt.
    spare_id = pki.other_programmer.token.private_key(pki.other_programmer.identity)
    with pytest.raises(SignatureError):
        check(envelope.seal("sealed-key-package-receipt", body, [spare_id]))
    # The OEM names an identity certificate; anything else is refused before the signature.
    with pytest.raises(CertificateError):
        verify_receipt(
            receipt.signed, package=data, programmer_cert=pki.programmer_ka.cert, root_cert=pki.root
        )


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
    body = cose_edit.body(data)
    body["entries"][0]["transferable"] = False
    with pytest.raises(SignatureError):
        _open(
            pki,
            cose_edit.with_body(data, body),
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


def test_package_must_be_opened_with_the_certified_keys(pki: Pki, programmer: Token) -> None:
    other = programmer.generate_ec(
        f"ka-{uuid.uuid4().hex[:8]}", curve=Curve.P256, policy=KEY_AGREEMENT
    )
    with pytest.raises(ConfigurationError):
        _open(pki, b"", TokenPackageRegistry(programmer), ka_key=other)
    with pytest.raises(ConfigurationError):
        _open(
            pki,
            b"",
            TokenPackageRegistry(programmer),
            identity_key=pki.oem.token.private_key(pki.oem.identity),
        )
