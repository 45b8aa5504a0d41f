"""Offline verification with public keys only: what an auditor (or the OEM) runs on the
files the parties hand over.  Imports with ``cryptography`` alone (no python-pkcs11)."""

from securethread.audit.files import (
    inspect_file,
    reconcile_files,
    verify_ledger_file,
    verify_transcript_file,
)

__all__ = ["inspect_file", "reconcile_files", "verify_ledger_file", "verify_transcript_file"]
