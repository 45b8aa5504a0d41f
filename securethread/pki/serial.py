"""Device certificate serial numbers: the job's tag followed by the device's slot.

Layout (17 octets, big-endian, RFC 5280 §4.1.2.2: positive, at most 20 octets)::

    0x02 | job tag (8 octets) | slot (8 octets, unsigned)

* ``0x02`` is the format version (version 1 derived the tag from the job id alone, which
  repeats across jobs and OEMs); it keeps the integer positive and its length fixed, so the
  DER INTEGER is always 17 content octets (no 0x00 pad) and a device serial is never
  confused with the 20-octet random serials of CA and enclave certificates;
* the job tag is the first 8 octets of the job's identity, the SHA-256 of the signed job
  (``formats.job.job_hash``), which the caller passes in.  It binds every serial to one
  signed job and carries 64 bits that nobody can predict before the officers signed the job
  (their ECDSA signatures hold the tokens' random nonces);
* the slot is the device's position in the job's quota.

So the OEM recovers (job, slot) from a certificate alone: reconciliation finds duplicate and
over-quota serials, and a certificate met in the field that is not in the job's ledger
(over-production) names the job it claims.  docs/pki.md says why this and not random serials.
"""

from __future__ import annotations

import os

import attrs

from ._errors import SerialNumberError

SERIAL_VERSION = 0x02
JOB_TAG_SIZE = 8
SEQUENCE_SIZE = 8
SERIAL_SIZE = 1 + JOB_TAG_SIZE + SEQUENCE_SIZE
MAX_SEQUENCE = (1 << (8 * SEQUENCE_SIZE)) - 1
MAX_JOB_IDENTITY = 64


def job_tag(job_identity: bytes) -> bytes:
    """The 8-octet tag of the job whose identity (SHA-256 of the signed job) is given."""
    if not isinstance(job_identity, bytes):
        raise TypeError(f"job identity must be bytes, not {type(job_identity).__name__}")
    if not JOB_TAG_SIZE <= len(job_identity) <= MAX_JOB_IDENTITY:
        raise SerialNumberError(
            f"job identity is {len(job_identity)} octets; a job tag needs "
            f"{JOB_TAG_SIZE}..{MAX_JOB_IDENTITY} (the SHA-256 of the signed job)"
        )
    return job_identity[:JOB_TAG_SIZE]


def serial_from_tag(tag: bytes, sequence: int) -> int:
    """Serial for a job tag (exactly 8 octets) and a slot (the issuer's hot path)."""
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise SerialNumberError(f"sequence number must be an int, not {type(sequence).__name__}")
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise SerialNumberError(f"sequence number {sequence} outside 0..2^64-1")
    if len(tag) != JOB_TAG_SIZE:
        raise SerialNumberError(f"job tag must be {JOB_TAG_SIZE} octets")
    return (
        (SERIAL_VERSION << (8 * (JOB_TAG_SIZE + SEQUENCE_SIZE)))
        | (int.from_bytes(tag, "big") << (8 * SEQUENCE_SIZE))
        | sequence
    )


def device_serial(job_identity: bytes, sequence: int) -> int:
    """The serial number of slot ``sequence`` of the job with identity ``job_identity``."""
    return serial_from_tag(job_tag(job_identity), sequence)


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

    def belongs_to(self, job_identity: bytes) -> bool:
        """Whether this serial was issued under the job with identity ``job_identity``."""
        return self.job_tag == job_tag(job_identity)


def parse_device_serial(serial: int) -> DeviceSerial:
    """Split a device serial into job tag and slot; SerialNumberError if it is not one."""
    if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
        raise SerialNumberError(f"serial {serial!r} is not a positive integer")
    if serial.bit_length() > 8 * SERIAL_SIZE:
        raise SerialNumberError(f"serial {serial:#x} is longer than {SERIAL_SIZE} octets")
    raw = serial.to_bytes(SERIAL_SIZE, "big")
    if raw[0] != SERIAL_VERSION:
        raise SerialNumberError(
            f"serial {serial:#x} is not a version-{SERIAL_VERSION} device serial"
        )
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
