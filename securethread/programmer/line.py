"""The per-device production pipeline on the programmer (flows 7 and 8).

Per batch of devices::

    identify (challenge, proof of possession, vendor chain, job targets, not seen before)
      -> count: reserve exactly this batch's slots, durably, in the store (S3)
      -> issue the device certificate (production CA key in the token)
      -> create the license (ECDH + KEK derivation + KWP wrap in the token)
      -> commit the ledger records and a signed checkpoint in one transaction (S4)
      -> release certificate and trust anchors to the device

Nothing leaves for a device before its slot and its ledger record are on disk.  A crash
anywhere wastes at most the slots of the current batch.  Programming (flow 8) is a
separate stage: the device's SBM takes manifest, image and license, and its signed boot
confirmation is checked and appended to the ledger.

Batching is what makes this fast: one database transaction and one checkpoint signature
per batch, one slot reservation per batch, and nothing per device but the token calls
the floor needs plus the checks that must be per device.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO, NamedTuple, Protocol

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    AlreadyProvisionedError,
    DeviceRefusedError,
    Error,
    QuotaExceededError,
)
from securethread.formats import ledger
from securethread.formats.job import VerifiedJob
from securethread.keys.protocol import PrivateKey
from securethread.programmer.store import ProductionStore

# --- fault injection for the crash-safety tests (S3) -----------------------------------------
# SECURETHREAD_FAULT_INJECT="<point>:<n>" SIGKILLs this process the n-th time <point> is
# reached.  Unset in production: the check is one global lookup.
_FAULT = os.environ.get("SECURETHREAD_FAULT_INJECT")
_fault_counts: dict[str, int] = {}


def _fault(point: str) -> None:
    if _FAULT is None:
        return
    name, _, nth = _FAULT.partition(":")
    if name != point:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


FAULT_POINTS = (
    "after-identify",
    "after-reserve",
    "after-certificate",
    "after-license",
    "before-commit",
    "after-commit",
    "mid-release",
    "after-release",
)


# --- what the pipeline talks to ----------------------------------------------------------------


class DevicePort(Protocol):
    """The programming adapter's view of one device (a simulated device in tests)."""

    def identify(self, challenge: bytes) -> bytes: ...

    def provision(self, data: bytes) -> None: ...

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes: ...


class Identity(Protocol):
    """What identification established (read-only: frozen results satisfy it)."""

    @property
    def device_id(self) -> str: ...

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey: ...


class CertificateIssuer(Protocol):
    def issue(
        self, device_public_key: ec.EllipticCurvePublicKey, device_id: str, sequence: int
    ) -> x509.Certificate: ...


class LicenseMaker(Protocol):
    def issue(self, device_id: str, device_public_key: ec.EllipticCurvePublicKey) -> bytes: ...


#: Verifies an identification response for a challenge; raises DeviceRefusedError.
IdentityVerifier = Callable[[bytes, bytes], Identity]
#: Builds the provisioning data released to a device, from its certificate's DER.
Packager = Callable[[bytes], bytes]
#: Verifies a boot confirmation (device cert, nonce, confirmation); raises.
BootVerifier = Callable[[x509.Certificate, bytes, bytes], None]


@attrs.frozen
class Provisioned:
    """A device that received its certificate; ``license`` is for the programming stage."""

    device_id: str
    slot: int
    seq: int
    certificate: x509.Certificate
    license: bytes
    elapsed_s: float


@attrs.frozen
class Refused:
    device_id: str | None
    reason: Error

    @property
    def kind(self) -> str:
        return type(self.reason).__name__


Outcome = Provisioned | Refused


class _Identified(NamedTuple):
    started: float  # perf_counter when the batch's identification began
    size: int
    accepted: list[tuple[DevicePort, Identity]]
    refused: list[Refused]


