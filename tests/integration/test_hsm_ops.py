"""Every token operation on real SoftHSM, round-tripped against ``cryptography``."""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import cmac, hashes, keywrap
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, ObjectClass

from securethread.errors import (
    DecryptionError,
    DuplicateObjectError,
    KeyNotFoundError,
    KeyPolicyError,
)
from securethread.hsm import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    PROGRAMMER_IMAGE_KEY,
    SIGNING,
    TEMP_CONFIRM,
    Curve,
    HsmPrivateKey,
    HsmSecretKey,
    KeyPolicy,
    Token,
    Usage,
    verify_signature,
)
from tests.license_probe import licensed_value

#: A temporary key that can both encrypt (to compare with cryptography) and derive.
ENC_DERIVE = KeyPolicy(usage=Usage.ENCRYPT | Usage.DERIVE, persistent=False)
CURVES = {Curve.P256: ec.SECP256R1(), Curve.P384: ec.SECP384R1()}
HASHES: dict[Curve, hashes.SHA256 | hashes.SHA384] = {
    Curve.P256: hashes.SHA256(),
    Curve.P384: hashes.SHA384(),
}


@pytest.fixture
def signer(oem: Token, label: str, request: pytest.FixtureRequest) -> Iterator[HsmPrivateKey]:
    curve = getattr(request, "param", Curve.P256)
    key = oem.generate_ec(label, curve=curve, policy=SIGNING)
    yield key
    oem.destroy(label)


def _known_secret(token: Token, value: bytes, *, wrap: bool, extractable: bool) -> HsmSecretKey:
    """A session AES key with a KNOWN value, created only by tests (never by the library)."""
    obj = token.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: extractable,
            Attribute.VALUE: value,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
            Attribute.WRAP: wrap,
            Attribute.UNWRAP: wrap,
            Attribute.DERIVE: False,
        }
    )
    return HsmSecretKey(token, label="", key_id=b"", handle=obj)


def _ecdh(token: Token, curve: Curve) -> tuple[HsmPrivateKey, HsmSecretKey, bytes]:
    """An ephemeral token key, the AES key it derived with a software peer, and that value."""
    ours = token.generate_ec("", curve=curve, policy=EPHEMERAL_AGREEMENT)
    peer = ec.generate_private_key(CURVES[curve])
    z = peer.exchange(ec.ECDH(), ours.public_key())
    assert len(z) == curve.coordinate_size
    derived = ours.derive_aes(peer.public_key(), policy=ENC_DERIVE)
    # SoftHSM 2.6.1 with CKD_NULL keeps the RIGHTMOST 32 bytes of Z (matters for P-384).
    return ours, derived, z[-32:]


@pytest.mark.parametrize("signer", [Curve.P256, Curve.P384], indirect=True)
def test_sign_verifies_with_cryptography(signer: HsmPrivateKey) -> None:
    curve = signer.curve
    for message in (b"", b"firmware manifest", os.urandom(1000)):
        sig = signer.sign(message)
        signer.public_key().verify(sig, message, ec.ECDSA(HASHES[curve]))
        verify_signature(signer.public_key(), sig, message, what="test")
    digest = hashlib.new(HASHES[curve].name, b"pre-hashed").digest()
    sig = signer.sign_digest(digest)
    signer.public_key().verify(sig, digest, ec.ECDSA(utils.Prehashed(HASHES[curve])))
    assert signer.public_key().curve.name == CURVES[curve].name


def test_key_id_label_and_lookup_are_consistent(oem: Token, signer: HsmPrivateKey) -> None:
    assert len(signer.key_id) == 20  # random, in the creation template (docs/keys.md)
    priv = oem.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=signer.label)
    pub = oem.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=signer.label)
    assert priv[Attribute.ID] == pub[Attribute.ID] == signer.key_id
    assert oem.public_key(signer.label) == signer.public_key()
    assert oem.has_key(signer.label)
    assert signer.label in oem.labels()
    with pytest.raises(DuplicateObjectError, match="already has a key"):
        oem.generate_ec(signer.label, curve=Curve.P256, policy=SIGNING)


def test_private_key_lookup_by_label(oem: Token, signer: HsmPrivateKey) -> None:
    # Lookup by label from the token (not the cache of generated keys) gives the same key.
    oem._private_keys.pop(signer.label, None)
    again = oem.private_key(signer.label)
    assert again.key_id == signer.key_id and again.curve is signer.curve
    verify_signature(again.public_key(), again.sign(b"m"), b"m", what="test")


