"""Identifier syntax shared by the profiles and the serial encoding."""

from __future__ import annotations

import re

from ._errors import NameNotAllowedError

_JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ENCLAVE_NAME = _JOB_ID
_DEVICE_ID = re.compile(r"[0-9a-f]{16}")
ROLES = ("oem", "programmer")


def check_job_id(job_id: object) -> str:
    """A job identifier matches ``[A-Za-z0-9._-]{1,64}``."""
    if not isinstance(job_id, str) or _JOB_ID.fullmatch(job_id) is None:
        raise NameNotAllowedError(f"job id {job_id!r} does not match [A-Za-z0-9._-]{{1,64}}")
    return job_id


def check_device_id(device_id: object) -> str:
    """A device identifier is a 64-bit chip UID: exactly 16 lowercase hex digits."""
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise NameNotAllowedError(
            f"device id {device_id!r} is not 16 lowercase hex digits (a 64-bit chip UID)"
        )
    return device_id


def check_enclave_name(name: object) -> str:
    if not isinstance(name, str) or _ENCLAVE_NAME.fullmatch(name) is None:
        raise NameNotAllowedError(f"enclave name {name!r} does not match [A-Za-z0-9._-]{{1,64}}")
    return name


def check_role(role: object) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise NameNotAllowedError(f"enclave role {role!r} is not one of {ROLES}")
    return role
