"""Device serial encoding: job tag + sequence, positive, at most 20 octets (RFC 5280 §4.1.2.2)."""

from __future__ import annotations

import pytest

from securethread.errors import CertificateError
from securethread.pki import (
    DeviceSerial,
    NameNotAllowedError,
    SerialNumberError,
    device_serial,
    job_tag,
    parse_device_serial,
)
from securethread.pki.serial import MAX_SEQUENCE, random_serial


@pytest.mark.parametrize("sequence", [0, 1, 999, 2**32, MAX_SEQUENCE])
def test_roundtrip(sequence: int) -> None:
    serial = device_serial("job-7", sequence)
    assert serial > 0
    assert len(serial.to_bytes((serial.bit_length() + 7) // 8, "big")) == 17
    parsed = parse_device_serial(serial)
    assert parsed == DeviceSerial(job_tag=job_tag("job-7"), sequence=sequence)
    assert parsed.belongs_to("job-7")
    assert not parsed.belongs_to("job-8")


def test_job_tag_is_stable_and_distinct() -> None:
    # Known answer: SHA-256("securethread/pki/job-tag/v1" || 0x00 || "job-1")[:8].
    import hashlib

    expect = hashlib.sha256(b"securethread/pki/job-tag/v1\x00job-1").digest()[:8]
    assert job_tag("job-1") == expect
    assert job_tag("job-1") != job_tag("job-2")
    assert device_serial("job-1", 5) != device_serial("job-2", 5)


@pytest.mark.parametrize("sequence", [-1, MAX_SEQUENCE + 1, True, 1.0, "3"])
def test_bad_sequence(sequence: object) -> None:
    with pytest.raises(SerialNumberError):
        device_serial("job-1", sequence)  # type: ignore[arg-type]


@pytest.mark.parametrize("job_id", ["", "a" * 65, "job/1", "jöb", "job 1", None, b"job"])
def test_bad_job_id(job_id: object) -> None:
    with pytest.raises(NameNotAllowedError):
        job_tag(job_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "serial",
    [
        0,
        -5,
        True,
        1 << (8 * 17),  # 18 octets
        0x02 << (8 * 16),  # wrong version octet
        random_serial(),  # CA/enclave serials are never device serials
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