@pytest.mark.parametrize("signer", [Curve.P256, Curve.P384], indirect=True)
def test_as_cryptography_signs_certificate_and_csr(oem: Token, signer: HsmPrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"HSM CA {signer.label}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(signer.key_id), critical=False)
        .sign(signer.as_cryptography(), HASHES[signer.curve])
    )
    cert.verify_directly_issued_by(cert)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(signer.as_cryptography(), HASHES[signer.curve])
    )
    assert csr.is_signature_valid
    # The certificate is stored next to its key with the same CKA_ID.
    oem.store_certificate(signer.label, cert)
    assert oem.certificate(signer.label) == cert
    obj = oem.session.get_objects(
        {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: signer.label}
    )
    assert [o[Attribute.ID] for o in obj] == [signer.key_id]
    with pytest.raises(DuplicateObjectError, match="already has a certificate"):
        oem.store_certificate(signer.label, cert)


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_ecdh_derive_aes_and_derive_ecb_agree_with_cryptography(oem: Token, curve: Curve) -> None:
    ours, derived, value = _ecdh(oem, curve)
    try:
        nonce = os.urandom(12)
        ct = derived.encrypt_gcm(nonce, b"shared secret check", b"aad")
        assert ct == AESGCM(value).encrypt(nonce, b"shared secret check", b"aad")
        data = os.urandom(32)
        child = derived.derive_ecb(data, policy=TEMP_CONFIRM)
        enc = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
        child_value = enc.update(data) + enc.finalize()
        c = cmac.CMAC(algorithms.AES(child_value))
        c.update(b"key confirmation")
        assert child.cmac(b"key confirmation") == c.finalize()
        child.destroy()
    finally:
        derived.destroy()
        ours.destroy()


def test_ecdh_between_the_two_tokens_agrees(oem: Token, programmer: Token) -> None:
    a = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    b = programmer.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    ka = a.derive_aes(b.public_key(), policy=ENC_DERIVE)
    kb = b.derive_aes(a.public_key(), policy=ENC_DERIVE)
    try:
        nonce = os.urandom(12)
        assert kb.decrypt_gcm(nonce, ka.encrypt_gcm(nonce, b"hello", b""), b"") == b"hello"
        assert ka.cmac(b"c") == kb.cmac(b"c")
    finally:
        for k in (ka, kb, a, b):
            k.destroy()


def test_aes_gcm_matches_cryptography_both_ways(oem: Token) -> None:
    value = os.urandom(32)
    key = _known_secret(oem, value, wrap=False, extractable=False)
    try:
        aead = AESGCM(value)
        for size in (0, 1, 15, 16, 17, 4096):
            nonce, pt, aad = os.urandom(12), os.urandom(size), os.urandom(size % 7)
            ct = key.encrypt_gcm(nonce, pt, aad)
            assert ct == aead.encrypt(nonce, pt, aad)
            assert aead.decrypt(nonce, ct, aad) == pt
            assert key.decrypt_gcm(nonce, aead.encrypt(nonce, pt, aad), aad) == pt
        nonce = os.urandom(12)
        ct = aead.encrypt(nonce, b"image chunk", b"hdr")
        bad_tag = ct[:-1] + bytes([ct[-1] ^ 0x01])
        bad_body = bytes([ct[0] ^ 0x80]) + ct[1:]
        for bad, aad in ((bad_tag, b"hdr"), (bad_body, b"hdr"), (ct, b"HDR")):
            with pytest.raises(DecryptionError, match="authentication failed"):
                key.decrypt_gcm(nonce, bad, aad)
        with pytest.raises(DecryptionError, match="shorter than its tag"):
            key.decrypt_gcm(nonce, ct[:15], b"hdr")
        # The key still works after the failures (no operation left half-open).
        assert key.decrypt_gcm(nonce, ct, b"hdr") == b"image chunk"
    finally:
        key.destroy()


def test_cmac_matches_cryptography(oem: Token) -> None:
    value = os.urandom(32)
    key = _known_secret(oem, value, wrap=False, extractable=False)
    try:
        for data in (b"", b"a", os.urandom(16), os.urandom(100)):
            c = cmac.CMAC(algorithms.AES(value))
            c.update(data)
            assert key.cmac(data) == c.finalize()
    finally:
        key.destroy()


