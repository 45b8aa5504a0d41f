"""Device certificate serial numbers that encode the job and the device's sequence number.

Layout (17 octets, big-endian, RFC 5280 §4.1.2.2: positive, at most 20 octets)::

    0x01 | job tag (8 octets) | sequence (8 octets, unsigned)

* ``0x01`` is the format version; it keeps the integer positive and its length fixed, so
  the DER INTEGER is always 17 content octets (no 0x00 pad) and a device serial can never be
  confused with the 20-octet random serials of CA and enclave certificates.
* the job tag is ``SHA-256("securethread/pki/job-tag/v1" || 0x00 || job_id)[:8]``;
* the sequence number is the device's position in the job's quota.

So the OEM recovers ``(job, sequence)`` from a certificate alone and detects duplicate and
over-quota serials during reconciliation.
"""

from __future__ import annotations

import hashlib
import os

import attrs

from ._errors import SerialNumberError
from ._names import check_job_id

SERIAL_VERSION = 0x01
JOB_TAG_SIZE = 8
SEQUENCE_SIZE = 8
SERIAL_SIZE = 1 + JOB_TAG_SIZE + SEQUENCE_SIZE
MAX_SEQUENCE = (1 << (8 * SEQUENCE_SIZE)) - 1
_TAG_DOMAIN = b"securethread/pki/job-tag/v1\x00"


def job_tag(job_id: str) -> bytes:
    """The job's 8-octet tag as encoded in its device serials."""
    check_job_id(job_id)
    return hashlib.sha256(_TAG_DOMAIN + job_id.encode("ascii")).digest()[:JOB_TAG_SIZE]


def serial_from_tag(tag: bytes, sequence: int) -> int:
    """Serial for a precomputed job tag (the issuer's hot path)."""
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise SerialNumberError(f"sequence number must be an int, not {type(sequence).__name__}")
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise SerialNumberError(f"sequence number {sequence} outside 0..2^64-1")
    return (
        (SERIAL_VERSION << (8 * (JOB_TAG_SIZE + SEQUENCE_SIZE)))
        | (int.from_bytes(tag, "big") << (8 * SEQUENCE_SIZE))
        | sequence
    )


def device_serial(job_id: str, sequence: int) -> int:
    """The serial number of device ``sequence`` of job ``job_id``."""
    return serial_from_tag(job_tag(job_id), sequence)


@attrs.frozen
class DeviceSerial:
    """A parsed device serial number."""

    job_tag: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    sequence: int = attrs.field(validator=attrs.validators.instance_of(int))

    def __attrs_post_init__(self) -> None:
        if len(self.job_tag) != JOB_TAG_SIZE:
            raise SerialNumberError(f"job tag must be {JOB_TAG_SIZE} octets")
        if not 0 <= self.sequence <= MAX_SEQUENCE:
            raise SerialNumberError(f"sequence number {self.sequence} outside 0..2^64-1")

    def belongs_to(self, job_id: str) -> bool:
        return self.job_tag == job_tag(job_id)


def parse_device_serial(serial: int) -> DeviceSerial:
    """Split a device serial into job tag and sequence; SerialNumberError if it is not one."""
    if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
        raise SerialNumberError(f"serial {serial!r} is not a positive integer")
    if serial.bit_length() > 8 * SERIAL_SIZE:
        raise SerialNumberError(f"serial {serial:#x} is longer than {SERIAL_SIZE} octets")
    raw = serial.to_bytes(SERIAL_SIZE, "big")
    if raw[0] != SERIAL_VERSION:
        raise SerialNumberError(f"serial {serial:#x} is not a version-1 device serial")
    return DeviceSerial(
        job_tag=raw[1 : 1 + JOB_TAG_SIZE],
        sequence=int.from_bytes(raw[1 + JOB_TAG_SIZE :], "big"),
    )


def random_serial() -> int:
    """A random 20-octet positive serial for CA and enclave certificates (RFC 5280 §4.1.2.2).

    The top octet is 0x40..0x7f: positive, exactly 20 octets, never a device serial.
    """
    raw = bytearray(os.urandom(20))
    raw[0] = (raw[0] & 0x3F) | 0x40
    return int.from_bytes(raw, "big")
