"""The OEM names the silicon vendors (issue 22), against the factory's own operators.

A fab the OEM never named -- made with ``securethread vendor init`` like the genuine one,
under the same default name -- brings chips to the line.  Whatever the caller passes (the
CLI's ``--chips-from``/``--vendor``, the Python API, a run configuration with the rogue
root added, an identifier that trusts more than the job), its chips are refused at
identification with a clear reason and nothing is counted: no slot, no certificate file,
no ledger record.  A job package whose vendor certificates are not the job's is refused at
open-job with nothing written; a vendor file replaced after open-job stops the run before
it starts.  The ledger names each device's vendor CA and the OEM reconciles it.

Real SoftHSM tokens, the real CLI in processes of their own (each party's environment),
the runner in-process on the session's tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from securethread.demo import child_env
from securethread.device.vendor import SiliconVendor, make_chips
from securethread.formats import ledger
from securethread.formats.device_trust import oem_root_hash
from securethread.formats.identity import IdentityVerifier, VendorCAError, vendor_ca_id
from securethread.formats.job import job_hash
from securethread.formats.jobpackage import JobPackage
from securethread.pki import from_pem
from securethread.programmer import runner
from securethread.programmer.line import Refused
from securethread.programmer.store import UNGUARDED, SQLiteStore
from tests.integration.fab_support import EXIT_CONFIG, EXIT_VERIFY, issue_job, oem_init, onboard
from tests.integration.fab_support import answer as _json
from tests.integration.fab_support import files as _files
from tests.integration.fab_support import one_line as _one_line
from tests.integration.fab_support import run as _run
from tests.integration.line_support import DEVICE_BASE, World, ledger_view

QUOTA = 20


def _der(cert: Any) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[no-any-return]


# --- the runner and the line (in-process, the session's tokens) -----------------------------------


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(oem, programmer, tmp_path_factory.mktemp("vendors"), chips=6)


def _rogue_fab(world: World, name: str, first: int, n: int) -> tuple[SiliconVendor, list[Any]]:
    """A fab the job does not name and ``n`` of its parts, ordered for this OEM (its root
    burnt in), with UIDs inside the job's targets: everything right but the fab."""
    fab = SiliconVendor(name)
    return fab, make_chips(
        fab, [DEVICE_BASE + first + i for i in range(n)],
        oem_root_hash=oem_root_hash(world.root), flash_size=1 << 16,
    )  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_chips_of_a_fab_the_job_does_not_name_are_refused_before_counting(
    world: World, workers: int
) -> None:
    job = world.job(quota=12, targets=12, batch_size=4, workers=workers)
    genuine = job.chips(world.specs[:3])
    rogue = job.chips(_rogue_fab(world, "Rogue Fab", 6, 3)[1])
    twin = job.chips(_rogue_fab(world, world.vendor.name, 9, 2)[1])  # the genuine fab's name
    r = runner.run(job.config, [genuine[0], *rogue, genuine[1], *twin, genuine[2]])
    assert (r.provisioned, r.programmed, r.quota_used) == (3, 3, 3)
    assert r.refused == {"UnknownVendorError": 3, "VendorCertificateError": 2}
    assert {n.stage for n in r.notes} == {"identify"}
    assert all("this job names" in n.message for n in r.notes), r.notes
    # Nothing of theirs anywhere: no slot (above), no certificate file, no ledger record.
    files = {p.stem for p in (job.dir / "devices").glob("*.pem")}
    assert files == {c.device_id for c in genuine}
    view = ledger_view(job)
    assert set(view.provisioned) == {c.device_id for c in genuine}
    # Each record names the vendor CA that certified its chip: the one the job names.
    store = SQLiteStore(job.store, create=False)
    try:
        raws = [raw for tag, raw in store.export(job.job_hash) if tag == "r"]
    finally:
        store.close()
    vendors = {
        ledger.parse_record(raw, i).vendor_ca
        for i, raw in enumerate(raws)
        if ledger.parse_record(raw, i).kind == ledger.KIND_PROVISIONED
    }
    assert vendors == {vendor_ca_id(world.vendor.root_certificate)}


