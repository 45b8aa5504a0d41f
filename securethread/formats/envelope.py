"""Signed envelopes as COSE (RFC 9052): the one way an artefact is signed and opened.

A single-signer artefact is a tagged ``COSE_Sign1`` (tag 18, RFC 9052 §4.2)::

    18([protected: bstr .cbor {1: alg, 3: "application/securethread-<kind>+cbor",
                               4: kid, "securethread-v": 2},
        unprotected: {}, payload: bstr (canonical CBOR of the body), signature: r||s])

signed over ``Sig_structure = ["Signature1", protected, h'', payload]`` (§4.4).  A kind in
:data:`MULTI_SIGNER_KINDS` (the officer-signed job) is a tagged ``COSE_Sign`` (tag 98,
§4.1) whose body protected header is ``{3: content type, "securethread-v": 2}`` and which
carries one ``COSE_Signature`` ``[bstr .cbor {1: alg, 4: kid}, {}, r||s]`` per officer,
each over ``["Signature", body_protected, sign_protected, h'', payload]``.

``alg`` is ES256 (-7) for P-256 and ES384 (-35) for P-384 (RFC 9053 §2.1), ``kid`` the
SHA-256 of the signer's SubjectPublicKeyInfo.  The content type names the kind, so a
signature on one kind can never be replayed as another (domain separation); the version
label binds the format version; both sit in the protected header every signature covers.
Invariant S2: :func:`open_envelope` checks size, shape, kind and signatures *before* the
body is parsed.

Invariant S6 (one valid byte string per signed content; docs/formats.md): an envelope is
accepted only if it is canonical CBOR, tagged, its protected headers hold exactly those
labels, the alg is the signer key's, the unprotected headers are empty, the COSE_Signatures
are in strictly ascending kid order (so reordering or duplicating one is refused, each
signer appears once), every kid is a trusted key (an unknown signer is refused, not
ignored), and every signature is ``r||s`` of the curve's length with ``0 < r < n`` and
``0 < s <= n/2`` ("low s": the twin ``(r, n - s)`` that also verifies is refused), and
verifies.  :func:`seal` and :func:`add_signature` produce exactly that form.

What identifies a signed artefact is :func:`content_id`: SHA-256 of
``CBOR([body protected header, payload])``, what the officers sign beside their own
signature headers, never the framing (another set of co-signers gives the same id).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, utils

from securethread.errors import FormatError, SignatureError
from securethread.formats import cbor
from securethread.keys.ecutil import fingerprint, verify_signature
from securethread.keys.protocol import PrivateKey

#: Version of every signed format's framing (1: the pre-COSE ``{kind, v, body, sigs}``).
ENVELOPE_VERSION = 2
DEFAULT_MAX_SIZE = 1 << 20
MAX_SIGNATURES = 16
FINGERPRINT_SIZE = 32

#: Kinds signed by several keys (COSE_Sign); every other kind is a COSE_Sign1.
MULTI_SIGNER_KINDS = frozenset({"job"})

#: COSE header labels (RFC 9052 §3.1) and the project's text label for the version.
HDR_ALG, HDR_CONTENT_TYPE, HDR_KID = 1, 3, 4
HDR_VERSION = "securethread-v"
CONTENT_TYPE_PREFIX = "application/securethread-"
CONTENT_TYPE_SUFFIX = "+cbor"

#: RFC 9053 §2.1: ES256 (-7) / ES384 (-35), by curve; signature r||s of 2 x field size.
_ALGS = {"secp256r1": (-7, 32), "secp384r1": (-35, 48)}
_SIGN1_KEYS = frozenset({HDR_ALG, HDR_CONTENT_TYPE, HDR_KID, HDR_VERSION})
_BODY_KEYS = frozenset({HDR_CONTENT_TYPE, HDR_VERSION})
_SIGNATURE_KEYS = frozenset({HDR_ALG, HDR_KID})

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
    (signatures out of order or repeated, high-s or malformed signature value)."""


class UnknownSignerError(SignatureError):
    """An envelope carries a signature by a key the verifier does not trust."""


def _curve(key: ec.EllipticCurvePublicKey) -> str:
    name = key.curve.name
    if name not in _ORDERS:
        raise FormatError(f"unsupported signature curve {name!r}")
    return name


def algorithm(key: ec.EllipticCurvePublicKey) -> int:
    """The COSE alg of ``key``'s signatures (RFC 9053 §2.1)."""
    return _ALGS[_curve(key)][0]