def test_kwp_wrap_is_rfc5649_and_unwrap_works(oem: Token) -> None:
    kek_value, target_value = os.urandom(32), os.urandom(32)
    kek = _known_secret(oem, kek_value, wrap=True, extractable=False)
    target = _known_secret(oem, target_value, wrap=False, extractable=True)
    try:
        wrapped = kek.wrap(target)
        assert wrapped == keywrap.aes_key_wrap_with_padding(kek_value, target_value)
        assert keywrap.aes_key_unwrap_with_padding(kek_value, wrapped) == target_value
        unwrapped = kek.unwrap(
            wrapped,
            label="",
            key_id=b"\x42",
            policy=KeyPolicy(usage=Usage.ENCRYPT, persistent=False),
        )
        nonce = os.urandom(12)
        ct = unwrapped.encrypt_gcm(nonce, b"x", b"")
        assert ct == AESGCM(target_value).encrypt(nonce, b"x", b"")
        unwrapped.destroy()
        # A key wrapped by cryptography unwraps in the token too.
        other = os.urandom(32)
        from_sw = kek.unwrap(
            keywrap.aes_key_wrap_with_padding(kek_value, other),
            label="",
            key_id=b"",
            policy=KeyPolicy(usage=Usage.ENCRYPT, persistent=False),
        )
        assert from_sw.encrypt_gcm(nonce, b"y", b"") == AESGCM(other).encrypt(nonce, b"y", b"")
        from_sw.destroy()
    finally:
        kek.destroy()
        target.destroy()


def test_kwp_unwrap_of_tampered_blob_fails_and_creates_nothing(oem: Token, label: str) -> None:
    kek_value = os.urandom(32)
    kek = _known_secret(oem, kek_value, wrap=True, extractable=False)
    try:
        wrapped = keywrap.aes_key_wrap_with_padding(kek_value, os.urandom(32))
        before = len(list(oem.session.get_objects()))
        for bad in (wrapped[:-1] + bytes([wrapped[-1] ^ 1]), wrapped[:-8], b"\x00" * 40):
            with pytest.raises(DecryptionError, match="RFC 5649"):
                kek.unwrap(bad, label=label, key_id=b"", policy=IMAGE_KEY)
        assert len(list(oem.session.get_objects())) == before
        assert not oem.has_key(label)
    finally:
        kek.destroy()


def test_image_key_travels_wrapped_between_tokens(
    oem: Token, programmer: Token, label: str
) -> None:
    """OEM image key -> KWP under an ECDH-derived KEK -> programmer token, then GCM agrees."""
    wrap_policy = KeyPolicy(usage=Usage.WRAP, persistent=False)
    a = oem.generate_ec("", curve=Curve.P384, policy=EPHEMERAL_AGREEMENT)
    b = programmer.generate_ec("", curve=Curve.P384, policy=EPHEMERAL_AGREEMENT)
    kek_a = a.derive_aes(b.public_key(), policy=wrap_policy)
    kek_b = b.derive_aes(a.public_key(), policy=wrap_policy)
    image = oem.generate_aes(label, policy=IMAGE_KEY)
    try:
        wrapped = kek_a.wrap(image)
        assert len(wrapped) == 40
        received = kek_b.unwrap(
            wrapped, label=label, key_id=image.key_id, policy=PROGRAMMER_IMAGE_KEY
        )
        assert received.key_id == image.key_id
        assert programmer.secret_key(label).key_id == image.key_id
        nonce = os.urandom(12)
        ct = image.encrypt_gcm(nonce, b"firmware", b"manifest")
        # The programmer's copy only licenses; the device's copy decrypts.
        value = licensed_value(programmer, received)
        assert AESGCM(value).decrypt(nonce, ct, b"manifest") == b"firmware"
        with pytest.raises(DuplicateObjectError, match="already has a key"):
            kek_b.unwrap(wrapped, label=label, key_id=b"", policy=IMAGE_KEY)
    finally:
        for k in (kek_a, kek_b, a, b):
            k.destroy()
        oem.destroy(label)
        programmer.destroy(label)
    assert not oem.has_key(label) and not programmer.has_key(label)


def test_temporary_objects_are_destroyed(oem: Token) -> None:
    before = len(list(oem.session.get_objects()))
    ours, derived, _ = _ecdh(oem, Curve.P256)
    child = derived.derive_ecb(os.urandom(32), policy=TEMP_CONFIRM)
    assert len(list(oem.session.get_objects())) == before + 4  # pub, priv, derived, child
    for k in (child, derived, ours):
        k.destroy()
    assert len(list(oem.session.get_objects())) == before


