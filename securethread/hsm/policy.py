"""PKCS#11 attribute templates: the one place that turns a :class:`KeyPolicy` into the
attributes of an object the token creates, derives or unwraps, and reads them back.

Invariant S1 (docs/design.md): every private or secret key is ``CKA_SENSITIVE=True``; it is
``CKA_EXTRACTABLE=False`` unless its policy declares it *transferable* (a key that must
travel, and then only wrapped).  Every object the library creates -- keys of every kind,
session or token, and certificates -- is ``CKA_MODIFIABLE=False`` and ``CKA_COPYABLE=False``
from its creation template (PKCS#11 v3.0 §4.4: neither can be turned off later, and SoftHSM
2.6.1 refuses C_SetAttributeValue and C_CopyObject on such objects with
CKR_ACTION_PROHIBITED).  CKA_MODIFIABLE comes last in every template: SoftHSM 2.6.1 applies a
C_DeriveKey/C_UnwrapKey template in order and refuses every attribute after
CKA_MODIFIABLE=False with CKR_ATTRIBUTE_READ_ONLY.  ``CKA_DESTROYABLE`` stays True:
temporaries are destroyed after use and a failed import is rolled back (job keys outlive their
job: revocation needs the production CA, docs/keys.md).  Usage attributes are explicit, every
one of them, so no token default can add a usage.
Attribute meanings: PKCS#11 v3.0 §4.4 (storage objects), §4.6 (certificates), §4.7-4.10
(keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pkcs11 import Attribute, ObjectClass

from ..keys.policy import KeyPolicy, PolicyReport, Usage

#: Storage attributes of every object the library creates (PKCS#11 v3.0 §4.4), but for
#: CKA_MODIFIABLE=False, which :func:`_frozen` appends last.
STORAGE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.COPYABLE: False,
    Attribute.DESTROYABLE: True,
}


def _frozen(template: dict[Attribute, Any]) -> dict[Attribute, Any]:
    """``template`` with CKA_MODIFIABLE=False as its last attribute (see the module doc;
    python-pkcs11 keeps the order of the attributes it adds to its own defaults)."""
    template.pop(Attribute.MODIFIABLE, None)
    template[Attribute.MODIFIABLE] = False
    return template


def secret_template(policy: KeyPolicy) -> dict[Attribute, Any]:
    """Attributes for an AES key (generate, derive or unwrap)."""
    policy.check_secret()
    u = policy.usage
    return _frozen(
        {
            Attribute.TOKEN: policy.persistent,
            Attribute.PRIVATE: True,
            **STORAGE_TEMPLATE,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: policy.transferable,
            Attribute.ENCRYPT: bool(u & Usage.ENCIPHER),
            Attribute.DECRYPT: bool(u & Usage.DECIPHER),
            Attribute.SIGN: bool(u & Usage.MAC),  # AES-CMAC (key confirmation, transfer MACs)
            Attribute.VERIFY: False,  # MACs are recomputed and compared in constant time
            Attribute.WRAP: bool(u & Usage.WRAP_KEY),
            Attribute.UNWRAP: bool(u & Usage.UNWRAP_KEY),
            Attribute.DERIVE: bool(u & Usage.DERIVE),
        }
    )


def private_template(policy: KeyPolicy) -> dict[Attribute, Any]:
    """Attributes for the private half of an EC key pair."""
    policy.check_private()
    u = policy.usage
    return _frozen(
        {
            Attribute.TOKEN: policy.persistent,
            Attribute.PRIVATE: True,
            **STORAGE_TEMPLATE,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: policy.transferable,
            Attribute.SIGN: bool(u & Usage.SIGN),
            Attribute.DERIVE: bool(u & Usage.DERIVE),
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
        }
    )


def public_template(policy: KeyPolicy) -> dict[Attribute, Any]:
    """Attributes for the public half of an EC key pair."""
    return _frozen(
        {
            Attribute.TOKEN: policy.persistent,
            Attribute.PRIVATE: False,
            **STORAGE_TEMPLATE,
            Attribute.VERIFY: bool(policy.usage & Usage.SIGN),
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
            Attribute.DERIVE: False,
        }
    )


def certificate_template() -> dict[Attribute, Any]:
    """Storage attributes of a CKO_CERTIFICATE the library stores (public, frozen)."""
    return _frozen({Attribute.TOKEN: True, Attribute.PRIVATE: False, **STORAGE_TEMPLATE})


_COMMON = [
    Attribute.TOKEN,
    Attribute.PRIVATE,
    Attribute.MODIFIABLE,
    Attribute.COPYABLE,
    Attribute.DESTROYABLE,
    Attribute.SENSITIVE,
    Attribute.EXTRACTABLE,
    Attribute.ALWAYS_SENSITIVE,
    Attribute.NEVER_EXTRACTABLE,
    Attribute.LOCAL,
    Attribute.DERIVE,
]
#: What :func:`report_from_attributes` needs, per class: only attributes the class has
#: (one C_GetAttributeValue fails as a whole on an attribute of another class).
REPORT_ATTRIBUTES: dict[ObjectClass, list[Attribute]] = {
    ObjectClass.PRIVATE_KEY: [*_COMMON, Attribute.SIGN, Attribute.DECRYPT, Attribute.UNWRAP],
    ObjectClass.SECRET_KEY: [
        *_COMMON,
        Attribute.ENCRYPT,
        Attribute.DECRYPT,
        Attribute.SIGN,
        Attribute.VERIFY,
        Attribute.WRAP,
        Attribute.UNWRAP,
    ],
}


def report_from_attributes(attrs_: Mapping[Attribute, Any]) -> PolicyReport:
    """A :class:`PolicyReport` from attributes read off a key; an absent one is False."""

    def flag(a: Attribute) -> bool:
        return bool(attrs_.get(a, False))

    return PolicyReport(
        token=flag(Attribute.TOKEN),
        private=flag(Attribute.PRIVATE),
        modifiable=flag(Attribute.MODIFIABLE),
        copyable=flag(Attribute.COPYABLE),
        destroyable=flag(Attribute.DESTROYABLE),
        sensitive=flag(Attribute.SENSITIVE),
        extractable=flag(Attribute.EXTRACTABLE),
        always_sensitive=flag(Attribute.ALWAYS_SENSITIVE),
        never_extractable=flag(Attribute.NEVER_EXTRACTABLE),
        local=flag(Attribute.LOCAL),
        encrypt=flag(Attribute.ENCRYPT),
        decrypt=flag(Attribute.DECRYPT),
        sign=flag(Attribute.SIGN),
        verify=flag(Attribute.VERIFY),
        wrap=flag(Attribute.WRAP),
        unwrap=flag(Attribute.UNWRAP),
        derive=flag(Attribute.DERIVE),
    )


__all__ = [
    "REPORT_ATTRIBUTES",
    "STORAGE_TEMPLATE",
    "certificate_template",
    "private_template",
    "public_template",
    "report_from_attributes",
    "secret_template",
]
