"""Named key policies and their enforcement by the software backend (docs/keys.md): each
usage is refused unless the policy grants it, as a token refuses it, and the reported
attributes are the ones SoftHSM reports for the same policy and origin."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import DecryptionError, KeyPolicyError
from securethread.formats.transcript import KeyEntry
from securethread.keys import SoftwareBackend
from securethread.keys.policy import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    KEY_AGREEMENT,
    NAMED_POLICIES,
    PROGRAMMER_IMAGE_KEY,
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_UNWRAP,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
    PolicyReport,
    Usage,
)

NONCE = bytes(12)


def test_named_policies_grant_one_role_each() -> None:
    assert IMAGE_KEY.usage == Usage.ENCIPHER | Usage.MAC and IMAGE_KEY.transferable
    assert PROGRAMMER_IMAGE_KEY.usage == Usage.NONE and PROGRAMMER_IMAGE_KEY.transferable
    assert [TEMP_WRAP.usage, TEMP_UNWRAP.usage, TEMP_CONFIRM.usage, TEMP_DERIVE.usage] == [
        Usage.WRAP_KEY,
        Usage.UNWRAP_KEY,
        Usage.MAC,
        Usage.DERIVE,
    ]
    for name, policy in NAMED_POLICIES.items():
        transferable = name in ("IMAGE_KEY", "PROGRAMMER_IMAGE_KEY")
        assert policy.transferable is transferable, name
        assert policy.persistent is (not name.startswith(("TEMP_", "EPHEMERAL_"))), name
    assert Usage.ENCRYPT == Usage.ENCIPHER | Usage.DECIPHER | Usage.MAC  # composites kept
    assert Usage.WRAP == Usage.WRAP_KEY | Usage.UNWRAP_KEY


@pytest.mark.parametrize(
    ("policy", "check", "message"),
    [
        (TEMP_WRAP, "check_private", "only sign and derive"),
        (IMAGE_KEY, "check_private", "only sign and derive"),
        (SIGNING, "check_secret", "AES key cannot sign"),
        (KeyPolicy(usage=Usage.SIGN | Usage.MAC), "check_secret", "AES key cannot sign"),
    ],
)
def test_impossible_usages_are_refused(policy: KeyPolicy, check: str, message: str) -> None:
    with pytest.raises(KeyPolicyError, match=message):
        getattr(policy, check)()


def _report(**changes: bool) -> PolicyReport:
    base = dict.fromkeys(attrs.fields_dict(PolicyReport), False)
    return PolicyReport(**(base | {"sensitive": True, "destroyable": True} | changes))


@pytest.mark.parametrize(
    ("changes", "transferable", "message"),
    [
        ({"sensitive": False}, True, "not CKA_SENSITIVE"),
        ({"extractable": True}, False, "not declared transferable"),
        ({"modifiable": True}, True, "CKA_MODIFIABLE"),
        ({"copyable": True}, True, "CKA_COPYABLE"),
    ],
)
def test_report_check_refuses(changes: dict[str, bool], transferable: bool, message: str) -> None:
    with pytest.raises(KeyPolicyError, match=message):
        _report(**changes).check(transferable=transferable)
    _report().check(transferable=False)  # and passes a frozen, sensitive key


@pytest.fixture
def sw() -> SoftwareBackend:
    return SoftwareBackend("policy")


ALLOWED = {
    "IMAGE_KEY": {"encrypt", "compute a CMAC"},
    "PROGRAMMER_IMAGE_KEY": set(),
    "TEMP_DERIVE": {"derive"},
    "TEMP_WRAP": {"wrap"},
    "TEMP_UNWRAP": {"unwrap"},
    "TEMP_CONFIRM": {"compute a CMAC"},
}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_software_backend_enforces_each_usage(sw: SoftwareBackend, name: str) -> None:
    """Every operation a policy does not grant is refused; every one it grants is tried."""
    key = sw.generate_aes("", policy=attrs.evolve(NAMED_POLICIES[name], persistent=False))
    victim = sw.generate_aes("", policy=attrs.evolve(IMAGE_KEY, persistent=False))
    operations: dict[str, Callable[[], Any]] = {
        "encrypt": lambda: key.encrypt_gcm(NONCE, b"x", b""),
        "decrypt": lambda: key.decrypt_gcm(NONCE, bytes(32), b""),
        "compute a CMAC": lambda: key.cmac(b"x"),
        "wrap": lambda: key.wrap(victim),
        "unwrap": lambda: key.unwrap(bytes(40), label="", key_id=b"", policy=TEMP_CONFIRM),
        "derive": lambda: key.derive_ecb(bytes(32), policy=TEMP_DERIVE),
    }
    for what, call in operations.items():
        if what in ALLOWED[name]:
            try:
                call()
            except DecryptionError:
                pass  # granted, and tried: the input is garbage
        else:
            with pytest.raises(KeyPolicyError, match=f"not allowed to {what}"):
                call()


def test_programmer_image_key_licenses_in_software(sw: SoftwareBackend) -> None:
    """The programmer's copy: no usage, but agree_and_wrap wraps it to a device."""
    oem_key = sw.generate_aes("img", policy=IMAGE_KEY)
    kek = sw.generate_aes("", policy=KeyPolicy(usage=Usage.WRAP, persistent=False))
    wrapped = kek.wrap(oem_key)
    copy = kek.unwrap(wrapped, label="copy", key_id=b"\x01", policy=PROGRAMMER_IMAGE_KEY)
    ka = sw.generate_ec("ka", curve=Curve.P256, policy=KEY_AGREEMENT)
    device = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert len(ka.agree_and_wrap(device, os.urandom(32), copy)) == 40
    report = copy.policy_report()
    assert report.usages == () and report.extractable and not report.always_sensitive


def test_reports_follow_the_origin_of_a_key(sw: SoftwareBackend) -> None:
    generated = sw.generate_aes("g", policy=IMAGE_KEY).policy_report()
    assert generated.local and generated.always_sensitive and not generated.never_extractable
    eph = sw.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    z = eph.derive_aes(eph.public_key(), policy=TEMP_DERIVE).policy_report()
    assert not z.local and z.always_sensitive and z.never_extractable and not z.token
    signing = sw.generate_ec("s", curve=Curve.P256, policy=SIGNING).policy_report()
    assert signing.usages == ("sign",) and signing.token and not signing.modifiable


def test_transcript_records_the_full_attribute_set(sw: SoftwareBackend) -> None:
    key = sw.generate_aes("img", policy=IMAGE_KEY)
    entry = KeyEntry.from_key(key)
    recorded = dict(entry.attributes)
    assert {k: v for k, v in recorded.items() if k != "type"} == key.policy_report().attributes()
    assert recorded["modifiable"] is False and recorded["copyable"] is False
    assert recorded["encrypt"] is True and recorded["decrypt"] is False
    signer = sw.generate_ec("s", curve=Curve.P256, policy=SIGNING)
    assert dict(KeyEntry.from_key(signer, attributes={"usage": ["sign"]}).attributes)["sign"]
    with pytest.raises(KeyPolicyError, match=r"usage \['sign', 'derive'\] contradicts"):
        KeyEntry.from_key(signer, attributes={"usage": ["sign", "derive"]})
    with pytest.raises(KeyPolicyError, match="modifiable=True contradicts"):
        KeyEntry.from_key(signer, attributes={"modifiable": True})