def test_generated_aes_key_lookup_and_destroy(oem: Token, label: str) -> None:
    key = oem.generate_aes(label, policy=IMAGE_KEY, key_id=b"\x01\x02")
    assert oem.secret_key(label).key_id == b"\x01\x02"
    nonce = os.urandom(12)
    ct = key.encrypt_gcm(nonce, b"p", b"")
    with pytest.raises(KeyPolicyError, match="not allowed to decrypt"):
        key.decrypt_gcm(nonce, ct, b"")  # nothing at the OEM decrypts (IMAGE_KEY)
    with pytest.raises(DuplicateObjectError):
        oem.generate_aes(label, policy=IMAGE_KEY)
    key.destroy()
    assert not oem.has_key(label)
    with pytest.raises(KeyNotFoundError, match=f"no secret_key labelled '{label}'"):
        oem.secret_key(label)


def test_random(oem: Token) -> None:
    values: set[Any] = {oem.random(32) for _ in range(4)}
    assert len(values) == 4 and all(len(v) == 32 for v in values)


# --- agree_and_wrap: the license hot path's composite (hsm/direct.py) ----------------------


def _kek_by_hand(device: ec.EllipticCurvePrivateKey, ka_public: Any, info: bytes) -> bytes:
    z = device.exchange(ec.ECDH(), ka_public)[-32:]
    enc = Cipher(algorithms.AES(z), modes.ECB()).encryptor()
    return enc.update(info) + enc.finalize()


def test_agree_and_wrap_equals_the_three_step_path_and_unwraps_on_the_device(
    oem: Token, label: str
) -> None:
    from securethread.hsm import KEY_AGREEMENT, TEMP_DERIVE, TEMP_WRAP

    ka = oem.generate_ec(label, curve=Curve.P256, policy=KEY_AGREEMENT)
    image = _known_secret(oem, os.urandom(32), wrap=False, extractable=True)
    device = ec.generate_private_key(ec.SECP256R1())
    info = os.urandom(32)
    try:
        before = len(list(oem.session.get_objects()))
        fast = ka.agree_and_wrap(device.public_key(), info, image)
        assert len(list(oem.session.get_objects())) == before  # temporaries destroyed
        z = ka.derive_aes(device.public_key(), policy=TEMP_DERIVE)
        kek = z.derive_ecb(info, policy=TEMP_WRAP)
        slow = kek.wrap(image)
        kek.destroy()
        z.destroy()
        assert fast == slow  # RFC 5649 is deterministic
        kek_value = _kek_by_hand(device, ka.public_key(), info)
        nonce = os.urandom(12)
        unwrapped = keywrap.aes_key_unwrap_with_padding(kek_value, fast)
        assert AESGCM(unwrapped).decrypt(nonce, image.encrypt_gcm(nonce, b"fw", b""), b"") == (
            b"fw"
        )
    finally:
        image.destroy()
        oem.destroy(label)


def test_agree_and_wrap_refusals_leave_no_objects(oem: Token, label: str) -> None:
    from securethread.errors import KeyPolicyError
    from securethread.hsm import KEY_AGREEMENT, SoftwareBackend

    ka = oem.generate_ec(label, curve=Curve.P256, policy=KEY_AGREEMENT)
    signer = oem.generate_ec(label + "-sig", curve=Curve.P256, policy=SIGNING)
    locked = _known_secret(oem, os.urandom(32), wrap=False, extractable=False)
    movable = _known_secret(oem, os.urandom(32), wrap=False, extractable=True)
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    try:
        before = len(list(oem.session.get_objects()))
        with pytest.raises(KeyPolicyError, match="CKR_KEY_UNEXTRACTABLE"):
            ka.agree_and_wrap(peer, os.urandom(32), locked)
        with pytest.raises(KeyPolicyError, match="CKR_KEY_FUNCTION_NOT_PERMITTED|INCONSISTENT"):
            signer.agree_and_wrap(peer, os.urandom(32), movable)
        with pytest.raises(KeyPolicyError, match="peer key is on secp384r1"):
            ka.agree_and_wrap(
                ec.generate_private_key(ec.SECP384R1()).public_key(), bytes(32), movable
            )
        with pytest.raises(ValueError, match="32 bytes"):
            ka.agree_and_wrap(peer, b"short", movable)
        soft = SoftwareBackend("other").generate_aes("k", policy=IMAGE_KEY)
        with pytest.raises(KeyPolicyError, match="same token"):
            ka.agree_and_wrap(peer, os.urandom(32), soft)
        assert len(list(oem.session.get_objects())) == before
    finally:
        for k in (locked, movable):
            k.destroy()
        oem.destroy(label)
        oem.destroy(label + "-sig")
