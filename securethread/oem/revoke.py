"""Revocation at the OEM: ``securethread oem revoke --job J --out CRL``.

The OEM root revokes a job's production CA -- and with it, for verifiers that check the whole
chain (``openssl verify -crl_check_all``), every device of the job.  Single devices are revoked
by the production CA that issued them, whose key lives in the programmer's token
(``securethread programmer revoke``): stock TLS servers look a device's CRL up by its issuer's
name, so only a CRL signed by the production CA is honoured for a device (docs/pki.md,
"Revocation").  The OEM's CRL accumulates in ``crl/root.pem``; each revocation adds to it and
increments its cRLNumber.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from securethread.oem import layout as L
from securethread.pki import from_pem, reason_named, revoke_production_ca
from securethread.workdir import StepResult, write_atomic

ROOT_CRL = "crl/root.pem"


def revoke(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    out: str | os.PathLike[str],
    reason: str = "unspecified",
) -> StepResult:
    """Revoke job ``job_id``'s production CA; write the root's new CRL (PEM) to ``out``."""
    work = L.open_oem(workdir)
    flag = reason_named(reason)
    jdir = L.job_dir(job_id)
    work.require(
        f"{jdir}/production-ca.pem", step=f"revoke {job_id}", needs=f"issue-job ({job_id})"
    )
    pca = from_pem(work.read(f"{jdir}/production-ca.pem", "production-CA certificate"))
    previous = work.read(ROOT_CRL, "root CRL") if work.exists(ROOT_CRL) else None
    oem = work.open_token(L.TOKEN)
    crl = revoke_production_ca(
        oem.private_key(L.L_ROOT),
        oem.certificate(L.L_ROOT),
        pca,
        reason=flag,
        previous_crl=previous,
    )
    work.write(ROOT_CRL, crl)
    write_atomic(Path(out), crl)
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "revocation",
        artefacts={"crl": hashlib.sha256(crl).digest()},
        details={"job": job_id, "revoked": "production-ca", "reason": flag.value},
    )
    return work.finish(
        "oem revoke", [ROOT_CRL, os.fspath(out)], [tx], {"job": job_id, "crl": os.fspath(out)}
    )
