"""Revocation cannot be erased (issue 22): a hostile operator at the programming centre, with
file access and the CLI but no PIN, deletes or replaces the job's files -- ``job.bin``,
``crl.pem``, the CSR -- and tries to get a CRL with fewer entries or a lower number, or to
open the job afresh.  The CRL's state is the revocation anchor in the programmer token
(securethread/programmer/crl_mark.py), so every CRL after that still holds every earlier
revocation under a higher cRLNumber, and the job never opens twice.  The same for the OEM
root's CRL.  All through the real CLI on a demo world (real SoftHSM tokens, real processes).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from securethread.demo import child_env
from securethread.errors import FormatError, TokenRecordError
from securethread.hsm.data import create_data, find_data
from securethread.hsm.records import TokenRecord
from securethread.hsm.token import Token
from tests.integration.demo_support import DEVICES, demo_copy

CLI = [sys.executable, "-m", "securethread.cli"]
JOB = "demo-job-1"
EXIT_CONFIG, EXIT_HSM, EXIT_VERIFY = 2, 3, 4


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=child_env(), timeout=timeout
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, _summary = demo_copy(tmp_path_factory, "revocation")  # the session's, copied
    fac = root / "factory"
    return {
        "root": root,
        "oem": root / "oem",
        "factory": fac,
        "job": fac / "jobs" / JOB,
        "pca": fac / "jobs" / JOB / "production-ca.pem",
    }


def _devices(world: dict[str, Path]) -> list[Path]:
    certs = sorted((world["job"] / "devices").glob("*.pem"))
    assert len(certs) == DEVICES
    return certs


def _crl(path: Path, issuer: Path) -> tuple[int, set[int]]:
    """A CRL's number and revoked serials, once it verifies under ``issuer``."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    ca = x509.load_pem_x509_certificate(issuer.read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return number, {e.serial_number for e in crl}


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def _revoke(world: dict[str, Path], device: Path, out: Path) -> tuple[int, set[int]]:
    proc = cli("programmer", "revoke", "--workdir", str(world["factory"]), "--job", JOB,
               "--device", str(device), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (world["job"] / "crl.pem").read_bytes()
    return _crl(out, world["pca"])


def _digests(d: Path) -> dict[str, str]:
    """Every file's digest outside the token directory (SoftHSM rewrites its token file at
    each login; what the token holds is checked through the CLI instead)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "hsm" not in p.relative_to(d).parts
    }


def _one_line(proc: subprocess.CompletedProcess[str], code: int, match: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]


def _open_job(world: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return _open_job_in(world["factory"])


def _open_job_in(factory: Path) -> subprocess.CompletedProcess[str]:
    inbox = factory / "inbox"
    return cli("programmer", "open-job", "--workdir", str(factory), str(inbox / f"job-{JOB}.bin"),
               "--image", str(inbox / "image-fw-sensor-1.enc"))  # fmt: skip


def test_deleted_job_bin_does_not_reopen_the_job(world: dict[str, Path], tmp_path: Path) -> None:
    """``rm job.bin`` then ``open-job``: refused naming why, the CRL (number 2, one device
    revoked) unchanged; nor can the production-CA key be replaced by deleting the CSR."""
    first = _devices(world)[0]
    number, serials = _revoke(world, first, tmp_path / "first.pem")
    assert _serial(first) in serials
    job_bin = world["job"] / "job.bin"
    saved = job_bin.read_bytes()
    job_bin.unlink()
    try:
        before = _digests(world["factory"])
        _one_line(_open_job(world), EXIT_VERIFY, f"job {JOB} was opened in this token before")
        assert _digests(world["factory"]) == before  # the CRL and everything else unchanged
        assert _crl(world["job"] / "crl.pem", world["pca"]) == (number, serials)
        # The CSR deleted too: request-ca must not destroy the job's production-CA key.
        csr = world["job"] / "production-ca.csr"
        saved_csr = csr.read_bytes()
        csr.unlink()
        try:
            before = _digests(world["factory"])
            proc = cli("programmer", "request-ca", "--workdir", str(world["factory"]), "--job", JOB)
            _one_line(proc, EXIT_VERIFY, "its production-CA key is never replaced")
            assert _digests(world["factory"]) == before
        finally:
            csr.write_bytes(saved_csr)
        # Revocation does not depend on the files: with job.bin gone it still grows.
        later, more = _revoke(world, _devices(world)[3], tmp_path / "without-job-bin.pem")
        assert later == number + 1 and more == serials | {_serial(_devices(world)[3])}
    finally:
        job_bin.write_bytes(saved)
    _one_line(_open_job(world), EXIT_VERIFY, "already open")


def test_deleted_crl_keeps_every_revocation(world: dict[str, Path], tmp_path: Path) -> None:
    """Delete crl.pem (and the outbox copy), revoke another device: the new CRL holds both
    revocations under a higher number."""
    a, b = _devices(world)[:2]
    number, serials = _revoke(world, a, tmp_path / "a.pem")
    (world["job"] / "crl.pem").unlink()
    (world["factory"] / "outbox" / f"crl-{JOB}.pem").unlink()
    later, now = _revoke(world, b, tmp_path / "b.pem")
    assert later == number + 1
    assert now == serials | {_serial(b)} and {_serial(a), _serial(b)} <= now


def test_an_older_crl_put_back_does_not_shrink_the_next(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """Replace crl.pem by an older, genuine CRL of the job: the next revocation still grows
    from the token's state, not from the file."""
    old = world["factory"] / "outbox" / f"crl-{JOB}.pem"
    older = tmp_path / "older.pem"
    shutil.copyfile(world["job"] / "crl.pem", older)
    _revoke(world, _devices(world)[2], tmp_path / "c.pem")
    newest, serials = _crl(world["job"] / "crl.pem", world["pca"])
    shutil.copyfile(older, world["job"] / "crl.pem")
    shutil.copyfile(older, old)
    again, after = _revoke(world, _devices(world)[3], tmp_path / "d.pem")
    assert again == newest + 1 and after >= serials | {_serial(_devices(world)[3])}
    assert _crl(older, world["pca"])[0] < again


def test_the_oem_root_crl_only_grows(world: dict[str, Path], tmp_path: Path) -> None:
    """The OEM side: its root CRL's state is in the OEM token too; deleting crl/root.pem
    does not restart it at number 1."""
    oem = world["oem"]
    root = oem / "root-ca.pem"
    pca = world["pca"]

    def revoke(out: Path) -> tuple[int, set[int]]:
        proc = cli("oem", "revoke", "--workdir", str(oem), "--job", JOB, "--reason",
                   "cACompromise", "--out", str(out))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return _crl(out, root)

    number, serials = revoke(tmp_path / "r1.pem")
    assert _serial(pca) in serials
    (oem / "crl" / "root.pem").unlink()
    again, still = revoke(tmp_path / "r2.pem")
    assert again == number + 1 and still == serials


def test_a_killed_open_job_finishes_with_its_first_crl(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """An open-job killed after it anchored the first CRL but before it wrote job.bin is
    finished by running it again, without signing a new CRL.  Played by the appliance (it
    holds the PIN) on a copy of the factory: the anchor is rolled to its unfinished form."""
    copy = tmp_path / "factory"
    shutil.copytree(world["factory"], copy, symlinks=True)
    (copy / "jobs" / JOB / "job.bin").unlink()
    code = (
        "import sys\n"
        "from securethread.programmer import layout as L\n"
        "from securethread.programmer.crl_mark import Anchor, RevocationAnchor\n"
        "work = L.open_programmer(sys.argv[1])\n"
        "anchor = RevocationAnchor(work.open_token(L.TOKEN), sys.argv[2])\n"
        "cur = anchor.read()\n"
        "v = cur.value\n"
        "anchor.write(Anchor(job=v.job, job_id=v.job_id, opened=False, crl=v.crl), after=cur)\n"
        "print(v.number)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(copy), JOB], capture_output=True,
                          text=True, env=child_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    number = int(proc.stdout)
    proc = _open_job_in(copy)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "jobs" / JOB / "job.bin").is_file()
    assert _crl(copy / "jobs" / JOB / "crl.pem", world["pca"])[0] == number  # none signed
    (copy / "jobs" / JOB / "job.bin").unlink()
    _one_line(_open_job_in(copy), EXIT_VERIFY, "was opened in this token before")


# --- the token record underneath --------------------------------------------------------------


def _record(token: Token, label: str) -> TokenRecord[bytes]:
    def parse(data: bytes) -> bytes:
        if not data.startswith(b"ok:"):
            raise FormatError("not ok")
        return data

    return TokenRecord(token, label=label, application="securethread/test", parse=parse,
                       what="test record")  # fmt: skip


def test_token_record_generations(spare: Token, label: str) -> None:
    """Each write is the next generation; older ones go; a writer that read a stale
    generation is refused; objects that exist but cannot be read are an error, never a
    record that is absent."""
    rec = _record(spare, label)
    assert rec.read() is None and not rec.exists()
    rec.write(b"ok:1", after=None)
    first = rec.read()
    assert first is not None and (first.number, first.value) == (0, b"ok:1")
    rec.write(b"ok:2", after=first)
    second = rec.read()
    assert second is not None and (second.number, second.value) == (1, b"ok:2")
    with pytest.raises(TokenRecordError, match="changed while this step ran"):
        rec.write(b"ok:3", after=first)  # stale: another writer moved it on
    with pytest.raises(TokenRecordError, match="changed while this step ran"):
        rec.write(b"ok:3", after=None)
    assert rec.read() == second
    rec.write(b"ok:3", after=second)
    assert len(find_data(spare, label=label, application="securethread/test")) == 2
    with pytest.raises(FormatError):
        rec.write(b"bad", after=rec.read())  # never written if it could not be read back
    # Only unreadable objects: an error naming the record, not "no record".
    other = _record(spare, label + "-x")
    create_data(spare, label=label + "-x", application="securethread/test", value=b"\0" * 9)
    with pytest.raises(TokenRecordError, match="unreadable"):
        other.read()
    for obj in find_data(spare, label=label + "-x", application="securethread/test"):
        obj.handle.destroy()
    for obj in find_data(spare, label=label, application="securethread/test"):
        obj.handle.destroy()
