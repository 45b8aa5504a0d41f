"""The programming centre's work directory: file names, token labels, opening it.

::

    <dir>/certs/        what the OEM's certificate bundle installed: root-ca.pem,
                        oem-identity.pem, officers.bin, firmware-signing.der, and this
                        enclave's identity / license-signing / ledger-signing /
                        key-agreement certificates
    <dir>/keys/         <image>.ack: the image key of <image> is in the token (receipt)
    <dir>/jobs/<job>/   production-ca.csr, job.bin, production-ca.pem, manifest.bin,
                        image.enc, store.sqlite (quota + ledger), devices/, ledger.bin,
                        vendors/<id>.pem (the vendor CAs the job names, by id)
    <dir>/outbox/       enrolment-request.bin, production-ca-request-<job>.bin,
                        key-receipt-<package>.bin, ledger-<job>.bin

One token, ``programmer``: the enclave's identity, license-signing, ledger-signing and
key-agreement keys, the image keys it received (wrapped only), and one production-CA key per
job (``production-ca-<job>``).
"""

from __future__ import annotations

import os

from securethread.workdir import PartyDir, check_name

PARTY = "programmer"
TOKEN = "programmer"
L_IDENTITY = "programmer-identity"
L_LICENSE = "license-signing"
L_LEDGER = "ledger-signing"
L_KA = "key-agreement"
#: purpose (as in the enrolment request) -> key label in the token
LABELS = {
    "identity": L_IDENTITY,
    "license-signing": L_LICENSE,
    "ledger-signing": L_LEDGER,
    "key-agreement": L_KA,
}

ENROLMENT = "outbox/enrolment-request.bin"
ROOT_CA = "certs/root-ca.pem"
OEM_IDENTITY = "certs/oem-identity.pem"
OFFICERS = "certs/officers.bin"
FIRMWARE_KEY = "certs/firmware-signing.der"


def cert_path(purpose: str) -> str:
    return f"certs/{purpose}.pem"


def image_key_label(image_id: str) -> str:
    return f"image-{check_name('image id', image_id)}"


def production_ca_label(job_id: str) -> str:
    return f"production-ca-{check_name('job id', job_id)}"


def job_dir(job_id: str) -> str:
    return f"jobs/{check_name('job id', job_id)}"


def provisioned_by_path(job_id: str, ca_id: bytes) -> str:
    """Where open-job keeps a production-CA certificate a "program" job names in
    ``provisioned_by``; ``ca_id`` is the SHA-256 of that certificate's DER."""
    return f"{job_dir(job_id)}/provisioned-by/{ca_id.hex()}.pem"


def vendor_ca_path(job_id: str, ca_id: bytes) -> str:
    """Where open-job keeps the certificate of a vendor CA the job names; ``ca_id`` is the
    SHA-256 of the CA's SubjectPublicKeyInfo (formats.identity.vendor_ca_id)."""
    return f"{job_dir(job_id)}/vendors/{ca_id.hex()}.pem"


def open_programmer(workdir: str | os.PathLike[str]) -> PartyDir:
    """The programmer's existing work directory (refuses the OEM's, or none)."""
    return PartyDir.open(workdir, PARTY)
