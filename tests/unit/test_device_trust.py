"""The chip trusts only its OEM (docs/device.md): the fab burns the hash of the OEM root's key
into ordered parts; the SBM refuses provisioning data under any other root, takes the
firmware-signing key, device class, job and rollback floor only from a statement the OEM root
signed, binds the production CA to that job, and never lowers its rollback floor.

Every refusal is checked to leave flash, OTP and fuses unchanged.  Software keys only; the
token path (root key in SoftHSM signing the statement) is tests/integration/test_mastering.py.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import pickle
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.device import (
    ChipSpec,
    DeviceTrustRefusedError,
    NotProvisionedError,
    OemRootMismatchError,
    ProvisioningData,
    ProvisioningError,
    ProvisioningFormatError,
    ProvisioningRollbackError,
    SimulatedDevice,
    UnorderedPartError,
    make_chips,
    verify_boot_confirmation,
)
from securethread.errors import FormatError, RollbackError
from securethread.formats import cbor
from securethread.formats.device_trust import (
    DEVICE_TRUST_KIND,
    DeviceTrust,
    DeviceTrustFormatError,
    DeviceTrustSignatureError,
    oem_root_hash,
    sign_device_trust,
    verify_device_trust,
)
from securethread.formats.envelope import add_signature, seal
from securethread.formats.identity import IdentityVerifier, new_challenge
from securethread.formats.image import ManifestSignatureError
from securethread.hsm import SoftwareBackend
from securethread.keys.ecutil import CryptographyKeyAdapter, spki_der
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    certify_production_ca,
    create_production_ca_csr,
    create_root_ca,
)
from securethread.programmer.line import DevicePort
from securethread.programmer.runner import PortFactory
from tests import cose_edit
from tests.unit.test_device import DEVICE_CLASS, JOB, World, _refused, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def evil() -> World:
    """An attacker's complete look-alike OEM: own root (same subject name as the genuine
    one), production CA for the same job id, firmware-signing key, image key, license keys."""
    return make_world()


def _boots(world: World, dev: SimulatedDevice, *, counter: int = 3) -> bytes:
    data = os.urandom(300)
    signed, blob, m = world.master(data, counter=counter)
    nonce = os.urandom(16)
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    conf = dev.program(signed, io.BytesIO(blob), lic, nonce=nonce)
    verify_boot_confirmation(
        conf, device_public_key=dev.public_key, device_id=dev.device_id, manifest=m, nonce=nonce
    )
    assert dev.firmware == data
    return conf


def _tag(job_id: str) -> bytes:
    """Stands in for the signed job's hash (as make_world's device certificates do)."""
    return hashlib.sha256(job_id.encode()).digest()


def _pca(world: World, job_id: str) -> tuple[Any, DeviceCertificateIssuer]:
    """Another production CA certified by ``world``'s root, for ``job_id``."""
    label = "pca-" + os.urandom(4).hex()
    csr = create_production_ca_csr(world.prog, label=label, job_id=job_id)
    cert = certify_production_ca(
        world.oem.private_key("root"),
        world.root_cert,
        csr,
        job_id=job_id,
        not_before=world.root_cert.not_valid_before_utc,
    )
    issuer = DeviceCertificateIssuer(
        world.prog.private_key(label),
        cert,
        job_id=job_id,
        job_tag=_tag(job_id),
        profile=DeviceProfile(organisation="securethread"),
    )
    return cert, issuer


def _root_like(world: World, *, key: Any, signer: Any) -> x509.Certificate:
    """A copy of ``world``'s root certificate with ``key`` as subject key, signed by
    ``signer``, with a new serial and notBefore (a re-issue when both are the root's own)."""
    root = world.root_cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(root.subject)
        .issuer_name(root.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(root.not_valid_before_utc - datetime.timedelta(seconds=1))
        .not_valid_after(root.not_valid_after_utc)
    )
    for ext in root.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(CryptographyKeyAdapter(signer), hashes.SHA384())


# --- the fab -------------------------------------------------------------------------------


def test_oem_root_hash_is_sha256_of_the_root_spki(world: World, evil: World) -> None:
    assert world.root_hash == hashlib.sha256(spki_der(world.root_cert.public_key())).digest()
    assert world.root_cert.subject == evil.root_cert.subject  # the look-alike's name is equal
    assert evil.root_hash != world.root_hash