@pytest.mark.parametrize(
    ("roots", "why"),
    [
        ("genuine+rogue", "is not a vendor CA the job names"),
        ("rogue", "is not a vendor CA the job names"),
        ("none", "no certificate for the job's vendor CA"),
    ],
)
def test_a_run_configuration_with_a_root_the_job_does_not_name_does_not_start(
    world: World, roots: str, why: str
) -> None:
    """The Python API below the CLI: a caller who builds the RunConfig and adds the rogue
    fab's root (``vendor_roots=[rogue]``) is refused before the store is even opened."""
    job = world.job(quota=3, targets=3)
    rogue = SiliconVendor("Rogue Fab")
    given = {
        "genuine+rogue": (_der(world.vendor.root_certificate), _der(rogue.root_certificate)),
        "rogue": (_der(rogue.root_certificate),),
        "none": (),
    }[roots]
    config = attrs.evolve(job.config, vendor_roots=given)
    chips = job.chips(_rogue_fab(world, "Rogue Fab", 0, 2)[1])
    with pytest.raises(VendorCAError, match=why):
        runner.run(config, chips)
    assert not job.store.exists() and not (job.dir / "devices").exists()


def test_the_line_refuses_an_unnamed_vendor_whatever_identifier_it_is_given(
    world: World, programmer: Any
) -> None:
    """ProductionLine checks the proven vendor CA against the job itself: a line built with
    an identifier that also trusts the rogue root still refuses its chip, uncounted."""
    job = world.job(quota=4, targets=12)
    fab, (rogue,) = _rogue_fab(world, "Rogue Fab", 6, 1)
    store = SQLiteStore(job.store)
    try:
        line = runner.build_line(job.config, programmer, store, guard=UNGUARDED, run=b"r1")
        # An identifier that trusts more than the job (a caller building its own line).
        wide = IdentityVerifier([world.vendor.root_certificate, fab.root_certificate])
        line._identify = lambda resp, ch: wide.verify(resp, challenge=ch)
        outcomes = list(line.provision([rogue.open(), world.specs[0].open()]))
        assert sorted(type(o).__name__ for o in outcomes) == ["Provisioned", "Refused"]
        (refused,) = [o for o in outcomes if isinstance(o, Refused)]
        assert refused.kind == "UnknownVendorError"
        assert f"job {job.config.job.job.job_id} does not name" in str(refused.reason)
        assert store.counts(job.job_hash)[1] == 1  # one slot: the genuine chip's
    finally:
        store.close()


