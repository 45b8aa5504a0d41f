"""A chip provisioned at a fab identifies by its OEM device certificate (docs/device.md,
"Identification"): the answer's optional certificate pair, and the programming job's
:class:`ProvisionedIdentityVerifier`.  Software keys (the OEM and fab appliance in software
backends, the same protocol as the tokens); the token path is in
tests/integration/test_fab_programming.py."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from securethread.device.sbm import SimulatedDevice
from securethread.errors import CertificateError, DeviceRefusedError
from securethread.formats import cbor
from securethread.formats.identity import (
    ChallengeMismatchError,
    DeviceIdMismatchError,
    IdentificationFormatError,
    IdentificationResponse,
    IdentityVerifier,
    KeyMismatchError,
    NotProvisionedChipError,
    ProofOfPossessionError,
    ProvisionedIdentityVerifier,
    UnknownProductionCAError,
    production_ca_id,
)
from securethread.hsm import SoftwareBackend
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    certify_production_ca,
    create_production_ca_csr,
    create_root_ca,
)
from tests.unit.test_device import JOB, World, make_world


def _der(cert: Any) -> bytes:
    return bytes(cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def _other_ca(
    world: World, job_id: str, *, root: Any = None
) -> tuple[Any, DeviceCertificateIssuer]:
    """A second production CA (another provisioning job), under ``root`` or the OEM's."""
    backend = SoftwareBackend("fab-2")
    if root is None:
        root_key, root_cert = world.oem.private_key("root"), world.root_cert
    else:
        root_key, root_cert = root
    csr = create_production_ca_csr(backend, label="pca", job_id=job_id)
    cert = certify_production_ca(
        root_key, root_cert, csr, job_id=job_id, not_before=root_cert.not_valid_before_utc
    )
    issuer = DeviceCertificateIssuer(
        backend.private_key("pca"),
        cert,
        job_id=job_id,
        job_tag=hashlib.sha256(job_id.encode()).digest(),
        profile=DeviceProfile(organisation="securethread"),
    )
    return cert, issuer


def _verifier(world: World, *cas: Any) -> ProvisionedIdentityVerifier:
    return ProvisionedIdentityVerifier(cas or (world.pca_cert,), world.root_cert)


def _answer(dev: SimulatedDevice) -> tuple[bytes, bytes]:
    challenge = os.urandom(32)
    return challenge, dev.identify(challenge)


def _edit(response: bytes, **over: Any) -> bytes:
    return attrs.evolve(IdentificationResponse.from_bytes(response), **over).to_bytes()


def test_a_provisioned_chip_answers_with_its_oem_certificate_and_is_identified(
    world: World,
) -> None:
    dev = world.chip()
    challenge, answer = _answer(dev)
    r = IdentificationResponse.from_bytes(answer)
    assert r.device_certificate is not None and r.production_ca_certificate == _der(world.pca_cert)
    assert r.to_bytes() == answer  # canonical: one encoding
    ident = _verifier(world).verify(answer, challenge=challenge)
    assert ident.device_id == dev.device_id
    assert ident.production_ca == production_ca_id(_der(world.pca_cert))
    assert ident.certificate_sha256 == hashlib.sha256(r.device_certificate).digest()
    assert ident.public_key.public_numbers() == dev.public_key.public_numbers()
    # the vendor certificate stays: a provisioning line still identifies the chip by it
    vendor = IdentityVerifier([world.vendor.root_certificate]).verify(answer, challenge=challenge)
    assert vendor.device_id == dev.device_id


def test_a_blank_chip_answers_without_the_pair_and_a_programming_job_refuses_it(
    world: World,
) -> None:
    dev = world.part()
    challenge, answer = _answer(dev)
    r = IdentificationResponse.from_bytes(answer)
    assert r.device_certificate is None and r.production_ca_certificate is None
    assert "device_certificate" not in cbor.decode(answer, what="t", max_size=1 << 14)
    with pytest.raises(NotProvisionedChipError, match="carries no OEM device certificate"):
        _verifier(world).verify(answer, challenge=challenge)


def test_a_chip_provisioned_under_a_ca_the_job_does_not_name_is_refused(world: World) -> None:
    other_cert, other = _other_ca(world, "job-2")
    dev = world.part()
    dev.provision(
        world.provisioning(
            dev,
            device_certificate=other.issue(dev.public_key, dev.device_id, 1),
            production_ca_certificate=other_cert,
            device_trust=world.trust(
                job_id="job-2", job_sha256=hashlib.sha256(b"job-2").digest()
            ),
        ).to_bytes()
    )
    challenge, answer = _answer(dev)
    with pytest.raises(UnknownProductionCAError, match="does not name"):
        _verifier(world).verify(answer, challenge=challenge)
    # named, the same chip is identified
    assert _verifier(world, world.pca_cert, other_cert).verify(answer, challenge=challenge)