def test_ordered_part_carries_the_burnt_hash_and_floor(world: World) -> None:
    dev = world.part(rollback_floor=4)
    assert dev.oem_root_hash == world.root_hash
    assert dev.rollback_counter == 4
    assert dev.otp is None and dev.trust is None


def test_stock_part_accepts_no_provisioning(world: World) -> None:
    dev = world.vendor.make_chip()
    assert dev.oem_root_hash is None
    challenge = new_challenge()
    ident = IdentityVerifier([world.vendor.root_certificate]).verify(
        dev.identify(challenge), challenge=challenge
    )
    assert ident.device_id == dev.device_id  # a stock part still identifies itself
    raw = world.provisioning(dev).to_bytes()
    err = _refused(dev, UnorderedPartError, lambda: dev.provision(raw))
    assert "stock part" in str(err)


def test_chip_specs_pickle_and_boot(world: World) -> None:
    """The line's path: make_chips at the fab, pickled to a worker, opened, identified,
    provisioned through the programmer's packager, programmed, boot confirmed."""
    base = int.from_bytes(os.urandom(6), "big") << 8
    specs = make_chips(world.vendor, [base, base + 1], oem_root_hash=world.root_hash)
    assert [s.device_id for s in specs] == [f"{base:016x}", f"{base + 1:016x}"]
    again = pickle.loads(pickle.dumps(specs))
    assert again == specs and all(isinstance(s, ChipSpec) for s in again)
    package = ProvisioningData.packager(
        production_ca_certificate=world.pca_cert,
        oem_root_certificate=world.root_cert,
        device_trust=world.trust(),
        job_sha256=_tag(JOB),
    )
    verifier = IdentityVerifier([world.vendor.root_certificate])
    for spec in again:
        factory: PortFactory = spec  # the spec is the runner's PortFactory (mypy)
        port: DevicePort = factory.open()  # and the chip its DevicePort
        dev = spec.open()
        assert dev.device_id == spec.device_id and dev.oem_root_hash == world.root_hash
        challenge = new_challenge()
        ident = verifier.verify(port.identify(challenge), challenge=challenge)
        world.seq += 1
        cert = world.devcerts.issue(ident.public_key, ident.device_id, world.seq)
        dev.provision(package(cert.public_bytes(serialization.Encoding.DER)))
        assert dev.rollback_counter == 2
        _boots(world, dev)


def test_fab_order_bad_inputs(world: World) -> None:
    base = int.from_bytes(os.urandom(6), "big") << 8
    make_chips(world.vendor, [base], oem_root_hash=world.root_hash)
    with pytest.raises(ValueError, match="already issued"):
        make_chips(world.vendor, [base], oem_root_hash=world.root_hash)
    for uid in (-1, 2**64, "00"):
        with pytest.raises(ValueError, match="64-bit"):
            make_chips(world.vendor, [uid], oem_root_hash=world.root_hash)  # type: ignore[list-item]
    for bad_hash in (b"", world.root_hash[:31], world.root_hash.hex()):
        with pytest.raises(ValueError, match="32 bytes"):
            world.vendor.make_chip(oem_root_hash=bad_hash)  # type: ignore[arg-type]
    for floor in (-1, 2**32, True):
        with pytest.raises(ValueError, match="rollback_floor"):
            world.vendor.make_chip(oem_root_hash=world.root_hash, rollback_floor=floor)
    # a bad order consumed no UID and made no chip
    assert len(make_chips(world.vendor, [base + 1], oem_root_hash=None)) == 1


# --- rogue root ----------------------------------------------------------------------------


def test_genuine_chip_refuses_rogue_root_at_first_provisioning(world: World, evil: World) -> None:
    """The attack of issue 13: a genuine, blank chip given a complete, self-consistent set of
    anchors under another root (same root name) would take it and flash the attacker's
    firmware.  The burnt hash stops it before anything in the data is used."""
    dev = world.part()
    rogue = evil.provisioning(dev)  # evil certifies the chip's (public) key under its own CA
    err = _refused(dev, OemRootMismatchError, lambda: dev.provision(rogue.to_bytes()))
    assert "burnt at the fab" in str(err)
    # ... so the attacker's firmware has nothing to be checked against and is not flashed,
    signed, blob, m = evil.master(b"attacker firmware")
    lic = evil.issuer(m).issue(dev.device_id, dev.public_key)
    _refused(
        dev, NotProvisionedError, lambda: dev.program(signed, io.BytesIO(blob), lic, bytes(16))
    )
    # ... and the blank chip still takes its OEM's provisioning data, then its firmware.
    dev.provision(world.provisioning(dev).to_bytes())
    _boots(world, dev)
    _refused(
        dev, ManifestSignatureError, lambda: dev.program(signed, io.BytesIO(blob), lic, bytes(16))
    )


