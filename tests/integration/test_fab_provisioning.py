"""Provisioning at the silicon vendor's fab (issue 20): a "provision" job on a second
programmer-party installation, run by hand with the real CLI in processes of their own.

The OEM onboards the fab's appliance as it onboards a programming centre (enrol,
certify-programmer, install-certs), and issues it a provision job (no image, no image key):
open-job takes no image, the line identifies each chip against the vendor CA the job names,
counts it, certifies it and burns the provisioning data (the part leaves the fab with it), and
the OEM reconciles the fab's closed ledger -- records without a license, no programmed record.
The fab's token holds no image key, so its PIN holder can mint certificates, never licenses.

Bad input, each one line and nothing counted or written: the job opened by an appliance it
does not name, an image given to a provision job, a provision job's package carrying a
manifest, chips of a fab the job does not name, and a provisioning ledger (re-signed with the
fab's own ledger key, as its PIN holder could) claiming a chip another fab made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from securethread.demo import child_env
from securethread.demo.fab import token_labels
from securethread.demo.line import SimulatedFab
from securethread.formats import cbor, ledger
from securethread.formats.identity import vendor_ca_id
from securethread.formats.jobpackage import JobPackage
from securethread.pki import from_pem
from tests.integration.fab_support import (
    CLI,
    EXIT_CONFIG,
    EXIT_VERIFY,
    issue_job,
    oem_init,
    onboard,
)
from tests.integration.fab_support import answer as _json
from tests.integration.fab_support import files as _files
from tests.integration.fab_support import one_line as _one_line
from tests.integration.fab_support import run as _run

FIRST = 0x5EC0_0000_0000_0000
QUOTA = 8


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An OEM, the vendor's fab appliance ``fab-1`` with an opened provision job ``lot-a``
    naming the vendor's CA, a second appliance ``fab-2`` (certified, named by no job), and a
    rogue fab nobody named."""
    tmp = tmp_path_factory.mktemp("fab")
    oem, fab = tmp / "oem", tmp / "fab-1"
    pins = [tmp / f"officer-{n}" / "pin" for n in (1, 2)]
    root_fingerprint = oem_init(oem, pins)
    onboard(oem, fab, "fab-1", root_fingerprint)
    onboard(oem, tmp / "fab-2", "fab-2", root_fingerprint)
    for vendor in ("vendor", "rogue"):
        _run("vendor", "init", "--workdir", str(tmp / vendor), "--oem-root",
             str(oem / "root-ca.pem"))  # fmt: skip
    sites = {"tmp": tmp, "oem": oem, "fab": fab, "fab-2": tmp / "fab-2",
             "vendor": tmp / "vendor", "rogue": tmp / "rogue", "pin-1": pins[0],
             "pin-2": pins[1], "package": oem / "outbox/job-lot-a.bin"}  # fmt: skip
    issued = _issue(sites, "lot-a", "fab", "fab-1")
    assert (issued["stage"], issued["image"]) == ("provision", None)
    assert not list((oem / "outbox").glob("image-*"))
    return sites


def _issue(sites: dict[str, Path], job: str, where: str, name: str) -> dict[str, Any]:
    """A provision job for appliance ``name`` (in ``sites[where]``), chips FIRST..FIRST+15:
    request-ca there, then the OEM's issue-job, two officers' approvals, issue-job."""
    oem, tmp = sites["oem"], sites["tmp"]
    _run("programmer", "request-ca", "--workdir", str(sites[where]), "--job", job)
    (tmp / f"{job}.toml").write_text(
        f'job_id = "{job}"\nprogrammer = "{name}"\nstage = "provision"\n'
        f'device_class = "sensor-v1"\nquota = {QUOTA}\n'
        f'vendors = ["{tmp / "vendor" / "root-ca.pem"}"]\n[targets]\n'
        f'ranges = [["{FIRST:016x}", "{FIRST + 15:016x}"]]\n[window]\ndays = 1\n'
    )
    # No master-image, no key delivery: a provision job needs neither.
    return issue_job(oem, tmp / f"{job}.toml", [sites["pin-1"], sites["pin-2"]], "--ca-request",
                     str(sites[where] / f"outbox/production-ca-request-{job}.bin"))  # fmt: skip


