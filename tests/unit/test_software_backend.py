"""The software backend: same protocol and key policy as the token, checked against cryptography."""

from __future__ import annotations

import datetime
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import cmac, hashes, keywrap
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from securethread.errors import (
    DecryptionError,
    DuplicateObjectError,
    InvalidPointError,
    KeyNotFoundError,
    KeyPolicyError,
)
from securethread.hsm import (
    IMAGE_KEY,
    KEY_AGREEMENT,
    SIGNING,
    TEMP_WRAP,
    Curve,
    KeyBackend,
    KeyPolicy,
    PrivateKey,
    SecretKey,
    SoftwareBackend,
    Usage,
    point_of,
    verify_signature,
)

ENC_DERIVE = KeyPolicy(usage=Usage.ENCRYPT | Usage.DERIVE, persistent=False)
WRAP_KEY = KeyPolicy(usage=Usage.WRAP)


@pytest.fixture
def sw() -> SoftwareBackend:
    return SoftwareBackend("unit")


def _curve(curve: Curve) -> ec.EllipticCurve:
    return ec.SECP256R1() if curve is Curve.P256 else ec.SECP384R1()


def test_backend_and_keys_satisfy_the_protocols(sw: SoftwareBackend) -> None:
    assert isinstance(sw, KeyBackend)
    assert isinstance(sw.generate_ec("k", curve=Curve.P256, policy=SIGNING), PrivateKey)
    assert isinstance(sw.generate_aes("a", policy=IMAGE_KEY), SecretKey)


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_sign_verifies_with_cryptography(sw: SoftwareBackend, curve: Curve) -> None:
    key = sw.generate_ec("signer", curve=curve, policy=SIGNING)
    sig = key.sign(b"message")
    h = hashes.SHA256() if curve is Curve.P256 else hashes.SHA384()
    key.public_key().verify(sig, b"message", ec.ECDSA(h))
    verify_signature(key.public_key(), sig, b"message", what="test")
    assert len(key.key_id) == 20  # SHA-1 of the point, like the token
    assert sw.public_key("signer") == key.public_key()


def test_as_cryptography_signs_a_certificate(sw: SoftwareBackend) -> None:
    key = sw.generate_ec("ca", curve=Curve.P384, policy=SIGNING)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key.as_cryptography(), hashes.SHA384())
    )
    cert.verify_directly_issued_by(cert)
    with pytest.raises(KeyPolicyError, match="cannot leave the key store"):
        key.as_cryptography().private_numbers()


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_ecdh_matches_cryptography_rightmost_32_bytes(sw: SoftwareBackend, curve: Curve) -> None:
    ours = sw.generate_ec("agree", curve=curve, policy=KeyPolicy(usage=Usage.DERIVE))
    peer = ec.generate_private_key(_curve(curve))
    z = peer.exchange(ec.ECDH(), ours.public_key())
    derived = ours.derive_aes(peer.public_key(), policy=ENC_DERIVE)
    nonce = os.urandom(12)
    assert derived.encrypt_gcm(nonce, b"pt", b"aad") == AESGCM(z[-32:]).encrypt(
        nonce, b"pt", b"aad"
    )
    # The peer may be given as an uncompressed point too.
    again = ours.derive_aes(point_of(peer.public_key()), policy=ENC_DERIVE)
    assert again.encrypt_gcm(nonce, b"pt", b"aad") == derived.encrypt_gcm(nonce, b"pt", b"aad")


def test_derive_ecb_matches_aes_ecb(sw: SoftwareBackend) -> None:
    ours = sw.generate_ec("agree", curve=Curve.P256, policy=KEY_AGREEMENT)
    peer = ec.generate_private_key(ec.SECP256R1())
    base_value = peer.exchange(ec.ECDH(), ours.public_key())
    base = ours.derive_aes(peer.public_key(), policy=ENC_DERIVE)
    data = os.urandom(32)
    child = base.derive_ecb(data, policy=ENC_DERIVE)
    enc = Cipher(algorithms.AES(base_value), modes.ECB()).encryptor()
    child_value = enc.update(data) + enc.finalize()
    c = cmac.CMAC(algorithms.AES(child_value))
    c.update(b"confirm")
    assert child.cmac(b"confirm") == c.finalize()
    with pytest.raises(ValueError):
        base.derive_ecb(b"\x00" * 16, policy=ENC_DERIVE)


def test_gcm_round_trip_and_bad_tag(sw: SoftwareBackend) -> None:
    key = sw.generate_aes("img", policy=KeyPolicy(usage=Usage.ENCRYPT))
    nonce = os.urandom(12)
    ct = key.encrypt_gcm(nonce, b"firmware", b"hdr")
    assert key.decrypt_gcm(nonce, ct, b"hdr") == b"firmware"
    for bad_ct, aad in ((ct[:-1] + bytes([ct[-1] ^ 1]), b"hdr"), (ct, b"other")):
        with pytest.raises(DecryptionError, match="authentication failed"):
            key.decrypt_gcm(nonce, bad_ct, aad)