def test_genuine_root_key_with_a_forged_root_certificate_refused(world: World, evil: World) -> None:
    """The genuine root key (its hash matches) in a certificate the root key did not sign."""
    dev = world.part()
    forged = _root_like(
        world, key=world.root_cert.public_key(), signer=evil.oem.private_key("root")
    )
    assert oem_root_hash(forged) == world.root_hash
    raw = world.provisioning(dev, oem_root_certificate=forged).to_bytes()
    err = _refused(dev, OemRootMismatchError, lambda: dev.provision(raw))
    assert "self-signed" in str(err)


def test_reissued_root_certificate_with_the_same_key_accepted(world: World) -> None:
    """Why the fab burns the hash of the key, not of the certificate: parts in stock survive
    the OEM re-issuing its root certificate (new serial, longer validity, same key)."""
    dev = world.part()
    reissued = _root_like(
        world, key=world.root_cert.public_key(), signer=world.oem.private_key("root")
    )
    assert reissued != world.root_cert and oem_root_hash(reissued) == world.root_hash
    dev.provision(world.provisioning(dev, oem_root_certificate=reissued).to_bytes())
    _boots(world, dev)


# --- production CA -------------------------------------------------------------------------


def test_production_ca_under_another_root_refused(world: World, evil: World) -> None:
    """Genuine root and statement, but the production CA (same job id) and the device
    certificate come from another root."""
    dev = world.part()
    evil.seq += 1
    cert = evil.devcerts.issue(dev.public_key, dev.device_id, evil.seq)
    raw = world.provisioning(
        dev, device_certificate=cert, production_ca_certificate=evil.pca_cert
    ).to_bytes()
    err = _refused(dev, ProvisioningError, lambda: dev.provision(raw))
    assert "chain" in str(err)


def test_production_ca_of_another_job_refused(world: World) -> None:
    """Each statement is bound to one job: neither an other job's production CA under this
    job's statement, nor an other job's statement (another device class) with this job's CA."""
    pca2, certs2 = _pca(world, "job-2")
    trust2 = world.trust(job_id="job-2", job_sha256=_tag("job-2"), device_class="gateway-v2")
    dev = world.part()
    world.seq += 1
    cert2 = certs2.issue(dev.public_key, dev.device_id, world.seq)
    raw = world.provisioning(
        dev, device_certificate=cert2, production_ca_certificate=pca2
    ).to_bytes()
    err = _refused(dev, ProvisioningError, lambda: dev.provision(raw))
    assert "job" in str(err)
    raw = world.provisioning(dev, device_trust=trust2).to_bytes()
    err = _refused(dev, ProvisioningError, lambda: dev.provision(raw))
    assert "job" in str(err)
    # control: job-2's statement with job-2's production CA is accepted
    raw = world.provisioning(
        dev, device_certificate=cert2, production_ca_certificate=pca2, device_trust=trust2
    ).to_bytes()
    dev.provision(raw)
    assert dev.trust is not None and dev.trust.device_class == "gateway-v2"


def test_device_certificate_of_another_signed_job_with_the_same_id_refused(world: World) -> None:
    """The statement names the exact signed job: a certificate from this job's production CA
    whose serial carries another job's tag (a re-issued job under the same id) is refused."""
    other = DeviceCertificateIssuer(
        world.prog.private_key("pca"),
        world.pca_cert,
        job_id=JOB,
        job_tag=_tag("another signed job"),
        profile=DeviceProfile(organisation="securethread"),
    )
    dev = world.part()
    world.seq += 1
    cert = other.issue(dev.public_key, dev.device_id, world.seq)
    raw = world.provisioning(dev, device_certificate=cert).to_bytes()
    err = _refused(dev, ProvisioningError, lambda: dev.provision(raw))
    assert "serial" in str(err)


# --- firmware-signing key, device class, floor: authenticated or refused ---------------------


