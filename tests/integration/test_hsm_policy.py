"""Invariant S1 and the frozen-key rule on real SoftHSM (docs/keys.md): every key the backend
creates, derives or unwraps is sensitive, extractable only when declared transferable,
non-modifiable and non-copyable, and has exactly the usage attributes of its policy; reading
a sensitive key's value, changing an attribute and copying the object all fail."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import keywrap
from pkcs11 import Attribute, KeyType, ObjectClass

from securethread.errors import KeyPolicyError
from securethread.hsm import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    KEY_AGREEMENT,
    PROGRAMMER_IMAGE_KEY,
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_UNWRAP,
    TEMP_WRAP,
    Curve,
    HsmSecretKey,
    KeyPolicy,
    PolicyReport,
    Token,
    Usage,
)

EC_POLICIES = {
    "signing": SIGNING,
    "key-agreement": KEY_AGREEMENT,
    "ephemeral-agreement": EPHEMERAL_AGREEMENT,
    "transferable-signing": KeyPolicy(usage=Usage.SIGN, transferable=True),
    "temp-signing": KeyPolicy(usage=Usage.SIGN, persistent=False),
}
AES_POLICIES = {
    "image": IMAGE_KEY,
    "programmer-image": PROGRAMMER_IMAGE_KEY,
    "kek": KeyPolicy(usage=Usage.WRAP),
    "secret": KeyPolicy(usage=Usage.ENCRYPT),
    "decrypt-only": KeyPolicy(usage=Usage.DECIPHER),
    "derive": KeyPolicy(usage=Usage.DERIVE),
    "temp-derive": TEMP_DERIVE,
    "temp-wrap": TEMP_WRAP,
    "temp-unwrap": TEMP_UNWRAP,
    "temp-confirm": TEMP_CONFIRM,
}

#: The library derives only temporary, non-transferable keys (ECDH and ECB derivation).
TEMP_AES = sorted(n for n, p in AES_POLICIES.items() if not p.persistent)
CKR_ACTION_PROHIBITED = "0x1b"  # python-pkcs11 0.10.1 has no class for it


def _usages(policy: KeyPolicy, *, private_key: bool) -> dict[str, bool]:
    """The usage attributes a policy means (docs/keys.md, rule 4), from its flags alone."""
    u = policy.usage
    if private_key:
        return {"sign": bool(u & Usage.SIGN), "derive": bool(u & Usage.DERIVE)} | dict.fromkeys(
            ("encrypt", "decrypt", "verify", "wrap", "unwrap"), False
        )
    return {
        "encrypt": bool(u & Usage.ENCIPHER),
        "decrypt": bool(u & Usage.DECIPHER),
        "sign": bool(u & Usage.MAC),
        "verify": False,
        "wrap": bool(u & Usage.WRAP_KEY),
        "unwrap": bool(u & Usage.UNWRAP_KEY),
        "derive": bool(u & Usage.DERIVE),
    }


def _assert_policy(
    report: PolicyReport, policy: KeyPolicy, obj: Any, *, private_key: bool = False
) -> None:
    report.check(transferable=policy.transferable)
    got = report.attributes()
    assert got["sensitive"] is True
    assert got["extractable"] is policy.transferable
    assert got["token"] is policy.persistent and got["private"] is True
    assert got["modifiable"] is False and got["copyable"] is False and got["destroyable"]
    assert {a: got[a] for a in _usages(policy, private_key=private_key)} == _usages(
        policy, private_key=private_key
    )
    # S1: the secret value can never be read in plaintext...
    with pytest.raises(pkcs11.AttributeSensitive):
        obj[Attribute.VALUE]
    # ...and the object can neither be changed nor copied (PKCS#11 v3.0 §4.4).
    with pytest.raises(pkcs11.PKCS11Error, match=CKR_ACTION_PROHIBITED):
        obj[Attribute.LABEL] = "changed"
    with pytest.raises(pkcs11.PKCS11Error, match=CKR_ACTION_PROHIBITED):
        obj[Attribute.DERIVE] = True
    with pytest.raises(pkcs11.PKCS11Error, match=CKR_ACTION_PROHIBITED):
        obj.copy({Attribute.TOKEN: False})


@pytest.fixture
def cleanup(oem: Token) -> Iterator[Callable[[Any], None]]:
    keys: list[Any] = []
    yield keys.append
    for k in reversed(keys):
        k.destroy()


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
@pytest.mark.parametrize("name", sorted(EC_POLICIES))
def test_generated_ec_keys(
    oem: Token, label: str, name: str, curve: Curve, cleanup: Callable[[Any], None]
) -> None:
    policy = EC_POLICIES[name]
    key = oem.generate_ec(label if policy.persistent else "", curve=curve, policy=policy)
    cleanup(key)
    report = key.policy_report()
    _assert_policy(report, policy, key._obj(), private_key=True)
    assert report.always_sensitive is True and report.local is True
    assert report.never_extractable is (not policy.transferable)
    pub = (
        oem.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
        if policy.persistent
        else key._temp_public
    )
    assert pub[Attribute.VERIFY] is bool(policy.usage & Usage.SIGN)
    assert pub[Attribute.MODIFIABLE] is False and pub[Attribute.COPYABLE] is False
    if policy.persistent:  # the random CKA_ID is in both halves' creation templates
        assert len(key.key_id) == 20 and pub[Attribute.ID] == key.key_id
        assert key._obj()[Attribute.ID] == key.key_id


@pytest.mark.parametrize("name", sorted(AES_POLICIES))
def test_generated_aes_keys(
    oem: Token, label: str, name: str, cleanup: Callable[[Any], None]
) -> None:
    policy = AES_POLICIES[name]
    key = oem.generate_aes(label, policy=policy)
    cleanup(key)
    obj = key._obj()
    _assert_policy(key.policy_report(), policy, obj)
    assert obj[Attribute.VALUE_LEN] == 32


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
@pytest.mark.parametrize("name", TEMP_AES)
def test_ecdh_derived_keys(
    oem: Token, name: str, curve: Curve, cleanup: Callable[[Any], None]
) -> None:
    policy = AES_POLICIES[name]
    eph = oem.generate_ec("", curve=curve, policy=EPHEMERAL_AGREEMENT)
    cleanup(eph)
    peer = oem.generate_ec("", curve=curve, policy=EPHEMERAL_AGREEMENT)
    cleanup(peer)
    derived = eph.derive_aes(peer.public_key(), policy=policy)
    cleanup(derived)
    _assert_policy(derived.policy_report(), policy, derived._obj())


@pytest.mark.parametrize("name", TEMP_AES)
def test_ecb_derived_keys(oem: Token, name: str, cleanup: Callable[[Any], None]) -> None:
    policy = AES_POLICIES[name]
    eph = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    cleanup(eph)
    base = eph.derive_aes(eph.public_key(), policy=TEMP_DERIVE)
    cleanup(base)
    child = base.derive_ecb(os.urandom(32), policy=policy)
    cleanup(child)
    _assert_policy(child.policy_report(), policy, child._obj())


def _known_kek(oem: Token, cleanup: Callable[[Any], None]) -> tuple[bytes, HsmSecretKey]:
    value = os.urandom(32)
    obj = oem.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.VALUE: value,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
        }
    )
    kek = HsmSecretKey(oem, label="", key_id=b"", handle=obj)
    cleanup(kek)
    return value, kek


@pytest.mark.parametrize(
    "policy",
    [IMAGE_KEY, PROGRAMMER_IMAGE_KEY, TEMP_CONFIRM, KeyPolicy(usage=Usage.ENCRYPT)],
    ids=str,
)
def test_unwrapped_keys(
    oem: Token, label: str, policy: KeyPolicy, cleanup: Callable[[Any], None]
) -> None:
    kek_value, kek = _known_kek(oem, cleanup)
    wrapped = keywrap.aes_key_wrap_with_padding(kek_value, os.urandom(32))
    key = kek.unwrap(wrapped, label=label, key_id=b"\x07", policy=policy)
    cleanup(key)
    report = key.policy_report()
    _assert_policy(report, policy, key._obj())
    # The value crossed the boundary wrapped, so the token cannot vouch it was always secret.
    assert report.always_sensitive is False and report.local is False


def test_programmer_image_key_can_only_be_wrapped(
    oem: Token, label: str, cleanup: Callable[[Any], None]
) -> None:
    """PROGRAMMER_IMAGE_KEY: every operation refused, yet a wrapping key can wrap it."""
    kek_value, kek = _known_kek(oem, cleanup)
    value = os.urandom(32)
    key = kek.unwrap(
        keywrap.aes_key_wrap_with_padding(kek_value, value),
        label=label,
        key_id=b"\x08",
        policy=PROGRAMMER_IMAGE_KEY,
    )
    cleanup(key)
    nonce = os.urandom(12)
    for call, what in (
        (lambda: key.encrypt_gcm(nonce, b"x", b""), "encrypt"),
        (lambda: key.decrypt_gcm(nonce, bytes(32), b""), "decrypt"),
        (lambda: key.cmac(b"x"), "compute a CMAC"),
        (lambda: key.wrap(key), "wrap"),
        (lambda: key.unwrap(bytes(40), label="", key_id=b"", policy=TEMP_CONFIRM), "unwrap"),
        (lambda: key.derive_ecb(bytes(32), policy=TEMP_DERIVE), "derive"),
    ):
        with pytest.raises(KeyPolicyError, match=f"not allowed to {what}"):
            call()
    assert keywrap.aes_key_unwrap_with_padding(kek_value, kek.wrap(key)) == value


def test_secret_policy_with_ecdsa_usage_is_refused(oem: Token) -> None:
    with pytest.raises(KeyPolicyError, match="AES key cannot sign"):
        oem.generate_aes("", policy=KeyPolicy(usage=Usage.SIGN, persistent=False))


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}, "not CKA_SENSITIVE"),
        ({Attribute.SENSITIVE: True, Attribute.MODIFIABLE: True}, "CKA_MODIFIABLE"),
        (
            {Attribute.SENSITIVE: True, Attribute.COPYABLE: True, Attribute.MODIFIABLE: False},
            "CKA_COPYABLE",
        ),
    ],
    ids=["extractable", "modifiable", "copyable"],
)
def test_hand_made_keys_are_detected_by_check(
    oem: Token, attributes: dict[Attribute, Any], message: str
) -> None:
    """The check itself can fail: keys made by hand, outside the templates, are refused."""
    obj = oem.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.VALUE: os.urandom(32),
            **attributes,
        }
    )
    key = HsmSecretKey(oem, label="", key_id=b"", handle=obj)
    try:
        with pytest.raises(KeyPolicyError, match=message):
            key.policy_report().check(transferable=True)
        if not attributes[Attribute.SENSITIVE]:
            assert len(obj[Attribute.VALUE]) == 32  # and its value can indeed be read
    finally:
        key.destroy()
