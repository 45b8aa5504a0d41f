"""The per-device production pipeline on the programmer (flows 7 and 8).

Per batch of devices::

    identify (challenge, proof of possession, vendor chain under a vendor CA the job names,
              job targets, not seen before)
      -> count: reserve exactly this batch's slots, durably, in the store (S3)
      -> issue the device certificate (production CA key in the token)
      -> create the license (ECDH + KEK derivation + KWP wrap in the token)
      -> commit the ledger records, a signed checkpoint and what is released, in one
         transaction (S4)
      -> keep the device certificates (the archive: files written atomically)
      -> release certificate and trust anchors to the device

The job's stage changes two steps (``job.stage``, docs/formats.md "Job stages"): a "provision"
job (the silicon vendor's fab) licenses nothing and programs nothing; a "program" job (the
programming centre, chips provisioned at a fab) identifies each chip by the OEM device
certificate it carries, under a production CA its ``provisioned_by`` names
(:class:`~securethread.formats.identity.ProvisionedIdentityVerifier`), issues no certificate
and releases no provisioning data (:meth:`ProductionLine._license_provisioned`: a "licensed"
record naming the chip's certificate by its hash), then programs as any job.

Nothing leaves for a device before its slot and its ledger record are on disk.  Slots the
batch does not use go back to the store (a refused device, a duplicate, a failure); if the
process dies, the run's end reclaims them (or, the leader killed, the next run burns them:
see the store).  Programming (flow 8) is a separate stage: the device's SBM takes
manifest, image and license, and its signed boot confirmation is checked
and appended to the ledger.  A device counted but not programmed (killed, stopped, refused
its image) is met again on a later run: it gets what it was released the first time -- the
same certificate, provisioning data and license, kept in the store -- and is programmed,
without a second count (:attr:`Provisioned.recovered`).

A device the line refuses never stops the line: whatever a device (or the bytes it sends)
makes fail -- identification, release, programming, even an exception from its port -- is
that device's refusal with its reason, and the batch goes on.  Only token trouble
(:class:`~securethread.errors.HSMError`), store trouble
(:class:`~securethread.errors.StoreError`) or a configuration error stops it.

Batching is what makes this fast: one database transaction and one checkpoint signature
per batch, one slot reservation per batch, and nothing per device but the token calls
the floor needs plus the checks that must be per device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO, NamedTuple, Protocol

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    AlreadyProvisionedError,
    ConfigurationError,
    DeviceRefusedError,
    Error,
    HSMError,
    QuotaExceededError,
    StoreError,
    VerificationError,
    name_exception,
)
from securethread.formats import ledger
from securethread.formats.identity import (
    NotProvisionedChipError,
    ProvisionedIdentity,
    UnknownProductionCAError,
    UnknownVendorError,
)
from securethread.formats.job import STAGE_PROGRAM, VerifiedJob
from securethread.keys.protocol import PrivateKey
from securethread.programmer.store import MarkKeeper, ProductionStore, Release

# --- test hooks: injected by tests, never read from the environment ------------------------------


class FaultHook(Protocol):
    """Called with the name of each fault point the pipeline passes (crash-safety tests)."""

    def __call__(self, point: str) -> None: ...


def no_faults(point: str) -> None:
    """The production hook: does nothing."""


NO_FAULTS: FaultHook = no_faults

FAULT_POINTS = (
    "after-identify",
    "after-reserve",
    "after-certificate",
    "after-license",
    "before-commit",
    "after-commit",
    "mid-release",
    "after-release",
    "mid-program",
    "after-program",
)

#: Errors that stop the run: the token or the store failed, or the setup is wrong.
FATAL: tuple[type[Error], ...] = (HSMError, StoreError, ConfigurationError)


class ReleaseError(DeviceRefusedError):
    """A counted device did not take what was released to it; a later run retries it."""


class ProgrammingError(DeviceRefusedError):
    """Programming a device failed in a way its SBM did not report as a refusal."""


describe = name_exception  # one line naming an exception of untrusted input


# --- what the pipeline talks to ----------------------------------------------------------------


class DevicePort(Protocol):
    """The programming adapter's view of one device (a simulated device in tests)."""

    def identify(self, challenge: bytes) -> bytes: ...

    def provision(self, data: bytes) -> None: ...

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes: ...


