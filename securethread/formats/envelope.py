"""Signed envelopes: the one way an artefact is signed, and the one way it is opened.

An envelope is canonical CBOR (see :mod:`securethread.formats.cbor`)::

    {"kind": "job", "v": 1, "body": <bstr: canonical CBOR of the body>,
     "sigs": [{"signer": <SHA-256 of the signer's SPKI>, "sig": <DER ECDSA>}, ...]}

Each signature covers ``CBOR(["securethread-signature", kind, v, body])`` so a signature on
one kind of artefact can never be replayed as another (domain separation).  Invariant S2:
:func:`open_envelope` checks size, shape, kind and signatures *before* the body is parsed.

Invariant S6 (one valid byte string per signed content; docs/formats.md): an envelope is
accepted only if

* the outer map has exactly ``kind`` (text), ``v`` (the integer 1), ``body`` (bytes) and a
  non-empty ``sigs`` array, each entry exactly ``{"signer": 32 bytes, "sig": bytes}``;
* the entries are in strictly ascending order of signer fingerprint (one canonical order,
  so reordering or duplicating an entry is refused, and each signer appears once);
* every signer is a trusted key (an entry by an unknown key is refused, not ignored);
* every signature is a strict-DER ECDSA-Sig-Value (RFC 3279 §2.2.3) with ``0 < r, s < n``
  and ``s <= n/2`` ("low s": the twin ``(r, n - s)`` that also verifies is refused), and
  verifies.

:func:`seal` and :func:`add_signature` produce exactly that form (a high ``s`` returned by a
token is replaced by ``n - s`` before it is written).  What identifies a signed artefact is
:func:`content_id`, the SHA-256 of the bytes the signers sign, never the envelope's bytes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import ec, utils

from securethread.errors import FormatError, SignatureError
from securethread.formats import cbor
from securethread.keys.ecutil import fingerprint, verify_signature
from securethread.keys.protocol import PrivateKey

ENVELOPE_VERSION = 1
DEFAULT_MAX_SIZE = 1 << 20
MAX_SIGNATURES = 16
FINGERPRINT_SIZE = 32
_OUTER_KEYS = frozenset({"kind", "v", "body", "sigs"})
_ENTRY_KEYS = frozenset({"signer", "sig"})

#: Group orders n of the curves securethread signs with (SEC 2 v2 §2.4.2, §2.5.1).
_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


class NonCanonicalEnvelopeError(FormatError):
    """An envelope that verifies under some reading but is not the one canonical encoding
    (signature entries out of order or repeated, high-s or non-DER signature)."""


class UnknownSignerError(SignatureError):
    """An envelope carries a signature by a key the verifier does not trust."""


def _order(key: ec.EllipticCurvePublicKey) -> int:
    n = _ORDERS.get(key.curve.name)
    if n is None:
        raise FormatError(f"unsupported signature curve {key.curve.name!r}")
    return n


def signed_bytes(kind: str, body: bytes, version: int = ENVELOPE_VERSION) -> bytes:
    """The exact bytes each signer signs."""
    return cbor.encode(["securethread-signature", kind, version, body])


def low_s(signature: bytes, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The canonical form of a DER ECDSA signature: ``s`` replaced by ``n - s`` if above n/2."""
    n = _order(public_key)
    r, s = utils.decode_dss_signature(signature)
    return utils.encode_dss_signature(r, n - s) if s > n // 2 else signature


def sign(key: PrivateKey, tbs: bytes) -> bytes:
    """Sign ``tbs`` with ``key``; always the low-s form (whatever the token returned)."""
    return low_s(key.sign(tbs), key.public_key())


def check_signature_encoding(
    signature: bytes, public_key: ec.EllipticCurvePublicKey, *, what: str
) -> None:
    """Refuse every encoding of an ECDSA signature but the one canonical form: strict DER
    (X.690 §10), ``0 < r < n``, ``0 < s <= n/2``."""
    n = _order(public_key)
    try:
        r, s = utils.decode_dss_signature(signature)
    except ValueError:
        raise NonCanonicalEnvelopeError(f"{what}: signature is not a DER ECDSA value") from None
    if utils.encode_dss_signature(r, s) != signature:
        raise NonCanonicalEnvelopeError(f"{what}: signature is not in strict DER")
    if not (0 < r < n and 0 < s < n):
        raise NonCanonicalEnvelopeError(f"{what}: signature value out of range")
    if s > n // 2:
        raise NonCanonicalEnvelopeError(f"{what}: signature has a high s (only low-s accepted)")


