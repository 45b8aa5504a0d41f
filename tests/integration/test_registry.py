"""The OEM's device registry on SQLite and on a real PostgreSQL server (started here).

Ledgers come from ``benchmarks.synth_ledger``: real keys on the software backend, real
formats, reconciled by :func:`reconcile_export` before they are ingested, as ``oem
reconcile`` does.  Checked on both databases: what ingest stores, that a ledger is ingested
once and only the reconciled bytes are, the answers of ``check`` and of the OCSP question
(known, revoked, duplicate, off-ledger), revocation from the OEM and from CRLs, and that a
SIGKILL at any instant of an ingest loses nothing: ingesting again gives exact counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.synth_ledger import SynthWorld, make_world, write_ledger
from securethread.formats.reconciliation import reconcile_export
from securethread.oem.registry import (
    LedgerMismatchError,
    Registry,
    RegistryError,
    RegistryJob,
    RegistryLookupError,
    Status,
)
from securethread.pki import revoke_devices, revoke_production_ca

from .pg_support import fresh_database, postgres_server

DEVICES = 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Makes empty registry databases of one kind: SQLite files, PostgreSQL databases."""
    made = iter(range(1000))
    if request.param == "sqlite":
        return lambda: str(tmp_path / f"registry-{next(made)}.sqlite")
    url = request.getfixturevalue("pg_url")
    return lambda: fresh_database(url)


@pytest.fixture
def database(new_database: Any) -> str:
    return str(new_database())


class Ledger:
    """A reconciled ledger file and what the OEM knows of its job."""

    def __init__(self, w: SynthWorld, path: Path) -> None:
        with open(path, "rb") as src:
            report = reconcile_export(src, **w.reconcile_args())
        assert report.provisioned == report.programmed > 0
        self.world = w
        self.path = path
        self.sha256 = hashlib.sha256(path.read_bytes()).digest()
        self.job = RegistryJob(
            job_id=w.job.job_id,
            job_sha256=w.job_sha256,
            production_ca=w.pca,
            ledger_key=w.ledger_cert.public_key(),  # type: ignore[arg-type]
        )

    def certs(self) -> list[x509.Certificate]:
        from securethread.formats import ledger

        with open(self.path, "rb") as src:
            _job, items = ledger.read_export(src)
            out = []
            for tag, raw in items:
                if tag == "r":
                    rec = ledger.parse_record(raw, 0)
                    if rec.kind == ledger.KIND_PROVISIONED:
                        out.append(x509.load_der_x509_certificate(rec.body["cert"]))
        return out

    def ingest(self, reg: Registry, **kw: Any) -> Any:
        with open(self.path, "rb") as src:
            return reg.ingest(src, job=self.job, ledger_sha256=self.sha256, **kw)


@pytest.fixture(scope="module")
def world() -> SynthWorld:
    return make_world(64, label="registry-test")


