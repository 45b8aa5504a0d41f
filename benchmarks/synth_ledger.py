"""Synthetic production ledgers of any size, on software keys (no token).

A 1,000,000-device ledger cannot be made with real per-device HSM work in a benchmark's
time, so the OEM side (root, officers, programmer certificates, production CA, manifest,
job) and the programmer side (ledger key, device certificates, boot confirmations) are
built here from real keys of :class:`securethread.hsm.SoftwareBackend` and the real formats,
the way ``tests/unit/ledger_world.py`` builds its small worlds; nothing is mocked, and the
ledger reconciles under :func:`securethread.formats.reconciliation.reconcile_export`.

Each device has its own chip key (unique, as reconciliation demands), a certificate issued
by the production CA through :class:`securethread.pki.DeviceCertificateIssuer`, and a boot
confirmation signed by its key.  Records are written streaming (a checkpoint per batch, the
close record last), so memory does not grow with the ledger.

``python -m benchmarks.synth_ledger OUT --devices N`` writes one (and prints the world's
public files beside it, for ``audit reconcile``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.formats import ledger
from securethread.formats.boot import BOOT_CONFIRMATION_KIND
from securethread.formats.boot import VERSION as BOOT_VERSION
from securethread.formats.envelope import seal
from securethread.formats.image import MIN_CHUNK_SIZE, NONCE_PREFIX_SIZE, Manifest, sign_manifest
from securethread.formats.job import ProductionJob, Targets, cosign_job, job_hash, sign_job
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from securethread.keys.ecutil import fingerprint, spki_der
from securethread.keys.protocol import PrivateKey
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    cert_fingerprint,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
)

JOB_ID = "synth-job"
ENCLAVE = "synth-prog"
ORG = "Synthetic OEM"
#: First device id: chip UIDs are BASE, BASE + 1, ... (16 hex digits).
BASE = 0x5E00_0000_0000_0000


class _Chip:
    """A chip's key for its boot confirmation: the two calls :func:`envelope.seal` makes."""

    __slots__ = ("_key", "_public")

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._public = self._key.public_key()

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


@attrs.define
class SynthWorld:
    """The public side of one job (what the OEM keeps) and the keys that made its ledger."""

    backend: SoftwareBackend
    root: x509.Certificate
    root_key: PrivateKey
    officer_keys: Sequence[PrivateKey]
    programmer_cert: x509.Certificate
    ledger_cert: x509.Certificate
    ledger_key: PrivateKey
    pca: x509.Certificate
    pca_key: PrivateKey
    issuer: DeviceCertificateIssuer
    job: ProductionJob
    job_signed: bytes
    manifest: Manifest
    manifest_signed: bytes
    vendor_ca: bytes
    now: int

    @property
    def job_sha256(self) -> bytes:
        return job_hash(self.job_signed)

    def device_id(self, slot: int) -> str:
        return f"{BASE + slot:016x}"

    def reconcile_args(self) -> dict[str, Any]:
        """Keyword arguments of :func:`reconcile_export` for this job."""
        return {
            "issued_job": self.job_signed,
            "officers": [k.public_key() for k in self.officer_keys],
            "min_threshold": 2,
            "root_cert": self.root,
            "programmer_cert": self.programmer_cert,
            "ledger_cert": self.ledger_cert,
            "production_ca_cert": self.pca,
            "manifest": self.manifest_signed,
        }

    def write_public_files(self, directory: Path) -> dict[str, str]:
        """The files ``securethread audit reconcile`` needs, PEM or as signed."""
        from securethread.formats.onboarding import OfficerBundle

        directory.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        files = {
            "root": ("root.pem", self.root.public_bytes(pem)),
            "programmer_cert": ("programmer.pem", self.programmer_cert.public_bytes(pem)),
            "ledger_cert": ("ledger.pem", self.ledger_cert.public_bytes(pem)),
            "production_ca": ("production-ca.pem", self.pca.public_bytes(pem)),
            "job": ("job.bin", self.job_signed),
            "manifest": ("manifest.bin", self.manifest_signed),
            "officers": (
                "officers.bin",
                OfficerBundle(
                    tuple(spki_der(k.public_key()) for k in self.officer_keys), 2
                ).seal(self.root_key),
            ),
        }
        out = {}
        for what, (name, data) in files.items():
            (directory / name).write_bytes(data)
            out[what] = str(directory / name)
        return out