def _entries(signers: Iterable[PrivateKey], kind: str, tbs: bytes) -> list[dict[str, bytes]]:
    entries = sorted(
        ({"signer": fingerprint(k.public_key()), "sig": sign(k, tbs)} for k in signers),
        key=lambda e: e["signer"],
    )
    if not entries:
        raise ValueError("an envelope needs at least one signer")
    if any(a["signer"] == b["signer"] for a, b in zip(entries, entries[1:], strict=False)):
        raise ValueError(f"{kind}: the same key cannot sign twice")
    return entries


def seal(kind: str, body: Mapping[str, Any], signers: Iterable[PrivateKey]) -> bytes:
    """Encode ``body`` canonically and sign it with every key in ``signers``."""
    body_bytes = cbor.encode(dict(body))
    sigs = _entries(signers, kind, signed_bytes(kind, body_bytes))
    return cbor.encode({"kind": kind, "v": ENVELOPE_VERSION, "body": body_bytes, "sigs": sigs})


def add_signature(envelope: bytes, kind: str, signer: PrivateKey) -> bytes:
    """Co-sign an existing envelope (M-of-N approval); the body is not re-encoded and the
    new entry takes its place in the canonical order."""
    outer = _parse_outer(envelope, kind, DEFAULT_MAX_SIZE)
    fp = fingerprint(signer.public_key())
    names = [s["signer"] for s in outer["sigs"]]
    if fp in names:
        raise FormatError(f"{kind}: already signed by this key")
    if len(names) >= MAX_SIGNATURES:
        raise FormatError(f"{kind}: already carries {MAX_SIGNATURES} signatures")
    entry = {"signer": fp, "sig": sign(signer, signed_bytes(kind, outer["body"]))}
    outer["sigs"].insert(bisect.bisect(names, fp), entry)
    return cbor.encode(outer)


