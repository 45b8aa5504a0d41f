"""A whole production on the software backend, for ledger and reconciliation tests.

The OEM side (root, officers, programmer certificates, production CA, manifest, job) and
the programmer side (ledger key, device certificates, boot confirmations, ledgers honest or
not) are built from real keys and the real formats; nothing is mocked.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.formats import ledger
from securethread.formats.boot import BOOT_CONFIRMATION_KIND
from securethread.formats.boot import VERSION as BOOT_VERSION
from securethread.formats.envelope import seal
from securethread.formats.image import MIN_CHUNK_SIZE, NONCE_PREFIX_SIZE, Manifest, sign_manifest
from securethread.formats.job import ProductionJob, Targets, cosign_job, job_hash, sign_job
from securethread.formats.reconciliation import ReconciliationReport, reconcile
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint
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
from securethread.pki.profile import ORGANIZATION

JOB_ID = "reconcile-job"
BASE = 0x1000
LAST_TARGET = BASE + 100
QUOTA = 6
ENCLAVE = "prog1"
CHECKPOINT_EVERY = 4
#: The vendor CAs the world's job names (SHA-256 of a CA key; the ledger records which one
#: certified each chip); OTHER_VENDOR_CA is a fab the job does not name.
VENDOR_CA = b"\x0a" * 32
SECOND_VENDOR_CA = b"\x0b" * 32
OTHER_VENDOR_CA = b"\x0c" * 32


@attrs.define
class World:
    backend: SoftwareBackend
    root: x509.Certificate
    root_key: PrivateKey
    programmer_cert: x509.Certificate
    ledger_cert: x509.Certificate
    ledger_key: PrivateKey
    pca: x509.Certificate
    issuer: DeviceCertificateIssuer
    officer_keys: Sequence[PrivateKey]
    job: ProductionJob
    job_signed: bytes
    manifest: Manifest
    manifest_signed: bytes
    window: tuple[datetime.datetime, datetime.datetime]
    now: int
    device_keys: dict[str, PrivateKey] = attrs.field(factory=dict)

    @property
    def officers(self) -> dict[bytes, ec.EllipticCurvePublicKey]:
        return {fingerprint(k.public_key()): k.public_key() for k in self.officer_keys}

    @property
    def job_id(self) -> bytes:
        return job_hash(self.job_signed)

    # --- records ----------------------------------------------------------------------------

    def device_id(self, slot: int) -> str:
        return f"{BASE + slot:016x}"

    def device_key(self, device_id: str) -> PrivateKey:
        if device_id not in self.device_keys:
            self.device_keys[device_id] = self.backend.generate_ec(
                f"dev-{device_id}-{len(self.device_keys)}", curve=Curve.P256, policy=SIGNING
            )
        return self.device_keys[device_id]

    def provisioned(
        self,
        slot: int,
        *,
        t: int | None = None,
        issuer: DeviceCertificateIssuer | None = None,
        device_id: str | None = None,
        key: ec.EllipticCurvePublicKey | None = None,
        vendor_ca: bytes = VENDOR_CA,
    ) -> ledger.PendingRecord:
        device_id = device_id or self.device_id(slot)
        public = key or self.device_key(device_id).public_key()
        cert = (issuer or self.issuer).issue(public, device_id, slot)
        return ledger.PendingRecord(
            kind=ledger.KIND_PROVISIONED,
            slot=slot,
            device_id=device_id,
            time=self.now if t is None else t,
            cert=cert.public_bytes(serialization.Encoding.DER),
            license_sha256=b"\x01" * 32,
            vendor_ca=vendor_ca,
        )

    def boot(self, signer: str, **changes: Any) -> bytes:
        """A boot confirmation signed by device ``signer``'s key (``changes`` to lie)."""
        body = {
            "v": BOOT_VERSION,
            "device_id": signer,
            "image_id": self.manifest.image_id,
            "image_version": self.manifest.image_version,
            "security_counter": self.manifest.security_counter,
            "plaintext_sha256": self.manifest.plaintext_sha256,
            "nonce": b"\x05" * 16,
        }
        body.update(changes)
        return seal(BOOT_CONFIRMATION_KIND, body, [self.device_key(signer)])

    def programmed(self, slot: int, *, boot: bytes | None = None) -> ledger.PendingRecord:
        device_id = self.device_id(slot)
        return ledger.PendingRecord(
            kind=ledger.KIND_PROGRAMMED,
            slot=slot,
            device_id=device_id,
            time=self.now,
            boot=self.boot(device_id) if boot is None else boot,
        )

    def items(
        self,
        records: Sequence[ledger.PendingRecord],
        *,
        key: PrivateKey | None = None,
        quota_used: int | None = None,
        close: bool = True,
    ) -> list[tuple[str, bytes]]:
        """An export's items: records, a checkpoint every CHECKPOINT_EVERY, the close."""
        return list(_items(self, records, key or self.ledger_key, quota_used, close))

    def check(self, items: Sequence[tuple[str, bytes]], **overrides: Any) -> ReconciliationReport:
        args: dict[str, Any] = dict(
            officers=self.officers,
            min_threshold=2,
            root_cert=self.root,
            programmer_cert=self.programmer_cert,
            ledger_cert=self.ledger_cert,
            production_ca_cert=self.pca,
            manifest=self.manifest_signed,
        )
        export_job = overrides.pop("export_job", self.job_signed)
        issued_job = overrides.pop("issued_job", self.job_signed)
        args.update(overrides)
        return reconcile(issued_job, export_job, iter(items), **args)