def content_type(kind: str) -> str:
    """The content type (header 3) that names a kind: the domain separation of signatures."""
    return f"{CONTENT_TYPE_PREFIX}{kind}{CONTENT_TYPE_SUFFIX}"


_protected_cache: dict[tuple[str, bytes], bytes] = {}


def protected_sign1(kind: str, key: ec.EllipticCurvePublicKey, kid: bytes | None = None) -> bytes:
    """The protected header of a COSE_Sign1 of ``kind`` by ``key`` (encoded, as signed)."""
    kid = fingerprint(key) if kid is None else kid
    hit = _protected_cache.get((kind, kid))
    if hit is None:
        hit = protected_header(kind, algorithm(key), kid)
        if len(_protected_cache) < 1024:
            _protected_cache[(kind, kid)] = hit
    return hit


def protected_body(kind: str) -> bytes:
    """The body protected header of a COSE_Sign of ``kind`` (no signer in it)."""
    return cbor.encode(
        {HDR_CONTENT_TYPE: content_type(kind), HDR_VERSION: ENVELOPE_VERSION}, int_keys=True
    )


def protected_signature(key: ec.EllipticCurvePublicKey) -> bytes:
    """The protected header of one COSE_Signature by ``key``."""
    return cbor.encode({HDR_ALG: algorithm(key), HDR_KID: fingerprint(key)}, int_keys=True)


def _bstr(value: bytes) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"expected bytes, got {type(value).__name__}")


# The Sig_structures hold a text string and byte strings only, which cbor2 always writes in
# the deterministic form (shortest heads, definite lengths): no map to put in order, so
# cbor.encode's walk is skipped on this per-signature path.


def sig_structure1(protected: bytes, payload: bytes) -> bytes:
    """The bytes a COSE_Sign1 signer signs (RFC 9052 §4.4, empty external_aad)."""
    return cbor2.dumps(["Signature1", _bstr(protected), b"", _bstr(payload)])


def sig_structure(body_protected: bytes, sign_protected: bytes, payload: bytes) -> bytes:
    """The bytes one COSE_Signature of a COSE_Sign signs (RFC 9052 §4.4)."""
    return cbor2.dumps(
        ["Signature", _bstr(body_protected), _bstr(sign_protected), b"", _bstr(payload)]
    )


def signed_bytes(kind: str, body: bytes, key: ec.EllipticCurvePublicKey) -> bytes:
    """The exact bytes ``key`` signs for a COSE_Sign1 of ``kind`` with payload ``body``."""
    return sig_structure1(protected_sign1(kind, key), body)


#: Tag 18 (COSE_Sign1, RFC 9052 §2) and a 4-element array, heads in their one short form.
_SIGN1_HEAD = b"\xd2\x84"
_EMPTY_MAP = b"\xa0"


def sign1_frame(protected: bytes, payload: bytes, signature: bytes) -> bytes:
    """The tagged COSE_Sign1 ``18([protected, {}, payload, signature])`` in deterministic
    CBOR, written directly (its parts are byte strings: nothing to order)."""
    return b"".join(
        (_SIGN1_HEAD, cbor2.dumps(_bstr(protected)), _EMPTY_MAP, cbor2.dumps(_bstr(payload)),
         cbor2.dumps(_bstr(signature)))
    )  # fmt: skip


def content_hash(protected: bytes, payload: bytes) -> bytes:
    """SHA-256 of ``CBOR([protected, payload])``: a signed content's identity."""
    return hashlib.sha256(cbor2.dumps([_bstr(protected), _bstr(payload)])).digest()


def body_content_id(kind: str, body: bytes) -> bytes:
    """:func:`content_id` of any COSE_Sign of ``kind`` over the payload ``body``."""
    return content_hash(protected_body(kind), body)


def raw_signature(der: bytes, key: ec.EllipticCurvePublicKey) -> bytes:
    """A DER ECDSA signature as COSE's fixed-length r||s, with ``s`` made low (S6)."""
    name = _curve(key)
    n, size = _ORDERS[name], _ALGS[name][1]
    r, s = utils.decode_dss_signature(der)
    if s > n // 2:
        s = n - s
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def sign(key: PrivateKey, tbs: bytes) -> bytes:
    """Sign ``tbs`` with ``key``: r||s, always the low-s form (whatever the token returned)."""
    public = key.public_key()
    return raw_signature(key.sign(tbs), public)


