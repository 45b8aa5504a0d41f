"""COSE envelopes (RFC 9052) with software keys: seal/open, tampering, M-of-N, malformed
messages, and S6 (one valid byte string per signed content)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from securethread.errors import FormatError, SignatureError
from securethread.formats import cbor
from securethread.formats.envelope import (
    ENVELOPE_VERSION,
    HDR_VERSION,
    NonCanonicalEnvelopeError,
    UnknownSignerError,
    add_signature,
    body_content_id,
    content_id,
    merge,
    open_envelope,
    peek_body,
    peek_kind,
    protected_body,
    protected_sign1,
    seal,
    sig_structure,
    sig_structure1,
    sign,
    sign1_message,
    signed_bytes,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint, verify_signature
from securethread.keys.protocol import PrivateKey
from tests import cose_edit

BODY = {"device_class": "sensor-x", "quota": 1000, "targets": [b"\x01" * 8, b"\x02" * 8]}
ONE = "manifest"  # a single-signer kind (COSE_Sign1)
MULTI = "job"  # the officer-signed kind (COSE_Sign)

_N = {
    Curve.P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    Curve.P384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


@pytest.fixture(scope="module")
def backend() -> SoftwareBackend:
    return SoftwareBackend("envelope-tests")


@pytest.fixture(scope="module")
def officers(backend: SoftwareBackend) -> list[PrivateKey]:
    return [backend.generate_ec(f"officer-{i}", curve=Curve.P256, policy=SIGNING) for i in range(3)]


@pytest.fixture(scope="module")
def outsider(backend: SoftwareBackend) -> PrivateKey:
    return backend.generate_ec("outsider", curve=Curve.P384, policy=SIGNING)


def _keys(signers: list[PrivateKey]) -> dict[bytes, Any]:
    return {fingerprint(k.public_key()): k.public_key() for k in signers}


def _der(raw: bytes) -> bytes:
    h = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:h], "big"), int.from_bytes(raw[h:], "big"))


def _raw(r: int, s: int, size: int = 32) -> bytes:
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
@pytest.mark.parametrize("kind", [ONE, MULTI])
def test_seal_open_round_trip(backend: SoftwareBackend, curve: Curve, kind: str) -> None:
    key = backend.generate_ec(f"rt-{curve.name}-{kind}", curve=curve, policy=SIGNING)
    env = seal(kind, BODY, [key])
    assert open_envelope(env, kind=kind, keys=key.public_key()) == BODY
    assert peek_kind(env) == kind
    assert peek_body(env) == (kind, BODY, [fingerprint(key.public_key())])
    tag, items = cose_edit.parts(env)
    assert tag == (98 if kind == MULTI else 18)
    assert len(cose_edit.signature(env)) == (64 if curve is Curve.P256 else 96)  # r||s


def test_sign1_layout_and_sig_structure(officers: list[PrivateKey]) -> None:
    """RFC 9052 §4.2/§4.4: the protected header binds alg, kind, version and kid, and the
    signature covers ["Signature1", protected, h'', payload], not the payload alone."""
    key = officers[0]
    env = seal(ONE, BODY, [key])
    tag, (prot, unprot, payload, sig) = cose_edit.parts(env)
    assert (tag, unprot, payload) == (18, {}, cbor.encode(BODY))
    hdr = cbor.decode(prot, int_keys=True)
    assert hdr == {
        1: -7,
        3: "application/securethread-manifest+cbor",
        4: fingerprint(key.public_key()),
        HDR_VERSION: ENVELOPE_VERSION,
    }
    assert prot == protected_sign1(ONE, key.public_key())
    tbs = sig_structure1(prot, payload)
    assert tbs == signed_bytes(ONE, payload, key.public_key())
    verify_signature(key.public_key(), _der(sig), tbs, what="t")
    with pytest.raises(SignatureError):
        verify_signature(key.public_key(), _der(sig), payload, what="t")
    assert cbor.encode(cbor2.CBORTag(18, [prot, {}, payload, sig])) == env


def test_sign_layout_one_signature_per_officer(officers: list[PrivateKey]) -> None:
    env = seal(MULTI, BODY, officers[:2])
    tag, (prot, unprot, payload, sigs) = cose_edit.parts(env)
    assert (tag, unprot, prot) == (98, {}, protected_body(MULTI))
    assert cbor.decode(prot, int_keys=True) == {
        3: "application/securethread-job+cbor",
        HDR_VERSION: ENVELOPE_VERSION,
    }
    by_kid = _keys(officers)
    for sprot, sunprot, sig in sigs:
        h = cbor.decode(sprot, int_keys=True)
        assert set(h) == {1, 4} and h[1] == -7 and sunprot == {}
        tbs = sig_structure(prot, sprot, payload)
        verify_signature(by_kid[h[4]], _der(sig), tbs, what="t")


def test_wrong_kind_rejected(officers: list[PrivateKey]) -> None:
    env = seal(ONE, BODY, [officers[0]])
    with pytest.raises(FormatError, match="expected a 'license' artefact, got 'manifest'"):
        open_envelope(env, kind="license", keys=officers[0].public_key())
    with pytest.raises(FormatError, match="expected a 'job' artefact, got 'manifest'"):
        open_envelope(env, kind="job", keys=officers[0].public_key())


def test_relabelled_kind_does_not_verify(officers: list[PrivateKey]) -> None:
    # Domain separation: a manifest signature relabelled as a license fails the signature.
    key = officers[0]
    env = seal(ONE, BODY, [key])
    relabelled = sign1_message(
        "license", -7, fingerprint(key.public_key()), cbor.encode(BODY), cose_edit.signature(env)
    )
    with pytest.raises(SignatureError, match="license: signature does not verify"):
        open_envelope(relabelled, kind="license", keys=key.public_key())


def test_wrong_key_rejected(officers: list[PrivateKey], outsider: PrivateKey) -> None:
    for kind in (ONE, MULTI):
        env = seal(kind, BODY, [outsider])
        with pytest.raises(UnknownSignerError, match="not trusted"):
            open_envelope(env, kind=kind, keys=officers[0].public_key())


def test_alg_must_be_the_keys(officers: list[PrivateKey]) -> None:
    key = officers[0]
    env = seal(ONE, BODY, [key])
    es384 = sign1_message(
        ONE, -35, fingerprint(key.public_key()), cbor.encode(BODY), cose_edit.signature(env)
    )
    with pytest.raises(FormatError, match="alg -35 does not match"):
        open_envelope(es384, kind=ONE, keys=key.public_key())


@pytest.mark.parametrize("kind", [ONE, MULTI])
def test_flipped_bit_in_body_rejected(officers: list[PrivateKey], kind: str) -> None:
    env = seal(kind, BODY, [officers[0]])
    body = cbor.encode(BODY)
    start = env.index(body)
    for offset in (0, len(body) // 2, len(body) - 1):
        tampered = bytearray(env)
        tampered[start + offset] ^= 0x01
        with pytest.raises((SignatureError, FormatError)):
            open_envelope(bytes(tampered), kind=kind, keys=officers[0].public_key())
    # A flip inside a byte-string value keeps the framing intact: it must be the signature
    # check that refuses it (S2: authenticated before parsed).
    tampered = bytearray(env)
    tampered[start + body.index(b"\x01" * 8)] ^= 0x80
    with pytest.raises(SignatureError, match="does not verify"):
        open_envelope(bytes(tampered), kind=kind, keys=officers[0].public_key())


@pytest.mark.parametrize("kind", [ONE, MULTI])
def test_flipped_bit_in_signature_rejected(officers: list[PrivateKey], kind: str) -> None:
    env = seal(kind, BODY, [officers[0]])
    sig = cose_edit.signature(env)
    for offset in (5, 40):
        bad = bytearray(sig)
        bad[offset] ^= 0x04
        with pytest.raises(SignatureError, match="does not verify"):
            open_envelope(
                cose_edit.with_signature(env, bytes(bad)), kind=kind, keys=officers[0].public_key()
            )


def test_threshold_m_of_n(officers: list[PrivateKey]) -> None:
    keys = _keys(officers)
    env = seal(MULTI, BODY, [officers[0]])
    with pytest.raises(SignatureError, match="1 valid signature.*2 required"):
        open_envelope(env, kind=MULTI, keys=keys, threshold=2)
    env2 = add_signature(env, MULTI, officers[2])
    assert open_envelope(env2, kind=MULTI, keys=keys, threshold=2) == BODY
    with pytest.raises(SignatureError, match="2 valid signature.*3 required"):
        open_envelope(env2, kind=MULTI, keys=keys, threshold=3)
    env3 = add_signature(env2, MULTI, officers[1])
    assert open_envelope(env3, kind=MULTI, keys=keys, threshold=3) == BODY
    # Co-signing does not re-encode the payload.
    assert cose_edit.parts(env3)[1][2] == cose_edit.parts(env)[1][2]
    # merge joins approvals made separately into the same canonical message.
    merged = merge(MULTI, [seal(MULTI, BODY, [k]) for k in officers])
    assert open_envelope(merged, kind=MULTI, keys=keys, threshold=3) == BODY


def test_single_signer_kinds_take_exactly_one(officers: list[PrivateKey]) -> None:
    with pytest.raises(ValueError, match="exactly one signer"):
        seal(ONE, BODY, officers[:2])
    env = seal(ONE, BODY, [officers[0]])
    with pytest.raises(FormatError, match="exactly one signer"):
        add_signature(env, ONE, officers[1])
    # A COSE_Sign of a single-signer kind is refused (tag 98, not 18).
    multi = cose_edit.multi_seal(ONE, BODY, officers[:2])
    with pytest.raises(FormatError, match="COSE tag 98, expected 18"):
        open_envelope(multi, kind=ONE, keys=_keys(officers))


def test_same_key_cannot_cosign_twice(officers: list[PrivateKey]) -> None:
    env = seal(MULTI, BODY, [officers[0]])
    with pytest.raises(FormatError, match="already signed by this key"):
        add_signature(env, MULTI, officers[0])


def test_duplicated_signature_entry_is_refused(officers: list[PrivateKey]) -> None:
    env = seal(MULTI, BODY, [officers[0]])
    tag, items = cose_edit.parts(env)
    items[3] = items[3] + items[3]
    with pytest.raises(NonCanonicalEnvelopeError, match="more than once"):
        open_envelope(cose_edit.build(tag, items), kind=MULTI, keys=_keys(officers))


def test_signature_by_an_unknown_key_is_refused(
    officers: list[PrivateKey], outsider: PrivateKey
) -> None:
    env = seal(MULTI, BODY, [officers[0], outsider])
    with pytest.raises(UnknownSignerError, match="1 signature.*not trusted"):
        open_envelope(env, kind=MULTI, keys=_keys(officers), threshold=1)


def test_bad_signature_by_known_key_is_an_error_even_if_threshold_met(
    officers: list[PrivateKey],
) -> None:
    env = seal(MULTI, BODY, officers[:2])
    bad = cose_edit.with_signature(env, cose_edit.signature(env, 0), 1)
    with pytest.raises(SignatureError, match="does not verify"):
        open_envelope(bad, kind=MULTI, keys=_keys(officers), threshold=1)


def test_seal_without_signers_and_zero_threshold_are_programming_errors(
    officers: list[PrivateKey],
) -> None:
    with pytest.raises(ValueError):
        seal(MULTI, BODY, [])
    env = seal(MULTI, BODY, [officers[0]])
    with pytest.raises(ValueError):
        open_envelope(env, kind=MULTI, keys=officers[0].public_key(), threshold=0)


def _signed_raw_body(signer: PrivateKey, body_bytes: bytes) -> bytes:
    public = signer.public_key()
    sig = sign(signer, signed_bytes(ONE, body_bytes, public))
    return sign1_message(ONE, -7, fingerprint(public), body_bytes, sig)


def test_signed_body_that_is_not_a_map_rejected(officers: list[PrivateKey]) -> None:
    env = _signed_raw_body(officers[0], cbor.encode([1, 2, 3]))
    with pytest.raises(FormatError, match="body is not a map"):
        open_envelope(env, kind=ONE, keys=officers[0].public_key())


def test_signed_but_non_canonical_body_rejected(officers: list[PrivateKey]) -> None:
    env = _signed_raw_body(officers[0], bytes.fromhex("a2616201616102"))  # keys out of order
    with pytest.raises(FormatError, match="manifest body: .*canonical order"):
        open_envelope(env, kind=ONE, keys=officers[0].public_key())


def _variants(env: bytes) -> list[tuple[bytes, str]]:
    tag, items = cose_edit.parts(env)
    prot, _unprot, payload, sig = items
    hdr = cbor.decode(prot, int_keys=True)

    def v(*new: Any, t: int = tag) -> bytes:
        return cose_edit.build(t, list(new))

    def with_hdr(**changes: Any) -> bytes:
        h = dict(hdr)
        for k, val in changes.items():
            label: Any = {"alg": 1, "ctype": 3, "kid": 4, "ver": HDR_VERSION}[k]
            if val is None:
                del h[label]
            else:
                h[label] = val
        return v(cbor.encode(h, int_keys=True), {}, payload, sig)

    return [
        (cbor.encode([prot, {}, payload, sig]), "not a COSE message"),
        (v(prot, {}, payload), "4-element COSE array"),
        (v(prot, {}, payload, sig, 1), "4-element COSE array"),
        (v(prot, {"a": 1}, payload, sig), "unprotected header must be empty"),
        (v(prot, {}, None, sig), "detached payloads refused"),
        (v(prot, {}, "text", sig), "payload is not a byte string"),
        (v({}, {}, payload, sig), "protected header is not a byte string"),
        (v(prot, {}, payload, "text"), "malformed signature"),
        (with_hdr(ver=1), "unsupported envelope version 1"),
        (with_hdr(ver=True), "unsupported envelope version"),
        (with_hdr(ver=None), "exactly the labels"),
        (with_hdr(kid=None), "exactly the labels"),
        (with_hdr(kid=b"x" * 31), "malformed key id"),
        (with_hdr(alg=-8), "unsupported algorithm -8"),
        (with_hdr(ctype=b"manifest"), "malformed content type"),
        (env + b"\x00", "trailing bytes"),
        (env[:-1], "truncated"),
        (b"", "empty"),
    ]


def test_malformed_sign1_rejected(officers: list[PrivateKey]) -> None:
    env = seal(ONE, BODY, [officers[0]])
    for bad, message in _variants(env):
        with pytest.raises(FormatError, match=message):
            open_envelope(bad, kind=ONE, keys=officers[0].public_key())


def test_malformed_sign_rejected(officers: list[PrivateKey]) -> None:
    env = seal(MULTI, BODY, [officers[0]])
    tag, (prot, _u, payload, sigs) = cose_edit.parts(env)
    entry = sigs[0]
    bads = [
        (cose_edit.build(tag, [prot, {}, payload, []]), "no signature"),
        (cose_edit.build(tag, [prot, {}, payload, b"x"]), "malformed signature list"),
        (cose_edit.build(tag, [prot, {}, payload, [entry[:2]]]), "malformed signature entry"),
        (cose_edit.build(tag, [prot, {}, payload, [[entry[0], {"a": 1}, entry[2]]]]),
         "unprotected header of a signature must be empty"),  # fmt: skip
        (cose_edit.build(tag, [prot, {}, payload, [[b"\xa0", {}, entry[2]]]]),
         "exactly the labels"),  # fmt: skip
        (cose_edit.build(tag, [protected_sign1(MULTI, officers[0].public_key()), {}, payload,
                                sigs]), "exactly the labels"),  # fmt: skip
        (cose_edit.build(tag, [prot, {}, payload, sigs * (17)]), "more than 16"),
    ]
    for bad, message in bads:
        with pytest.raises(FormatError, match=message):
            open_envelope(bad, kind=MULTI, keys=officers[0].public_key())


def test_oversize_envelope_rejected(officers: list[PrivateKey]) -> None:
    env = seal(ONE, {"blob": b"\x00" * 2000}, [officers[0]])
    assert open_envelope(env, kind=ONE, keys=officers[0].public_key(), max_size=len(env))
    with pytest.raises(FormatError, match="exceeds the limit of 1000"):
        open_envelope(env, kind=ONE, keys=officers[0].public_key(), max_size=1000)


def test_peek_rejects_non_envelopes() -> None:
    with pytest.raises(FormatError, match="not a securethread signed artefact"):
        peek_kind(cbor.encode({"kind": 5}))
    with pytest.raises(FormatError, match="not a securethread signed artefact"):
        peek_kind(cbor.encode([1]))
    foreign = cbor.encode(cbor2.CBORTag(18, [cbor.encode({3: "text/plain"}, int_keys=True)]))
    with pytest.raises(FormatError, match="not a securethread signed artefact"):
        peek_kind(foreign)


def test_non_canonical_message_bytes_rejected(officers: list[PrivateKey]) -> None:
    """The framing itself has one encoding: a long-form tag head or array head is refused."""
    env = seal(ONE, BODY, [officers[0]])
    assert env[:2] == b"\xd2\x84"
    for bad in (b"\xd8\x12" + env[1:], b"\xd2\x98\x04" + env[2:]):
        with pytest.raises(FormatError, match="shortest"):
            open_envelope(bad, kind=ONE, keys=officers[0].public_key())
    other_tag = b"\xd8\x61" + env[1:]  # tag 97 (COSE_Mac)
    with pytest.raises(FormatError, match="tags"):
        open_envelope(other_tag, kind=ONE, keys=officers[0].public_key())


# --- S6: one valid byte string per signed content --------------------------------------------


class _HighS:
    """A key whose signatures always come back with a high s (some tokens do that)."""

    def __init__(self, key: PrivateKey) -> None:
        self._key, self.curve = key, key.curve

    def public_key(self) -> Any:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        sig = self._key.sign(data)
        r, s = decode_dss_signature(sig)
        n = _N[self.curve]
        return encode_dss_signature(r, s if s > n // 2 else n - s)


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
@pytest.mark.parametrize("kind", [ONE, MULTI])
def test_n_minus_s_twin_of_a_valid_signature_is_refused(
    backend: SoftwareBackend, curve: Curve, kind: str
) -> None:
    key = backend.generate_ec(f"twin-{curve.name}-{kind}", curve=curve, policy=SIGNING)
    env = seal(kind, BODY, [key])
    sig = cose_edit.signature(env)
    size = len(sig) // 2
    r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
    twin = _raw(r, _N[curve] - s, size)
    tag, items = cose_edit.parts(env)
    tbs = (
        sig_structure1(items[0], items[2])
        if tag == 18
        else sig_structure(items[0], items[3][0][0], items[2])
    )
    # The twin is a valid ECDSA signature of the same bytes (so the curve order is right)...
    verify_signature(key.public_key(), _der(twin), tbs, what="t")
    # ...and exactly one of the pair is accepted.
    with pytest.raises(NonCanonicalEnvelopeError, match="high s"):
        open_envelope(cose_edit.with_signature(env, twin), kind=kind, keys=key.public_key())
    assert open_envelope(env, kind=kind, keys=key.public_key()) == BODY


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_seal_and_cosign_normalise_a_high_s_from_the_key(
    backend: SoftwareBackend, curve: Curve
) -> None:
    a = backend.generate_ec(f"hi-a-{curve.name}", curve=curve, policy=SIGNING)
    b = backend.generate_ec(f"hi-b-{curve.name}", curve=curve, policy=SIGNING)
    size = 32 if curve is Curve.P256 else 48
    for _ in range(4):
        env = add_signature(seal(MULTI, BODY, [_HighS(a)]), MULTI, _HighS(b))  # type: ignore[list-item,arg-type]
        for i in range(2):
            s = int.from_bytes(cose_edit.signature(env, i)[size:], "big")
            assert s <= _N[curve] // 2
        assert open_envelope(env, kind=MULTI, keys=_keys([a, b]), threshold=2) == BODY
        one = seal(ONE, BODY, [_HighS(a)])  # type: ignore[list-item]
        assert int.from_bytes(cose_edit.signature(one)[size:], "big") <= _N[curve] // 2


def test_signature_of_the_wrong_length_or_der_is_refused(officers: list[PrivateKey]) -> None:
    env = seal(ONE, BODY, [officers[0]])
    sig = cose_edit.signature(env)
    for bad in (sig + b"\x00", sig[:-1], b"", _der(sig)):
        with pytest.raises(NonCanonicalEnvelopeError, match="64-byte r\\|\\|s"):
            bad_env = cose_edit.with_signature(env, bad)
            open_envelope(bad_env, kind=ONE, keys=officers[0].public_key())


def test_zero_or_out_of_range_signature_values_are_refused(officers: list[PrivateKey]) -> None:
    env = seal(ONE, BODY, [officers[0]])
    n = _N[Curve.P256]
    for r, s in ((0, 1), (1, 0), (n, 1), (n + 1, 1)):
        with pytest.raises(NonCanonicalEnvelopeError, match="out of range"):
            open_envelope(
                cose_edit.with_signature(env, _raw(r, s)), kind=ONE, keys=officers[0].public_key()
            )


def test_signatures_out_of_canonical_order_are_refused(officers: list[PrivateKey]) -> None:
    env = seal(MULTI, BODY, officers[:2])
    tag, items = cose_edit.parts(env)
    kids = [cbor.decode(e[0], int_keys=True)[4] for e in items[3]]
    assert kids == sorted(kids)
    items[3].reverse()
    with pytest.raises(NonCanonicalEnvelopeError, match="canonical order"):
        open_envelope(cose_edit.build(tag, items), kind=MULTI, keys=_keys(officers), threshold=2)


def test_cosigning_in_any_order_gives_the_canonical_order(officers: list[PrivateKey]) -> None:
    ab = add_signature(seal(MULTI, BODY, [officers[0]]), MULTI, officers[1])
    ba = add_signature(seal(MULTI, BODY, [officers[1]]), MULTI, officers[0])
    for env in (ab, ba):
        kids = peek_body(env)[2]
        assert kids == sorted(kids)
        assert open_envelope(env, kind=MULTI, keys=_keys(officers), threshold=2) == BODY


def test_content_id_is_the_same_for_every_valid_framing(officers: list[PrivateKey]) -> None:
    framings = [
        seal(MULTI, BODY, [officers[0]]),
        seal(MULTI, BODY, [officers[0]]),  # re-signed: a fresh ECDSA nonce, other bytes
        seal(MULTI, BODY, officers[:2]),
        add_signature(seal(MULTI, BODY, [officers[2]]), MULTI, officers[1]),
    ]
    assert len(set(framings)) == len(framings)
    ids = {content_id(env, kind=MULTI) for env in framings}
    assert ids == {body_content_id(MULTI, cbor.encode(BODY))}
    assert content_id(seal(MULTI, {**BODY, "quota": 1}, [officers[0]]), kind=MULTI) not in ids
    assert body_content_id("other", cbor.encode(BODY)) not in ids  # the kind is bound


def test_sealing_with_the_same_key_twice_is_a_programming_error(
    officers: list[PrivateKey],
) -> None:
    with pytest.raises(ValueError, match="cannot sign twice"):
        seal(MULTI, BODY, [officers[0], officers[0]])