def merge(kind: str, envelopes: Iterable[bytes], *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """One envelope carrying the signatures of ``envelopes``, which must sign one body: M-of-N
    approvals made in separate processes (each signer seals the body alone) joined in the
    canonical order (S6).  Nothing is verified here: open the result with :func:`open_signed`."""
    outers = [_parse_outer(data, kind, max_size) for data in envelopes]
    if not outers:
        raise ValueError("merge needs at least one envelope")
    body = outers[0]["body"]
    if any(o["body"] != body for o in outers[1:]):
        raise FormatError(f"{kind}: the envelopes to merge sign different bodies")
    sigs = sorted((s for o in outers for s in o["sigs"]), key=lambda s: bytes(s["signer"]))
    if any(a["signer"] == b["signer"] for a, b in zip(sigs, sigs[1:], strict=False)):
        raise FormatError(f"{kind}: the envelopes to merge share a signer")
    if len(sigs) > MAX_SIGNATURES:
        raise FormatError(f"{kind}: more than {MAX_SIGNATURES} signatures")
    return cbor.encode({"kind": kind, "v": ENVELOPE_VERSION, "body": body, "sigs": sigs})


def _parse_outer(data: bytes, kind: str, max_size: int) -> dict[str, Any]:
    """The outer map, checked for shape, exact types and canonical entry order."""
    outer = cbor.decode(data, what=kind, max_size=max_size)
    if not isinstance(outer, dict) or set(outer) != _OUTER_KEYS:
        raise FormatError(f"{kind}: not a signed envelope")
    if type(outer["kind"]) is not str:
        raise FormatError(f"{kind}: malformed envelope")
    if outer["kind"] != kind:
        raise FormatError(f"expected a {kind!r} artefact, got {outer['kind']!r}")
    if type(outer["v"]) is not int or outer["v"] != ENVELOPE_VERSION:
        raise FormatError(f"{kind}: unsupported envelope version {outer['v']!r}")
    if type(outer["body"]) is not bytes or type(outer["sigs"]) is not list:
        raise FormatError(f"{kind}: malformed envelope")
    sigs = outer["sigs"]
    if not sigs:
        raise FormatError(f"{kind}: envelope carries no signature")
    if len(sigs) > MAX_SIGNATURES:
        raise FormatError(f"{kind}: more than {MAX_SIGNATURES} signatures")
    for s in sigs:
        if not (
            type(s) is dict
            and set(s) == _ENTRY_KEYS
            and type(s["signer"]) is bytes
            and type(s["sig"]) is bytes
            and len(s["signer"]) == FINGERPRINT_SIZE
        ):
            raise FormatError(f"{kind}: malformed signature entry")
    for prev, cur in zip(sigs, sigs[1:], strict=False):
        if prev["signer"] == cur["signer"]:
            raise NonCanonicalEnvelopeError(f"{kind}: a signer appears more than once")
        if prev["signer"] > cur["signer"]:
            raise NonCanonicalEnvelopeError(
                f"{kind}: signatures are not in canonical order (ascending signer fingerprint)"
            )
    return outer


def content_id(data: bytes, *, kind: str, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """SHA-256 of the bytes the signers of an envelope sign: the identity of its content.

    Equal for every valid framing of the same signed body (another set of co-signers, a
    re-signature); nothing is verified here, so use it only on an envelope you open too.
    """
    outer = _parse_outer(data, kind, max_size)
    return hashlib.sha256(signed_bytes(kind, outer["body"])).digest()


def peek_kind(data: bytes) -> str:
    """The kind of an envelope, for display only (nothing is verified)."""
    outer = cbor.decode(data, what="artefact", max_size=64 << 20)
    if not isinstance(outer, dict) or not isinstance(outer.get("kind"), str):
        raise FormatError("not a securethread signed artefact")
    return str(outer["kind"])


def peek_body(data: bytes) -> tuple[str, dict[str, Any], list[bytes]]:
    """Kind, *unverified* body and signer fingerprints, for ``inspect`` only."""
    kind = peek_kind(data)
    outer = _parse_outer(data, kind, 64 << 20)
    body = cbor.decode(outer["body"], what=f"{kind} body")
    if not isinstance(body, dict):  # as open_signed: every body is a map
        raise FormatError(f"{kind}: body is not a map")
    return kind, body, [s["signer"] for s in outer["sigs"]]


@attrs.frozen
class Opened:
    """A verified envelope: its body, the trusted keys that signed it, its content id."""

    body: dict[str, Any]
    signers: tuple[bytes, ...]
    content_id: bytes


def open_signed(
    data: bytes,
    *,
    kind: str,
    keys: ec.EllipticCurvePublicKey | Mapping[bytes, ec.EllipticCurvePublicKey],
    threshold: int = 1,
    max_size: int = DEFAULT_MAX_SIZE,
) -> Opened:
    """Verify an envelope of ``kind`` strictly (see the module docstring) and decode it.

    ``keys`` is the one trusted key, or a map fingerprint -> key; every signature must be by
    one of them and verify, and at least ``threshold`` must be present.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if isinstance(keys, ec.EllipticCurvePublicKey):
        keys = {fingerprint(keys): keys}
    outer = _parse_outer(data, kind, max_size)
    sigs = outer["sigs"]
    unknown = [s["signer"] for s in sigs if s["signer"] not in keys]
    if unknown:
        raise UnknownSignerError(
            f"{kind}: {len(unknown)} signature(s) by a key that is not trusted "
            f"(first {unknown[0].hex()[:16]})"
        )
    tbs = signed_bytes(kind, outer["body"])
    for s in sigs:
        key = keys[s["signer"]]
        check_signature_encoding(s["sig"], key, what=kind)
        verify_signature(key, s["sig"], tbs, what=kind)
    if len(sigs) < threshold:
        raise SignatureError(
            f"{kind}: {len(sigs)} valid signature(s) from trusted keys, {threshold} required"
        )
    body = cbor.decode(outer["body"], what=f"{kind} body")
    if not isinstance(body, dict):
        raise FormatError(f"{kind}: body is not a map")
    return Opened(
        body=body,
        signers=tuple(s["signer"] for s in sigs),
        content_id=hashlib.sha256(tbs).digest(),
    )


def open_envelope(
    data: bytes,
    *,
    kind: str,
    keys: ec.EllipticCurvePublicKey | Mapping[bytes, ec.EllipticCurvePublicKey],
    threshold: int = 1,
    max_size: int = DEFAULT_MAX_SIZE,
) -> dict[str, Any]:
    """Verify and decode an envelope of ``kind`` (see :func:`open_signed`); return its body."""
    return open_signed(data, kind=kind, keys=keys, threshold=threshold, max_size=max_size).body