def check_signature_encoding(
    signature: bytes, public_key: ec.EllipticCurvePublicKey, *, what: str
) -> None:
    """Refuse every encoding of an ECDSA signature but the one canonical form: r||s of the
    curve's length (RFC 9053 §2.1), ``0 < r < n``, ``0 < s <= n/2``."""
    name = _curve(public_key)
    n, size = _ORDERS[name], _ALGS[name][1]
    if type(signature) is not bytes or len(signature) != 2 * size:
        raise NonCanonicalEnvelopeError(
            f"{what}: signature is not a {2 * size}-byte r||s value (RFC 9053 §2.1)"
        )
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    if not (0 < r < n and 0 < s < n):
        raise NonCanonicalEnvelopeError(f"{what}: signature value out of range")
    if s > n // 2:
        raise NonCanonicalEnvelopeError(f"{what}: signature has a high s (only low-s accepted)")


def verify(
    public_key: ec.EllipticCurvePublicKey, signature: bytes, tbs: bytes, *, what: str
) -> None:
    """Check ``signature`` is canonical (see :func:`check_signature_encoding`) and verifies."""
    check_signature_encoding(signature, public_key, what=what)
    size = len(signature) // 2
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    verify_signature(public_key, der, tbs, what=what)


# --- sealing ----------------------------------------------------------------------------


def _signature_entry(key: PrivateKey, body_prot: bytes, payload: bytes) -> tuple[bytes, list[Any]]:
    public = key.public_key()
    prot = protected_signature(public)
    sig = sign(key, sig_structure(body_prot, prot, payload))
    return fingerprint(public), [prot, {}, sig]


def _sign_message(kind: str, body_prot: bytes, payload: bytes, sigs: list[list[Any]]) -> bytes:
    return cbor.encode(cbor2.CBORTag(cbor.TAG_COSE_SIGN, [body_prot, {}, payload, sigs]))


def seal(kind: str, body: Mapping[str, Any], signers: Iterable[PrivateKey]) -> bytes:
    """Encode ``body`` canonically and sign it: a COSE_Sign1 by the one key in ``signers``,
    or for a :data:`MULTI_SIGNER_KINDS` kind a COSE_Sign by every key in ``signers``."""
    payload = cbor.encode(dict(body))
    keys = list(signers)
    if not keys:
        raise ValueError("an envelope needs at least one signer")
    if kind not in MULTI_SIGNER_KINDS:
        if len(keys) != 1:
            raise ValueError(f"{kind}: a COSE_Sign1 artefact has exactly one signer")
        public = keys[0].public_key()
        prot = protected_sign1(kind, public)
        sig = sign(keys[0], sig_structure1(prot, payload))
        return sign1_frame(prot, payload, sig)
    body_prot = protected_body(kind)
    entries = sorted((_signature_entry(k, body_prot, payload) for k in keys), key=lambda e: e[0])
    if any(a[0] == b[0] for a, b in zip(entries, entries[1:], strict=False)):
        raise ValueError(f"{kind}: the same key cannot sign twice")
    if len(entries) > MAX_SIGNATURES:
        raise ValueError(f"{kind}: more than {MAX_SIGNATURES} signatures")
    return _sign_message(kind, body_prot, payload, [e[1] for e in entries])


def add_signature(envelope: bytes, kind: str, signer: PrivateKey) -> bytes:
    """Co-sign an existing COSE_Sign (M-of-N approval); the payload is not re-encoded and
    the new COSE_Signature takes its place in the canonical order."""
    msg = _parse(envelope, kind, DEFAULT_MAX_SIZE)
    if msg.sign1:
        raise FormatError(f"{kind}: a COSE_Sign1 artefact has exactly one signer")
    fp = fingerprint(signer.public_key())
    if fp in msg.kids:
        raise FormatError(f"{kind}: already signed by this key")
    if len(msg.kids) >= MAX_SIGNATURES:
        raise FormatError(f"{kind}: already carries {MAX_SIGNATURES} signatures")
    _fp, entry = _signature_entry(signer, msg.protected, msg.payload)
    sigs = [[p, {}, s] for p, s in zip(msg.sig_protected, msg.sigs, strict=True)]
    sigs.insert(bisect.bisect(list(msg.kids), fp), entry)
    return _sign_message(kind, msg.protected, msg.payload, sigs)