class Identity(Protocol):
    """What identification established (read-only: frozen results satisfy it):
    ``vendor_ca`` is the SHA-256 of the key of the vendor CA that certified the chip."""

    @property
    def device_id(self) -> str: ...

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    @property
    def vendor_ca(self) -> bytes: ...


class CertificateIssuer(Protocol):
    def issue(
        self, device_public_key: ec.EllipticCurvePublicKey, device_id: str, sequence: int
    ) -> x509.Certificate: ...


class LicenseMaker(Protocol):
    def issue(self, device_id: str, device_public_key: ec.EllipticCurvePublicKey) -> bytes: ...


class CertificateArchive(Protocol):
    """Keeps device certificates durably; called after the commit, before the release."""

    def keep(self, certificates: Sequence[tuple[str, bytes]]) -> None:
        """``(device_id, certificate DER)`` pairs; raise to stop the release."""
        ...


class NoArchive:
    """Keeps nothing: the certificates are in the ledger only."""

    def keep(self, certificates: Sequence[tuple[str, bytes]]) -> None:
        return None


NO_ARCHIVE = NoArchive()

#: What identification established, by the job's stage.
Identified = Identity | ProvisionedIdentity
#: Verifies an identification response for a challenge; raises DeviceRefusedError.  A
#: "program" job's verifier identifies chips by their OEM device certificate instead
#: (:class:`~securethread.formats.identity.ProvisionedIdentity`).
IdentityVerifier = Callable[[bytes, bytes], Identified]
#: Builds the provisioning data released to a device, from its certificate's DER.
Packager = Callable[[bytes], bytes]
#: Verifies a boot confirmation (device cert, nonce, confirmation); raises.
BootVerifier = Callable[[x509.Certificate, bytes, bytes], None]


@attrs.frozen
class Provisioned:
    """A device that received its certificate; ``license`` is for the programming stage.

    ``recovered``: it was counted on an earlier run and not programmed; what it received
    now is what was released to it then."""

    device_id: str
    slot: int
    seq: int
    certificate: x509.Certificate
    license: bytes
    elapsed_s: float
    recovered: bool = False


@attrs.frozen
class Refused:
    """A device the line refused before counting it (no slot used)."""

    device_id: str | None
    reason: Error

    @property
    def kind(self) -> str:
        return type(self.reason).__name__


@attrs.frozen
class Unreleased:
    """A device counted and recorded whose release failed; a later run releases it."""

    device_id: str
    reason: Error

    @property
    def kind(self) -> str:
        return type(self.reason).__name__


@attrs.frozen
class AlreadyDone(Refused):
    """A device provisioned and programmed under this job before (a resumed run meets it
    again); refused as :class:`~securethread.errors.AlreadyProvisionedError`."""


Outcome = Provisioned | Refused | Unreleased


@attrs.frozen
class BatchResult:
    """One batch through flow 7: an outcome per device, and the devices to program now.

    ``stopped``: the stop request came before anything was counted; nothing was done."""

    outcomes: list[Outcome]
    to_program: list[tuple[DevicePort, Provisioned]]
    stopped: bool = False


class _Identified(NamedTuple):
    started: float  # perf_counter when the batch's identification began
    size: int
    accepted: list[tuple[DevicePort, Identified]]
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


def _never() -> bool:
    return False


