"""A registry ingest in a process of its own, for the kill tests:
``python -m tests.integration.registry_child DATABASE DIR``.

``DIR`` holds what the OEM knows of a reconciled job (``job.json``: job id, identity, ledger
SHA-256; ``production-ca.pem``; ``ledger-cert.pem``) and the ledger (``ledger.bin``).  Prints
``ingesting`` on stderr once the transaction is open, then the report as JSON on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography import x509

from securethread.oem.registry import Registry, RegistryJob


def job_files(directory: Path) -> tuple[RegistryJob, bytes]:
    meta = json.loads((directory / "job.json").read_text())
    ledger_cert = x509.load_pem_x509_certificate((directory / "ledger-cert.pem").read_bytes())
    pca = x509.load_pem_x509_certificate((directory / "production-ca.pem").read_bytes())
    job = RegistryJob(
        job_id=meta["job_id"],
        job_sha256=bytes.fromhex(meta["job_sha256"]),
        production_ca=pca,
        ledger_key=ledger_cert.public_key(),  # type: ignore[arg-type]
    )
    return job, bytes.fromhex(meta["ledger_sha256"])


def main(database: str, directory: str) -> None:
    d = Path(directory)
    job, digest = job_files(d)
    with Registry.open(database) as reg, open(d / "ledger.bin", "rb") as src:
        print("ingesting", file=sys.stderr, flush=True)
        report = reg.ingest(src, job=job, ledger_sha256=digest)
    print(json.dumps(report.to_json()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
