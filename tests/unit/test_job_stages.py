"""Job stages (issue 20): a "full" job provisions and programs, a "provision" job (the
silicon vendor's fab) names no image, a "program" job names the provisioning jobs whose chips
it accepts and no vendor CA. Each inconsistency is one JobError naming it; the job spec
states the stage, and a spec without one is a "full" job as before."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from securethread.device.vendor import SiliconVendor
from securethread.errors import ConfigurationError, FormatError, JobError
from securethread.formats import cbor
from securethread.formats.job import (
    MAX_PROVISIONED_BY,
    STAGE_FULL,
    STAGE_PROGRAM,
    STAGE_PROVISION,
    ProductionJob,
    Targets,
    job_hash,
    sign_job,
)
from securethread.formats.jobpackage import JobPackage
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from securethread.oem.jobspec import load_job_spec
from securethread.pki.profile import DeviceProfile

A, B = b"\x0a" * 32, b"\x0b" * 32
PCA_1, PCA_2 = b"\x51" * 32, b"\x52" * 32
TOO_MANY = tuple(bytes([i]) * 32 for i in range(MAX_PROVISIONED_BY + 1))
IMAGE = {"image_id": "fw-1", "manifest_sha256": b"\x22" * 32}


def _job(**kw: Any) -> ProductionJob:
    now = int(time.time())
    args: dict[str, Any] = dict(
        job_id="job-s", device_class="sensor-v1", targets=Targets(ranges=((0x1000, 0x1FFF),)),
        quota=5, not_before=now - 60, not_after=now + 3600, programmer=b"\x11" * 32,
        certificate=DeviceProfile(organisation="Test OEM"), production_ca=b"\x33" * 32,
        vendors=(A,), **IMAGE,
    )  # fmt: skip
    args.update(kw)
    return ProductionJob(**args)


def _provision(**kw: Any) -> ProductionJob:
    return _job(**{"stage": STAGE_PROVISION, "image_id": None, "manifest_sha256": None, **kw})


def _program(**kw: Any) -> ProductionJob:
    args = {"stage": STAGE_PROGRAM, "vendors": (), "provisioned_by": (PCA_2, PCA_1)}
    return _job(**{**args, "production_ca": None, **kw})


def test_each_stage_round_trips_and_is_its_own_job() -> None:
    full, provision, program = _job(), _provision(), _program()
    assert full.stage == STAGE_FULL and full.provisions and full.programs
    assert provision.provisions and not provision.programs
    assert program.programs and not program.provisions
    assert program.provisioned_by == (PCA_1, PCA_2)  # sorted: one encoding per set (S6)
    assert "production_ca" not in program.to_obj()  # the programming centre certifies nothing
    for job in (full, provision, program):
        assert ProductionJob.from_obj(cbor.decode(cbor.encode(job.to_obj()))) == job
    # A provision job leaves the image keys out (one encoding of absence, not null).
    assert {"image_id", "manifest_sha256"}.isdisjoint(provision.to_obj())
    assert provision.to_obj()["stage"] == "provision"
    officer = SoftwareBackend("o").generate_ec("o", curve=Curve.P256, policy=SIGNING)
    ids = {job_hash(sign_job(j, [officer])) for j in (full, provision, program)}
    assert len(ids) == 3


def test_what_a_stage_lacks_is_one_clear_error() -> None:
    assert _job().image() == ("fw-1", b"\x22" * 32)
    with pytest.raises(JobError, match="job job-s is a 'provision' job: it names no image"):
        _provision().image()
    assert _provision().production_ca_sha256() == b"\x33" * 32
    with pytest.raises(JobError, match="job job-s is a 'program' job: it has no production CA"):
        _program().production_ca_sha256()


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: _job(stage="fab"), "field 'stage' must match"),
        (lambda: _job(image_id=None), "a 'full' job must name both image_id and manifest"),
        (lambda: _job(manifest_sha256=None), "a 'full' job must name both image_id"),
        (lambda: _provision(image_id="fw-1"), "a 'provision' job must carry no image_id"),
        (lambda: _provision(provisioned_by=(PCA_1,)), "provisioned_by must be empty for a 'pro"),
        (lambda: _job(provisioned_by=(PCA_1,)), "provisioned_by must be empty for a 'full'"),
        (lambda: _provision(vendors=()), "a 'provision' job must name at least one vendor CA"),
        (lambda: _program(provisioned_by=()), "provisioned_by must be non-empty for a 'program"),
        (lambda: _program(vendors=(A,)), "a 'program' job must name no vendor CA"),
        (lambda: _program(production_ca=b"\x33" * 32), "'program' job must name no production_ca"),
        (lambda: _provision(production_ca=None), "'provision' job must name its production_ca"),
        (lambda: _job(production_ca=None), "a 'full' job must name its production_ca"),
        (lambda: _program(image_id=None, manifest_sha256=None), "'program' job must name both"),
        (lambda: _program(provisioned_by=(PCA_1, PCA_1)), "field 'provisioned_by' must be stri"),
        (lambda: _program(provisioned_by=(PCA_1[:31],)), "'provisioned_by' item 0 must be 32"),
        (
            lambda: _program(provisioned_by=TOO_MANY),
            f"'provisioned_by' must list 0..{MAX_PROVISIONED_BY} items",
        ),
    ],
)
def test_an_inconsistent_stage_is_one_error_naming_it(make: Any, why: str) -> None:
    with pytest.raises((JobError, FormatError), match=why):
        make()


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda o: o.pop("stage"), "job: missing field 'stage'"),
        (lambda o: o.update(stage=None), "field 'stage' must be text"),
        (lambda o: o.update(image_id=None), "field 'image_id' is left out when absent, not null"),
        (lambda o: o.update(image_id="fw-1"), "'provision' job must carry no image_id"),
        (lambda o: o.update(provisioned_by=[PCA_2, PCA_1]), "must be strictly ascending"),
        (lambda o: o.pop("provisioned_by"), "job: missing field 'provisioned_by'"),
    ],
)
def test_a_wire_job_of_a_stage_is_strict(edit: Any, why: str) -> None:
    obj = _provision().to_obj()
    obj["provisioned_by"] = list(obj["provisioned_by"])
    edit(obj)
    with pytest.raises((JobError, FormatError), match=why):
        ProductionJob.from_obj(obj)


def test_the_package_of_a_provision_job_has_no_manifest() -> None:
    package = JobPackage(job=b"j", production_ca=b"p", manifest=None, device_trust=b"d",
                         vendors=(b"v",))  # fmt: skip
    data = package.to_bytes()
    assert "manifest" not in cbor.decode(data)
    assert JobPackage.from_bytes(data) == package
    assert JobPackage.from_bytes(package.__class__(
        job=b"j", production_ca=b"p", manifest=b"m", device_trust=b"d", vendors=()
    ).to_bytes()).vendors == ()  # fmt: skip


# --- the job spec -------------------------------------------------------------------------------

_HEAD = 'job_id = "j"\nprogrammer = "fab-1"\nquota = 3\n'
_TAIL = '[targets]\nranges = [["5ec0000000000000", "5ec0000000000002"]]\n[window]\ndays = 1\n'


def _spec(tmp_path: Path, body: str) -> Path:
    fab = SiliconVendor("Genuine Fab").root_certificate
    (tmp_path / "fab.pem").write_bytes(fab.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "pca.pem").write_bytes(fab.public_bytes(serialization.Encoding.PEM))
    p = tmp_path / "j.toml"
    p.write_text(_HEAD + body + _TAIL)
    return p


def test_a_spec_without_a_stage_is_a_full_job(tmp_path: Path) -> None:
    spec = load_job_spec(_spec(tmp_path, 'image = "fw"\nvendors = ["fab.pem"]\n'))
    assert (spec.stage, spec.image, spec.provisioned_by) == (STAGE_FULL, "fw", ())


def test_a_provision_spec_names_a_device_class_and_no_image(tmp_path: Path) -> None:
    body = 'stage = "provision"\ndevice_class = "sensor-v1"\nvendors = ["fab.pem"]\n'
    spec = load_job_spec(_spec(tmp_path, body))
    assert (spec.stage, spec.image, spec.device_class) == (STAGE_PROVISION, None, "sensor-v1")
    assert len(spec.vendors) == 1


def test_a_program_spec_names_jobs_or_production_ca_certificates(tmp_path: Path) -> None:
    body = 'stage = "program"\nimage = "fw"\nprovisioned_by = ["fab-job-1", "pca.pem"]\n'
    spec = load_job_spec(_spec(tmp_path, body))
    assert spec.stage == STAGE_PROGRAM and spec.vendors == ()
    assert spec.provisioned_by[0] == "fab-job-1"
    assert not isinstance(spec.provisioned_by[1], str)  # the certificate, loaded


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('stage = "fab"\n', "stage must be one of full, provision, program, got 'fab'"),
        ('stage = "provision"\nvendors = ["fab.pem"]\n', "device_class is required in a 'prov"),
        (
            'stage = "provision"\ndevice_class = "s"\nimage = "fw"\nvendors = ["fab.pem"]\n',
            "a 'provision' job has no image",
        ),
        ('stage = "program"\nimage = "fw"\n', "provisioned_by is required in a 'program' job"),
        (
            'stage = "program"\nimage = "fw"\nprovisioned_by = ["j1"]\nvendors = ["fab.pem"]\n',
            "a 'program' job has no vendors",
        ),
        (
            'image = "fw"\nvendors = ["fab.pem"]\nprovisioned_by = ["j1"]\n',
            "a 'full' job has no provisioned_by",
        ),
        ('stage = "program"\nimage = "fw"\nprovisioned_by = []\n', "must name 1..64 provisio"),
        ('stage = "program"\nimage = "fw"\nprovisioned_by = ["a", "a"]\n', "names a provisio"),
        ('stage = "program"\nimage = "fw"\nprovisioned_by = ["a b"]\n', "job id 'a b' must"),
        ('stage = "program"\nimage = "fw"\nprovisioned_by = "j1"\n', "must be a list of job"),
        ('stage = "program"\nimage = "fw"\nprovisioned_by = ["gone.pem"]\n', "gone.pem"),
    ],
)
def test_a_bad_stage_in_a_spec_is_one_clear_error(tmp_path: Path, body: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        load_job_spec(_spec(tmp_path, body))