# --- the CLI: two sites by hand, a second fab nobody named ------------------------------------


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An OEM whose job names the genuine fab; a programming centre up to request-ca; a
    rogue fab made the same way, which nobody named."""
    tmp = tmp_path_factory.mktemp("vendor-cli")
    oem, fac = tmp / "oem", tmp / "factory"
    pins = [tmp / f"officer-{n}" / "pin" for n in (1, 2)]
    onboard(oem, fac, "f-1", oem_init(oem, pins))
    (tmp / "fw.bin").write_bytes(os.urandom(8 << 10))
    _run("oem", "master-image", "--workdir", str(oem), str(tmp / "fw.bin"), "--image-id", "fw",
         "--version", "1", "--security-counter", "1", "--device-class", "c")  # fmt: skip
    package = tmp / "keys.sealed"
    _run("oem", "seal-keys", "--workdir", str(oem), "--to", "f-1", "--image", "fw", "--out",
         str(package))  # fmt: skip
    _run("programmer", "open-keys", "--workdir", str(fac), str(package))
    _run("oem", "confirm-keys", "--workdir", str(oem),
         str(next((fac / "outbox").glob("key-receipt-*.bin"))))  # fmt: skip
    for fab in ("vendor", "rogue"):  # two fabs, made alike; the OEM names the first only
        _run("vendor", "init", "--workdir", str(tmp / fab), "--oem-root", str(oem / "root-ca.pem"))
    _run("programmer", "request-ca", "--workdir", str(fac), "--job", "j")
    last = 0x5EC0_0000_0000_0000 + QUOTA - 1
    (tmp / "j.toml").write_text(
        f'job_id = "j"\nprogrammer = "f-1"\nimage = "fw"\nquota = {QUOTA}\n'
        f'vendors = ["{tmp / "vendor" / "root-ca.pem"}"]\n[targets]\n'
        f'ranges = [["5ec0000000000000", "{last:016x}"]]\n[window]\ndays = 1\n'
    )
    issue_job(oem, tmp / "j.toml", pins, "--ca-request",
              str(fac / "outbox/production-ca-request-j.bin"))  # fmt: skip
    return {"tmp": tmp, "oem": oem, "factory": fac, "vendor": tmp / "vendor",
            "rogue": tmp / "rogue"}  # fmt: skip


def _open_job(sites: dict[str, Path], package: Path, *, ok: bool = True) -> Any:
    return _run("programmer", "open-job", "--workdir", str(sites["factory"]), str(package),
                "--image", str(sites["oem"] / "outbox/image-fw.enc"), ok=ok)  # fmt: skip


@pytest.mark.parametrize("shipped", ["rogue", "genuine+rogue", "none"])
def test_open_job_refuses_a_package_whose_vendor_certificates_are_not_the_jobs(
    sites: dict[str, Path], shipped: str
) -> None:
    """The transport (or an operator) swaps the package's vendor certificates: the job's
    hashes, which the officers signed, refuse them; the factory's directory is unchanged."""
    genuine = (sites["oem"] / "outbox/job-j.bin").read_bytes()
    pkg = JobPackage.from_bytes(genuine)
    rogue = _der(from_pem((sites["rogue"] / "root-ca.pem").read_bytes()))
    vendors = {"rogue": (rogue,), "genuine+rogue": (*pkg.vendors, rogue), "none": ()}[shipped]
    bad = sites["tmp"] / f"job-{shipped}.bin"
    # A package that ships no vendor parses (a "program" job's names none): the job's list
    # refuses it.
    bad.write_bytes(attrs.evolve(pkg, vendors=vendors).to_bytes())
    before = _files(sites["factory"])
    proc = _open_job(sites, bad, ok=False)
    line = _one_line(proc)
    assert proc.returncode == EXIT_VERIFY, line
    assert ("not a vendor CA the job names" in line) if vendors else (
        "no certificate for the job's vendor CA" in line
    )
    assert _files(sites["factory"]) == before


def test_open_job_keeps_the_vendor_cas_the_job_names(sites: dict[str, Path]) -> None:
    _open_job(sites, sites["oem"] / "outbox/job-j.bin")
    kept = list((sites["factory"] / "jobs/j/vendors").iterdir())
    genuine = from_pem((sites["vendor"] / "root-ca.pem").read_bytes())
    assert [p.name for p in kept] == [f"{vendor_ca_id(genuine).hex()}.pem"]
    assert from_pem(kept[0].read_bytes()) == genuine


