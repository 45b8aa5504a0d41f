"""Data objects (CKO_DATA, PKCS#11 v3.0 §4.5) in a token: small application records.

A data object holds bytes (``CKA_VALUE``) under a label and an application name
(``CKA_APPLICATION``).  The library keeps state here that must outlive the files beside
the token, such as a job's quota mark (:mod:`securethread.programmer.quota_mark`).

Facts this module is built on (docs/hsm.md, SoftHSM 2.6.1):

* ``CKA_VALUE`` of a data object cannot be changed after creation (SoftHSM returns
  CKR_ATTRIBUTE_READ_ONLY): a new value is a new object, the old one is destroyed after;
* every token object is a file of its own, written when the object is created
  (milliseconds each), so callers write rarely;
* objects are private (``CKA_PRIVATE``, readable only after login) and visible to every
  process logged in to the token; a search can meet a handle another process just
  destroyed (CKR_OBJECT_HANDLE_INVALID), so searches are retried.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pkcs11
from pkcs11 import Attribute, ObjectClass

from ..errors import HSMError
from .token import Token

_SEARCH_RETRIES = 5


@attrs.frozen
class DataObject:
    """One data object as read from the token; ``value`` is None if it cannot be read."""

    label: str
    value: bytes | None
    handle: Any = attrs.field(eq=False, repr=False)


def find_data(token: Token, *, label: str, application: str) -> list[DataObject]:
    """Every data object labelled ``label`` for ``application`` (in no particular order).

    An object whose value cannot be read (a file SoftHSM cannot parse) is returned with
    ``value=None`` so that the caller decides what a damaged record means.
    """
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.LABEL: label,
        Attribute.APPLICATION: application,
    }
    for attempt in range(_SEARCH_RETRIES):
        try:
            found = list(token.session.get_objects(template))
            out = []
            for obj in found:
                try:
                    value: bytes | None = bytes(obj[Attribute.VALUE])
                except pkcs11.ObjectHandleInvalid:
                    raise
                except pkcs11.PKCS11Error:
                    value = None
                out.append(DataObject(label=label, value=value, handle=obj))
            return out
        except pkcs11.ObjectHandleInvalid:
            # Another process destroyed an object during our search: search again.
            if attempt + 1 == _SEARCH_RETRIES:
                raise HSMError(
                    f"token {token.name!r}: data objects {label!r} keep changing under us"
                ) from None
            time.sleep(0.01 * (attempt + 1))
        except pkcs11.PKCS11Error as exc:
            raise HSMError(
                f"token {token.name!r}: cannot search data objects {label!r}: "
                f"{type(exc).__name__}"
            ) from exc
    raise AssertionError("unreachable")


def create_data(token: Token, *, label: str, application: str, value: bytes) -> DataObject:
    """Create a private token data object (one file write in SoftHSM)."""
    if type(value) is not bytes:
        raise TypeError("a data object's value must be bytes")
    # Serialised with the token's other object creations (SoftHSMv2 #573).
    with token._objects_lock:
        try:
            obj = token.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                    Attribute.COPYABLE: False,  # docs/keys.md: nothing is cloned
                    Attribute.LABEL: label,
                    Attribute.APPLICATION: application,
                    Attribute.VALUE: value,
                }
            )
        except pkcs11.PKCS11Error as exc:
            raise HSMError(
                f"token {token.name!r}: cannot create data object {label!r}: "
                f"{type(exc).__name__}"
            ) from exc
    return DataObject(label=label, value=value, handle=obj)


def destroy_data(token: Token, obj: DataObject) -> None:
    """Destroy ``obj``; one that another process destroyed already is not an error."""
    with token._objects_lock:
        try:
            obj.handle.destroy()
        except pkcs11.ObjectHandleInvalid:
            pass
        except pkcs11.PKCS11Error as exc:
            raise HSMError(
                f"token {token.name!r}: cannot destroy data object {obj.label!r}: "
                f"{type(exc).__name__}"
            ) from exc


__all__ = ["DataObject", "create_data", "destroy_data", "find_data"]
