"""Signed envelopes with software keys: seal/open, tampering, M-of-N, malformed outers."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from securethread.errors import FormatError, SignatureError
from securethread.formats import cbor
from securethread.formats.envelope import (
    ENVELOPE_VERSION,
    NonCanonicalEnvelopeError,
    UnknownSignerError,
    add_signature,
    content_id,
    open_envelope,
    peek_body,
    peek_kind,
    seal,
    sign,
    signed_bytes,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint, verify_signature
from securethread.keys.protocol import PrivateKey

BODY = {"device_class": "sensor-x", "quota": 1000, "targets": [b"\x01" * 8, b"\x02" * 8]}


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


def _reencode(envelope: bytes, **changes: Any) -> bytes:
    outer = cbor.decode(envelope)
    outer.update(changes)
    return cbor.encode(outer)


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_seal_open_round_trip(backend: SoftwareBackend, curve: Curve) -> None:
    key = backend.generate_ec(f"rt-{curve.name}", curve=curve, policy=SIGNING)
    env = seal("job", BODY, [key])
    assert open_envelope(env, kind="job", keys=key.public_key()) == BODY
    assert peek_kind(env) == "job"
    kind, body, signers = peek_body(env)
    assert (kind, body, signers) == ("job", BODY, [fingerprint(key.public_key())])


def test_envelope_is_canonical_and_signature_covers_domain_separated_bytes(
    officers: list[PrivateKey],
) -> None:
    env = seal("job", BODY, [officers[0]])
    outer = cbor.decode(env)
    assert outer["v"] == ENVELOPE_VERSION
    assert outer["body"] == cbor.encode(BODY)
    assert cbor.encode(outer) == env
    # The signature is over ["securethread-signature", kind, v, body], not the body alone.
    from securethread.hsm import verify_signature

    verify_signature(
        officers[0].public_key(),
        outer["sigs"][0]["sig"],
        signed_bytes("job", outer["body"]),
        what="job",
    )
    with pytest.raises(SignatureError):
        verify_signature(
            officers[0].public_key(), outer["sigs"][0]["sig"], outer["body"], what="job"
        )


def test_wrong_kind_rejected(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    with pytest.raises(FormatError, match="expected a 'license' artefact, got 'job'"):
        open_envelope(env, kind="license", keys=officers[0].public_key())


def test_relabelled_kind_does_not_verify(officers: list[PrivateKey]) -> None:
    # Domain separation: a job signature replayed as a license fails the signature check.
    env = _reencode(seal("job", BODY, [officers[0]]), kind="license")
    with pytest.raises(SignatureError, match="license: signature does not verify"):
        open_envelope(env, kind="license", keys=officers[0].public_key())


def test_wrong_key_rejected(officers: list[PrivateKey], outsider: PrivateKey) -> None:
    env = seal("job", BODY, [outsider])
    with pytest.raises(UnknownSignerError, match="not trusted"):
        open_envelope(env, kind="job", keys=officers[0].public_key())


def test_flipped_bit_in_body_rejected(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    body = cbor.encode(BODY)
    start = env.index(body)
    for offset in (0, len(body) // 2, len(body) - 1):
        tampered = bytearray(env)
        tampered[start + offset] ^= 0x01
        with pytest.raises((SignatureError, FormatError)):
            open_envelope(bytes(tampered), kind="job", keys=officers[0].public_key())
    # A flip inside a byte-string value keeps the framing intact: it must be the signature
    # check that refuses it (S2: authenticated before parsed).
    tampered = bytearray(env)
    tampered[start + body.index(b"\x01" * 8)] ^= 0x80
    with pytest.raises(SignatureError, match="does not verify"):
        open_envelope(bytes(tampered), kind="job", keys=officers[0].public_key())


def test_flipped_bit_in_signature_rejected(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    sig = cbor.decode(env)["sigs"][0]["sig"]
    for offset in (5, len(sig) // 2, len(sig) - 1):
        bad = bytearray(sig)
        bad[offset] ^= 0x04
        tampered = _reencode(
            env, sigs=[{"signer": fingerprint(officers[0].public_key()), "sig": bytes(bad)}]
        )
        with pytest.raises(SignatureError, match="does not verify"):
            open_envelope(tampered, kind="job", keys=officers[0].public_key())


def test_threshold_m_of_n(officers: list[PrivateKey]) -> None:
    keys = _keys(officers)
    env = seal("job", BODY, [officers[0]])
    with pytest.raises(SignatureError, match="1 valid signature.*2 required"):
        open_envelope(env, kind="job", keys=keys, threshold=2)
    env2 = add_signature(env, "job", officers[2])
    assert open_envelope(env2, kind="job", keys=keys, threshold=2) == BODY
    with pytest.raises(SignatureError, match="2 valid signature.*3 required"):
        open_envelope(env2, kind="job", keys=keys, threshold=3)
    env3 = add_signature(env2, "job", officers[1])
    assert open_envelope(env3, kind="job", keys=keys, threshold=3) == BODY
    # Co-signing does not re-encode the body.
    assert cbor.decode(env3)["body"] == cbor.decode(env)["body"]


def test_same_key_cannot_cosign_twice(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    with pytest.raises(FormatError, match="already signed by this key"):
        add_signature(env, "job", officers[0])


def test_duplicated_signature_entry_is_refused(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    sigs = cbor.decode(env)["sigs"]
    doubled = _reencode(env, sigs=sigs + sigs)
    with pytest.raises(NonCanonicalEnvelopeError, match="more than once"):
        open_envelope(doubled, kind="job", keys=_keys(officers), threshold=1)


def test_signature_by_an_unknown_key_is_refused(
    officers: list[PrivateKey], outsider: PrivateKey
) -> None:
    env = seal("job", BODY, [officers[0], outsider])
    with pytest.raises(UnknownSignerError, match="1 signature.*not trusted"):
        open_envelope(env, kind="job", keys=_keys(officers), threshold=1)


def test_bad_signature_by_known_key_is_an_error_even_if_threshold_met(
    officers: list[PrivateKey],
) -> None:
    env = seal("job", BODY, officers[:2])
    outer = cbor.decode(env)
    outer["sigs"][1]["sig"] = outer["sigs"][0]["sig"]  # officer 1's entry, officer 0's sig
    with pytest.raises(SignatureError, match="does not verify"):
        open_envelope(cbor.encode(outer), kind="job", keys=_keys(officers), threshold=1)


def test_seal_without_signers_and_zero_threshold_are_programming_errors(
    officers: list[PrivateKey],
) -> None:
    with pytest.raises(ValueError):
        seal("job", BODY, [])
    env = seal("job", BODY, [officers[0]])
    with pytest.raises(ValueError):
        open_envelope(env, kind="job", keys=officers[0].public_key(), threshold=0)


def _signed_raw_body(signer: PrivateKey, body_bytes: bytes) -> bytes:
    sig = sign(signer, signed_bytes("job", body_bytes))
    return cbor.encode(
        {
            "kind": "job",
            "v": ENVELOPE_VERSION,
            "body": body_bytes,
            "sigs": [{"signer": fingerprint(signer.public_key()), "sig": sig}],
        }
    )


def test_signed_body_that_is_not_a_map_rejected(officers: list[PrivateKey]) -> None:
    env = _signed_raw_body(officers[0], cbor.encode([1, 2, 3]))
    with pytest.raises(FormatError, match="body is not a map"):
        open_envelope(env, kind="job", keys=officers[0].public_key())


def test_signed_but_non_canonical_body_rejected(officers: list[PrivateKey]) -> None:
    env = _signed_raw_body(officers[0], bytes.fromhex("a2616201616102"))  # keys out of order
    with pytest.raises(FormatError, match="job body: .*canonical order"):
        open_envelope(env, kind="job", keys=officers[0].public_key())


def _outer_variants(env: bytes) -> list[tuple[bytes, str]]:
    outer = cbor.decode(env)
    sig = outer["sigs"][0]

    def variant(**changes: Any) -> bytes:
        return cbor.encode({**outer, **changes})

    without_sigs = {k: v for k, v in outer.items() if k != "sigs"}
    return [
        (cbor.encode([1, 2]), "not a signed envelope"),
        (cbor.encode(without_sigs), "not a signed envelope"),
        (variant(extra=1), "not a signed envelope"),
        (variant(v=2), "unsupported envelope version 2"),
        (variant(body="text"), "malformed envelope"),
        (variant(sigs={"a": 1}), "malformed envelope"),
        (variant(sigs=[b"x"]), "malformed signature entry"),
        (variant(sigs=[{**sig, "signer": sig["signer"][:31]}]), "malformed signature entry"),
        (variant(sigs=[{**sig, "sig": "text"}]), "malformed signature entry"),
        (variant(sigs=[{**sig, "when": 1}]), "malformed signature entry"),
        (variant(sigs=[{"signer": sig["signer"]}]), "malformed signature entry"),
        (env + b"\x00", "trailing bytes"),
        (env[:-1], "truncated"),
        (b"", "empty"),
    ]


def test_malformed_outer_rejected(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    for bad, message in _outer_variants(env):
        with pytest.raises(FormatError, match=message):
            open_envelope(bad, kind="job", keys=officers[0].public_key())


def test_empty_signature_list_is_refused(officers: list[PrivateKey]) -> None:
    env = _reencode(seal("job", BODY, [officers[0]]), sigs=[])
    with pytest.raises(FormatError, match="no signature"):
        open_envelope(env, kind="job", keys=officers[0].public_key())


def test_oversize_envelope_rejected(officers: list[PrivateKey]) -> None:
    env = seal("job", {"blob": b"\x00" * 2000}, [officers[0]])
    assert open_envelope(env, kind="job", keys=officers[0].public_key(), max_size=len(env))
    with pytest.raises(FormatError, match="exceeds the limit of 1000"):
        open_envelope(env, kind="job", keys=officers[0].public_key(), max_size=1000)


def test_peek_rejects_non_envelopes() -> None:
    with pytest.raises(FormatError, match="not a securethread signed artefact"):
        peek_kind(cbor.encode({"kind": 5}))
    with pytest.raises(FormatError, match="not a securethread signed artefact"):
        peek_kind(cbor.encode([1]))


# --- S6: one valid byte string per signed content --------------------------------------------

_N = {
    Curve.P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    Curve.P384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


def _with_sig(env: bytes, index: int, sig: bytes) -> bytes:
    outer = cbor.decode(env)
    outer["sigs"][index]["sig"] = sig
    return cbor.encode(outer)


def _twin(sig: bytes, curve: Curve) -> bytes:
    r, s = decode_dss_signature(sig)
    return encode_dss_signature(r, _N[curve] - s)


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
def test_n_minus_s_twin_of_a_valid_signature_is_refused(
    backend: SoftwareBackend, curve: Curve
) -> None:
    key = backend.generate_ec(f"twin-{curve.name}", curve=curve, policy=SIGNING)
    env = seal("job", BODY, [key])
    sig = cbor.decode(env)["sigs"][0]["sig"]
    twin = _twin(sig, curve)
    # The twin is a valid ECDSA signature of the same bytes (so the curve order is right)...
    verify_signature(key.public_key(), twin, signed_bytes("job", cbor.encode(BODY)), what="t")
    # ...and exactly one of the pair is accepted.
    with pytest.raises(NonCanonicalEnvelopeError, match="high s"):
        open_envelope(_with_sig(env, 0, twin), kind="job", keys=key.public_key())
    assert open_envelope(env, kind="job", keys=key.public_key()) == BODY


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_seal_and_cosign_normalise_a_high_s_from_the_key(
    backend: SoftwareBackend, curve: Curve
) -> None:
    a = backend.generate_ec(f"hi-a-{curve.name}", curve=curve, policy=SIGNING)
    b = backend.generate_ec(f"hi-b-{curve.name}", curve=curve, policy=SIGNING)
    for _ in range(4):
        env = add_signature(seal("job", BODY, [_HighS(a)]), "job", _HighS(b))  # type: ignore[list-item,arg-type]
        for entry in cbor.decode(env)["sigs"]:
            assert decode_dss_signature(entry["sig"])[1] <= _N[curve] // 2
        assert open_envelope(env, kind="job", keys=_keys([a, b]), threshold=2) == BODY


def test_signature_not_in_strict_der_is_refused(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    sig = cbor.decode(env)["sigs"][0]["sig"]
    r, s = decode_dss_signature(sig)
    body = sig[2:]
    variants = [
        bytes([0x30, 0x81, len(body)]) + body,  # long-form length (BER, not DER)
        sig + b"\x00",  # trailing byte
        _der_ints(b"\x00\x00" + r.to_bytes(32, "big"), s.to_bytes(32, "big")),  # padded r
    ]
    for bad in variants:
        with pytest.raises(NonCanonicalEnvelopeError, match="DER"):
            open_envelope(_with_sig(env, 0, bad), kind="job", keys=officers[0].public_key())


def _der_ints(r: bytes, s: bytes) -> bytes:
    def integer(v: bytes) -> bytes:
        if v[0] & 0x80:
            v = b"\x00" + v
        return bytes([0x02, len(v)]) + v

    inner = integer(r) + integer(s)
    return bytes([0x30, len(inner)]) + inner


def test_zero_or_out_of_range_signature_values_are_refused(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, [officers[0]])
    n = _N[Curve.P256]
    for r, s in ((0, 1), (1, 0), (n, 1), (n + 1, 1)):
        bad = encode_dss_signature(r, s)
        with pytest.raises(NonCanonicalEnvelopeError, match="out of range"):
            open_envelope(_with_sig(env, 0, bad), kind="job", keys=officers[0].public_key())


def test_signatures_out_of_canonical_order_are_refused(officers: list[PrivateKey]) -> None:
    env = seal("job", BODY, officers[:2])
    outer = cbor.decode(env)
    fps = [e["signer"] for e in outer["sigs"]]
    assert fps == sorted(fps)
    outer["sigs"].reverse()
    with pytest.raises(NonCanonicalEnvelopeError, match="canonical order"):
        open_envelope(cbor.encode(outer), kind="job", keys=_keys(officers), threshold=2)


def test_cosigning_in_any_order_gives_the_canonical_order(officers: list[PrivateKey]) -> None:
    ab = add_signature(seal("job", BODY, [officers[0]]), "job", officers[1])
    ba = add_signature(seal("job", BODY, [officers[1]]), "job", officers[0])
    for env in (ab, ba):
        fps = [e["signer"] for e in cbor.decode(env)["sigs"]]
        assert fps == sorted(fps)
        assert open_envelope(env, kind="job", keys=_keys(officers), threshold=2) == BODY


def test_content_id_is_the_same_for_every_valid_framing(officers: list[PrivateKey]) -> None:
    framings = [
        seal("job", BODY, [officers[0]]),
        seal("job", BODY, [officers[0]]),  # re-signed: a fresh ECDSA nonce, other bytes
        seal("job", BODY, officers[:2]),
        add_signature(seal("job", BODY, [officers[2]]), "job", officers[1]),
    ]
    assert len(set(framings)) == len(framings)
    ids = {content_id(env, kind="job") for env in framings}
    assert ids == {hashlib.sha256(signed_bytes("job", cbor.encode(BODY))).digest()}
    assert content_id(seal("job", {**BODY, "quota": 1}, [officers[0]]), kind="job") not in ids


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"v": True}, "unsupported envelope version"),
        ({"kind": b"job"}, "malformed envelope"),
        ({"sigs": [{"signer": "a" * 32, "sig": b"x"}]}, "malformed signature entry"),
    ],
)
def test_outer_fields_of_the_wrong_type_are_refused(
    officers: list[PrivateKey], changes: dict[str, Any], message: str
) -> None:
    env = _reencode(seal("job", BODY, [officers[0]]), **changes)
    with pytest.raises(FormatError, match=message):
        open_envelope(env, kind="job", keys=officers[0].public_key())


def test_sealing_with_the_same_key_twice_is_a_programming_error(
    officers: list[PrivateKey],
) -> None:
    with pytest.raises(ValueError, match="cannot sign twice"):
        seal("job", BODY, [officers[0], officers[0]])