def merge(kind: str, envelopes: Iterable[bytes], *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """One COSE_Sign carrying the signatures of ``envelopes``, which must sign one payload:
    M-of-N approvals made in separate processes (each signer seals the body alone) joined in
    the canonical order (S6).  Nothing is verified here: open the result with
    :func:`open_signed`."""
    msgs = [_parse(data, kind, max_size) for data in envelopes]
    if not msgs:
        raise ValueError("merge needs at least one envelope")
    if msgs[0].sign1:
        raise FormatError(f"{kind}: a COSE_Sign1 artefact has exactly one signer")
    payload = msgs[0].payload
    if any(m.payload != payload for m in msgs[1:]):
        raise FormatError(f"{kind}: the envelopes to merge sign different bodies")
    entries = sorted(
        (
            (kid, [p, {}, s])
            for m in msgs
            for kid, p, s in zip(m.kids, m.sig_protected, m.sigs, strict=True)
        ),
        key=lambda e: e[0],
    )
    if any(a[0] == b[0] for a, b in zip(entries, entries[1:], strict=False)):
        raise FormatError(f"{kind}: the envelopes to merge share a signer")
    if len(entries) > MAX_SIGNATURES:
        raise FormatError(f"{kind}: more than {MAX_SIGNATURES} signatures")
    return _sign_message(kind, msgs[0].protected, payload, [e[1] for e in entries])


# --- parsing ----------------------------------------------------------------------------


@attrs.frozen
class _Message:
    """A COSE_Sign1 or COSE_Sign checked for shape and canonical order, not yet verified."""

    sign1: bool
    protected: bytes  # the Sign1 protected header, or the COSE_Sign body protected header
    payload: bytes
    kids: tuple[bytes, ...]
    algs: tuple[int, ...]
    sig_protected: tuple[bytes, ...]  # empty for a COSE_Sign1
    sigs: tuple[bytes, ...]


def parse_message(data: bytes, *, kind: str, max_size: int = DEFAULT_MAX_SIZE) -> _Message:
    """The COSE message of ``kind`` checked for shape and canonical form, *not verified*."""
    return _parse(data, kind, max_size)


def protected_header(kind: str, alg: int, kid: bytes) -> bytes:
    """The protected header of a COSE_Sign1 of ``kind`` by the key ``kid`` using ``alg``."""
    return cbor.encode(
        {
            HDR_ALG: alg,
            HDR_CONTENT_TYPE: content_type(kind),
            HDR_KID: kid,
            HDR_VERSION: ENVELOPE_VERSION,
        },
        int_keys=True,
    )


def sign1_message(kind: str, alg: int, kid: bytes, payload: bytes, signature: bytes) -> bytes:
    """A COSE_Sign1 of ``kind`` from its parts (a signature made over :func:`signed_bytes`)."""
    return sign1_frame(protected_header(kind, alg, kid), payload, signature)


#: Protected headers already parsed and found well formed (they repeat: one per signer and
#: kind), so a verifier decodes each once.  Read-only maps.
_header_cache: dict[tuple[bytes, frozenset[Any]], dict[Any, Any]] = {}


def _header(data: Any, kind: str, labels: frozenset[Any], what: str) -> dict[Any, Any]:
    if type(data) is not bytes:
        raise FormatError(f"{kind}: {what} is not a byte string")
    hit = _header_cache.get((data, labels))
    if hit is not None:
        return hit
    hdr = cbor.decode(data, what=f"{kind} {what}", int_keys=True)
    if type(hdr) is not dict or set(hdr) != labels:
        raise FormatError(f"{kind}: {what} must hold exactly the labels {sorted(map(str, labels))}")
    if len(_header_cache) < 1024:
        _header_cache[(data, labels)] = hdr
    return hdr


def _check_body_header(hdr: dict[Any, Any], kind: str) -> None:
    ctype = hdr[HDR_CONTENT_TYPE]
    if type(ctype) is not str:
        raise FormatError(f"{kind}: malformed content type")
    if ctype != content_type(kind):
        raise FormatError(f"expected a {kind!r} artefact, got {_kind_of(ctype)!r}")
    v = hdr[HDR_VERSION]
    if not cbor.is_version(v, ENVELOPE_VERSION):
        raise FormatError(f"{kind}: unsupported envelope version {v!r}")


def _signer(hdr: dict[Any, Any], kind: str) -> tuple[bytes, int]:
    kid, alg = hdr[HDR_KID], hdr[HDR_ALG]
    if type(kid) is not bytes or len(kid) != FINGERPRINT_SIZE:
        raise FormatError(f"{kind}: malformed key id (kid)")
    if type(alg) is not int or alg not in (-7, -35):
        raise FormatError(f"{kind}: unsupported algorithm {alg!r} (ES256 or ES384)")
    return kid, alg


def _kind_of(ctype: str) -> str:
    if ctype.startswith(CONTENT_TYPE_PREFIX) and ctype.endswith(CONTENT_TYPE_SUFFIX):
        return ctype[len(CONTENT_TYPE_PREFIX) : -len(CONTENT_TYPE_SUFFIX)]
    return ctype


def _peek_ctype(value: Any) -> str | None:
    """The kind a message's protected header names, if any (for error messages only)."""
    try:
        hdr = cbor.decode(value[0], int_keys=True)
        ctype = hdr[HDR_CONTENT_TYPE]
    except (FormatError, TypeError, KeyError, IndexError):
        return None
    return _kind_of(ctype) if type(ctype) is str else None


def _parse(data: bytes, kind: str, max_size: int) -> _Message:
    """The message of ``kind``, checked for tag, shape, exact types and canonical order."""
    want = cbor.TAG_COSE_SIGN if kind in MULTI_SIGNER_KINDS else cbor.TAG_COSE_SIGN1
    if want == cbor.TAG_COSE_SIGN1:
        parts = cbor.decode_sign1(data, max_size=max_size)  # one pass when well formed
        if parts is not None:
            return _sign1(kind, *parts)
    outer = cbor.decode(data, what=kind, max_size=max_size, cose_tag=True)
    if type(outer) is not cbor2.CBORTag:
        raise FormatError(f"{kind}: not a COSE message (tag {want} expected)")
    if outer.tag != want:
        got = _peek_ctype(outer.value)
        if got is not None and got != kind:
            raise FormatError(f"expected a {kind!r} artefact, got {got!r}")
        raise FormatError(f"{kind}: COSE tag {outer.tag}, expected {want}")
    msg = outer.value
    if type(msg) is not list or len(msg) != 4:
        raise FormatError(f"{kind}: not a signed envelope (a 4-element COSE array)")
    prot, unprot, payload, last = msg
    if unprot != {} or type(unprot) is not dict:
        raise FormatError(f"{kind}: unprotected header must be empty")
    if type(payload) is not bytes:
        raise FormatError(f"{kind}: payload is not a byte string (detached payloads refused)")
    if want == cbor.TAG_COSE_SIGN1:
        if type(last) is not bytes:
            raise FormatError(f"{kind}: malformed signature")
        return _sign1(kind, prot, payload, last)
    _check_body_header(_header(prot, kind, _BODY_KEYS, "protected header"), kind)
    if type(last) is not list:
        raise FormatError(f"{kind}: malformed signature list")
    if not last:
        raise FormatError(f"{kind}: envelope carries no signature")
    if len(last) > MAX_SIGNATURES:
        raise FormatError(f"{kind}: more than {MAX_SIGNATURES} signatures")
    kids, algs, sprots, sigs = [], [], [], []
    for entry in last:
        if not (
            type(entry) is list
            and len(entry) == 3
            and type(entry[2]) is bytes
            and type(entry[1]) is dict
        ):
            raise FormatError(f"{kind}: malformed signature entry")
        if entry[1]:
            raise FormatError(f"{kind}: unprotected header of a signature must be empty")
        kid, alg = _signer(_header(entry[0], kind, _SIGNATURE_KEYS, "signature header"), kind)
        kids.append(kid)
        algs.append(alg)
        sprots.append(entry[0])
        sigs.append(entry[2])
    for prev, cur in zip(kids, kids[1:], strict=False):
        if prev == cur:
            raise NonCanonicalEnvelopeError(f"{kind}: a signer appears more than once")
        if prev > cur:
            raise NonCanonicalEnvelopeError(
                f"{kind}: signatures are not in canonical order (ascending key id)"
            )
    return _Message(False, prot, payload, tuple(kids), tuple(algs), tuple(sprots), tuple(sigs))


def _sign1(kind: str, prot: bytes, payload: bytes, signature: bytes) -> _Message:
    hdr = _header(prot, kind, _SIGN1_KEYS, "protected header")
    _check_body_header(hdr, kind)
    kid, alg = _signer(hdr, kind)
    return _Message(True, prot, payload, (kid,), (alg,), (), (signature,))


def content_id(data: bytes, *, kind: str, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """SHA-256 of ``CBOR([protected, payload])``: the identity of an envelope's content.

    Equal for every valid framing of the same signed payload (another set of co-signers, a
    re-signature); nothing is verified here, so use it only on an envelope you open too.
    """
    msg = _parse(data, kind, max_size)
    return content_hash(msg.protected, msg.payload)


def peek_kind(data: bytes) -> str:
    """The kind of an envelope, for display only (nothing is verified)."""
    outer = cbor.decode(data, what="artefact", max_size=64 << 20, cose_tag=True)
    if type(outer) is not cbor2.CBORTag or type(outer.value) is not list or not outer.value:
        raise FormatError("not a securethread signed artefact (a tagged COSE message)")
    prot = outer.value[0]
    if type(prot) is not bytes:
        raise FormatError("not a securethread signed artefact")
    hdr = cbor.decode(prot, what="protected header", int_keys=True)
    ctype = hdr.get(HDR_CONTENT_TYPE) if type(hdr) is dict else None
    if type(ctype) is not str or _kind_of(ctype) == ctype:
        raise FormatError("not a securethread signed artefact")
    return _kind_of(ctype)


def peek_body(data: bytes) -> tuple[str, dict[str, Any], list[bytes]]:
    """Kind, *unverified* body and signer key ids, for ``inspect`` only."""
    kind = peek_kind(data)
    msg = _parse(data, kind, 64 << 20)
    body = cbor.decode(msg.payload, what=f"{kind} body")
    if not isinstance(body, dict):  # as open_signed: every body is a map
        raise FormatError(f"{kind}: body is not a map")
    return kind, body, list(msg.kids)


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

    ``keys`` is the one trusted key, or a map key id -> key; every signature must be by
    one of them and verify, and at least ``threshold`` must be present.
    """
    msg = _verified(data, kind, keys, threshold, max_size)
    return Opened(
        body=_body(msg, kind),
        signers=msg.kids,
        content_id=content_hash(msg.protected, msg.payload),
    )


def _verified(
    data: bytes,
    kind: str,
    keys: ec.EllipticCurvePublicKey | Mapping[bytes, ec.EllipticCurvePublicKey],
    threshold: int,
    max_size: int,
) -> _Message:
    """The message of ``kind`` once every rule of :func:`open_signed` but the body's held."""
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if isinstance(keys, ec.EllipticCurvePublicKey):
        keys = {fingerprint(keys): keys}
    msg = _parse(data, kind, max_size)
    unknown = [k for k in msg.kids if k not in keys]
    if unknown:
        raise UnknownSignerError(
            f"{kind}: {len(unknown)} signature(s) by a key that is not trusted "
            f"(first {unknown[0].hex()[:16]})"
        )
    for i, (kid, alg, sig) in enumerate(zip(msg.kids, msg.algs, msg.sigs, strict=True)):
        key = keys[kid]
        if alg != algorithm(key):
            raise FormatError(f"{kind}: alg {alg} does not match the signer's key")
        if msg.sign1:
            tbs = sig_structure1(msg.protected, msg.payload)
        else:
            tbs = sig_structure(msg.protected, msg.sig_protected[i], msg.payload)
        verify(key, sig, tbs, what=kind)
    if len(msg.sigs) < threshold:
        raise SignatureError(
            f"{kind}: {len(msg.sigs)} valid signature(s) from trusted keys, {threshold} required"
        )
    return msg


def _body(msg: _Message, kind: str) -> dict[str, Any]:
    body = cbor.decode(msg.payload, what=f"{kind} body")
    if not isinstance(body, dict):
        raise FormatError(f"{kind}: body is not a map")
    return body


def open_envelope(
    data: bytes,
    *,
    kind: str,
    keys: ec.EllipticCurvePublicKey | Mapping[bytes, ec.EllipticCurvePublicKey],
    threshold: int = 1,
    max_size: int = DEFAULT_MAX_SIZE,
) -> dict[str, Any]:
    """Verify and decode an envelope of ``kind`` (see :func:`open_signed`); return its body."""
    return _body(_verified(data, kind, keys, threshold, max_size), kind)