def _certify(
    b: SoftwareBackend, root_key: PrivateKey, root: x509.Certificate, label: str, purpose: Any
) -> x509.Certificate:
    csr = create_enclave_csr(b, label=label, enclave_name=ENCLAVE, purpose=purpose)
    return certify_enclave(
        root_key, root, csr, enclave_name=ENCLAVE, purpose=purpose, role="programmer"
    )


def make_world(quota: int, *, job_id: str = JOB_ID, label: str = "synth") -> SynthWorld:
    """A job for ``quota`` devices (targets BASE .. BASE + quota - 1), window around now."""
    b = SoftwareBackend(label)
    root = create_root_ca(b, label="root", organisation=ORG)
    root_key = b.private_key("root")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    nb = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    window = (nb, now + datetime.timedelta(days=1))
    csr = create_production_ca_csr(b, label="pca", job_id=job_id)
    pca = certify_production_ca(
        root_key, root, csr, job_id=job_id, not_before=window[0], not_after=root.not_valid_after_utc
    )
    programmer_cert = _certify(b, root_key, root, "p-id", EnclavePurpose.IDENTITY)
    ledger_cert = _certify(b, root_key, root, "p-ledger", EnclavePurpose.LEDGER_SIGNING)
    fw = b.generate_ec("fw", curve=Curve.P256, policy=SIGNING)
    manifest = Manifest(
        image_id="synth-img",
        image_version="1.0.0",
        security_counter=1,
        device_class="synth",
        plaintext_length=1000,
        plaintext_sha256=hashlib.sha256(b"synthetic firmware").digest(),
        ciphertext_sha256=b"\x03" * 32,
        chunk_size=MIN_CHUNK_SIZE,
        nonce_prefix=b"\x04" * NONCE_PREFIX_SIZE,
        header_sha256=b"\x06" * 32,
        image_key_id=b"image-key",
    )
    manifest_signed = sign_manifest(manifest, fw)
    officers = [b.generate_ec(f"o{i}", curve=Curve.P256, policy=SIGNING) for i in range(2)]
    vendor = b.generate_ec("vendor-ca", curve=Curve.P256, policy=SIGNING)
    vendor_ca = fingerprint(vendor.public_key())
    profile = DeviceProfile(organisation=ORG, not_after=pca.not_valid_after_utc)
    job_fields: dict[str, Any] = dict(
        job_id=job_id, device_class="synth",
        targets=Targets(ranges=((BASE, BASE + max(quota, 1) - 1),)), quota=max(quota, 1),
        not_before=int(window[0].timestamp()), not_after=int(window[1].timestamp()),
        image_id="synth-img", manifest_sha256=hashlib.sha256(manifest_signed).digest(),
        programmer=cert_fingerprint(programmer_cert), threshold=2, certificate=profile,
        production_ca=cert_fingerprint(pca),
    )  # fmt: skip
    if "vendors" in attrs.fields_dict(ProductionJob):
        job_fields["vendors"] = (vendor_ca,)
    job = ProductionJob(**job_fields)
    job_signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    issuer = DeviceCertificateIssuer(
        b.private_key("pca"), pca, job_id=job_id, job_tag=job_hash(job_signed), profile=profile
    )
    return SynthWorld(
        backend=b,
        root=root,
        root_key=root_key,
        officer_keys=officers,
        programmer_cert=programmer_cert,
        ledger_cert=ledger_cert,
        ledger_key=b.private_key("p-ledger"),
        pca=pca,
        pca_key=b.private_key("pca"),
        issuer=issuer,
        job=job,
        job_signed=job_signed,
        manifest=manifest,
        manifest_signed=manifest_signed,
        vendor_ca=vendor_ca,
        now=int(now.timestamp()),
    )


_HAS_VENDOR_CA = "vendor_ca" in attrs.fields_dict(ledger.PendingRecord)


