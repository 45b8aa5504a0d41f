"""Invariant S1 on real SoftHSM: every key the backend creates is sensitive, and extractable
only when declared transferable; reading a sensitive key's value fails."""

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
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
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
    "kek": KeyPolicy(usage=Usage.WRAP),
    "secret": KeyPolicy(usage=Usage.ENCRYPT),
    "derive": KeyPolicy(usage=Usage.DERIVE),
    "temp-derive": TEMP_DERIVE,
    "temp-wrap": TEMP_WRAP,
    "temp-confirm": TEMP_CONFIRM,
}

#: The library derives only temporary keys (ECDH and ECB derivation).
TEMP_AES = sorted(name for name, p in AES_POLICIES.items() if not p.persistent)


def _assert_policy(report: PolicyReport, policy: KeyPolicy, obj: Any) -> None:
    report.check(transferable=policy.transferable)
    assert report.sensitive is True
    assert report.extractable is policy.transferable
    # S1: the secret value can never be read in plaintext.
    with pytest.raises(pkcs11.AttributeSensitive):
        obj[Attribute.VALUE]


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
    key = oem.generate_ec(label, curve=curve, policy=policy)
    cleanup(key)
    report = key.policy_report()
    _assert_policy(report, policy, key._obj())
    assert report.always_sensitive is True
    assert report.never_extractable is (not policy.transferable)
    if policy.persistent:
        found = oem.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        assert found[Attribute.TOKEN] is True
        assert found[Attribute.SIGN] is bool(policy.usage & Usage.SIGN)
        assert found[Attribute.DERIVE] is bool(policy.usage & Usage.DERIVE)
        assert found[Attribute.DECRYPT] is False and found[Attribute.UNWRAP] is False
    else:
        assert key._obj()[Attribute.TOKEN] is False


@pytest.mark.parametrize("name", sorted(AES_POLICIES))
def test_generated_aes_keys(
    oem: Token, label: str, name: str, cleanup: Callable[[Any], None]
) -> None:
    policy = AES_POLICIES[name]
    key = oem.generate_aes(label, policy=policy)
    cleanup(key)
    obj = key._obj()
    _assert_policy(key.policy_report(), policy, obj)
    assert obj[Attribute.TOKEN] is policy.persistent
    assert obj[Attribute.WRAP] is bool(policy.usage & Usage.WRAP)
    assert obj[Attribute.ENCRYPT] is bool(policy.usage & Usage.ENCRYPT)
    assert obj[Attribute.DERIVE] is bool(policy.usage & Usage.DERIVE)
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


@pytest.mark.parametrize("policy", [IMAGE_KEY, KeyPolicy(usage=Usage.ENCRYPT)], ids=str)
def test_unwrapped_keys(
    oem: Token, label: str, policy: KeyPolicy, cleanup: Callable[[Any], None]
) -> None:
    kek_value = os.urandom(32)
    obj = oem.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.VALUE: kek_value,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
        }
    )
    kek = HsmSecretKey(oem, label="", key_id=b"", handle=obj)
    cleanup(kek)
    wrapped = keywrap.aes_key_wrap_with_padding(kek_value, os.urandom(32))
    key = kek.unwrap(wrapped, label=label, key_id=b"\x07", policy=policy)
    cleanup(key)
    report = key.policy_report()
    _assert_policy(report, policy, key._obj())
    # The value crossed the boundary wrapped, so the token cannot vouch it was always secret.
    assert report.always_sensitive is False


def test_extractable_test_key_is_detected_by_check(oem: Token) -> None:
    """The check itself can fail: a non-sensitive key made by hand is refused."""
    obj = oem.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
            Attribute.VALUE: os.urandom(32),
        }
    )
    key = HsmSecretKey(oem, label="", key_id=b"", handle=obj)
    try:
        report = key.policy_report()
        with pytest.raises(KeyPolicyError, match="not CKA_SENSITIVE"):
            report.check(transferable=True)
        assert len(obj[Attribute.VALUE]) == 32  # and its value can indeed be read
    finally:
        key.destroy()
