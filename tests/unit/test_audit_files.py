"""``audit verify-ledger`` from files needs the programmer it expects (issue 22).

Before, it proved only that a ledger key the OEM root certified for ledger signing signed the
ledger -- any programmer's: a ledger re-signed by another programmer the same OEM certified
passed, and only reconciliation refused it.  Software backend, real formats and files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securethread.audit import verify_ledger_file
from securethread.errors import LedgerError
from securethread.formats import ledger
from securethread.formats.reconciliation import LedgerSignerError
from securethread.pki import EnclavePurpose

from .ledger_world import World, certify, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world("audit-files")


@pytest.fixture(scope="module")
def other(world: World) -> dict[str, x509.Certificate]:
    """A second programmer, "prog2", certified by the same OEM root."""
    return {
        "identity": certify(world.backend, world.root_key, world.root, label="p2-id",
                            purpose=EnclavePurpose.IDENTITY, enclave="prog2"),
        "ledger": certify(world.backend, world.root_key, world.root, label="p2-ledger",
                          purpose=EnclavePurpose.LEDGER_SIGNING, enclave="prog2"),
    }  # fmt: skip


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _export(world: World, path: Path, *, key_label: str | None = None) -> Path:
    key = world.backend.private_key(key_label) if key_label else None
    items = world.items([world.provisioned(0), world.programmed(0)], key=key)
    out = io.BytesIO()
    ledger.write_export(out, world.job_signed, items)
    path.write_bytes(out.getvalue())
    return path


def _verify(world: World, tmp: Path, export: Path, *, expected: x509.Certificate,
            ledger_cert: x509.Certificate) -> dict[str, object]:  # fmt: skip
    return verify_ledger_file(
        export,
        programmer_cert=_pem(tmp / "expected.pem", expected),
        ledger_cert=_pem(tmp / "ledger.pem", ledger_cert),
        root=_pem(tmp / "root.pem", world.root),
    )


def test_the_expected_programmers_ledger_verifies(world: World, tmp_path: Path) -> None:
    s = _verify(world, tmp_path, _export(world, tmp_path / "l.bin"),
                expected=world.programmer_cert, ledger_cert=world.ledger_cert)  # fmt: skip
    assert s["programmer"] == "prog1" and s["job_id"] == world.job.job_id
    assert s["records"] == 2 and s["closed"]


def test_a_ledger_re_signed_by_another_certified_programmer_is_refused(
    world: World, other: dict[str, x509.Certificate], tmp_path: Path
) -> None:
    resigned = _export(world, tmp_path / "l.bin", key_label="p2-ledger")
    with pytest.raises(LedgerSignerError, match="is for .*prog2.*the programmer expected is"):
        _verify(world, tmp_path, resigned, expected=world.programmer_cert,
                ledger_cert=other["ledger"])  # fmt: skip
    with pytest.raises(LedgerError, match="does not verify"):  # prog1's certificate offered
        _verify(world, tmp_path, resigned, expected=world.programmer_cert,
                ledger_cert=world.ledger_cert)  # fmt: skip
    with pytest.raises(LedgerSignerError, match="names another programmer"):  # prog2 expected
        _verify(world, tmp_path, resigned, expected=other["identity"],
                ledger_cert=other["ledger"])  # fmt: skip


def test_an_identity_certificate_is_not_a_ledger_certificate(
    world: World, tmp_path: Path
) -> None:
    export = _export(world, tmp_path / "l.bin", key_label="p-id")
    with pytest.raises(LedgerSignerError, match="not trusted"):
        _verify(world, tmp_path, export, expected=world.programmer_cert,
                ledger_cert=world.programmer_cert)  # fmt: skip


def test_the_expectation_must_be_a_programmer_identity_under_the_root(
    world: World, tmp_path: Path
) -> None:
    export = _export(world, tmp_path / "l.bin")
    with pytest.raises(LedgerSignerError, match="programmer certificate"):
        _verify(world, tmp_path, export, expected=world.ledger_cert,
                ledger_cert=world.ledger_cert)  # fmt: skip
