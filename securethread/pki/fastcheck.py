"""Checking many device certificates of one job quickly: by comparison with one that passed
full validation.

A production CA issues its devices from one template (:class:`DeviceCertificateIssuer`): the
TBSCertificates of a job's devices differ only in the serial, the device id (subject, and
wherever the job's profile repeats it), the public point and the subjectKeyIdentifier.  So
once one device certificate of the job has passed full validation
(:class:`~securethread.pki.validate.DeviceChainValidator`: profile, names, extensions, validity,
RFC 5280 path validation, job binding), another one whose DER is byte for byte that
certificate's but for those fields -- each well-formed: a minimal positive INTEGER of the same
length, the same device id at every place, a point on the curve, the SKI of that point (method
1, §4.2.1.2) -- and whose signature verifies under the production CA's key passes every one of
those checks too: none of them depends on anything else.  What the template cannot vouch for
(validity at another time) stays with the caller.

:meth:`DeviceTemplate.match` only ever *accepts*: anything else -- another length, another
byte outside the fields, two different device ids -- returns None and the caller validates in
full, which names the problem.  The comparison is one regular expression built from the
template (its constant bytes escaped, a group per field, the repeated device id a
backreference), matched in C: ~3 us, then one ECDSA verification (:meth:`match`) or none
(:meth:`unsigned`, for a caller that has the signature covered otherwise), against a full
parse and pyca's verifier.
"""

from __future__ import annotations

import hashlib
import re

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["DeviceTemplate", "Matched"]

#: What a device id may be in the template's fields (a 64-bit chip UID, lowercase hex).
_DEVICE_ID = rb"[0-9a-f]{16}"


def _tlv(buf: bytes, pos: int, tag: int) -> tuple[int, int]:
    """(content start, content end) of the DER TLV of ``tag`` at ``pos`` (X.690 §10.1:
    definite, minimal lengths), or ValueError."""
    if buf[pos] != tag:
        raise ValueError("unexpected tag")
    first = buf[pos + 1]
    if first < 0x80:
        start, length = pos + 2, first
    else:
        n = first & 0x7F
        if not 1 <= n <= 3 or buf[pos + 2] == 0:
            raise ValueError("length not minimal")
        length = int.from_bytes(buf[pos + 2 : pos + 2 + n], "big")
        if length < 0x80:
            raise ValueError("length not minimal")
        start = pos + 2 + n
    end = start + length
    if end > len(buf):
        raise ValueError("truncated")
    return start, end


def _split(der: bytes) -> tuple[bytes, bytes, bytes]:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    (RFC 5280 §4.1): the TBS TLV, the algorithm TLV, the BIT STRING's content."""
    start, end = _tlv(der, 0, 0x30)
    if end != len(der):
        raise ValueError("trailing bytes")
    t0 = start
    _s, t1 = _tlv(der, t0, 0x30)
    _s, a1 = _tlv(der, t1, 0x30)
    s0, s1 = _tlv(der, a1, 0x03)
    if s1 != end or s0 >= s1 or der[s0] != 0:  # no unused bits
        raise ValueError("bad signature BIT STRING")
    return der[t0:t1], der[t1:a1], der[s0 + 1 : s1]


@attrs.frozen
class Matched:
    """A certificate that matched the template: its fields, and its signed bytes."""

    device_id: str
    serial: int
    point: bytes
    tbs: bytes
    signature: bytes


