"""PKCS#11 URIs (RFC 7512): parse ``pkcs11:token=oem;object=root-ca;type=private?pin-source=...``.

Pure logic, no PKCS#11 calls.  The path attributes select a token and an object; the query
attributes say where the module and the PIN come from.  Values are percent-decoded
(RFC 7512 §2.3).  Vendor attributes (``x-`` prefix) are skipped; any other attribute we do
not understand is refused, because silently ignoring it could select the wrong object.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import attrs

from ..errors import URIError

# RFC 7512 §2.3: pk11-path-attr names this library understands.
_PATH_ATTRS = frozenset(
    {
        "token",
        "manufacturer",
        "serial",
        "model",
        "library-manufacturer",
        "library-description",
        "library-version",
        "object",
        "type",
        "id",
        "slot-description",
        "slot-manufacturer",
        "slot-id",
    }
)
_QUERY_ATTRS = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
_OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: CK_SLOT_ID is a CK_ULONG (PKCS#11 v3.0 §3.2): below 2**64, at most 20 decimal digits.
_MAX_SLOT_DIGITS = 20


def _unquote(value: str, what: str) -> bytes:
    # RFC 7512 §2.3: pk11-pchar / pk11-qchar, with "%" HEXDIG HEXDIG escapes.
    if _PCT.search(value):
        raise URIError(f"PKCS#11 URI: bad percent-encoding in {what!r}")
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == "%":
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            try:
                out += c.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate is no character (RFC 3629 §3)
                raise URIError(f"PKCS#11 URI: {what!r} holds a non-character") from None
            i += 1
    return bytes(out)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise URIError(f"PKCS#11 URI: {what} is not UTF-8") from None


@attrs.frozen(kw_only=True)
class PKCS11URI:
    """A parsed RFC 7512 URI. ``id`` is raw bytes; everything else is text."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    slot_id: int | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    pin_value: str | None = attrs.field(default=None, repr=False)  # never shown

    @classmethod
    def parse(cls, uri: str) -> PKCS11URI:
        """Parse ``uri``; raise :class:`URIError` naming what is wrong."""
        if not isinstance(uri, str):
            raise URIError("PKCS#11 URI must be a string")
        if not uri.lower().startswith("pkcs11:"):
            raise URIError("PKCS#11 URI must start with 'pkcs11:'")
        rest = uri[len("pkcs11:") :]
        path, _, query = rest.partition("?")
        fields: dict[str, object] = {}
        for part in filter(None, path.split(";")):
            name, eq, value = part.partition("=")
            if not eq:
                raise URIError(f"PKCS#11 URI: path attribute {name!r} has no '='")
            name = name.lower()
            if name.startswith("x-"):
                continue
            if name not in _PATH_ATTRS:
                raise URIError(f"PKCS#11 URI: unknown path attribute {name!r}")
            key = name.replace("-", "_")
            if key in fields:
                raise URIError(f"PKCS#11 URI: attribute {name!r} given twice")  # §2.3
            raw = _unquote(value, name)
            if name == "id":
                fields["id"] = raw
            elif name == "slot-id":
                text = _text(raw, name)
                # RFC 7512 §2.3: slot-id = 1*DIGIT (ASCII only; str.isdigit() also takes
                # "²", which int() refuses, and "١", which int() reads as 1).
                if (
                    not (text.isascii() and text.isdigit())
                    or len(text) > _MAX_SLOT_DIGITS
                    or int(text) >= 1 << 64
                ):
                    raise URIError(
                        f"PKCS#11 URI: slot-id {text[:32]!r} is not a decimal number below 2^64"
                    )
                fields["slot_id"] = int(text)
            elif name == "type":
                text = _text(raw, name)
                if text not in _OBJECT_TYPES:
                    raise URIError(f"PKCS#11 URI: unknown object type {text!r}")
                fields["type"] = text
            elif key in {"token", "manufacturer", "serial", "model", "object"}:
                fields[key] = _text(raw, name)
            # library-* and slot-description/manufacturer are accepted but not used.
        for part in filter(None, query.split("&")):
            name, eq, value = part.partition("=")
            if not eq:
                raise URIError(f"PKCS#11 URI: query attribute {name!r} has no '='")
            name = name.lower()
            if name.startswith("x-"):
                continue
            if name not in _QUERY_ATTRS:
                raise URIError(f"PKCS#11 URI: unknown query attribute {name!r}")
            key = name.replace("-", "_")
            if key in fields:
                raise URIError(f"PKCS#11 URI: attribute {name!r} given twice")
            fields[key] = _text(_unquote(value, name), name)
        if "pin_source" in fields and "pin_value" in fields:
            raise URIError("PKCS#11 URI: pin-source and pin-value are mutually exclusive")
        return cls(**fields)  # type: ignore[arg-type]

    def __str__(self) -> str:
        """The URI without its PIN value (safe to log)."""
        path = []
        for name in ("token", "manufacturer", "serial", "model", "object", "type"):
            value = getattr(self, name)
            if value is not None:
                path.append(f"{name}={quote(value, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.slot_id is not None:
            path.append(f"slot-id={self.slot_id}")
        query = []
        if self.module_path is not None:
            query.append(f"module-path={quote(self.module_path, safe='/')}")
        if self.module_name is not None:
            query.append(f"module-name={quote(self.module_name, safe='')}")
        if self.pin_source is not None:
            query.append(f"pin-source={quote(self.pin_source, safe='/:')}")
        s = "pkcs11:" + ";".join(path)
        return s + ("?" + "&".join(query) if query else "")