def test_a_production_ca_the_oem_root_did_not_certify_is_refused(world: World) -> None:
    rogue = SoftwareBackend("rogue")
    rogue_root = create_root_ca(rogue, label="root")
    forged, issuer = _other_ca(world, JOB, root=(rogue.private_key("root"), rogue_root))
    # the programming appliance never trusts it, even if a job named it ...
    with pytest.raises(CertificateError):
        ProvisionedIdentityVerifier([forged], world.root_cert)
    # ... and a chip carrying it (same job id, same names) is refused by the lookup
    dev = world.chip()
    challenge, answer = _answer(dev)
    fake = _edit(
        answer,
        device_certificate=_der(issuer.issue(dev.public_key, dev.device_id, 7)),
        production_ca_certificate=_der(forged),
    )
    with pytest.raises(UnknownProductionCAError):
        _verifier(world).verify(fake, challenge=challenge)


def test_a_certificate_replayed_from_another_chip_is_refused(world: World) -> None:
    victim, thief = world.chip(), world.chip()
    _c, victim_answer = _answer(victim)
    stolen = IdentificationResponse.from_bytes(victim_answer).device_certificate
    challenge, answer = _answer(thief)
    # the thief shows the victim's certificate under its own id: another device id
    with pytest.raises(DeviceIdMismatchError):
        _verifier(world).verify(_edit(answer, device_certificate=stolen), challenge=challenge)
    # ... under the victim's id: the certificate certifies another key
    claimed = _edit(answer, device_certificate=stolen, device_id=victim.device_id)
    with pytest.raises(KeyMismatchError, match="replayed"):
        _verifier(world).verify(claimed, challenge=challenge)
    # ... with the victim's key too: it cannot sign for it
    victim_key = IdentificationResponse.from_bytes(victim_answer).public_key
    full = _edit(claimed, public_key=victim_key)
    with pytest.raises(ProofOfPossessionError):
        _verifier(world).verify(full, challenge=challenge)


def test_stale_challenge_altered_certificate_and_half_a_pair_are_refused(world: World) -> None:
    dev = world.chip()
    challenge, answer = _answer(dev)
    with pytest.raises(ChallengeMismatchError):
        _verifier(world).verify(answer, challenge=os.urandom(32))
    cert = IdentificationResponse.from_bytes(answer).device_certificate
    assert cert is not None
    bad = bytearray(cert)
    bad[-5] ^= 1  # inside the signature
    with pytest.raises(DeviceRefusedError):
        _verifier(world).verify(_edit(answer, device_certificate=bytes(bad)), challenge=challenge)
    with pytest.raises(IdentificationFormatError, match="come together"):
        _edit(answer, production_ca_certificate=None)
    raw = cbor.decode(answer, what="t", max_size=1 << 14)
    del raw["device_certificate"]
    with pytest.raises(IdentificationFormatError, match="come together"):
        IdentificationResponse.from_bytes(cbor.encode(raw))


def test_a_production_ca_outside_its_validity_is_refused_when_the_job_is_set_up(
    world: World,
) -> None:
    import datetime

    before = world.pca_cert.not_valid_before_utc - datetime.timedelta(days=1)
    with pytest.raises(CertificateError, match="not yet valid|before"):
        ProvisionedIdentityVerifier([world.pca_cert], world.root_cert, at=before)


def test_a_chip_provisioned_at_the_simulated_fab_keeps_its_otp(
    world: World, tmp_path: Any
) -> None:
    from securethread.demo.line import SimulatedFab, create_vendor, keep_otp
    from securethread.errors import AlreadyProvisionedError, ConfigurationError
    from securethread.workdir import to_pem

    (tmp_path / "root.pem").write_bytes(to_pem(world.root_cert))
    create_vendor(tmp_path / "vendor", oem_root=tmp_path / "root.pem")
    uid = 0x5EC0_0000_0000_0001
    chip = SimulatedFab(tmp_path / "vendor").chip(uid).open()
    assert chip.otp is None
    chip.provision(world.provisioning(chip).to_bytes())
    assert chip.otp is not None
    with pytest.raises(ConfigurationError, match="no OTP"):
        keep_otp(tmp_path / "vendor", f"{uid:016x}", b"")
    keep_otp(tmp_path / "vendor", chip.device_id, chip.otp)
    again = SimulatedFab(tmp_path / "vendor").chip(uid).open()  # the part, later, elsewhere
    assert again.otp == chip.otp and again.state() == chip.state()
    with pytest.raises(AlreadyProvisionedError):  # OTP is write-once, as on the fab's line
        again.provision(world.provisioning(again).to_bytes())
    challenge, answer = _answer(again)
    assert _verifier(world).verify(answer, challenge=challenge).device_id == chip.device_id
    # another part of the same fab is still blank
    assert SimulatedFab(tmp_path / "vendor").chip(uid + 1).open().otp is None
