"""The OEM names the silicon vendors (issue 22): which vendor CAs a job accepts is inside
what the officers sign, the job spec names their certificates, the job package ships them,
identification reports which CA certified a chip, and reconciliation refuses a ledger
record naming a CA the job does not.

These are the pure parts (formats, spec, identification, reconciliation); the appliance
refusing a fab the OEM never named -- through the CLI, the runner and the line, with
nothing counted -- is tests/integration/test_vendor_trust.py.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.device.vendor import SiliconVendor
from securethread.errors import ConfigurationError, FormatError, JobError, LedgerError
from securethread.formats import cbor, ledger
from securethread.formats.identity import (
    IdentityVerifier,
    UnknownVendorError,
    VendorCAError,
    VendorCertificateError,
    check_vendor_cas,
    new_challenge,
    vendor_ca_id,
)
from securethread.formats.job import MAX_VENDORS, ProductionJob, Targets, job_hash, sign_job
from securethread.formats.jobpackage import JobPackage
from securethread.formats.reconciliation import ReconciliationError
from securethread.hsm import SIGNING, Curve, SoftwareBackend, fingerprint
from securethread.oem.jobspec import load_job_spec
from securethread.pki.profile import DeviceProfile

from .ledger_world import OTHER_VENDOR_CA, SECOND_VENDOR_CA, VENDOR_CA, World, make_world

A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def fab() -> SiliconVendor:
    return SiliconVendor("Genuine Fab")


@pytest.fixture(scope="module")
def rogue() -> SiliconVendor:
    return SiliconVendor("Rogue Fab")


def _job(**kw: Any) -> ProductionJob:
    now = int(time.time())
    args: dict[str, Any] = dict(
        job_id="job-v", device_class="sensor-v1", targets=Targets(ranges=((0x1000, 0x1FFF),)),
        quota=5, not_before=now - 60, not_after=now + 3600, image_id="fw-1",
        manifest_sha256=b"\x22" * 32, programmer=b"\x11" * 32,
        certificate=DeviceProfile(organisation="Test OEM"), production_ca=b"\x33" * 32,
        vendors=(B, A),
    )  # fmt: skip
    args.update(kw)
    return ProductionJob(**args)


# --- the job body -------------------------------------------------------------------------------


def test_the_job_names_its_vendors_sorted_and_the_officers_sign_them() -> None:
    job = _job()
    assert job.vendors == (A, B)  # one encoding per set (S6)
    assert ProductionJob.from_obj(job.to_obj()) == job
    officer = SoftwareBackend("o").generate_ec("o", curve=Curve.P256, policy=SIGNING)
    # Another vendor set is another signed body, so another job identity.
    assert job_hash(sign_job(job, [officer])) != job_hash(
        sign_job(_job(vendors=(A, C)), [officer])
    )


@pytest.mark.parametrize(
    ("vendors", "why"),
    [
        ([B, A], "field 'vendors' must be strictly ascending"),
        ([A, A], "field 'vendors' must be strictly ascending"),
        ([A[:31]], "field 'vendors' item 0 must be 32 bytes"),
        ([A, "b" * 32], "field 'vendors' item 1 must be 32 bytes"),
        (A, "field 'vendors' must be an array"),
        ([bytes([i]) * 32 for i in range(MAX_VENDORS + 1)], f"must list 0..{MAX_VENDORS} items"),
    ],
)
def test_a_malformed_vendor_list_is_refused(vendors: object, why: str) -> None:
    obj = _job().to_obj()
    obj["vendors"] = vendors
    with pytest.raises(FormatError, match=why):
        ProductionJob.from_obj(obj)


def test_a_job_without_vendors_is_refused() -> None:
    obj = _job().to_obj()
    del obj["vendors"]
    with pytest.raises(FormatError, match="vendors"):
        ProductionJob.from_obj(obj)
    # The list may be empty on the wire (a "program" job names no vendor), a "full" job's not.
    obj["vendors"] = []
    with pytest.raises(JobError, match="'full' job must name at least one vendor CA"):
        ProductionJob.from_obj(obj)
    with pytest.raises(JobError, match="'full' job must name at least one vendor CA"):
        _job(vendors=())


# --- the job package --------------------------------------------------------------------------


def test_the_job_package_carries_the_vendor_certificates(fab: SiliconVendor) -> None:
    package = JobPackage(
        job=b"j", production_ca=b"p", manifest=b"m", device_trust=b"d",
        vendors=(_der(fab.root_certificate),),
    )  # fmt: skip
    assert JobPackage.from_bytes(package.to_bytes()) == package


def test_audit_inspect_shows_the_packages_vendor_certificates(fab: SiliconVendor) -> None:
    from securethread.audit.inspect import describe

    officer = SoftwareBackend("o").generate_ec("o", curve=Curve.P256, policy=SIGNING)
    part = sign_job(_job(), [officer])  # inspect shows each part as it is, unverified
    package = JobPackage(
        job=part, production_ca=b"p", manifest=part, device_trust=part,
        vendors=(_der(fab.root_certificate),),
    )  # fmt: skip
    (view,) = describe(package.to_bytes())["vendors"]
    assert "Genuine Fab" in view["subject"] and view["sha256"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        # Empty is well-formed (a "program" job names no vendor); open-job checks the list
        # against the job's (test_job_stages, test_fab_provisioning).
        ({"vendors": [b"v"] * 65}, "field 'vendors' must list 0..64 items"),
        ({"vendors": b"x"}, "field 'vendors' must be an array"),
        ({"vendors": ["text"]}, "field 'vendors' item 0 must be 1..4096 bytes"),
        ({"vendors": [b""]}, "field 'vendors' item 0 must be 1..4096 bytes"),
        ({"vendors": [b"x" * 5000]}, "field 'vendors' item 0 must be 1..4096 bytes"),
        ({"v": 1}, "unsupported version 1"),
        ({"v": True}, "unsupported version True"),
    ],
)
def test_a_malformed_job_package_is_refused(change: dict[str, Any], why: str) -> None:
    outer = cbor.decode(
        JobPackage(
            job=b"j", production_ca=b"p", manifest=b"m", device_trust=b"d", vendors=(b"v",)
        ).to_bytes()
    )
    outer.update(change)
    with pytest.raises(FormatError, match=why):
        JobPackage.from_bytes(cbor.encode(outer))


def test_a_job_package_of_the_first_format_is_refused() -> None:
    outer = cbor.decode(
        JobPackage(
            job=b"j", production_ca=b"p", manifest=b"m", device_trust=b"d", vendors=(b"v",)
        ).to_bytes()
    )
    del outer["vendors"]
    with pytest.raises(FormatError, match="missing field 'vendors'"):
        JobPackage.from_bytes(cbor.encode(outer))


# --- vendor CA certificates against the job's hashes --------------------------------------------


def test_vendor_ca_id_is_the_hash_of_the_key(fab: SiliconVendor) -> None:
    key = fab.root_certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert vendor_ca_id(fab.root_certificate) == fingerprint(key)


def test_exactly_the_named_vendor_cas_are_accepted(
    fab: SiliconVendor, rogue: SiliconVendor
) -> None:
    named = {vendor_ca_id(fab.root_certificate), vendor_ca_id(rogue.root_certificate)}
    got = check_vendor_cas(
        [_der(rogue.root_certificate), _der(fab.root_certificate)], named=named, what="ca"
    )
    assert [vendor_ca_id(c) for c in got] == sorted(named)


def _not_a_ca(fab: SiliconVendor) -> bytes:
    return _der(fab.make_chip().vendor_certificate)


@pytest.mark.parametrize(
    ("given", "why"),
    [
        (lambda f, r: [_der(r.root_certificate)], "is not a vendor CA the job names"),
        (lambda f, r: [_der(f.root_certificate), _der(r.root_certificate)], "Rogue Fab"),
        (lambda f, r: [], "no certificate for the job's vendor CA"),
        (lambda f, r: [_der(f.root_certificate)] * 2, "given twice"),
        (lambda f, r: [b"\x30\x03\x02\x01\x00"], "ca 0"),
    ],
)
def test_other_missing_or_repeated_vendor_cas_are_refused(
    fab: SiliconVendor, rogue: SiliconVendor, given: Any, why: str
) -> None:
    with pytest.raises(VendorCAError, match=why):
        check_vendor_cas(given(fab, rogue), named={vendor_ca_id(fab.root_certificate)}, what="ca")


def test_a_chip_certificate_is_not_a_vendor_ca(fab: SiliconVendor) -> None:
    chip = x509.load_der_x509_certificate(_not_a_ca(fab))
    with pytest.raises(VendorCAError, match="not a CA certificate"):
        check_vendor_cas([_der(chip)], named={vendor_ca_id(chip)}, what="ca")


# --- identification reports which CA certified the chip -----------------------------------------


def test_identification_reports_the_vendor_ca_that_certified_the_chip(
    fab: SiliconVendor, rogue: SiliconVendor
) -> None:
    verifier = IdentityVerifier([fab.root_certificate, rogue.root_certificate])
    for vendor in (fab, rogue):
        chip = vendor.make_chip()
        ch = new_challenge()
        ident = verifier.verify(chip.identify(ch), challenge=ch)
        assert ident.vendor_ca == vendor_ca_id(vendor.root_certificate)


def test_two_named_fabs_of_one_name_are_told_apart_by_their_keys() -> None:
    """A fab that re-keyed keeps its name: each chip is credited to the CA that signed it."""
    old, new = SiliconVendor("Same Fab"), SiliconVendor("Same Fab")
    verifier = IdentityVerifier([old.root_certificate, new.root_certificate])
    for vendor in (old, new):
        chip = vendor.make_chip()
        ch = new_challenge()
        ident = verifier.verify(chip.identify(ch), challenge=ch)
        assert ident.vendor_ca == vendor_ca_id(vendor.root_certificate)


def test_a_fab_the_job_does_not_name_is_refused_with_its_reason(
    fab: SiliconVendor, rogue: SiliconVendor
) -> None:
    verifier = IdentityVerifier([fab.root_certificate])
    ch = new_challenge()
    with pytest.raises(UnknownVendorError, match="not a vendor CA this job names"):
        verifier.verify(rogue.make_chip().identify(ch), challenge=ch)
    # `securethread vendor init` makes every simulated fab under one default name: a rogue
    # of the genuine fab's name fails on the signature, and says so.
    twin = SiliconVendor(fab.name)
    with pytest.raises(VendorCertificateError, match="under the vendor CA .* this job names"):
        verifier.verify(twin.make_chip().identify(ch), challenge=ch)


# --- the job spec -------------------------------------------------------------------------------

_SPEC = (
    'job_id = "j"\nprogrammer = "f-1"\nimage = "fw"\nquota = 3\n{vendors}'
    '[targets]\nranges = [["5ec0000000000000", "5ec0000000000002"]]\n[window]\ndays = 1\n'
)


def _spec(tmp_path: Path, vendors: str) -> Path:
    p = tmp_path / "spec" / "j.toml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(_SPEC.format(vendors=vendors))
    return p


def test_the_job_spec_names_vendor_certificate_files(
    tmp_path: Path, fab: SiliconVendor, rogue: SiliconVendor
) -> None:
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "fab.pem").write_bytes(_pem(fab.root_certificate))
    (tmp_path / "rogue.pem").write_bytes(_pem(rogue.root_certificate))
    spec = load_job_spec(
        _spec(tmp_path, f'vendors = ["fab.pem", "{tmp_path / "rogue.pem"}"]\n')
    )  # relative to the spec, or absolute
    assert spec.vendors == (fab.root_certificate, rogue.root_certificate)


def _files(fab: SiliconVendor) -> dict[str, bytes]:
    return {
        "fab.pem": _pem(fab.root_certificate),
        "chip.pem": _pem(fab.make_chip().vendor_certificate),
        "two.pem": _pem(fab.root_certificate) * 2,
        "junk.pem": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    }


@pytest.mark.parametrize(
    ("vendors", "why"),
    [
        ("", "vendors is required"),
        ("vendors = []\n", "must name 1"),
        ('vendors = "fab.pem"\n', "list of certificate file names"),
        ('vendors = ["missing.pem"]\n', "cannot read vendor CA certificate"),
        ('vendors = ["chip.pem"]\n', "not a CA certificate"),
        ('vendors = ["fab.pem", "fab.pem"]\n', "given twice"),
        ('vendors = ["two.pem"]\n', "exactly one PEM block"),
        ('vendors = ["junk.pem"]\n', "vendor CA certificate"),
    ],
)
def test_a_bad_vendors_entry_in_the_job_spec_is_one_clear_error(
    tmp_path: Path, fab: SiliconVendor, vendors: str, why: str
) -> None:
    spec = _spec(tmp_path, vendors)
    for name, data in _files(fab).items():
        (spec.parent / name).write_bytes(data)
    with pytest.raises(ConfigurationError, match=why) as exc:  # exit 2, one line
        load_job_spec(spec)
    assert "\n" not in str(exc.value)


# --- the ledger records the vendor CA; reconciliation checks it against the job ------------------


@pytest.fixture(scope="module")
def world() -> World:
    return make_world("vendors")


def test_a_ledger_of_chips_from_the_named_vendors_reconciles(world: World) -> None:
    recs = [
        world.provisioned(0, vendor_ca=VENDOR_CA),
        world.provisioned(1, vendor_ca=SECOND_VENDOR_CA),
    ]
    items = world.items(recs)
    assert world.check(items).provisioned == 2
    raws = [raw for tag, raw in items if tag == "r"]
    assert [ledger.parse_record(r, i).vendor_ca for i, r in enumerate(raws)] == [
        VENDOR_CA, SECOND_VENDOR_CA
    ]  # fmt: skip


def test_a_record_naming_a_vendor_ca_outside_the_job_is_refused(world: World) -> None:
    recs = [world.provisioned(0), world.provisioned(1, vendor_ca=OTHER_VENDOR_CA)]
    with pytest.raises(ReconciliationError, match="ledger record 1: .*vendor CA 0c0c") as exc:
        world.check(world.items(recs))
    assert exc.value.index == 1
    assert "does not name" in str(exc.value)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"vendor_ca": b"\x0a" * 31}, "field 'vendor_ca' must be 32 bytes"),
        ({"vendor_ca": "0a" * 32}, "field 'vendor_ca' must be 32 bytes"),
        ({"v": 1}, "field 'v' must be 3"),  # a record of the first format, which named no vendor
        ({"v": 2}, "field 'v' must be 3"),  # the encoding before issue 21
    ],
)
def test_a_provisioning_record_with_a_bad_vendor_field_is_refused(
    world: World, change: dict[str, Any], why: str
) -> None:
    ((_r, _s, raw, _h),) = ledger.chain(
        [world.provisioned(0)], job=world.job_id, start_seq=0, prev=world.job_id
    )
    body = cbor.decode(raw)
    body.update(change)
    with pytest.raises(LedgerError, match=why):
        ledger.parse_record(cbor.encode(body), 0)
    del body["vendor_ca"]
    with pytest.raises(LedgerError, match="missing field 'vendor_ca'"):
        ledger.parse_record(cbor.encode(body), 0)


def test_a_programmed_record_names_no_vendor(world: World) -> None:
    rec = world.programmed(0)
    ((_r, _s, raw, _h),) = ledger.chain([rec], job=world.job_id, start_seq=0, prev=world.job_id)
    assert "vendor_ca" not in cbor.decode(raw)
    assert ledger.parse_record(raw, 0).vendor_ca == b""


def test_a_vendor_ca_without_key_usage_is_refused(fab: SiliconVendor) -> None:
    """A vendor CA is what a fab's root is (cA, keyCertSign); one without keyUsage is not."""
    root = fab.root_certificate
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no key usage")])
    bare = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    with pytest.raises(VendorCAError, match="lacks 2.5.29.15"):
        check_vendor_cas([_der(bare)], named={vendor_ca_id(bare)}, what="ca")