def _items(
    w: World,
    records: Sequence[ledger.PendingRecord],
    key: PrivateKey,
    quota_used: int | None,
    close: bool,
) -> Iterator[tuple[str, bytes]]:
    job = w.job_id
    head = job
    chained = ledger.chain(records, job=job, start_seq=0, prev=job)
    for seq, (_r, _s, raw, h) in enumerate(chained):
        yield "r", raw
        head = h
        if seq % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 or seq == len(records) - 1:
            yield "c", ledger.sign_checkpoint(key, job=job, upto=seq, head=head, time=1)
    if close:
        prov = sum(r.kind == ledger.KIND_PROVISIONED for r in records)
        totals = ledger.LedgerTotals(
            records=len(records),
            provisioned=prov,
            programmed=len(records) - prov,
            head=head,
            quota=w.job.quota,
            quota_used=prov if quota_used is None else quota_used,
        )
        yield "e", ledger.sign_close(key, ledger.CloseRecord.of(totals, job=job, time=2))


def certify(
    b: SoftwareBackend,
    root_key: PrivateKey,
    root: x509.Certificate,
    *,
    label: str,
    purpose: EnclavePurpose,
    enclave: str = ENCLAVE,
) -> x509.Certificate:
    csr = create_enclave_csr(b, label=label, enclave_name=enclave, purpose=purpose)
    return certify_enclave(
        root_key, root, csr, enclave_name=enclave, purpose=purpose, role="programmer"
    )


def production_ca(
    b: SoftwareBackend,
    root_key: PrivateKey,
    root: x509.Certificate,
    *,
    label: str,
    job_id: str,
    window: tuple[datetime.datetime, datetime.datetime],
) -> x509.Certificate:
    csr = create_production_ca_csr(b, label=label, job_id=job_id)
    return certify_production_ca(
        root_key, root, csr, job_id=job_id, not_before=window[0], not_after=window[1]
    )


def device_profile(pca: x509.Certificate) -> DeviceProfile:
    """The job's device profile: reconciliation checks every device against it."""
    return DeviceProfile(organisation=ORGANIZATION, not_after=pca.not_valid_after_utc)


def device_issuer(
    b: SoftwareBackend, label: str, pca: x509.Certificate, *, job_id: str, identity: bytes
) -> DeviceCertificateIssuer:
    """The production CA's issuer; device serials carry the job identity's tag."""
    profile = device_profile(pca)
    return DeviceCertificateIssuer(
        b.private_key(label), pca, job_id=job_id, job_tag=identity, profile=profile
    )


def make_world(label: str = "w") -> World:
    b = SoftwareBackend(label)
    root = create_root_ca(b, label="root")
    root_key = b.private_key("root")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    nb = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    window = (nb, now + datetime.timedelta(days=1))
    pca = production_ca(b, root_key, root, label="pca", job_id=JOB_ID, window=window)
    programmer_cert = certify(b, root_key, root, label="p-id", purpose=EnclavePurpose.IDENTITY)
    ledger_cert = certify(
        b, root_key, root, label="p-ledger", purpose=EnclavePurpose.LEDGER_SIGNING
    )
    fw = b.generate_ec("fw", curve=Curve.P256, policy=SIGNING)
    manifest = Manifest(
        image_id="img",
        image_version="1.0.0",
        security_counter=3,
        device_class="c",
        plaintext_length=1000,
        plaintext_sha256=hashlib.sha256(b"firmware").digest(),
        ciphertext_sha256=b"\x03" * 32,
        chunk_size=MIN_CHUNK_SIZE,
        nonce_prefix=b"\x04" * NONCE_PREFIX_SIZE,
        header_sha256=b"\x06" * 32,
        image_key_id=b"image-key",
    )
    manifest_signed = sign_manifest(manifest, fw)
    officers = [b.generate_ec(f"o{i}", curve=Curve.P256, policy=SIGNING) for i in range(3)]
    job = ProductionJob(
        job_id=JOB_ID, device_class="c", targets=Targets(ranges=((BASE, LAST_TARGET),)),
        quota=QUOTA, not_before=int(window[0].timestamp()), not_after=int(window[1].timestamp()),
        image_id="img", manifest_sha256=hashlib.sha256(manifest_signed).digest(),
        programmer=cert_fingerprint(programmer_cert), threshold=2,
        certificate=device_profile(pca), production_ca=cert_fingerprint(pca),
        vendors=(VENDOR_CA, SECOND_VENDOR_CA),
    )  # fmt: skip
    job_signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    issuer = device_issuer(b, "pca", pca, job_id=JOB_ID, identity=job_hash(job_signed))
    return World(
        backend=b,
        root=root,
        root_key=root_key,
        programmer_cert=programmer_cert,
        ledger_cert=ledger_cert,
        ledger_key=b.private_key("p-ledger"),
        pca=pca,
        issuer=issuer,
        officer_keys=officers,
        job=job,
        job_signed=job_signed,
        manifest=manifest,
        manifest_signed=manifest_signed,
        window=window,
        now=int(now.timestamp()),
    )
