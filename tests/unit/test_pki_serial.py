"""Device serial encoding: job tag + slot, positive, at most 20 octets (RFC 5280 §4.1.2.2)."""

from __future__ import annotations

import hashlib

import pytest

from securethread.errors import CertificateError
from securethread.pki import (
    DeviceSerial,
    SerialNumberError,
    device_serial,
    job_tag,
    parse_device_serial,
)
from securethread.pki.serial import MAX_SEQUENCE, SERIAL_VERSION, random_serial

JOB_7 = hashlib.sha256(b"signed job 7").digest()
JOB_8 = hashlib.sha256(b"signed job 8").digest()


@pytest.mark.parametrize("sequence", [0, 1, 999, 2**32, MAX_SEQUENCE])
def test_roundtrip(sequence: int) -> None:
    serial = device_serial(JOB_7, sequence)
    assert serial > 0
    raw = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
    assert len(raw) == 17 and raw[0] == SERIAL_VERSION == 0x02
    parsed = parse_device_serial(serial)
    assert parsed == DeviceSerial(job_tag=job_tag(JOB_7), sequence=sequence)
    assert parsed.belongs_to(JOB_7)
    assert not parsed.belongs_to(JOB_8)


def test_job_tag_is_the_head_of_the_job_identity() -> None:
    # Known answer: the tag is the first 8 octets of the SHA-256 of the signed job.
    assert job_tag(JOB_7) == JOB_7[:8]
    assert device_serial(JOB_7, 5) == int.from_bytes(b"\x02" + JOB_7[:8] + (5).to_bytes(8), "big")
    assert device_serial(JOB_7, 5) != device_serial(JOB_8, 5)
    assert job_tag(JOB_7[:8]) == job_tag(JOB_7)  # 8 octets are enough; the rest is unused


def test_same_job_id_in_two_signed_jobs_gives_distinct_serials() -> None:
    """The old tag came from the job id alone, so "demo-job-1" collided across OEMs."""
    a = hashlib.sha256(b"oem A signed job demo-job-1").digest()
    b = hashlib.sha256(b"oem B signed job demo-job-1").digest()
    assert {device_serial(a, s) for s in range(100)}.isdisjoint(
        device_serial(b, s) for s in range(100)
    )


@pytest.mark.parametrize("sequence", [-1, MAX_SEQUENCE + 1, True, 1.0, "3"])
def test_bad_sequence(sequence: object) -> None:
    with pytest.raises(SerialNumberError):
        device_serial(JOB_7, sequence)  # type: ignore[arg-type]


@pytest.mark.parametrize("identity", [b"", b"1234567", b"x" * 65])
def test_bad_job_identity(identity: bytes) -> None:
    with pytest.raises(SerialNumberError, match="job identity"):
        job_tag(identity)


@pytest.mark.parametrize("identity", ["job-1", None, bytearray(32)])
def test_job_identity_of_the_wrong_type_is_a_programming_error(identity: object) -> None:
    with pytest.raises(TypeError):
        job_tag(identity)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "serial",
    [
        0,
        -5,
        True,
        1 << (8 * 17),  # 18 octets
        0x01 << (8 * 16),  # version 1 (tag from the job id): no longer issued
        0x03 << (8 * 16),  # unknown version
        # CA/enclave serials are never device serials (a fresh one each run, under a fixed
        # id: pytest-xdist workers must collect the same ids)
        pytest.param(random_serial(), id="random-ca-serial"),
    ],
)
def test_parse_refuses_non_device_serials(serial: int) -> None:
    with pytest.raises(SerialNumberError) as info:
        parse_device_serial(serial)
    assert isinstance(info.value, CertificateError)


def test_random_serials_are_positive_20_octets() -> None:
    for _ in range(200):
        s = random_serial()
        assert 0 < s and (s.bit_length() + 7) // 8 == 20 and s.bit_length() < 160


def test_device_serial_value_object_validates() -> None:
    with pytest.raises(SerialNumberError):
        DeviceSerial(job_tag=b"\x00" * 7, sequence=1)
    with pytest.raises(SerialNumberError):
        DeviceSerial(job_tag=b"\x00" * 8, sequence=-1)