def _batches(devices: Iterable[DevicePort], size: int) -> Iterator[list[DevicePort]]:
    batch: list[DevicePort] = []
    for dev in devices:
        batch.append(dev)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ProductionLine:
    """One worker's provisioning pipeline for one verified job.

    Several lines (in separate processes) may run against the same job and store: the
    store serialises reservations and commits, and refuses a second record for a device.
    """

    def __init__(
        self,
        *,
        job: VerifiedJob,
        store: ProductionStore,
        identify: IdentityVerifier,
        issuer: CertificateIssuer,
        licenses: LicenseMaker,
        ledger_key: PrivateKey,
        packager: Packager,
        batch_size: int = 32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.job = job
        self._job_hash = job.sha256
        self._store = store
        self._identify = identify
        self._issuer = issuer
        self._licenses = licenses
        self._ledger_key = ledger_key
        self._packager = packager
        self.batch_size = batch_size
        self._clock = clock
        store.open_job(
            job=job.sha256, job_id=job.job.job_id, quota=job.job.quota, signed=job.signed
        )

    # --- flow 7 -----------------------------------------------------------------------------

    def provision(self, devices: Iterable[DevicePort]) -> Iterator[Outcome]:
        """Provision ``devices``; yields one outcome per device, in batches."""
        for batch in _batches(devices, self.batch_size):
            yield from self._finish_batch(self._identify_batch(batch))

    def _check_window(self) -> None:
        from securethread.formats.job import check_job_window

        check_job_window(self.job.job, int(self._clock()))

    def _identify_batch(self, batch: Sequence[DevicePort]) -> _Identified:
        """Challenge, proof of possession, vendor chain, targets: no state is changed."""
        t0 = time.perf_counter()
        self._check_window()
        targets = self.job.job.targets
        accepted: list[tuple[DevicePort, Identity]] = []
        refused: list[Refused] = []
        seen: set[str] = set()
        for dev in batch:
            challenge = os.urandom(32)
            try:
                ident = self._identify(dev.identify(challenge), challenge)
                targets.check(ident.device_id)
                if ident.device_id in seen:
                    raise AlreadyProvisionedError(f"device {ident.device_id} appears twice")
            except DeviceRefusedError as exc:
                refused.append(Refused(getattr(exc, "device_id", None), exc))
                continue
            except Error as exc:
                refused.append(Refused(None, DeviceRefusedError(f"identification failed: {exc}")))
                continue
            seen.add(ident.device_id)
            accepted.append((dev, ident))
        return _Identified(t0, len(batch), accepted, refused)

    def _finish_batch(self, identified: _Identified) -> Iterator[Outcome]:
        """Count, issue, commit, release one identified batch."""
        t0, size, accepted, refused = identified
        _fault("after-identify")
        known = self._store.known_devices(
            self._job_hash, ledger.KIND_PROVISIONED, [i.device_id for _, i in accepted]
        )
        fresh: list[tuple[DevicePort, Identity]] = []
        for dev, ident in accepted:
            if ident.device_id in known:
                refused.append(
                    Refused(
                        ident.device_id,
                        AlreadyProvisionedError(
                            f"device {ident.device_id} was already provisioned under this job"
                        ),
                    )
                )
            else:
                fresh.append((dev, ident))
        # Count exactly the devices of this batch, durably, before anything is issued (S3).
        slots: Sequence[int] = ()
        quota_error: QuotaExceededError | None = None
        if fresh:
            try:
                slots = self._store.reserve(self._job_hash, len(fresh))
            except QuotaExceededError as exc:
                quota_error = exc
            _fault("after-reserve")
        work = [(dev, ident, slot) for (dev, ident), slot in zip(fresh, slots, strict=False)]
        for _dev, ident in fresh[len(slots) :]:
            refused.append(
                Refused(
                    ident.device_id,
                    quota_error
                    or QuotaExceededError(f"quota of {self.job.job.quota} devices is exhausted"),
                )
            )

        now = int(self._clock())
        pending: list[ledger.PendingRecord] = []
        issued: dict[str, tuple[DevicePort, x509.Certificate, bytes, bytes]] = {}
        for dev, ident, slot in work:
            cert = self._issuer.issue(ident.public_key, ident.device_id, slot)
            _fault("after-certificate")
            lic = self._licenses.issue(ident.device_id, ident.public_key)
            _fault("after-license")
            der = cert.public_bytes(serialization.Encoding.DER)
            pending.append(
                ledger.PendingRecord(
                    kind=ledger.KIND_PROVISIONED,
                    slot=slot,
                    device_id=ident.device_id,
                    time=now,
                    cert=der,
                    license_sha256=ledger.sha256(lic),
                )
            )
            issued[ident.device_id] = (dev, cert, der, lic)
        _fault("before-commit")
        committed = self._store.commit(self._job_hash, pending, self._sign_checkpoint)
        _fault("after-commit")
        for dup in committed.duplicates:
            refused.append(
                Refused(
                    dup.device_id,
                    AlreadyProvisionedError(
                        f"device {dup.device_id} was provisioned concurrently by another worker"
                    ),
                )
            )
        yield from refused
        elapsed = (time.perf_counter() - t0) / max(size, 1)
        for rec, seq, _raw in committed.records:
            dev, cert, der, lic = issued[rec.device_id]
            dev.provision(self._packager(der))  # release: only after the commit above
            _fault("mid-release")
            yield Provisioned(
                device_id=rec.device_id,
                slot=rec.slot,
                seq=seq,
                certificate=cert,
                license=lic,
                elapsed_s=elapsed,
            )
        _fault("after-release")

    def _sign_checkpoint(self, upto: int, head: bytes) -> bytes:
        return ledger.sign_checkpoint(
            self._ledger_key, job=self._job_hash, upto=upto, head=head, time=int(self._clock())
        )

    # --- flow 8 -----------------------------------------------------------------------------

    def program(
        self,
        items: Iterable[tuple[DevicePort, Provisioned]],
        *,
        manifest: bytes,
        open_image: Callable[[], BinaryIO],
        verify_boot: BootVerifier,
    ) -> Iterator[tuple[str, Error | None]]:
        """Program provisioned devices; append a ledger record per verified boot.

        Yields ``(device_id, None)`` for a device that booted the image, or
        ``(device_id, error)`` for one whose SBM refused it or whose confirmation failed.
        """
        pending: list[ledger.PendingRecord] = []
        results: list[tuple[str, Error | None]] = []

        def flush() -> Iterator[tuple[str, Error | None]]:
            if pending:
                self._store.commit(self._job_hash, pending, self._sign_checkpoint)
                pending.clear()
            yield from results
            results.clear()

        for dev, prov in items:
            nonce = os.urandom(16)
            try:
                with open_image() as image:
                    boot = dev.program(manifest, image, prov.license, nonce)
                verify_boot(prov.certificate, nonce, boot)
            except Error as exc:
                results.append((prov.device_id, exc))
                continue
            pending.append(
                ledger.PendingRecord(
                    kind=ledger.KIND_PROGRAMMED,
                    slot=prov.slot,
                    device_id=prov.device_id,
                    time=int(self._clock()),
                    boot=boot,
                )
            )
            results.append((prov.device_id, None))
            if len(pending) >= self.batch_size:
                yield from flush()
        yield from flush()
