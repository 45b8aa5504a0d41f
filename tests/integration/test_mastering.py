"""End to end on real SoftHSM tokens: OEM masters -> image key to the programmer -> programmer
identifies, certifies and provisions a device and issues its license -> the device's SBM boots.

The secure channel module is written concurrently, so the key transfer here is a stand-in:
each token generates an ephemeral P-256 key, both derive the same AES wrapping key *inside*
the token (CKM_ECDH1_DERIVE), the OEM wraps the image key (RFC 5649) and the programmer unwraps
it as a sensitive, transferable image key with the same CKA_ID.  No plaintext key bytes exist
in host memory; unlike the real channel this exchange is unauthenticated -- acceptable only in
this test.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from securethread.device.sbm import ProvisioningData, SiliconVendor, verify_boot_confirmation
from securethread.errors import KeyPolicyError, RollbackError
from securethread.formats.device_trust import DeviceTrust, oem_root_hash, sign_device_trust
from securethread.formats.identity import IdentityVerifier, new_challenge
from securethread.formats.image import DEFAULT_CHUNK_SIZE, master_image, verify_manifest
from securethread.formats.license import LicenseIssuer, WrongDeviceLicenseError
from securethread.hsm import IMAGE_KEY, PROGRAMMER_IMAGE_KEY, SIGNING, Curve, KeyPolicy, Usage
from securethread.keys.policy import EPHEMERAL_AGREEMENT
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
)

_TEMP_KEK = KeyPolicy(usage=Usage.WRAP, persistent=False)


def _transfer_image_key(oem: Any, programmer: Any, image_key: Any, label: str) -> Any:
    """Test-only stand-in for the channel (see module docstring)."""
    eo = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    ep = programmer.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    ko = eo.derive_aes(ep.public_key(), policy=_TEMP_KEK)
    kp = ep.derive_aes(eo.public_key(), policy=_TEMP_KEK)
    try:
        wrapped = ko.wrap(image_key)
        return kp.unwrap(wrapped, label=label, key_id=image_key.key_id, policy=PROGRAMMER_IMAGE_KEY)
    finally:
        for k in (ko, kp, eo, ep):
            k.destroy()


@pytest.fixture(scope="module")
def plant(oem, programmer):  # type: ignore[no-untyped-def]
    """Key ceremony and onboarding on the real tokens, with unique labels."""
    p = "m-" + uuid.uuid4().hex[:8]
    P = EnclavePurpose
    root_cert = create_root_ca(oem, label=f"{p}-root")
    root_key = oem.private_key(f"{p}-root")
    fw_key = oem.generate_ec(f"{p}-fw", curve=Curve.P256, policy=SIGNING)
    image_key = oem.generate_aes(f"{p}-img", policy=IMAGE_KEY)
    ident_csr = create_enclave_csr(
        programmer, label=f"{p}-id", enclave_name="prog1", purpose=P.IDENTITY
    )
    ident = certify_enclave(
        root_key, root_cert, ident_csr, enclave_name="prog1", purpose=P.IDENTITY, role="programmer"
    )
    lic_csr = create_enclave_csr(
        programmer, label=f"{p}-lic", enclave_name="prog1", purpose=P.LICENSE_SIGNING
    )
    lic_cert = certify_enclave(
        root_key, root_cert, lic_csr, enclave_name="prog1", purpose=P.LICENSE_SIGNING,
        role="programmer",
    )  # fmt: skip
    ka_csr = create_enclave_csr(
        programmer,
        label=f"{p}-ka",
        enclave_name="prog1",
        purpose=P.KEY_AGREEMENT,
        signer=programmer.private_key(f"{p}-id"),
    )
    ident_key = ident.public_key()
    assert isinstance(ident_key, ec.EllipticCurvePublicKey)
    ka_cert = certify_enclave(
        root_key, root_cert, ka_csr, enclave_name="prog1", purpose=P.KEY_AGREEMENT,
        role="programmer", proof_key=ident_key,
    )  # fmt: skip
    job = f"job-{p}"
    pca_csr = create_production_ca_csr(programmer, label=f"{p}-pca", job_id=job)
    pca_cert = certify_production_ca(
        root_key,
        root_cert,
        pca_csr,
        job_id=job,
        not_before=root_cert.not_valid_before_utc,
    )
    prog_image_key = _transfer_image_key(oem, programmer, image_key, f"{p}-img")
    yield dict(
        p=p,
        root_cert=root_cert,
        fw_key=fw_key,
        image_key=image_key,
        prog_image_key=prog_image_key,
        ka_key=programmer.private_key(f"{p}-ka"),
        ka_cert=ka_cert,
        lic_key=programmer.private_key(f"{p}-lic"),
        lic_cert=lic_cert,
        devcerts=DeviceCertificateIssuer(
            programmer.private_key(f"{p}-pca"),
            pca_cert,
            job_id=job,
            job_tag=hashlib.sha256(job.encode()).digest(),  # stands in for the signed job's hash
            profile=DeviceProfile(organisation="securethread"),
        ),
        pca_cert=pca_cert,
        vendor=SiliconVendor(),
        # The OEM's root key (in its token) vouches for what the chips of this job trust.
        device_trust=sign_device_trust(
            DeviceTrust(
                job_id=job,
                job_sha256=hashlib.sha256(job.encode()).digest(),
                device_class="sensor-v1",
                firmware_signing_key=fw_key.public_key(),
                min_security_counter=1,
            ),
            root_key,
        ),
    )
    for suffix in ("root", "fw", "img"):
        oem.destroy(f"{p}-{suffix}")
    for suffix in ("id", "lic", "ka", "pca", "img"):
        programmer.destroy(f"{p}-{suffix}")


def _master(plant: dict[str, Any], data: bytes, counter: int) -> tuple[bytes, bytes]:
    out = io.BytesIO()
    signed = master_image(
        io.BytesIO(data),
        out,
        image_key=plant["image_key"],
        signing_key=plant["fw_key"],
        image_id="fw-main",
        image_version=f"2.{counter}",
        security_counter=counter,
        device_class="sensor-v1",
    )
    return signed, out.getvalue()


def _onboard(plant: dict[str, Any], seq: int) -> tuple[Any, Any]:
    """Programmer side, per device: identify, certify, provision."""
    dev = plant["vendor"].make_chip(oem_root_hash=oem_root_hash(plant["root_cert"]))
    verifier = IdentityVerifier([plant["vendor"].root_certificate])
    challenge = new_challenge()
    ident = verifier.verify(dev.identify(challenge), challenge=challenge)
    cert = plant["devcerts"].issue(ident.public_key, ident.device_id, seq)
    dev.provision(
        ProvisioningData(
            device_certificate=cert,
            production_ca_certificate=plant["pca_cert"],
            oem_root_certificate=plant["root_cert"],
            device_trust=plant["device_trust"],
        ).to_bytes()
    )
    return dev, ident


def test_end_to_end(plant, programmer) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(2 * DEFAULT_CHUNK_SIZE + 12345)  # three 1 MiB chunks, the last short
    signed, blob = _master(plant, data, counter=4)
    manifest = verify_manifest(signed, key=plant["fw_key"].public_key())
    assert manifest.image_key_id == plant["prog_image_key"].key_id
    issuer = LicenseIssuer(
        ka_key=plant["ka_key"],
        ka_certificate=plant["ka_cert"],
        signing_key=plant["lic_key"],
        signing_certificate=plant["lic_cert"],
        image_key=plant["prog_image_key"],
        manifest=manifest,
    )
    a, ident_a = _onboard(plant, 1)
    b, ident_b = _onboard(plant, 2)
    lic_a = issuer.issue(ident_a.device_id, ident_a.public_key)
    lic_b = issuer.issue(ident_b.device_id, ident_b.public_key)

    # A license for device A is useless on device B; B's state is untouched.
    before = b.state()
    with pytest.raises(WrongDeviceLicenseError):
        b.program(signed, io.BytesIO(blob), lic_a, nonce=os.urandom(16))
    assert b.state() == before

    for dev, ident, lic in ((a, ident_a, lic_a), (b, ident_b, lic_b)):
        nonce = os.urandom(16)
        confirmation = dev.program(signed, io.BytesIO(blob), lic, nonce=nonce)
        assert dev.firmware == data
        verify_boot_confirmation(
            confirmation,
            device_public_key=ident.public_key,
            device_id=ident.device_id,
            manifest=manifest,
            nonce=nonce,
        )

    # An older image, validly signed by the OEM, is refused after the newer one booted.
    old_signed, old_blob = _master(plant, b"old firmware", counter=3)
    old_m = verify_manifest(old_signed, key=plant["fw_key"].public_key())
    old_lic = LicenseIssuer(
        ka_key=plant["ka_key"],
        ka_certificate=plant["ka_cert"],
        signing_key=plant["lic_key"],
        signing_certificate=plant["lic_cert"],
        image_key=plant["prog_image_key"],
        manifest=old_m,
    ).issue(a.device_id, a.public_key)
    before = a.state()
    with pytest.raises(RollbackError):
        a.program(old_signed, io.BytesIO(old_blob), old_lic, nonce=os.urandom(16))
    assert a.state() == before and a.firmware == data


def _secret_objects(token: Any) -> int:
    return len(list(token.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})))


def test_license_issue_leaves_no_temporaries(plant, programmer) -> None:  # type: ignore[no-untyped-def]
    issuer = LicenseIssuer(
        ka_key=plant["ka_key"],
        ka_certificate=plant["ka_cert"],
        signing_key=plant["lic_key"],
        signing_certificate=plant["lic_cert"],
        image_key=plant["prog_image_key"],
        image_id="fw-main",
    )
    dev = plant["vendor"].make_chip()
    issuer.issue(dev.device_id, dev.public_key)  # warm caches
    before = _secret_objects(programmer)
    for _ in range(5):
        issuer.issue(dev.device_id, dev.public_key)
    assert _secret_objects(programmer) == before


def test_programmer_image_key_policy(plant) -> None:  # type: ignore[no-untyped-def]
    """S1: the transferred image key is sensitive in the programmer token, and a key that is
    not a wrapping key cannot be used to export it."""
    key = plant["prog_image_key"]
    report = key.policy_report()
    assert report.sensitive
    report.check(transferable=True)
    with pytest.raises(KeyPolicyError):
        key.wrap(key)  # the programmer's copy has no usage: it is not a wrapping key