def _open(sites: dict[str, Path], where: str, package: Path, *extra: str,
          ok: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return _run("programmer", "open-job", "--workdir", str(sites[where]), str(package), *extra,
                ok=ok)  # fmt: skip


def _provision(sites: dict[str, Path], chips: str, first: int, n: int,
               ok: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return _run("programmer", "provision", "--workdir", str(sites["fab"]), "--job", "lot-a",
                "--chips-from", str(sites[chips]), "--first", str(first), "--devices", str(n),
                "--progress", "none", ok=ok)  # fmt: skip


def test_a_provision_job_opens_only_as_what_it_is(sites: dict[str, Path]) -> None:
    """Refused before anything is written: the appliance the job does not name, an image
    given to a job that names none, a package that carries a manifest after all."""
    package = sites["package"]
    before = _files(sites["fab-2"])
    proc = _open(sites, "fab-2", package, ok=False)
    assert proc.returncode == EXIT_VERIFY, proc.stderr
    assert "job lot-a is for another programmer enclave" in _one_line(proc)
    assert _files(sites["fab-2"]) == before
    before = _files(sites["fab"])
    image = sites["tmp"] / "image.enc"
    image.write_bytes(b"\x00" * 4096)
    proc = _open(sites, "fab", package, "--image", str(image), ok=False)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "a 'provision' job, takes no image: the job names none" in _one_line(proc)
    with_manifest = sites["tmp"] / "job-with-manifest.bin"
    pkg = JobPackage.from_bytes(package.read_bytes())
    with_manifest.write_bytes(attrs.evolve(pkg, manifest=b"\xa0").to_bytes())
    proc = _open(sites, "fab", with_manifest, ok=False)
    assert proc.returncode == EXIT_VERIFY, proc.stderr
    assert "'provision' job and the package's carries a manifest" in _one_line(proc)
    assert _files(sites["fab"]) == before


def test_the_fab_provisions_chips_and_the_oem_reconciles_its_ledger(
    sites: dict[str, Path],
) -> None:
    _open(sites, "fab", sites["package"])
    fab = sites["fab"]
    assert not (fab / "jobs/lot-a/image.enc").exists()
    assert not (fab / "jobs/lot-a/manifest.bin").exists()
    # A fab the job does not name: refused at identification, nothing counted.
    proc = _provision(sites, "rogue", 0, 2, ok=False)
    assert proc.returncode == EXIT_VERIFY and "this job names" in _one_line(proc)
    assert _json(proc)["quota_used"] == 0
    out = _json(_provision(sites, "vendor", 0, 5))
    assert (out["provisioned"], out["programmed"], out["quota_used"]) == (5, 0, 5)
    assert out["unprogrammed"] == 0  # every release confirmed: nothing left to release
    # The parts leave the fab with their OTP: each opens provisioned, with its OEM device
    # certificate (and a second run meets them as done, counting nothing).
    vendor = SimulatedFab(sites["vendor"])
    certs = sorted((fab / "jobs/lot-a/devices").glob("*.pem"))
    assert len(certs) == 5
    for i in range(5):
        dev = vendor.chip(FIRST + i).open()
        assert dev.otp is not None
    again = _json(_provision(sites, "vendor", 0, 5))
    assert (again["provisioned"], again["already_done"], again["quota_used"]) == (0, 5, 5)

    closed = _json(_run("programmer", "close-job", "--workdir", str(fab), "--job", "lot-a"))
    assert (closed["provisioned"], closed["programmed"]) == (5, 0)
    export = fab / "outbox/ledger-lot-a.bin"
    with open(export, "rb") as src:
        _signed, items = ledger.read_export(src)
        records = [ledger.parse_record(raw, i) for i, (tag, raw) in enumerate(
            (t, r) for t, r in items if t == "r")]  # fmt: skip
    genuine = vendor_ca_id(from_pem((sites["vendor"] / "root-ca.pem").read_bytes()))
    assert [r.kind for r in records] == ["provisioned"] * 5
    assert all("license_sha256" not in r.body and r.vendor_ca == genuine for r in records)
    # A provisioning ledger claiming a chip another fab made: the fab's PIN holder re-signs
    # its own ledger with a record naming the rogue fab's CA -- refused at that record.
    rogue = vendor_ca_id(from_pem((sites["rogue"] / "root-ca.pem").read_bytes()))
    forged = sites["tmp"] / "ledger-forged.bin"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.resign_child", str(fab), str(export),
         str(forged), "2", "vendor_ca", rogue.hex()],
        capture_output=True, text=True, env=child_env(), cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = _run("oem", "reconcile", "--workdir", str(sites["oem"]), str(forged), "--job",
                "lot-a", ok=False)  # fmt: skip
    assert proc.returncode == EXIT_VERIFY, proc.stderr
    line = _one_line(proc)
    assert "ledger record 2" in line and "which job lot-a does not name" in line, line
    rec = _json(_run("oem", "reconcile", "--workdir", str(sites["oem"]), str(export),
                     "--job", "lot-a"))  # fmt: skip
    assert (rec["provisioned"], rec["programmed"], rec["quota_used"]) == (5, 0, 5)

    # The fab's PIN holder can mint certificates (the production-CA key) but not licenses:
    # no image key was ever delivered to its token.
    labels = token_labels(fab)
    assert not [s for s in labels["secret"] if s.startswith("image-")], labels
    assert "production-ca-lot-a" in labels["private"], labels


def test_the_package_that_crossed_to_the_fab_names_no_image(sites: dict[str, Path]) -> None:
    """What crossed to the fab: no manifest key (left out, not null), the one vendor CA."""
    raw = cbor.decode(sites["package"].read_bytes())
    assert "manifest" not in raw and len(raw["vendors"]) == 1
    vendor = from_pem((sites["vendor"] / "root-ca.pem").read_bytes())
    assert raw["vendors"][0] == vendor.public_bytes(serialization.Encoding.DER)


def test_stations_at_the_fab_provision_through_the_station_api(sites: dict[str, Path]) -> None:
    """The fab's appliance serves its provision job to a station: the station burns the
    provisioning data and confirms with no boot (there is no image; GetImage streams
    nothing); a rerun finds the chips done; the OEM reconciles the ledger."""
    from tests.integration.station_world import ServerProcess, add_station, station_args

    fab2 = sites["fab-2"]
    _issue(sites, "lot-b", "fab-2", "fab-2")
    _open(sites, "fab-2", sites["oem"] / "outbox/job-lot-b.bin")
    files = add_station({"tmp": sites["tmp"], "factory": fab2}, "s1")
    server = ServerProcess(fab2)
    try:
        args = station_args(files, server.target, "lot-b", devices=3, first=8,
                            chips=sites["vendor"])  # fmt: skip
        r = _json(subprocess.run([*CLI, *args], capture_output=True, text=True,
                                 env=child_env()))  # fmt: skip
        assert (r["provisioned"], r["already_done"], r["refused"]) == (3, 0, {}), r
        again = _json(subprocess.run([*CLI, *args], capture_output=True, text=True,
                                     env=child_env()))  # fmt: skip
        assert (again["provisioned"], again["already_done"]) == (0, 3), again
    finally:
        server.stop()
    closed = _json(_run("programmer", "close-job", "--workdir", str(fab2), "--job", "lot-b"))
    assert (closed["provisioned"], closed["programmed"]) == (3, 0)
    rec = _json(_run("oem", "reconcile", "--workdir", str(sites["oem"]),
                     str(fab2 / "outbox/ledger-lot-b.bin"), "--job", "lot-b"))  # fmt: skip
    assert (rec["provisioned"], rec["programmed"]) == (3, 0)


def test_a_program_job_names_provisioning_jobs_this_oem_issued(sites: dict[str, Path]) -> None:
    """issue-job resolves a program spec's ``provisioned_by`` (a job id, or that job's
    production-CA certificate) against the OEM's own records: a provisioning job it issued,
    or one clear error (files only: no token is opened)."""
    from securethread.errors import JobError
    from securethread.oem import layout as OL
    from securethread.oem.jobs import _provisioning_ca
    from securethread.pki import cert_fingerprint

    work = OL.open_oem(sites["oem"])
    pca = from_pem((sites["oem"] / "jobs/lot-a/production-ca.pem").read_bytes())
    for entry in ("lot-a", pca):  # the CA itself (or its hash, F1's first version) either way
        found = _provisioning_ca(work, entry)
        assert (found if isinstance(found, bytes) else cert_fingerprint(found)) == (
            cert_fingerprint(pca)
        )
    with pytest.raises(JobError, match="this OEM issued no job 'lot-z'"):
        _provisioning_ca(work, "lot-z")
    vendor = from_pem((sites["vendor"] / "root-ca.pem").read_bytes())
    with pytest.raises(JobError, match="is not a production CA this OEM's root certified"):
        _provisioning_ca(work, vendor)
