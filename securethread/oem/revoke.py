"""Revocation at the OEM: ``securethread oem revoke --job J --out CRL``.

The OEM root revokes a job's production CA -- and with it, for verifiers that check the whole
chain (``openssl verify -crl_check_all``), every device of the job.  Single devices are revoked
by the production CA that issued them, whose key lives in the programmer's token
(``securethread programmer revoke``): stock TLS servers look a device's CRL up by its issuer's
name, so only a CRL signed by the production CA is honoured for a device (docs/pki.md,
"Revocation").

The root's CRL only grows: each revocation adds to it and increments its cRLNumber (RFC 5280
§5.2.3).  Its state is the last root CRL, kept in the OEM token as a record of private data
objects (:class:`~securethread.hsm.records.TokenRecord`); ``crl/root.pem`` is a copy derived
from it, so deleting or replacing that file never shrinks the next CRL.  A work directory
from before the record existed starts from its ``crl/root.pem`` (verified under the root).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securethread.errors import FormatError
from securethread.hsm.records import TokenRecord
from securethread.hsm.token import Token
from securethread.oem import layout as L
from securethread.pki import from_pem, reason_named, revoke_production_ca
from securethread.workdir import StepResult, write_atomic

ROOT_CRL = "crl/root.pem"
APPLICATION = "securethread/revocation"
ROOT_RECORD = "revocation-root"


def _der_crl(data: bytes) -> bytes:
    """A generation's value: one DER CRL (verified under the root where it is used)."""
    try:
        x509.load_der_x509_crl(data)
    except ValueError:
        raise FormatError("the root's revocation record is not a DER CRL") from None
    return data


def root_record(token: Token) -> TokenRecord[bytes]:
    """The OEM root's last CRL in the OEM token."""
    return TokenRecord(
        token,
        label=ROOT_RECORD,
        application=APPLICATION,
        parse=_der_crl,
        what="root's revocation record",
    )


def revoked_by_root(token: Token, cert: x509.Certificate) -> bool:
    """Whether the root's last CRL (the token's record, not a file) lists ``cert``, a
    production CA the root issued (RFC 5280 §5.3: by serial; the CRL is the root's own)."""
    current = root_record(token).read()
    if current is None:
        return False
    crl = x509.load_der_x509_crl(current.value)
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


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
    oem = work.open_token(L.TOKEN)
    record = root_record(oem)
    current = record.read()
    if current is not None:
        previous: bytes | None = current.value
    else:  # no record yet: the file, if any (an older directory), verified under the root
        previous = work.read(ROOT_CRL, "root CRL") if work.exists(ROOT_CRL) else None
    crl = revoke_production_ca(
        oem.private_key(L.L_ROOT),
        oem.certificate(L.L_ROOT),
        pca,
        reason=flag,
        previous_crl=previous,
    )
    der = x509.load_pem_x509_crl(crl).public_bytes(serialization.Encoding.DER)
    record.write(der, after=current)  # the token first, then the copies
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