@pytest.mark.parametrize("who", ["evil root", "firmware key", "production CA", "license key"])
def test_statement_not_signed_by_the_burnt_root_refused(
    world: World, evil: World, who: str
) -> None:
    """Another root, or a key the OEM or the programmer holds that is not the root."""
    signer = {
        "evil root": evil.oem.private_key("root"),
        "firmware key": world.fw_key,
        "production CA": world.prog.private_key("pca"),
        "license key": world.prog.private_key("lic"),
    }[who]
    dev = world.part()
    statement = world.trust(signer=signer, firmware_signing_key=evil.fw_key.public_key())
    raw = world.provisioning(dev, device_trust=statement).to_bytes()
    _refused(dev, DeviceTrustRefusedError, lambda: dev.provision(raw))


@pytest.mark.parametrize(
    "field,value",
    [
        ("device_class", "gateway-v2"),
        ("firmware_signing_key", "evil"),
        ("min_security_counter", 0),
        ("job_id", "job-2"),
        ("job_sha256", b"\x01" * 32),
    ],
)
def test_statement_altered_on_the_line_refused(
    world: World, evil: World, field: str, value: Any
) -> None:
    """The root's signature kept, one authenticated value changed."""
    body = cose_edit.body(world.trust())
    body[field] = spki_der(evil.fw_key.public_key()) if value == "evil" else value
    statement = cose_edit.with_body(world.trust(), body)
    dev = world.part()
    raw = world.provisioning(dev, device_trust=statement).to_bytes()
    err = _refused(dev, DeviceTrustRefusedError, lambda: dev.provision(raw))
    assert "signature" in str(err)


def test_statement_with_an_extra_signer_refused(world: World, evil: World) -> None:
    dev = world.part()
    with pytest.raises(FormatError, match="exactly one signer"):
        add_signature(world.trust(), DEVICE_TRUST_KIND, evil.oem.private_key("root"))
    # The statement as a COSE_Sign by the root and another key: not a COSE_Sign1, refused.
    keys = [world.oem.private_key("root"), evil.oem.private_key("root")]
    statement = cose_edit.multi_seal(DEVICE_TRUST_KIND, cose_edit.body(world.trust()), keys)
    raw = world.provisioning(dev, device_trust=statement).to_bytes()
    _refused(dev, DeviceTrustRefusedError, lambda: dev.provision(raw))


def test_version_1_provisioning_data_with_bare_anchors_refused(world: World, evil: World) -> None:
    """Yesterday's format: firmware-signing key, device class and floor as plain fields."""
    dev = world.part()
    d = cbor.decode(world.provisioning(dev).to_bytes())
    del d["device_trust"]
    d.update(
        v=1,
        firmware_signing_key=spki_der(evil.fw_key.public_key()),
        min_security_counter=0,
        device_class=DEVICE_CLASS,
    )
    _refused(dev, ProvisioningFormatError, lambda: dev.provision(cbor.encode(d)))


def test_verified_anchors_are_what_the_root_signed(world: World) -> None:
    dev = world.chip()
    assert dev.trust == DeviceTrust(
        job_id=JOB,
        job_sha256=_tag(JOB),
        device_class=DEVICE_CLASS,
        firmware_signing_key=world.fw_key.public_key(),
        min_security_counter=2,
    )


# --- rollback floor ------------------------------------------------------------------------


def test_provisioning_never_lowers_the_fused_floor(world: World) -> None:
    dev = world.part(rollback_floor=5)
    raw = world.provisioning(dev, device_trust=world.trust(min_security_counter=4)).to_bytes()
    err = _refused(dev, ProvisioningRollbackError, lambda: dev.provision(raw))
    assert isinstance(err, RollbackError) and "below the fused 5" in str(err)
    dev.provision(
        world.provisioning(dev, device_trust=world.trust(min_security_counter=5)).to_bytes()
    )
    assert dev.rollback_counter == 5
    # a floor above the fused one raises the fuses at provisioning
    up = world.part(rollback_floor=1)
    up.provision(
        world.provisioning(up, device_trust=world.trust(min_security_counter=7)).to_bytes()
    )
    assert up.rollback_counter == 7
    signed, blob, m = world.master(b"v6", counter=6)
    lic = world.issuer(m).issue(up.device_id, up.public_key)
    _refused(up, RollbackError, lambda: up.program(signed, io.BytesIO(blob), lic, bytes(16)))