def device_records(
    w: SynthWorld, slot: int, *, programmed: bool = True, chip: _Chip | None = None
) -> list[ledger.PendingRecord]:
    """The provisioned record of the device in ``slot`` (and its programmed record)."""
    chip = chip or _Chip()
    device_id = w.device_id(slot)
    cert = w.issuer.issue(chip.public_key(), device_id, slot)
    extra = {"vendor_ca": w.vendor_ca} if _HAS_VENDOR_CA else {}
    out = [
        ledger.PendingRecord(
            kind=ledger.KIND_PROVISIONED,
            slot=slot,
            device_id=device_id,
            time=w.now,
            cert=cert.public_bytes(serialization.Encoding.DER),
            license_sha256=hashlib.sha256(device_id.encode()).digest(),
            **extra,
        )
    ]
    if programmed:
        boot = seal(
            BOOT_CONFIRMATION_KIND,
            {
                "v": BOOT_VERSION,
                "device_id": device_id,
                "image_id": w.manifest.image_id,
                "image_version": w.manifest.image_version,
                "security_counter": w.manifest.security_counter,
                "plaintext_sha256": w.manifest.plaintext_sha256,
                "nonce": os.urandom(16),
            },
            [chip],  # type: ignore[list-item]  # _Chip has the two methods seal uses
        )
        out.append(
            ledger.PendingRecord(
                kind=ledger.KIND_PROGRAMMED, slot=slot, device_id=device_id, time=w.now, boot=boot
            )
        )
    return out


#: The world a forked synthesis worker inherits (set before the pool forks).
_FORKED: tuple[SynthWorld, bool] | None = None


def _batch(bounds: tuple[int, int]) -> list[ledger.PendingRecord]:
    assert _FORKED is not None
    w, programmed = _FORKED
    out: list[ledger.PendingRecord] = []
    for slot in range(*bounds):
        out += device_records(w, slot, programmed=programmed)
    return out


def _batches(
    w: SynthWorld, devices: int, batch: int, programmed: bool, workers: int
) -> Iterator[list[ledger.PendingRecord]]:
    """Each batch's records, made here or by ``workers`` forked processes (in order)."""
    bounds = [(s, min(s + batch, devices)) for s in range(0, devices, batch)]
    global _FORKED
    _FORKED = (w, programmed)
    try:
        if workers <= 1:
            yield from map(_batch, bounds)
            return
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_batch, bounds, chunksize=16)
    finally:
        _FORKED = None


def _items(
    w: SynthWorld, devices: int, batch: int, programmed: bool, workers: int = 1
) -> Iterator[tuple[str, bytes]]:
    job = w.job_sha256
    head, seq, provisioned, records = job, 0, 0, 0
    for pending in _batches(w, devices, batch, programmed, workers):
        chained = ledger.chain(pending, job=job, start_seq=seq, prev=head)
        for _rec, _seq, raw, h in chained:
            yield ledger.TAG_RECORD, raw
            head = h
        seq += len(chained)
        records += len(chained)
        provisioned += sum(r.kind == ledger.KIND_PROVISIONED for r in pending)
        yield (
            ledger.TAG_CHECKPOINT,
            ledger.sign_checkpoint(w.ledger_key, job=job, upto=seq - 1, head=head, time=w.now),
        )
    totals = ledger.LedgerTotals(
        records=records,
        provisioned=provisioned,
        programmed=records - provisioned,
        head=head,
        quota=w.job.quota,
        quota_used=provisioned,
    )
    close = ledger.CloseRecord.of(totals, job=job, time=w.now)
    yield ledger.TAG_CLOSE, ledger.sign_close(w.ledger_key, close)


def write_ledger(
    w: SynthWorld,
    out: BinaryIO,
    devices: int,
    *,
    batch: int = 32,
    programmed: bool = True,
    workers: int = 1,
) -> int:
    """Write the closed ledger export of ``devices`` devices to ``out`` (records made by
    ``workers`` processes); returns the number of items."""
    if devices > w.job.quota:
        raise ValueError(f"{devices} devices exceed the job's quota of {w.job.quota}")
    items = _items(w, devices, batch, programmed, workers)
    return ledger.write_export(out, w.job_signed, items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the ledger export to write")
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32, help="devices per checkpoint (default 32)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    a = ap.parse_args()
    t0 = time.perf_counter()
    w = make_world(a.devices)
    with open(a.out, "wb") as f:
        write_ledger(w, f, a.devices, batch=a.batch, workers=a.workers)
    files = w.write_public_files(a.out.parent / (a.out.name + ".public"))
    s = time.perf_counter() - t0
    print(json.dumps({"ledger": str(a.out), "devices": a.devices, "seconds": round(s, 1), **files}))


if __name__ == "__main__":
    main()
