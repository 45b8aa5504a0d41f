"""The revocation anchor: a production CA's revocation state, kept in the programmer token.

A job's CRL (RFC 5280 §5) must only ever grow: its cRLNumber goes up (§5.2.3) and a
revoked serial stays revoked.  The files of the work directory cannot promise that --
``crl.pem`` and ``job.bin`` can be deleted or replaced by anyone at the programming centre
-- so the state lives beside the production-CA key, in private data objects of the token
(:class:`~securethread.hsm.records.TokenRecord`; where the quota mark is)::

    {"v": 1, "job": job identity, "job_id": ..., "opened": bool, "crl": DER of the last CRL}

The last CRL the production CA signed *is* the state: its number, its entries (serial,
revocation date, reason), under the CA's signature.  ``open-job`` writes the first (empty)
one; every ``revoke`` reads it, adds, writes the next generation and only then writes the
CRL files, which are copies derived from it.  Deleting or replacing any file of the work
directory never shrinks it.

It also records that the job was opened here: ``opened`` becomes true once ``open-job``
wrote ``job.bin``.  A later ``open-job`` of the same job id is refused whatever files are
missing; one killed before ``opened`` was written finishes with the anchor's first CRL
(no new CRL is signed).  What it cannot stop: the token directory itself restored from a
copy (SoftHSM keeps objects in plain files; docs/threat-model.md), or the PIN holder
destroying the objects.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securethread.errors import FormatError, JobError
from securethread.formats import cbor, fields
from securethread.formats.job import JOB_ID_RE
from securethread.hsm.records import Generation, TokenRecord
from securethread.hsm.token import Token
from securethread.pki.crl import MAX_CRL_SIZE
from securethread.workdir import StepOrderError, check_name

APPLICATION = "securethread/revocation"
VERSION = 1


def anchor_label(job_id: str) -> str:
    """One anchor per job id: a job id opens once in a token, whatever job it names."""
    return "revocation-" + check_name("job id", job_id)


@fields.body("revocation anchor")
@attrs.frozen(kw_only=True)
class Anchor:
    """One generation of a job's revocation anchor."""

    job: bytes = fields.byte_string("job", size=32)  # the job identity
    job_id: str = fields.text("job_id", max_len=64, pattern=JOB_ID_RE)
    opened: bool = fields.boolean("opened")
    crl: bytes = fields.byte_string("crl", min_len=1, max_len=MAX_CRL_SIZE)  # DER
    version: int = fields.version(VERSION)

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Anchor:
        d = cbor.decode(data, what="revocation anchor", max_size=MAX_CRL_SIZE + 1024)
        anchor = fields.decode(cls, d)
        try:  # the CRL is verified under its CA where it is used (current_crl)
            anchor.number  # noqa: B018
        except (ValueError, x509.ExtensionNotFound):
            raise FormatError("revocation anchor: the CRL is malformed") from None
        return anchor

    @property
    def number(self) -> int:
        """The last CRL's cRLNumber (RFC 5280 §5.2.3)."""
        crl = x509.load_der_x509_crl(self.crl)
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    def crl_pem(self) -> bytes:
        return x509.load_der_x509_crl(self.crl).public_bytes(serialization.Encoding.PEM)


class RevocationAnchor:
    """Job ``job_id``'s revocation anchor in ``token``."""

    def __init__(self, token: Token, job_id: str) -> None:
        self.job_id = job_id
        self.label = anchor_label(job_id)
        self._record = TokenRecord(
            token,
            label=self.label,
            application=APPLICATION,
            parse=self._parse,
            what=f"revocation anchor of job {job_id}",
        )

    def _parse(self, data: bytes) -> Anchor:
        anchor = Anchor.from_bytes(data)
        if anchor.job_id != self.job_id:
            raise FormatError(f"revocation anchor names job {anchor.job_id!r}")
        return anchor

    def read(self) -> Generation[Anchor] | None:
        """The newest generation; ``None`` if this token never opened job ``job_id``."""
        return self._record.read()

    def write(self, anchor: Anchor, *, after: Generation[Anchor] | None) -> None:
        """Write ``anchor`` as the generation after ``after`` (see TokenRecord.write)."""
        self._record.write(anchor.to_bytes(), after=after)

    def check_opening(self, job: bytes) -> Generation[Anchor] | None:
        """Before ``open-job`` of ``job`` (its identity): refuse a job id this token opened
        before; return the anchor an ``open-job`` killed before it finished left (it is
        finished with that anchor's CRL), else ``None``."""
        current = self.read()
        if current is None:
            return None
        if current.value.job != job:
            raise JobError(
                f"job id {self.job_id} was opened in this token before, with another job: "
                "a job id opens once"
            )
        if current.value.opened:
            raise JobError(
                f"job {self.job_id} was opened in this token before (its revocation state, "
                f"CRL number {current.value.number}, is in the token): a job opens once; "
                f"if jobs/{self.job_id}/ lost files, restore them from a backup"
            )
        return current

    def refuse_new_key(self) -> None:
        """Before ``request-ca`` replaces the job's production-CA key: refuse if this token
        opened the job (its CA key signs the job's CRLs for as long as the token lives)."""
        current = self.read()
        if current is not None:
            raise JobError(
                f"job {self.job_id} was opened in this token (its revocation state is in the "
                "token): its production-CA key is never replaced"
            )

    def require(self) -> Generation[Anchor]:
        """The newest generation; :class:`~securethread.workdir.StepOrderError` if this token
        never opened job ``job_id`` (whatever files say)."""
        current = self.read()
        if current is None:
            raise StepOrderError(
                f"this token holds no revocation state for job {self.job_id}: the job was "
                "never opened here (open-job first)"
            )
        return current


def crl_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)


@contextmanager
def anchor_lock(workdir: Path) -> Iterator[None]:
    """Serialise anchor updates between processes (two revokes at once would each write
    the generation after the same one): ``flock(2)`` on the work directory itself, so a
    refused step leaves no lock file behind."""
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


__all__ = ["APPLICATION", "Anchor", "RevocationAnchor", "anchor_label", "anchor_lock", "crl_der"]
