"""Crafted inputs that escaped as something other than a securethread.Error (issue 22).

Each was found by building the input: an envelope whose body is not a map reached
``EnrolmentRequest.open`` and ``CertificateBundle.open`` (TypeError: unhashable / not
iterable) and ``audit inspect`` of a ledger whose job it is (AttributeError); a ceremony
record dated after 9999 made every view of its transcript fail (ValueError: year 10000 is
out of range; OSError further on).  Now each is one :class:`securethread.Error`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

from securethread.audit.inspect import describe
from securethread.errors import Error, FormatError
from securethread.formats import cbor, envelope, ledger
from securethread.formats import transcript as tr
from securethread.formats.onboarding import (
    BUNDLE_KIND,
    ENROLMENT_KIND,
    CertificateBundle,
    EnrolmentRequest,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from securethread.keys.ecutil import fingerprint
from tests import cose_edit

BACKEND = SoftwareBackend("crafted")
KEY = BACKEND.generate_ec("k", curve=Curve.P256, policy=SIGNING)

#: CBOR bodies that are not maps; the first three escaped before.
NOT_MAPS: list[Any] = [[[1]], 5, None, [1, 2], "text", b"bytes", True]


def signed_with_body(kind: str, body: Any) -> bytes:
    """A well-formed, validly signed envelope of ``kind`` whose body is ``body``."""
    if kind in envelope.MULTI_SIGNER_KINDS:
        return cose_edit.multi_seal(kind, body, [KEY])
    body_bytes = cbor.encode(body)
    public = KEY.public_key()
    sig = envelope.sign(KEY, envelope.signed_bytes(kind, body_bytes, public))
    return envelope.sign1_message(
        kind, envelope.algorithm(public), fingerprint(public), body_bytes, sig
    )


OPENERS: dict[str, tuple[str, Callable[[bytes], object]]] = {
    "enrolment request": (ENROLMENT_KIND, EnrolmentRequest.open),
    "certificate bundle": (
        BUNDLE_KIND,
        lambda d: CertificateBundle.open(d, root_fingerprint=b"\0" * 32),
    ),
    "peek_body": ("job", envelope.peek_body),
}


@pytest.mark.parametrize("body", NOT_MAPS, ids=repr)
@pytest.mark.parametrize("opener", list(OPENERS))
def test_an_envelope_whose_body_is_not_a_map_is_a_format_error(opener: str, body: Any) -> None:
    kind, open_ = OPENERS[opener]
    with pytest.raises(FormatError, match="body is not a map"):
        open_(signed_with_body(kind, body))


def test_the_crafted_envelope_is_otherwise_valid() -> None:
    """The same envelope with a map body verifies: only the body's type is refused above."""
    data = signed_with_body("job", {"a": 1})
    assert envelope.open_envelope(data, kind="job", keys=KEY.public_key()) == {"a": 1}


@pytest.mark.parametrize("body", NOT_MAPS, ids=repr)
def test_inspect_of_a_ledger_whose_job_body_is_not_a_map(body: Any) -> None:
    out = io.BytesIO()
    ledger.write_export(out, signed_with_body("job", body), [])
    view = describe(out.getvalue())
    assert view["kind"] == "ledger" and view["job_id"] is None and not view["verified"]


# --- ceremony record times: RFC 3339 has four-digit years -------------------------------------


def _record(time: int) -> bytes:
    """A record's canonical bytes with ``time`` (built past the constructor's own check)."""
    valid = tr.CeremonyRecord(seq=0, prev=b"\0" * 32, time=0, enclave="oem", operation="init")
    return cbor.encode({**cbor.decode(valid.to_bytes()), "time": time})


def _transcript(time: int) -> bytes:
    raw = _record(time)
    signed = tr.SignedRecord(
        record=raw,
        signature=envelope.sign(
            KEY, envelope.signed_bytes(tr.SIGNATURE_KIND, raw, KEY.public_key())
        ),
        signer=fingerprint(KEY.public_key()),
    )
    return tr.MAGIC + signed.frame()


@pytest.mark.parametrize("time", [tr.MAX_TIME + 1, 1 << 40, (1 << 63) - 1])
def test_a_ceremony_record_after_year_9999_is_a_format_error(time: int) -> None:
    with pytest.raises(FormatError, match="after 9999-12-31T23:59:59Z"):
        tr.CeremonyRecord.from_bytes(_record(time))
    with pytest.raises(Error):
        tr.verify_transcript(_transcript(time), public_key=KEY.public_key())
    with pytest.raises(Error):
        describe(_transcript(time))


def test_the_last_second_of_9999_is_a_valid_time() -> None:
    summary = tr.verify_transcript(_transcript(tr.MAX_TIME), public_key=KEY.public_key())
    assert summary.records[0].timestamp == "9999-12-31T23:59:59Z"
    assert describe(_transcript(tr.MAX_TIME))["records"][0]["time"] == "9999-12-31T23:59:59Z"