@attrs.frozen
class DeviceTemplate:
    """A fully validated device certificate of one job, with its per-device fields located."""

    tbs: bytes
    algorithm: bytes
    #: (offset, length, kind) of every per-device field, sorted; kind is "serial", "id",
    #: "point" or "ski"
    fields: tuple[tuple[int, int, str], ...]
    issuer_key: ec.EllipticCurvePublicKey
    curve: ec.EllipticCurve
    hash: hashes.HashAlgorithm
    not_before: float
    not_after: float
    #: The whole certificate as a pattern: ``30 82 LL LL``, the TBS with a group per field,
    #: the algorithm, ``03 SL 00`` and the signature (lengths checked after the match).
    pattern: re.Pattern[bytes] = attrs.field(eq=False, repr=False)

    @classmethod
    def learn(
        cls, cert: x509.Certificate, issuer: x509.Certificate, *, device_id: str
    ) -> DeviceTemplate | None:
        """The template of ``cert`` -- which the caller validated in full, as device
        ``device_id`` of ``issuer`` -- or None if its fields cannot be located unambiguously
        (then every certificate is validated in full)."""
        key = issuer.public_key()
        algorithm = cert.signature_hash_algorithm
        if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:
            return None
        try:
            tbs, alg, _sig = _split(cert.public_bytes(serialization.Encoding.DER))
        except (ValueError, IndexError):
            return None
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return None
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        serial = _integer_content(cert.serial_number)
        ski = hashlib.sha1(point).digest()  # noqa: S324 - RFC 5280 §4.2.1.2 method (1)
        spans: list[tuple[int, int, str]] = []
        for value, kind in ((serial, "serial"), (point, "point"), (ski, "ski")):
            if tbs.count(value) != 1:
                return None
            spans.append((tbs.index(value), len(value), kind))
        marker = device_id.encode("ascii")
        at = tbs.find(marker)
        while at != -1:
            spans.append((at, len(marker), "id"))
            at = tbs.find(marker, at + 1)
        spans.sort()
        if not any(k == "id" for _o, _n, k in spans) or any(
            a[0] + a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)
        ):
            return None  # no device id, or overlapping fields: validate everything in full
        der = cert.public_bytes(serialization.Encoding.DER)
        if der[:2] != b"\x30\x82" or len(der) - 4 < 0x100:
            return None  # another outer length form: validate everything in full
        return cls(
            tbs=tbs,
            algorithm=alg,
            fields=tuple(spans),
            issuer_key=key,
            curve=public.curve,
            hash=algorithm,
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            pattern=_compile(tbs, alg, spans),
        )

    def match(self, der: bytes) -> Matched | None:
        """The fields of ``der`` if it is this template's certificate with well-formed fields
        of its own and a signature that verifies under the issuer; else None."""
        m = self.unsigned(der)
        if m is None:
            return None
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(self.curve, m.point)
            self.issuer_key.verify(m.signature, m.tbs, ec.ECDSA(self.hash))
        except (ValueError, InvalidSignature):
            return None
        return m

    def unsigned(self, der: bytes) -> Matched | None:
        """What :meth:`match` checks but the point's validity and the signature (for a
        caller that checks both elsewhere: the point on :attr:`curve`, the signature under
        :attr:`issuer_key` with :attr:`hash` -- or covered otherwise)."""
        m = self.pattern.fullmatch(der)
        if m is None:
            return None
        sig = m["sig"]
        # X.690 §8.1.3: the outer length (long form, two octets: >= 0x100 by the template's
        # own length) and the BIT STRING's short-form length agree with what follows them
        if int.from_bytes(m["len"], "big") != len(der) - 4 or m["siglen"][0] != len(sig) + 1:
            return None
        serial, point = m["serial"], m["point"]
        if (
            not _minimal_positive(serial)
            or hashlib.sha1(point).digest() != m["ski"]  # noqa: S324 - §4.2.1.2 (1)
        ):
            return None
        return Matched(
            device_id=m["id"].decode("ascii"),
            serial=int.from_bytes(serial, "big"),
            point=point,
            tbs=der[4 : 4 + len(self.tbs)],
            signature=sig,
        )


def _compile(tbs: bytes, alg: bytes, spans: list[tuple[int, int, str]]) -> re.Pattern[bytes]:
    """The template certificate as a regular expression: constant bytes escaped, each field
    a group of its length (the device id ``[0-9a-f]{16}`` once, then a backreference)."""
    parts = [rb"\x30\x82(?P<len>..)"]
    pos, named = 0, set()
    for offset, length, kind in spans:
        parts.append(re.escape(tbs[pos:offset]))
        if kind in named:
            parts.append(b"(?P=%s)" % kind.encode())
        elif kind == "id":
            parts.append(b"(?P<id>" + _DEVICE_ID + b")")
        else:
            parts.append(b"(?P<%s>.{%d})" % (kind.encode(), length))
        named.add(kind)
        pos = offset + length
    parts.append(re.escape(tbs[pos:]) + re.escape(alg))
    # signatureValue BIT STRING, no unused bits (RFC 5280 §4.1.1.3); short-form length
    parts.append(rb"\x03(?P<siglen>[\x02-\x7f])\x00(?P<sig>.+)")
    return re.compile(b"".join(parts), re.DOTALL)


def _integer_content(n: int) -> bytes:
    """The DER content octets of a positive INTEGER (X.690 §8.3)."""
    return n.to_bytes(n.bit_length() // 8 + 1, "big")


def _minimal_positive(content: bytes) -> bool:
    """DER INTEGER content that is minimal (§8.3.2) and positive."""
    if not content or content[0] & 0x80:
        return False
    return not (len(content) > 1 and content[0] == 0 and not content[1] & 0x80)
