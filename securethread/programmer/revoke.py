"""Revocation at the programming centre: ``securethread programmer revoke --job J --device
CERT ... --out CRL``.

Device certificates are revoked by the production CA that issued them: its key is in this
token, and stock TLS servers (openssl, Python ``ssl``, mosquitto) honour a device's CRL only
when the device's issuer signed it (docs/pki.md, "Revocation").  The OEM asks; the programmer
signs.  ``open-job`` already issued the job's first, empty CRL, so relying parties can turn
CRL checking on from the first device.

The CRL's state -- its number and every entry -- is the job's revocation anchor in the token
(:mod:`securethread.programmer.crl_mark`), never a file: each revocation reads the anchor,
adds, writes the next generation, and only then writes ``jobs/<job>/crl.pem`` and
``outbox/crl-<job>.pem``, copies derived from it.  Deleting ``crl.pem`` or ``job.bin``, or
putting an older CRL in their place, does not shrink the next CRL.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from securethread.errors import ConfigurationError
from securethread.formats.job import VerifiedJob
from securethread.hsm.token import Token
from securethread.pki import from_pem, reason_named, refresh_crl, revoke_devices
from securethread.programmer import layout as L
from securethread.programmer.crl_mark import Anchor, RevocationAnchor, anchor_lock, crl_der
from securethread.workdir import PartyDir, StepResult, read_file, write_atomic


def _write_crl_files(work: PartyDir, job_id: str, crl_pem: bytes) -> list[str]:
    jdir = L.job_dir(job_id)
    return [
        work.write(f"{jdir}/crl.pem", crl_pem),
        work.write(f"outbox/crl-{job_id}.pem", crl_pem),
    ]


def first_crl(work: PartyDir, token: Token, job: VerifiedJob) -> list[str]:
    """The job's first, empty CRL (signed by its production CA), anchored in the token, kept
    and in the outbox.  An open-job killed before it finished left its anchor: that CRL is
    written again, no new one is signed (:meth:`RevocationAnchor.check_opening`)."""
    job_id = job.job.job_id
    anchor = RevocationAnchor(token, job_id)
    with anchor_lock(work.root):
        current = anchor.check_opening(job.sha256)
        if current is None:
            label = L.production_ca_label(job_id)
            crl = crl_der(refresh_crl(token.private_key(label), token.certificate(label)))
            state = Anchor(job=job.sha256, job_id=job_id, opened=False, crl=crl)
            anchor.write(state, after=None)
        else:
            state = current.value
    return _write_crl_files(work, job_id, state.crl_pem())


def mark_opened(work: PartyDir, token: Token, job_id: str) -> None:
    """Record in the anchor that open-job finished (``job.bin`` written): from now on the
    job id never opens again in this token."""
    with anchor_lock(work.root):
        anchor = RevocationAnchor(token, job_id)
        current = anchor.read()
        if current is None:
            raise AssertionError("mark_opened before first_crl")
        if not current.value.opened:
            anchor.write(
                Anchor(job=current.value.job, job_id=job_id, opened=True, crl=current.value.crl),
                after=current,
            )


def revoke(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    devices: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    reason: str = "unspecified",
) -> StepResult:
    """Revoke device certificates of job ``job_id``; write the CA's new CRL (PEM) to ``out``.

    The previous CRL is the token's (the anchor), whatever the job's files say; a job whose
    files were deleted can still be revoked from."""
    work = L.open_programmer(workdir)
    L.job_dir(job_id)  # the job id is a name before anything else
    if not devices:
        raise ConfigurationError("name at least one device certificate to revoke (--device)")
    flag = reason_named(reason)
    certs = [from_pem(read_file(d, "device certificate", limit=64 << 10)) for d in devices]
    token = work.open_token(L.TOKEN)
    label = L.production_ca_label(job_id)
    anchor = RevocationAnchor(token, job_id)
    with anchor_lock(work.root):
        current = anchor.require()
        # The previous CRL is verified under the CA again (RFC 5280 §6.3.3) before its
        # entries are carried over.
        crl = revoke_devices(
            token.private_key(label),
            token.certificate(label),
            certs,
            reason=flag,
            previous_crl=current.value.crl,
        )
        state = Anchor(
            job=current.value.job, job_id=job_id, opened=current.value.opened, crl=crl_der(crl)
        )
        # The token first: a kill after this leaves files one CRL behind the anchor, which
        # the next revocation (numbered after the anchor's) overtakes.
        anchor.write(state, after=current)
    written = _write_crl_files(work, job_id, crl)
    write_atomic(Path(out), crl)
    tx = work.transcript(token.private_key(L.L_IDENTITY))
    tx.append(
        "revocation",
        artefacts={"crl": hashlib.sha256(crl).digest()},
        details={"job": job_id, "revoked": len(certs), "reason": flag.value},
    )
    return work.finish(
        "programmer revoke",
        [*written, os.fspath(out)],
        [tx],
        {
            "job": job_id,
            "revoked": [f"{c.serial_number:x}" for c in certs],
            "crl_number": state.number,
        },
    )
