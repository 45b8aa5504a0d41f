"""The OEM's work directory: file names, token labels, and opening it.

::

    <dir>/root-ca.pem, oem-identity.pem, firmware-signing.pem (public key), officers.bin
    <dir>/programmers/<name>/   the enclave's certificates, keys-<image>.ack / .receipt
    <dir>/images/<image>/       image.enc, manifest.bin (firmware stays with the OEM)
    <dir>/jobs/<job>/           spec.toml, production-ca.pem, device-trust.bin, draft.bin
                                (the unsigned job body), approvals/officer-<n>.bin (one
                                officer's signature each), job.bin (the issued job),
                                reconciliation.json
    <dir>/outbox/               certificates-<programmer>.bin, job-<job>.bin, image-<image>.enc,
                                keys-<image>-<programmer>.sealed, crl-*.pem

Tokens: ``oem`` (root CA, OEM identity, firmware signing, image keys) and one token per
officer (``officer-1`` ...), each with its own PIN, holding that officer's job-signing key.
The ``pins`` file holds the ``oem`` token's PIN only: each officer keeps their own PIN.
"""

from __future__ import annotations

import os

from securethread.workdir import PartyDir, check_name

PARTY = "oem"
TOKEN = "oem"
L_ROOT = "oem-root-ca"
L_IDENTITY = "oem-identity"
L_FIRMWARE = "firmware-signing"
L_OFFICER = "job-signing"

ROOT_CA = "root-ca.pem"
IDENTITY = "oem-identity.pem"
FIRMWARE_KEY = "firmware-signing.pem"
OFFICERS = "officers.bin"


def officer_token(i: int) -> str:
    return f"officer-{i}"


def image_key_label(image_id: str) -> str:
    return f"image-{image_id}"


def programmer_dir(name: str) -> str:
    return f"programmers/{check_name('programmer name', name)}"


def image_dir(image_id: str) -> str:
    return f"images/{check_name('image id', image_id)}"


def job_dir(job_id: str) -> str:
    return f"jobs/{check_name('job id', job_id)}"


def job_draft(job_id: str) -> str:
    """The unsigned job body the officers approve (``issue-job SPEC`` writes it last)."""
    return f"{job_dir(job_id)}/draft.bin"


def job_approvals(job_id: str) -> str:
    return f"{job_dir(job_id)}/approvals"


def job_approval(job_id: str, officer: int) -> str:
    """Officer ``officer``'s approval: the draft sealed with that officer's key alone."""
    return f"{job_approvals(job_id)}/{officer_token(officer)}.bin"


def open_oem(workdir: str | os.PathLike[str]) -> PartyDir:
    """The OEM's existing work directory (refuses the programmer's, or none)."""
    return PartyDir.open(workdir, PARTY)
