"""Signed envelopes: the one way an artefact is signed, and the one way it is opened.

An envelope is canonical CBOR (see :mod:`securethread.cbor`)::

    {"kind": "job", "v": 1, "body": <bstr: canonical CBOR of the body>,
     "sigs": [{"signer": <SHA-256 of the signer's SPKI>, "sig": <DER ECDSA>}, ...]}

Each signature covers ``CBOR(["securethread-signature", kind, v, body])`` so a signature on
one kind of artefact can never be replayed as another (domain separation).  Invariant S2:
:func:`open_envelope` checks size, shape, kind and signatures *before* the body is parsed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, SignatureError
from securethread.formats import cbor
from securethread.keys.ecutil import fingerprint, verify_signature
from securethread.keys.protocol import PrivateKey

ENVELOPE_VERSION = 1
DEFAULT_MAX_SIZE = 1 << 20
_OUTER_KEYS = frozenset({"kind", "v", "body", "sigs"})


def signed_bytes(kind: str, body: bytes, version: int = ENVELOPE_VERSION) -> bytes:
    """The exact bytes each signer signs."""
    return cbor.encode(["securethread-signature", kind, version, body])


def seal(kind: str, body: Mapping[str, Any], signers: Iterable[PrivateKey]) -> bytes:
    """Encode ``body`` canonically and sign it with every key in ``signers``."""
    body_bytes = cbor.encode(dict(body))
    tbs = signed_bytes(kind, body_bytes)
    sigs = [{"signer": fingerprint(k.public_key()), "sig": k.sign(tbs)} for k in signers]
    if not sigs:
        raise ValueError("an envelope needs at least one signer")
    return cbor.encode({"kind": kind, "v": ENVELOPE_VERSION, "body": body_bytes, "sigs": sigs})


def add_signature(envelope: bytes, kind: str, signer: PrivateKey) -> bytes:
    """Co-sign an existing envelope (M-of-N approval); the body is not re-encoded."""
    outer = _parse_outer(envelope, kind, DEFAULT_MAX_SIZE)
    fp = fingerprint(signer.public_key())
    if any(s["signer"] == fp for s in outer["sigs"]):
        raise FormatError(f"{kind}: already signed by this key")
    sig = signer.sign(signed_bytes(kind, outer["body"]))
    outer["sigs"].append({"signer": fp, "sig": sig})
    return cbor.encode(outer)


def _parse_outer(data: bytes, kind: str, max_size: int) -> dict[str, Any]:
    outer = cbor.decode(data, what=kind, max_size=max_size)
    if not isinstance(outer, dict) or set(outer) != _OUTER_KEYS:
        raise FormatError(f"{kind}: not a signed envelope")
    if outer["kind"] != kind:
        raise FormatError(f"expected a {kind!r} artefact, got {outer['kind']!r}")
    if outer["v"] != ENVELOPE_VERSION:
        raise FormatError(f"{kind}: unsupported envelope version {outer['v']!r}")
    if not isinstance(outer["body"], bytes) or not isinstance(outer["sigs"], list):
        raise FormatError(f"{kind}: malformed envelope")
    for s in outer["sigs"]:
        if not (
            isinstance(s, dict)
            and set(s) == {"signer", "sig"}
            and isinstance(s["signer"], bytes)
            and isinstance(s["sig"], bytes)
            and len(s["signer"]) == 32
        ):
            raise FormatError(f"{kind}: malformed signature entry")
    return outer


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
    return kind, body, [s["signer"] for s in outer["sigs"]]


def open_envelope(
    data: bytes,
    *,
    kind: str,
    keys: ec.EllipticCurvePublicKey | Mapping[bytes, ec.EllipticCurvePublicKey],
    threshold: int = 1,
    max_size: int = DEFAULT_MAX_SIZE,
) -> dict[str, Any]:
    """Verify and decode an envelope of ``kind``; return its body.

    ``keys`` is the one trusted key, or a map fingerprint -> key of which ``threshold``
    distinct keys must have signed.  Signatures by unknown keys count for nothing; a bad
    signature by a known key is an error (never silently skipped).
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if isinstance(keys, ec.EllipticCurvePublicKey):
        keys = {fingerprint(keys): keys}
    outer = _parse_outer(data, kind, max_size)
    tbs = signed_bytes(kind, outer["body"])
    good: set[bytes] = set()
    for s in outer["sigs"]:
        key = keys.get(s["signer"])
        if key is None or s["signer"] in good:
            continue
        verify_signature(key, s["sig"], tbs, what=kind)
        good.add(s["signer"])
    if len(good) < threshold:
        raise SignatureError(
            f"{kind}: {len(good)} valid signature(s) from trusted keys, {threshold} required"
        )
    body = cbor.decode(outer["body"], what=f"{kind} body")
    if not isinstance(body, dict):
        raise FormatError(f"{kind}: body is not a map")
    return body