def test_programming_floor_only_rises(world: World) -> None:
    """Across a sequence of validly signed images the fused floor is the highest counter
    booted so far; every older image is refused and leaves the state as it was."""
    dev = world.chip()  # floor 2 from the statement
    images = {c: world.master(f"v{c}".encode() * 50, counter=c) for c in (1, 2, 3, 5, 6)}
    for c in (3, 5, 2, 3, 5, 1, 6, 5):
        floor = dev.rollback_counter
        signed, blob, m = images[c]
        lic = world.issuer(m).issue(dev.device_id, dev.public_key)
        if c < floor:
            _refused(
                dev,
                RollbackError,
                lambda s=signed, b=blob, li=lic: dev.program(s, io.BytesIO(b), li, bytes(16)),
            )
            assert dev.rollback_counter == floor
        else:  # the same counter again is allowed (a repair)
            dev.program(signed, io.BytesIO(blob), lic, bytes(16))
            assert dev.firmware == f"v{c}".encode() * 50
            assert dev.rollback_counter == c
    assert dev.rollback_counter == 6


# --- the statement itself (formats/device_trust.py) ----------------------------------------


def test_statement_round_trip(world: World) -> None:
    trust = DeviceTrust(
        job_id="job-9",
        job_sha256=os.urandom(32),
        device_class="sensor-v2",
        firmware_signing_key=world.fw_key.public_key(),
        min_security_counter=2**32 - 1,
    )
    signed = sign_device_trust(trust, world.oem.private_key("root"))
    assert verify_device_trust(signed, oem_root=world.root_cert) == trust


@pytest.mark.parametrize(
    "over",
    [
        {"job_id": "no spaces"},
        {"job_id": ""},
        {"job_sha256": b"\x00" * 31},
        {"job_sha256": "00" * 32},
        {"device_class": "bad class!"},
        {"device_class": 7},
        {"min_security_counter": -1},
        {"min_security_counter": 2**32},
        {"min_security_counter": True},
        {"firmware_signing_key": ec.generate_private_key(ec.SECP384R1()).public_key()},
        {"firmware_signing_key": b"\x30\x00"},
        {"version": 1},  # the encoding before issue 21
        {"version": 3},
    ],
)
def test_statement_bad_values_refused_at_construction(world: World, over: dict[str, Any]) -> None:
    fields: dict[str, Any] = dict(
        job_id=JOB,
        job_sha256=_tag(JOB),
        device_class=DEVICE_CLASS,
        firmware_signing_key=world.fw_key.public_key(),
        min_security_counter=1,
    )
    with pytest.raises(DeviceTrustFormatError):
        DeviceTrust(**{**fields, **over})


def _root_signed(world: World, body: dict[str, Any], kind: str = DEVICE_TRUST_KIND) -> bytes:
    return seal(kind, body, [world.oem.private_key("root")])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: {k: v for k, v in b.items() if k != "device_class"},
        lambda b: {**b, "extra": 1},
        lambda b: {**b, "v": 1},  # the encoding before issue 21
        lambda b: {**b, "v": 3},
        lambda b: {**b, "firmware_signing_key": "not bytes"},
        lambda b: {**b, "firmware_signing_key": b"\x30\x00"},
        lambda b: {
            **b,
            "firmware_signing_key": spki_der(ec.generate_private_key(ec.SECP384R1()).public_key()),
        },
        lambda b: {**b, "min_security_counter": -1},
    ],
)
def test_root_signed_but_malformed_statement_refused(world: World, mutate: Any) -> None:
    body = cose_edit.body(world.trust())
    with pytest.raises(DeviceTrustFormatError):
        verify_device_trust(_root_signed(world, mutate(body)), oem_root=world.root_cert)


def test_statement_of_another_kind_or_shape_refused(world: World) -> None:
    body = cose_edit.body(world.trust())
    with pytest.raises(DeviceTrustFormatError, match="device-trust"):
        verify_device_trust(_root_signed(world, body, "manifest"), oem_root=world.root_cert)
    for bad in (b"", b"\xa0", bytes(4096), "text"):
        with pytest.raises(DeviceTrustFormatError):
            verify_device_trust(bad, oem_root=world.root_cert)  # type: ignore[arg-type]
    with pytest.raises(DeviceTrustSignatureError):
        verify_device_trust(world.trust(), oem_root=make_world().root_cert)


def test_part_ordered_by_another_oem_refuses_this_oems_data(world: World) -> None:
    """One fab serves many OEMs; parts are not interchangeable between them."""
    other_root = create_root_ca(SoftwareBackend("other-oem"), label="root")
    dev = world.vendor.make_chip(oem_root_hash=oem_root_hash(other_root))
    raw = world.provisioning(dev).to_bytes()
    _refused(dev, OemRootMismatchError, lambda: dev.provision(raw))