@pytest.fixture(scope="module")
def honest(world: SynthWorld, tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    path = tmp_path_factory.mktemp("ledgers") / "ledger.bin"
    with open(path, "wb") as out:
        write_ledger(world, out, DEVICES, batch=8)
    return Ledger(world, path)


@pytest.fixture(scope="module")
def fork(world: SynthWorld, tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """A second ledger of the same job: the same slots and serials, other chips (a store
    restored and run again)."""
    path = tmp_path_factory.mktemp("ledgers") / "fork.bin"
    with open(path, "wb") as out:
        write_ledger(world, out, 4, batch=8)
    return Ledger(world, path)


def test_ingest_stores_every_device_once(database: str, honest: Ledger) -> None:
    with Registry.open(database) as reg:
        report = honest.ingest(reg)
        assert report.ingested and report.devices == DEVICES and report.records == 2 * DEVICES
        assert report.programmed == DEVICES and report.duplicate_serials == 0
        counts = reg.counts()
        assert counts["devices"] == DEVICES and counts["ledgers"] == 1
        again = honest.ingest(reg)
        assert not again.ingested and again.devices == DEVICES
        assert reg.counts() == counts
        serials = [s for _d, s in reg.device_serials(honest.job.job_id)]
        assert serials == [format(c.serial_number, "x") for c in honest.certs()]
    # reopened: the ledger is still there, nothing doubled
    with Registry.open(database) as reg:
        assert reg.counts() == counts


def test_only_the_reconciled_bytes_are_ingested(
    database: str, honest: Ledger, tmp_path: Path
) -> None:
    data = bytearray(honest.path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one record
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(bytes(data))
    with Registry.open(database) as reg:
        with open(tampered, "rb") as src, pytest.raises(LedgerMismatchError, match="not the one"):
            reg.ingest(src, job=honest.job, ledger_sha256=honest.sha256)
        # a ledger that is not even an export, and the honest one under another job's hash
        with open(honest.path, "rb") as src, pytest.raises(LedgerMismatchError):
            reg.ingest(src, job=honest.job, ledger_sha256=hashlib.sha256(b"x").digest())
        other = make_world(4, job_id="other-job", label="registry-other")
        wrong_job = RegistryJob("other-job", other.job_sha256, other.pca, honest.job.ledger_key)
        with open(honest.path, "rb") as src, pytest.raises(LedgerMismatchError, match="not job"):
            reg.ingest(src, job=wrong_job, ledger_sha256=honest.sha256)
        assert all(v == 0 for v in reg.counts().values()), reg.counts()


def test_check_and_status_of_ledgered_devices(database: str, honest: Ledger) -> None:
    certs = honest.certs()
    pca_sha = hashlib.sha256(honest.world.pca.public_bytes(serialization.Encoding.DER)).digest()
    with Registry.open(database) as reg:
        assert reg.status(pca_sha, certs[0].serial_number).state == "not-issued"
        assert reg.check(certs[0]).status is Status.UNKNOWN  # not ingested yet
        honest.ingest(reg)
        r = reg.check(certs[0])
        assert r.status is Status.KNOWN and r.job_id == honest.job.job_id
        assert r.device_id == honest.world.device_id(0) and r.certificates_with_serial == 1
        assert r.vendor_ca == honest.world.vendor_ca.hex()
        assert reg.status(pca_sha, certs[0].serial_number).state == "good"
        # a serial the production CA never gave in a reconciled ledger: never "good"
        assert reg.status(pca_sha, certs[-1].serial_number + 1000).state == "not-issued"
        assert reg.counts()["sightings"] == 0


def test_off_ledger_certificate_and_duplicate_serial(database: str, honest: Ledger) -> None:
    w = honest.world
    certs = honest.certs()
    pca_sha = hashlib.sha256(w.pca.public_bytes(serialization.Encoding.DER)).digest()
    chip = ec.generate_private_key(ec.SECP256R1()).public_key()
    # Minted with the production-CA key (the PIN holder) for a slot no ledger holds ...
    minted = w.issuer.issue(chip, w.device_id(40), 40)
    # ... and for slot 3 again, to another chip (a restored store): same serial.
    twin = w.issuer.issue(chip, w.device_id(3), 3)
    assert twin.serial_number == certs[3].serial_number
    # Forged: the production CA's name, another key's signature.
    forger = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateBuilder()
        .subject_name(certs[5].subject)
        .issuer_name(certs[5].issuer)
        .public_key(chip)
        .serial_number(certs[5].serial_number)
        .not_valid_before(certs[5].not_valid_before_utc)
        .not_valid_after(certs[5].not_valid_after_utc)
        .sign(forger, hashes.SHA256())
    )
    with Registry.open(database) as reg:
        honest.ingest(reg)
        m = reg.check(minted)
        assert m.status is Status.UNKNOWN and m.off_ledger and m.job_id == honest.job.job_id
        assert reg.status(pca_sha, minted.serial_number).state == "not-issued"
        f = reg.check(forged)
        assert f.status is Status.UNKNOWN
        assert not f.off_ledger
        assert reg.counts()["sightings"] == 1  # the forgery is not recorded
        assert reg.status(pca_sha, certs[5].serial_number).state == "good"
        # the twin: flagged, and from then on the serial is a duplicate for OCSP too
        assert reg.status(pca_sha, certs[3].serial_number).state == "good"
        t = reg.check(twin)
        assert t.status is Status.DUPLICATE and t.off_ledger and t.certificates_with_serial == 2
        assert reg.status(pca_sha, certs[3].serial_number).state == "duplicate"
        assert reg.check(certs[3]).status is Status.DUPLICATE
        assert reg.check(certs[4]).status is Status.KNOWN
        assert reg.counts()["sightings"] == 2
        reg.check(twin)  # seen again: still one sighting
        assert reg.counts()["sightings"] == 2


def test_forked_ledger_flags_every_serial_seen_twice(
    database: str, honest: Ledger, fork: Ledger
) -> None:
    pca_sha = hashlib.sha256(honest.world.pca.public_bytes(serialization.Encoding.DER)).digest()
    with Registry.open(database) as reg:
        assert honest.ingest(reg).duplicate_serials == 0
        second = fork.ingest(reg)
        assert second.ingested and second.duplicate_serials == 4
        assert list(second.duplicates) == [format(c.serial_number, "x") for c in fork.certs()]
        for c in fork.certs():
            assert reg.status(pca_sha, c.serial_number).state == "duplicate"
            assert reg.check(c).status is Status.DUPLICATE
        assert reg.status(pca_sha, honest.certs()[4].serial_number).state == "good"


def test_revocation_by_the_oem_and_by_crls(database: str, honest: Ledger) -> None:
    w = honest.world
    certs = honest.certs()
    pca_sha = hashlib.sha256(w.pca.public_bytes(serialization.Encoding.DER)).digest()
    crl = revoke_devices(w.pca_key, w.pca, [certs[1]], reason=x509.ReasonFlags.key_compromise)
    with Registry.open(database) as reg:
        report = honest.ingest(reg, crls=[(crl, w.pca)])
        assert report.revocations == 1
        s = reg.status(pca_sha, certs[1].serial_number)
        assert (s.state, s.reason) == ("revoked", "keyCompromise")
        r = reg.check(certs[1])
        assert r.status is Status.REVOKED and r.revocation_reason == "keyCompromise"
        assert reg.apply_crl(crl, w.pca) == 0  # again: nothing new
        serial, new = reg.revoke(
            job_id=w.job.job_id, job_sha256=w.job_sha256, production_ca=w.pca,
            device_id=w.device_id(2), reason=x509.ReasonFlags.superseded,
        )  # fmt: skip
        assert new and serial == format(certs[2].serial_number, "x")
        assert reg.status(pca_sha, certs[2].serial_number).state == "revoked"
        with pytest.raises(RegistryLookupError, match="no serial"):
            reg.revoke(job_id=w.job.job_id, job_sha256=w.job_sha256, production_ca=w.pca,
                       serial=certs[-1].serial_number + 5)  # fmt: skip
        # a CRL the production CA did not sign changes nothing
        other = make_world(2, job_id="crl-other", label="registry-crl")
        foreign = revoke_devices(other.pca_key, other.pca, [])
        from securethread.pki import RevocationError as RevErr

        with pytest.raises(RevErr):
            reg.apply_crl(foreign, w.pca)
        # the root revokes the production CA: every device of the job is revoked
        root_crl = revoke_production_ca(
            w.root_key, w.root, w.pca, reason=x509.ReasonFlags.ca_compromise
        )
        assert reg.apply_crl(root_crl, w.root) == 1
        s = reg.status(pca_sha, certs[7].serial_number)
        assert (s.state, s.reason) == ("revoked", "cACompromise")
        assert reg.check(certs[7]).status is Status.REVOKED


def test_database_errors_are_registry_errors(tmp_path: Path) -> None:
    from securethread.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="no such directory"):
        Registry.open(tmp_path / "missing" / "r.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError):
        Registry.open(junk)
    with Registry.open(tmp_path / "r.sqlite") as reg:
        reg._db.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")  # noqa: SLF001
    with pytest.raises(RegistryError, match="schema '99'"):
        Registry.open(tmp_path / "r.sqlite")
    with pytest.raises(RegistryError, match="cannot open"):
        Registry.open("postgresql://nobody@127.0.0.1:1/none")


# --- killed mid-ingest ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large(world: SynthWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000-device ledger and what the child process needs to ingest it."""
    big = make_world(3000, job_id="large-job", label="registry-large")
    d = tmp_path_factory.mktemp("large")
    with open(d / "ledger.bin", "wb") as out:
        write_ledger(big, out, 3000, batch=32)
    led = Ledger(big, d / "ledger.bin")
    pem = serialization.Encoding.PEM
    (d / "production-ca.pem").write_bytes(big.pca.public_bytes(pem))
    (d / "ledger-cert.pem").write_bytes(big.ledger_cert.public_bytes(pem))
    (d / "job.json").write_text(
        json.dumps({"job_id": big.job.job_id, "job_sha256": big.job_sha256.hex(),
                    "ledger_sha256": led.sha256.hex()})
    )  # fmt: skip
    return d


def _child(database: str, d: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.registry_child", database, str(d)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _ingesting(proc: subprocess.Popen[str]) -> str:
    """Wait for the child's "ingesting" line: its transaction is about to open."""
    assert proc.stderr is not None
    while line := proc.stderr.readline():
        if line.startswith("ingesting"):
            return line
    return ""


def test_sigkill_at_any_instant_of_an_ingest_loses_nothing(
    new_database: Any, large: Path
) -> None:
    database = new_database()
    # how long a whole ingest takes here, in a process of its own (into another database)
    probe = _child(new_database(), large)
    assert probe.stderr is not None
    _ingesting(probe)
    t0 = time.monotonic()
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err
    full = time.monotonic() - t0
    rng = random.Random(1906)
    killed_inside = 0
    for _ in range(5):
        proc = _child(database, large)
        assert proc.stderr is not None
        line = _ingesting(proc)
        time.sleep(rng.uniform(0, full))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed_inside += proc.returncode == -signal.SIGKILL and line.startswith("ingesting")
        with Registry.open(database) as reg:
            counts = reg.counts()
        assert counts["devices"] in (0, 3000) and counts["ledgers"] in (0, 1), counts
        assert (counts["devices"] == 3000) == (counts["ledgers"] == 1), counts
    assert killed_inside >= 1
    done = _child(database, large)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    with Registry.open(database) as reg:
        counts = reg.counts()
        assert counts["devices"] == 3000 and counts["ledgers"] == 1, counts
    again = _child(database, large)
    out, err = again.communicate(timeout=300)
    assert json.loads(out)["ingested"] is False
    with Registry.open(database) as reg:
        assert reg.counts() == counts