def _spki(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ProductionLine:
    """One worker's provisioning pipeline for one verified job.

    Several lines (in separate processes) may run against the same job and store within
    one run: the store serialises reservations and commits, and refuses a second record
    for a device.  ``run`` names the run the line's reservations belong to; ``guard`` (no
    default) keeps the token's quota mark ahead of the store (S7; passing ``UNGUARDED`` is
    an explicit choice for tests and benchmarks); ``faults`` and ``archive`` are hooks
    (tests; device-certificate files).
    """

    def __init__(
        self,
        *,
        job: VerifiedJob,
        store: ProductionStore,
        identify: IdentityVerifier,
        issuer: CertificateIssuer | None,
        licenses: LicenseMaker | None,
        ledger_key: PrivateKey,
        packager: Packager | None,
        batch_size: int = 32,
        clock: Callable[[], float] = time.time,
        guard: MarkKeeper,
        run: bytes = b"",
        faults: FaultHook = NO_FAULTS,
        archive: CertificateArchive = NO_ARCHIVE,
    ) -> None:
        if not 1 <= batch_size <= ledger.MAX_BATCH:  # one checkpoint covers at most MAX_BATCH
            raise ValueError(f"batch_size must be 1..{ledger.MAX_BATCH}")
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
        self._guard = guard
        self._run = run
        self._fault = faults
        self._archive = archive
        self._vendors = frozenset(job.job.vendors)
        # A "program" job: chips provisioned under the jobs it names; no certificate issued.
        self._program = job.job.stage == STAGE_PROGRAM
        self._provisioned_by = frozenset(job.job.provisioned_by)
        self._counted = ledger.KIND_LICENSED if self._program else ledger.KIND_PROVISIONED
        if (issuer is None or packager is None) != self._program:
            raise ConfigurationError(
                "a line issues certificates and provisioning data iff its job provisions"
            )
        if (licenses is None) == job.job.programs:  # a "provision" job licenses nothing
            raise ConfigurationError("a line issues licenses iff its job programs")
        store.open_job(
            job=job.sha256, job_id=job.job.job_id, quota=job.job.quota, signed=job.signed
        )

    # --- flow 7 -----------------------------------------------------------------------------

    def provision(self, devices: Iterable[DevicePort]) -> Iterator[Outcome]:
        """Provision ``devices``; yields one outcome per device, in batches."""
        for batch in _batches(devices, self.batch_size):
            yield from self.provision_batch(batch).outcomes

    def provision_batch(
        self, batch: Sequence[DevicePort], *, stop: Callable[[], bool] = _never
    ) -> BatchResult:
        """One batch through flow 7.  ``stop`` is asked once, after identification: if it
        says so, the batch is dropped before anything is counted."""
        identified = self._identify_batch(batch)
        self._fault("after-identify")
        if stop():
            return BatchResult([], [], stopped=True)
        return self._finish_batch(identified)

    def _check_window(self) -> None:
        from securethread.formats.job import check_job_window

        check_job_window(self.job.job, int(self._clock()))

    def _identify_batch(self, batch: Sequence[DevicePort]) -> _Identified:
        """Challenge, proof of possession, vendor chain, the job's vendor CAs, targets: no
        state is changed."""
        t0 = time.perf_counter()
        self._check_window()
        targets = self.job.job.targets
        accepted: list[tuple[DevicePort, Identified]] = []
        refused: list[Refused] = []
        seen: set[str] = set()
        for dev in batch:
            challenge = os.urandom(32)
            try:
                ident = self._identify(dev.identify(challenge), challenge)
                self._check_origin(ident)
                targets.check(ident.device_id)
                if ident.device_id in seen:
                    raise AlreadyProvisionedError(f"device {ident.device_id} appears twice")
            except FATAL:
                raise
            except DeviceRefusedError as exc:
                refused.append(Refused(getattr(exc, "device_id", None), exc))
                continue
            except Exception as exc:  # whatever a hostile device makes fail: its refusal
                refused.append(
                    Refused(None, DeviceRefusedError(f"identification failed: {describe(exc)}"))
                )
                continue
            seen.add(ident.device_id)
            accepted.append((dev, ident))
        return _Identified(t0, len(batch), accepted, refused)

    def _check_origin(self, ident: Identified) -> None:
        """Where the chip comes from is one the job names: its vendor CA (a job that
        provisions), or the production CA it was provisioned under (a "program" job)."""
        if isinstance(ident, ProvisionedIdentity):
            self._check_provisioned_by(ident)
        elif self._program:
            raise NotProvisionedChipError(
                f"device {ident.device_id} carries no OEM device certificate; job "
                f"{self.job.job.job_id} programs only chips provisioned under the jobs it names"
            )
        else:
            self._check_vendor(ident)

    def _check_provisioned_by(self, ident: ProvisionedIdentity) -> None:
        """A "program" job: the chip's production CA is one the officer-signed job names in
        ``provisioned_by`` (the ledger records it; joint reconciliation checks it again)."""
        if not self._program or ident.production_ca not in self._provisioned_by:
            raise UnknownProductionCAError(
                f"device {ident.device_id}: provisioned under production CA "
                f"{ident.production_ca.hex()[:16]}, which job {self.job.job.job_id} does not "
                "name"
            )

    def _check_vendor(self, ident: Identity) -> None:
        """The chip's vendor CA is one the officer-signed job names, whatever identifier
        the line was given (the ledger records it; reconciliation checks it again)."""
        if ident.vendor_ca not in self._vendors:
            raise UnknownVendorError(
                f"device {ident.device_id}: certified by vendor CA {ident.vendor_ca.hex()[:16]}, "
                f"which job {self.job.job.job_id} does not name"
            )

    def _finish_batch(self, identified: _Identified) -> BatchResult:
        """Count, issue, commit, keep, release one identified batch."""
        t0, size, accepted, refused = identified
        fresh, recover = self._sort_known(accepted, refused)
        outcomes: list[Outcome] = list(refused)
        slots = self._reserve(fresh, outcomes)
        work = list(zip(fresh, slots, strict=False))
        try:
            committed, issued = self._issue_and_commit(work, outcomes)
        except BaseException:
            # Token or store trouble, or an interrupt: nothing of this batch was released.
            self._give_back_quietly(slots)
            raise
        elapsed = (time.perf_counter() - t0) / max(size, 1)
        released = [(issued[rec.device_id], rec, seq) for rec, seq, _raw in committed]
        self._archive.keep(
            [(rec.device_id, issued[rec.device_id][2]) for rec, _seq, _raw in committed]
            + [(rel.device_id, rel.certificate) for _dev, _ident, rel in recover]
        )
        to_program: list[tuple[DevicePort, Provisioned]] = []
        for (dev, cert, _der, lic, data), rec, seq in released:
            try:
                if not self._program:  # a "program" job's chip keeps its fab's data
                    dev.provision(data)  # release: only after the commit above
            except Exception as exc:
                outcomes.append(Unreleased(rec.device_id, _release_error(exc)))
                continue
            finally:
                self._fault("mid-release")
            prov = Provisioned(rec.device_id, rec.slot, seq, cert, lic, elapsed)
            outcomes.append(prov)
            to_program.append((dev, prov))
        for dev, _ident, rel in recover:
            prov_or_not = self._release_again(dev, rel, elapsed)
            outcomes.append(prov_or_not)
            if isinstance(prov_or_not, Provisioned):
                to_program.append((dev, prov_or_not))
        self._fault("after-release")
        return BatchResult(outcomes, to_program)

    def _sort_known(
        self, accepted: list[tuple[DevicePort, Identified]], refused: list[Refused]
    ) -> tuple[list[tuple[DevicePort, Identified]], list[tuple[DevicePort, Identified, Release]]]:
        """New devices; devices counted by an earlier run and not programmed (to recover);
        the rest were provisioned already (and programmed, or in flight in this run)."""
        ids = [i.device_id for _, i in accepted]
        known = self._store.known_devices(self._job_hash, self._counted, ids)
        pending = self._store.unprogrammed(self._job_hash, sorted(known)) if known else {}
        fresh: list[tuple[DevicePort, Identified]] = []
        recover: list[tuple[DevicePort, Identified, Release]] = []
        for dev, ident in accepted:
            did = ident.device_id
            if did not in known:
                fresh.append((dev, ident))
                continue
            rel = pending.get(did)
            if rel is None:
                refused.append(
                    AlreadyDone(
                        did,
                        AlreadyProvisionedError(
                            f"device {did} was already {self._counted}"
                            + (" and programmed" if self.job.job.programs else "")
                            + " under this job"
                        ),
                    )
                )
            elif rel.run == self._run:
                refused.append(
                    Refused(
                        did,
                        AlreadyProvisionedError(
                            f"device {did} was provisioned earlier in this run (met twice)"
                        ),
                    )
                )
            elif _spki(x509.load_der_x509_certificate(rel.certificate).public_key()) != _spki(
                ident.public_key
            ):
                refused.append(
                    Refused(
                        did,
                        DeviceRefusedError(
                            f"device {did} answers with another key than the one certified "
                            "for it on an earlier run"
                        ),
                    )
                )
            else:
                recover.append((dev, ident, rel))
        return fresh, recover

    def _reserve(
        self, fresh: list[tuple[DevicePort, Identified]], outcomes: list[Outcome]
    ) -> list[int]:
        """Count exactly the new devices of this batch, durably, before anything is issued
        (S3); the devices beyond the quota are refused."""
        slots: list[int] = []
        quota_error: QuotaExceededError | None = None
        if fresh:
            try:
                slots = self._store.reserve(
                    self._job_hash, len(fresh), run=self._run, guard=self._guard
                )
            except QuotaExceededError as exc:
                quota_error = exc
            self._fault("after-reserve")
        for _dev, ident in fresh[len(slots) :]:
            outcomes.append(
                Refused(
                    ident.device_id,
                    quota_error
                    or QuotaExceededError(f"quota of {self.job.job.quota} devices is exhausted"),
                )
            )
        return slots

    def _issue_and_commit(
        self,
        work: list[tuple[tuple[DevicePort, Identified], int]],
        outcomes: list[Outcome],
    ) -> tuple[
        list[tuple[ledger.PendingRecord, int, bytes]],
        dict[str, tuple[DevicePort, x509.Certificate, bytes, bytes, bytes]],
    ]:
        now = int(self._clock())
        pending: list[ledger.PendingRecord] = []
        releases: dict[str, Release] = {}
        issued: dict[str, tuple[DevicePort, x509.Certificate, bytes, bytes, bytes]] = {}
        unused: list[int] = []
        for (dev, ident), slot in work:
            try:
                if isinstance(ident, ProvisionedIdentity):
                    cert, der, lic, data, record = self._license_provisioned(ident, slot, now)
                else:
                    cert, der, lic, data, record = self._certify_and_license(ident, slot, now)
            except FATAL:
                raise
            except Exception as exc:  # the device's key or id made issuance fail
                unused.append(slot)
                reason = exc if isinstance(exc, VerificationError) else None
                outcomes.append(
                    Refused(
                        ident.device_id,
                        reason
                        or DeviceRefusedError(
                            f"device {ident.device_id}: issuance failed: {describe(exc)}"
                        ),
                    )
                )
                continue
            pending.append(record)
            releases[ident.device_id] = Release(ident.device_id, slot, der, data, lic)
            issued[ident.device_id] = (dev, cert, der, lic, data)
        self._fault("before-commit")
        committed = self._store.commit(
            self._job_hash, pending, self._sign_checkpoint, releases=releases, run=self._run
        )
        self._fault("after-commit")
        if unused:
            self._store.give_back(self._job_hash, unused, run=self._run)
        for dup in committed.duplicates:
            outcomes.append(
                Refused(
                    dup.device_id,
                    AlreadyProvisionedError(
                        f"device {dup.device_id} was provisioned concurrently by another worker"
                    ),
                )
            )
        return committed.records, issued

    def _certify_and_license(
        self, ident: Identity, slot: int, now: int
    ) -> tuple[x509.Certificate, bytes, bytes, bytes, ledger.PendingRecord]:
        """A job that provisions: the device certificate, the license, the provisioning
        data, and the "provisioned" record naming the chip's vendor CA."""
        assert self._issuer is not None and self._packager is not None  # checked at __init__
        cert = self._issuer.issue(ident.public_key, ident.device_id, slot)
        self._fault("after-certificate")
        lic = b""  # a "provision" job (the fab): no license, and a record without its hash
        if self._licenses is not None:
            lic = self._licenses.issue(ident.device_id, ident.public_key)
            self._fault("after-license")
        der = cert.public_bytes(serialization.Encoding.DER)
        data = self._packager(der)
        record = ledger.PendingRecord(
            kind=ledger.KIND_PROVISIONED,
            slot=slot,
            device_id=ident.device_id,
            time=now,
            cert=der,
            license_sha256=ledger.sha256(lic) if self._licenses is not None else b"",
            vendor_ca=ident.vendor_ca,
        )
        return cert, der, lic, data, record

    def _license_provisioned(
        self, ident: ProvisionedIdentity, slot: int, now: int
    ) -> tuple[x509.Certificate, bytes, bytes, bytes, ledger.PendingRecord]:
        """A "program" job: no certificate and no provisioning data (the chip carries both
        from its fab); the license, and the "licensed" record naming the chip's certificate
        and production CA by their hashes."""
        assert self._licenses is not None  # checked at __init__: a program job programs
        lic = self._licenses.issue(ident.device_id, ident.public_key)
        self._fault("after-license")
        cert = x509.load_der_x509_certificate(ident.device_certificate)
        record = ledger.PendingRecord(
            kind=ledger.KIND_LICENSED,
            slot=slot,
            device_id=ident.device_id,
            time=now,
            license_sha256=ledger.sha256(lic),
            cert_sha256=ident.certificate_sha256,
            production_ca=ident.production_ca,
        )
        return cert, ident.device_certificate, lic, b"", record

    def _give_back_quietly(self, slots: Sequence[int]) -> None:
        """Best effort after a failure: slots that stay reserved are reclaimed at the run's
        end (burned by the next run if the run was killed)."""
        if not slots:
            return
        try:
            self._store.give_back(self._job_hash, slots, run=self._run)
        except Error:
            pass

    def _release_again(self, dev: DevicePort, rel: Release, elapsed: float) -> Outcome:
        """A device counted on an earlier run: the same provisioning data again (a chip
        that kept it refuses it as already provisioned, which is fine)."""
        try:
            if not self._program:
                dev.provision(rel.provisioning)
        except AlreadyProvisionedError:
            pass
        except Exception as exc:
            return Unreleased(rel.device_id, _release_error(exc))
        finally:
            self._fault("mid-release")
        cert = x509.load_der_x509_certificate(rel.certificate)
        return Provisioned(rel.device_id, rel.slot, -1, cert, rel.license, elapsed, True)

    def _sign_checkpoint(self, upto: int, head: bytes) -> bytes:
        return ledger.sign_checkpoint(
            self._ledger_key, job=self._job_hash, upto=upto, head=head, time=int(self._clock())
        )

    def released(self, provisioned: Sequence[Provisioned]) -> None:
        """A "provision" job's end for devices that took their provisioning data: nothing
        follows at this appliance (no license, no image), so what was released to them is
        forgotten (:meth:`ProductionStore.released`) and a chip met again is refused as
        done.  A device whose release failed keeps it, for a later run to release again."""
        if self.job.job.programs:
            raise ConfigurationError(
                f"job {self.job.job.job_id} programs its devices: their programming ends them"
            )
        self._store.released(self._job_hash, [p.device_id for p in provisioned])

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
        ``(device_id, error)`` for one whose SBM refused it or whose confirmation failed
        (it stays counted, with what it was released, for a later run).
        """
        pending: list[ledger.PendingRecord] = []
        results: list[tuple[str, Error | None]] = []

        def flush() -> Iterator[tuple[str, Error | None]]:
            if pending:
                self._store.commit(
                    self._job_hash, pending, self._sign_checkpoint, run=self._run
                )
                pending.clear()
                self._fault("after-program")
            yield from results
            results.clear()

        for dev, prov in items:
            nonce = os.urandom(16)
            try:
                image = open_image()
            except OSError as exc:
                raise ConfigurationError(f"cannot open the image: {exc.strerror}") from None
            try:
                with image:
                    boot = dev.program(manifest, image, prov.license, nonce)
                verify_boot(prov.certificate, nonce, boot)
            except FATAL:
                raise
            except Error as exc:
                results.append((prov.device_id, exc))
                continue
            except Exception as exc:  # a hostile device's answer: its refusal
                results.append(
                    (prov.device_id, ProgrammingError(f"programming failed: {describe(exc)}"))
                )
                continue
            self._fault("mid-program")
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


def _release_error(exc: Exception) -> Error:
    if isinstance(exc, Error) and not isinstance(exc, FATAL):
        return exc
    return ReleaseError(f"release failed: {describe(exc)}")