def _provision(
    sites: dict[str, Path], fab: str, first: int, n: int, *, option: str = "--chips-from",
    ok: bool = True,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return _run("programmer", "provision", "--workdir", str(sites["factory"]), "--job", "j",
                option, str(sites[fab]), "--first", str(first), "--devices", str(n),
                "--progress", "none", ok=ok)  # fmt: skip


@pytest.mark.parametrize("option", ["--chips-from", "--vendor"])
def test_the_cli_refuses_the_chips_of_a_fab_the_oem_never_named(
    sites: dict[str, Path], option: str
) -> None:
    """``provision --chips-from ROGUE`` (or the old ``--vendor ROGUE``) only says where the
    chips come from: every one is refused at identification, one line, exit 4, uncounted."""
    devices = sites["factory"] / "jobs/j/devices"
    before = sorted(devices.iterdir()) if devices.exists() else []
    proc = _provision(sites, "rogue", 0, 3, option=option, ok=False)
    line = _one_line(proc)
    assert proc.returncode == EXIT_VERIFY, line
    assert "3 device(s) refused" in line and "this job names" in line
    out = _json(proc)
    assert out["provisioned"] == 0 and out["quota_used"] == 0
    assert out["refused"] == {"VendorCertificateError": 3}  # same default name, other key
    assert (sorted(devices.iterdir()) if devices.exists() else []) == before


def test_the_python_api_refuses_the_chips_of_a_fab_the_oem_never_named(
    sites: dict[str, Path],
) -> None:
    """``securethread.programmer.provision`` takes chips, not trust: the rogue fab's chips,
    handed to it directly, are refused and nothing is counted (run as the factory's own
    process: its token and PIN file)."""
    code = (
        "import json, sys\n"
        "from securethread.demo.line import SimulatedFab\n"
        "from securethread.programmer import provision\n"
        "fab = SimulatedFab(sys.argv[2])\n"
        "r = provision(sys.argv[1], job_id='j', chips=fab.chips([0x5EC0000000000005, "
        "0x5EC0000000000006]), workers=0)\n"
        "print(json.dumps({'problem': str(r.problem), **{k: r.details[k] for k in "
        "('provisioned', 'quota_used', 'refused')}}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(sites["factory"]), str(sites["rogue"])],
        capture_output=True, text=True, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["provisioned"], out["quota_used"]) == (0, 0)
    assert out["refused"] == {"VendorCertificateError": 2}
    assert "this job names" in out["problem"]


def test_a_vendor_file_replaced_after_open_job_stops_the_run_before_it_starts(
    sites: dict[str, Path],
) -> None:
    """The operator puts the rogue fab's CA where open-job kept the genuine one: the run
    checks the file against the job's hash again and does not start."""
    (kept,) = (sites["factory"] / "jobs/j/vendors").iterdir()
    genuine = kept.read_bytes()
    kept.write_bytes((sites["rogue"] / "root-ca.pem").read_bytes())
    try:
        proc = _provision(sites, "rogue", 0, 2, ok=False)
        line = _one_line(proc)
        assert proc.returncode == EXIT_VERIFY and "not a vendor CA the job names" in line, line
        kept.unlink()
        proc = _provision(sites, "vendor", 0, 2, ok=False)
        line = _one_line(proc)
        assert proc.returncode == EXIT_CONFIG and "cannot read vendor CA certificate" in line
    finally:
        kept.write_bytes(genuine)
    assert not (sites["factory"] / "jobs/j/devices").exists() or not any(
        (sites["factory"] / "jobs/j/devices").iterdir()
    )


def test_the_ledger_names_each_devices_vendor_and_the_oem_reconciles_it(
    sites: dict[str, Path],
) -> None:
    out = _json(_provision(sites, "vendor", 0, 4))
    assert (out["provisioned"], out["booted"], out["quota_used"]) == (4, 4, 4)  # none before
    _run("programmer", "close-job", "--workdir", str(sites["factory"]), "--job", "j")
    export = sites["factory"] / "outbox/ledger-j.bin"
    with open(export, "rb") as src:
        signed, items = ledger.read_export(src)
        raws = [raw for tag, raw in items if tag == "r"]
    records = [ledger.parse_record(raw, i) for i, raw in enumerate(raws)]
    genuine = vendor_ca_id(from_pem((sites["vendor"] / "root-ca.pem").read_bytes()))
    assert [r.vendor_ca for r in records if r.kind == ledger.KIND_PROVISIONED] == [genuine] * 4
    assert job_hash(signed) == job_hash((sites["oem"] / "jobs/j/job.bin").read_bytes())
    rec = _json(_run("oem", "reconcile", "--workdir", str(sites["oem"]), str(export),
                     "--job", "j"))  # fmt: skip
    assert rec["ok"] and rec["provisioned"] == 4
