"""Reconciliation's signature checks, in worker processes.

Per device, reconciliation's cost is its ECDSA verifications (the boot confirmation under the
device's key; the device certificate under the production CA when every certificate signature
is verified, :class:`~securethread.formats.reconciliation.CertificateSignatures`) and
everything else: decoding, the order and uniqueness checks, the on-disk memory of devices.
The verifications need no state but the job's, so they can run elsewhere while the main
process goes on: it hands each record's verification to a pool of worker processes in chunks,
in record order, and collects the results in the same order.

The answer is the sequential one.  A record's own checks in the main process (order, quota,
targets, duplicates, the certificate's form) come before its verification, as they do in one
process; and when anything fails -- a check in the main process, the ledger reader, a worker
-- the failure reported is the one of the earliest record: every verification of the records
before it is collected first, and the first that failed wins (its message is the one full
validation gives, computed in the worker).

:class:`Verifications` runs the checks in this process until the ledger has more than
``threshold`` verifications (small ledgers, most tests), then in ``workers`` forked
processes; ``workers=1`` never starts a pool.
"""

from __future__ import annotations

import collections
import datetime
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import Error, LedgerError
from securethread.formats.image import Manifest
from securethread.pki.profile import DeviceProfile

__all__ = ["JobContext", "Verifications"]

#: Records per chunk handed to a worker, and chunks in flight per worker (memory: constant).
CHUNK = 256
IN_FLIGHT = 4
#: Verifications (one or two per device) before the pool starts (forking costs ~0.1 s a
#: worker).
THRESHOLD = 4096
_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


@attrs.frozen
class JobContext:
    """What a verification needs to know of the job (picklable: DER and plain values)."""

    root_der: bytes
    pca_der: bytes
    job_id: str
    identity: bytes
    profile: DeviceProfile
    manifest: Manifest | None  # None: a "provision" job (no image, no boot confirmation)


# A task: ("cert", index, time, der, tbs, signature, hash name, point) or
# ("boot", index, boot, point, device_id)
Task = tuple[Any, ...]


class _Checker:
    """The verifications, with the job's state built once per process."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.root = x509.load_der_x509_certificate(ctx.root_der)
        self.pca = x509.load_der_x509_certificate(ctx.pca_der)
        key = self.pca.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # reconciliation checked the CA
        self.pca_key = key
        self._validators: dict[int, Any] = {}

    def failure(self, task: Task) -> str | None:
        """None if the task's verification holds, else the message full validation gives."""
        if task[0] == "cert":
            _kind, _index, t, der, tbs, sig, hash_name, point = task
            try:
                # the certified point on the curve (SEC 1 §3.2.2), the CA's signature
                ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
                self.pca_key.verify(sig, tbs, ec.ECDSA(_HASHES[hash_name]))
                return None
            except (ValueError, InvalidSignature):
                return self._full_validation(der, t)
        from securethread.formats.boot import (
            BootConfirmationError,
            verify_recorded_boot_confirmation,
        )

        _kind, _index, boot, point, device_id = task
        if self.ctx.manifest is None:  # reconciliation refuses a provision job's boot record
            return "a provision job's ledger has no boot confirmation"
        try:
            verify_recorded_boot_confirmation(
                boot,
                device_public_key=ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), point
                ),
                device_id=device_id,
                manifest=self.ctx.manifest,
            )
        except BootConfirmationError as exc:
            return f"boot confirmation fails: {exc}"
        return None

    def _full_validation(self, der: bytes, t: int) -> str:
        from securethread.pki import DeviceChainValidator, untrusted

        try:
            cert = untrusted.load_certificate(der, what="device certificate")
            v = self._validators.get(t)
            if v is None:
                v = self._validators[t] = DeviceChainValidator(
                    self.pca,
                    self.root,
                    at=datetime.datetime.fromtimestamp(t, datetime.UTC),
                    job_id=self.ctx.job_id,
                    job_tag=self.ctx.identity,
                    profile=self.ctx.profile,
                )
            v.validate(cert)
        except Error as exc:
            return str(exc)
        return "device certificate signature does not verify under the production CA"


_WORKER: _Checker | None = None


def _init(ctx: JobContext) -> None:
    global _WORKER
    _WORKER = _Checker(ctx)


def _run(tasks: list[Task]) -> tuple[int, str] | None:
    """In a worker: the first failing task of a chunk (tasks in record order), if any."""
    assert _WORKER is not None
    for task in tasks:
        why = _WORKER.failure(task)
        if why is not None:
            return task[1], why
    return None


def _failed(index: int, why: str) -> LedgerError:
    from securethread.formats.reconciliation import ReconciliationError

    return ReconciliationError(f"ledger record {index}: {why}", index=index)


class Verifications:
    """Verifications handed out in record order; failures raised in record order."""

    def __init__(
        self, ctx: JobContext, *, workers: int | None = None, threshold: int | None = None
    ) -> None:
        self._ctx = ctx
        self._workers = max(1, workers if workers is not None else os.cpu_count() or 1)
        self._threshold = THRESHOLD if threshold is None else threshold
        self._local: _Checker | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._chunk: list[Task] = []
        self._pending: collections.deque[Future[tuple[int, str] | None]] = collections.deque()
        self.tasks = 0

    def add(self, task: Task) -> None:
        """Verify ``task`` now (few devices, or one worker) or in a worker; a failure found
        now is raised now (nothing is pending before it)."""
        self.tasks += 1
        if self._pool is None and (self._workers == 1 or self.tasks <= self._threshold):
            if self._local is None:
                self._local = _Checker(self._ctx)
            why = self._local.failure(task)
            if why is not None:
                raise _failed(task[1], why)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_init,
                initargs=(self._ctx,),
            )
        self._chunk.append(task)
        if len(self._chunk) >= CHUNK:
            self._submit()

    def _submit(self) -> None:
        assert self._pool is not None
        if self._chunk:
            self._pending.append(self._pool.submit(_run, self._chunk))
            self._chunk = []
        while len(self._pending) > self._workers * IN_FLIGHT:
            self._collect(self._pending.popleft())

    @staticmethod
    def _collect(fut: Future[tuple[int, str] | None]) -> None:
        failed = fut.result()
        if failed is not None:
            raise _failed(*failed)

    def finish(self) -> None:
        """Every verification handed out, checked: raise the earliest failure (at the end of
        the ledger)."""
        if self._pool is not None:
            self._submit()
            while self._pending:
                self._collect(self._pending.popleft())

    def before(self, exc: BaseException) -> None:
        """Raise the earliest failure of a record before the one ``exc`` names (about to be
        raised); a failure this object raised is the earliest already."""
        index = getattr(exc, "index", None)
        try:
            self.finish()
        except LedgerError as earlier:
            if index is None or (earlier.index is not None and earlier.index < index):
                raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