def test_wrap_unwrap_round_trip_and_integrity(sw: SoftwareBackend) -> None:
    kek = sw.generate_aes("kek", policy=WRAP_KEY)
    image = sw.generate_aes("img", policy=IMAGE_KEY)
    wrapped = kek.wrap(image)
    assert len(wrapped) == 40  # RFC 5649: 32-byte key + 8-byte integrity block
    copy = kek.unwrap(
        wrapped, label="img-copy", key_id=b"\x01", policy=KeyPolicy(usage=Usage.DECIPHER)
    )
    nonce = os.urandom(12)
    assert copy.decrypt_gcm(nonce, image.encrypt_gcm(nonce, b"x", b""), b"") == b"x"
    tampered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(DecryptionError, match="RFC 5649"):
        kek.unwrap(tampered, label="bad", key_id=b"", policy=IMAGE_KEY)
    assert not sw.has_key("bad")
    short = keywrap.aes_key_wrap_with_padding(os.urandom(32), b"\x00" * 16)
    with pytest.raises(DecryptionError):
        kek.unwrap(short, label="bad", key_id=b"", policy=IMAGE_KEY)


def test_key_of_wrong_type_for_operation(sw: SoftwareBackend) -> None:
    agree = sw.generate_ec("agree", curve=Curve.P256, policy=KEY_AGREEMENT)
    signer = sw.generate_ec("sign", curve=Curve.P256, policy=SIGNING)
    image = sw.generate_aes("img", policy=IMAGE_KEY)
    kek = sw.generate_aes("kek", policy=WRAP_KEY)
    secret = sw.generate_aes("secret", policy=KeyPolicy(usage=Usage.ENCRYPT))
    with pytest.raises(KeyPolicyError, match="not allowed to sign"):
        agree.sign(b"x")
    with pytest.raises(KeyPolicyError, match="not allowed to derive"):
        signer.derive_aes(agree.public_key(), policy=ENC_DERIVE)
    with pytest.raises(KeyPolicyError, match="not allowed to wrap"):
        image.wrap(image)
    with pytest.raises(KeyPolicyError, match="not allowed to unwrap"):
        image.unwrap(b"\x00" * 40, label="x", key_id=b"", policy=IMAGE_KEY)
    with pytest.raises(KeyPolicyError, match="not extractable"):
        kek.wrap(secret)
    with pytest.raises(KeyPolicyError, match="not allowed to encrypt"):
        kek.encrypt_gcm(os.urandom(12), b"", b"")
    with pytest.raises(KeyPolicyError, match="not allowed to derive"):
        image.derive_ecb(b"\x00" * 32, policy=ENC_DERIVE)
    with pytest.raises(KeyPolicyError, match="only sign and derive"):
        sw.generate_ec("ec-wrap", curve=Curve.P256, policy=TEMP_WRAP)
    assert not sw.has_key("ec-wrap")


def test_peer_not_on_curve_and_wrong_curve(sw: SoftwareBackend) -> None:
    agree = sw.generate_ec("agree", curve=Curve.P256, policy=KEY_AGREEMENT)
    point = bytearray(point_of(agree.public_key()))
    point[-1] ^= 1
    with pytest.raises(InvalidPointError, match="not a valid P256 point"):
        agree.derive_aes(bytes(point), policy=ENC_DERIVE)
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(KeyPolicyError, match="not on secp256r1"):
        agree.derive_aes(other, policy=ENC_DERIVE)


def test_labels_duplicates_lookup_destroy(sw: SoftwareBackend) -> None:
    sw.generate_ec("k", curve=Curve.P256, policy=SIGNING)
    with pytest.raises(DuplicateObjectError, match="already has a key 'k'"):
        sw.generate_ec("k", curve=Curve.P256, policy=SIGNING)
    sw.generate_aes("a", policy=IMAGE_KEY)
    with pytest.raises(DuplicateObjectError, match="already has a key 'a'"):
        sw.generate_aes("a", policy=IMAGE_KEY)
    assert sw.has_key("k") and sw.has_key("a")
    sw.destroy("k")
    assert not sw.has_key("k")
    with pytest.raises(KeyNotFoundError, match="no private key 'k'"):
        sw.private_key("k")
    with pytest.raises(KeyNotFoundError, match="no secret key 'nope'"):
        sw.secret_key("nope")
    with pytest.raises(KeyNotFoundError, match="no certificate 'nope'"):
        sw.certificate("nope")
    # Temporary keys are not registered under their label.
    sw.generate_ec("tmp", curve=Curve.P256, policy=KeyPolicy(usage=Usage.SIGN, persistent=False))
    assert not sw.has_key("tmp")


def test_policy_reports(sw: SoftwareBackend) -> None:
    sw.generate_ec("s", curve=Curve.P256, policy=SIGNING).policy_report().check(transferable=False)
    report = sw.generate_aes("img", policy=IMAGE_KEY).policy_report()
    report.check(transferable=True)
    assert report.extractable and report.sensitive
    with pytest.raises(KeyPolicyError, match="not declared transferable"):
        report.check(transferable=False)


def test_agree_and_wrap_equals_the_three_step_path() -> None:
    from securethread.hsm import TEMP_DERIVE

    b = SoftwareBackend("agree")
    ka = b.generate_ec("ka", curve=Curve.P256, policy=KEY_AGREEMENT)
    image = b.generate_aes("image", policy=IMAGE_KEY)
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    info = os.urandom(32)
    z = ka.derive_aes(peer, policy=TEMP_DERIVE)
    slow = z.derive_ecb(info, policy=TEMP_WRAP).wrap(image)
    assert ka.agree_and_wrap(peer, info, image) == slow
