"""Revocation at the programming centre: ``securethread programmer revoke --job J --device
CERT ... --out CRL``.

Device certificates are revoked by the production CA that issued them: its key is in this
token, and stock TLS servers (openssl, Python ``ssl``, mosquitto) honour a device's CRL only
when the device's issuer signed it (docs/pki.md, "Revocation").  The OEM asks; the programmer
signs.  ``open-job`` already issued the job's first, empty CRL, so relying parties can turn
CRL checking on from the first device.  The CRL accumulates in ``jobs/<job>/crl.pem``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from securethread.errors import ConfigurationError
from securethread.pki import from_pem, reason_named, refresh_crl, revoke_devices
from securethread.programmer import layout as L
from securethread.workdir import PartyDir, StepResult, read_file, write_atomic


def first_crl(work: PartyDir, token: object, job_id: str) -> str:
    """The job's first, empty CRL (signed by its production CA), kept and in the outbox."""
    label = L.production_ca_label(job_id)
    crl = refresh_crl(token.private_key(label), token.certificate(label))  # type: ignore[attr-defined]
    work.write(f"{L.job_dir(job_id)}/crl.pem", crl)
    return work.write(f"outbox/crl-{job_id}.pem", crl)


def revoke(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    devices: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    reason: str = "unspecified",
) -> StepResult:
    """Revoke device certificates of job ``job_id``; write the CA's new CRL (PEM) to ``out``."""
    work = L.open_programmer(workdir)
    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"revoke {job_id}", needs=f"open-job ({job_id})")
    if not devices:
        raise ConfigurationError("name at least one device certificate to revoke (--device)")
    flag = reason_named(reason)
    certs = [from_pem(read_file(d, "device certificate", limit=64 << 10)) for d in devices]
    previous = work.read(f"{jdir}/crl.pem", "CRL") if work.exists(f"{jdir}/crl.pem") else None
    token = work.open_token(L.TOKEN)
    label = L.production_ca_label(job_id)
    crl = revoke_devices(
        token.private_key(label),
        token.certificate(label),
        certs,
        reason=flag,
        previous_crl=previous,
    )
    work.write(f"{jdir}/crl.pem", crl)
    work.write(f"outbox/crl-{job_id}.pem", crl)
    write_atomic(Path(out), crl)
    tx = work.transcript(token.private_key(L.L_IDENTITY))
    tx.append(
        "revocation",
        artefacts={"crl": hashlib.sha256(crl).digest()},
        details={"job": job_id, "revoked": len(certs), "reason": flag.value},
    )
    return work.finish(
        "programmer revoke",
        [f"{jdir}/crl.pem", f"outbox/crl-{job_id}.pem", os.fspath(out)],
        [tx],
        {"job": job_id, "revoked": [f"{c.serial_number:x}" for c in certs]},
    )
