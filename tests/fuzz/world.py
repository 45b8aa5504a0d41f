"""Valid artefacts of every format, made with the library itself on software keys.

Keys and random bytes come from :class:`DeterministicBackend`, so a fresh backend of the same
name replays the same handshake: a recorded channel message is valid for a fresh endpoint,
and each fuzz input starts from clean state (the channel, the transfer and the sealed package
change their receiver's state when they succeed).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import tempfile
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.channel.handshake import ChannelSession, OemChannel, ProgrammerChannel
from securethread.channel.transfer import (
    KeyReceiver,
    KeySender,
    MemoryPackageRegistry,
    open_package,
    seal_package,
)
from securethread.device.sbm import ProvisioningData, verify_boot_confirmation
from securethread.device.vendor import SiliconVendor
from securethread.errors import DuplicateObjectError
from securethread.formats import ledger
from securethread.formats.device_trust import DeviceTrust, oem_root_hash, sign_device_trust
from securethread.formats.identity import IdentityVerifier, vendor_ca_id
from securethread.formats.image import encrypt_image, sign_manifest
from securethread.formats.job import ProductionJob, Targets, cosign_job, sign_job, verify_job
from securethread.formats.jobpackage import JobPackage
from securethread.formats.license import LicenseIssuer, open_license
from securethread.formats.lot import LotManifest, sign_lot, verify_lot
from securethread.formats.mcuboot import ImageVersion, build_image
from securethread.formats.onboarding import CertificateBundle, EnrolmentRequest, OfficerBundle
from securethread.formats.programming import (
    Confirmations,
    PackageChip,
    ProgrammingPackage,
    lot_job_hash,
    sign_package,
)
from securethread.formats.transcript import CertEntry, KeyEntry, Transcript
from securethread.keys.ecutil import curve_object, fingerprint, hash_for, point_of, spki_der
from securethread.keys.policy import IMAGE_KEY, SIGNING, Curve, KeyPolicy
from securethread.keys.software import SoftwareBackend, SoftwarePrivateKey
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
from securethread.programmer.line import ProductionLine, Provisioned
from securethread.programmer.store import UNGUARDED, SQLiteStore
from tests.fuzz.mutate import Keyring

JOB_ID = "fuzz-job"
LOT_ID = "fuzz-lot"
FACTORY = "fuzz-factory"
DEVICE_CLASS = "sensor-v1"
IMAGE_ID = "fw-main"
CHUNK = 1024
TRANSFER_LABEL = "transfer-key"
_ORDERS = {
    Curve.P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    Curve.P384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


class DeterministicBackend(SoftwareBackend):
    """A SoftwareBackend whose keys and random bytes follow from its name and call order."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._counter = 0

    def _stream(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self._counter += 1
            out += hashlib.sha256(f"fuzz/{self.name}/{self._counter}".encode()).digest()
        return out[:n]

    def random(self, n: int) -> bytes:
        return self._stream(n)

    def generate_ec(
        self, label: str, *, curve: Curve, policy: KeyPolicy, key_id: bytes | None = None
    ) -> SoftwarePrivateKey:
        policy.check_private()
        scalar = int.from_bytes(self._stream(64), "big") % (_ORDERS[curve] - 1) + 1
        raw = ec.derive_private_key(scalar, curve_object(curve))
        if key_id is None:
            key_id = hashlib.sha1(point_of(raw.public_key())).digest() if policy.persistent else b""  # noqa: S324
        key = SoftwarePrivateKey(self, label=label, key_id=key_id, key=raw, policy=policy)
        if policy.persistent:
            if label in self._privates:
                raise DuplicateObjectError(f"{self.name!r} already has a key {label!r}")
            self._privates[label] = key
        return key

    def generate_aes(self, label: str, *, policy: KeyPolicy, key_id: bytes | None = None) -> Any:
        return self._add_secret(
            label, key_id if key_id is not None else self._stream(16), self._stream(32), policy
        )


def _enclave(
    backend: SoftwareBackend,
    root_key: Any,
    root: x509.Certificate,
    *,
    label: str,
    name: str,
    role: str,
    purpose: EnclavePurpose,
    signer: Any = None,
    proof: ec.EllipticCurvePublicKey | None = None,
) -> x509.Certificate:
    csr = create_enclave_csr(
        backend, label=label, enclave_name=name, purpose=purpose, signer=signer
    )
    return certify_enclave(
        root_key, root, csr, enclave_name=name, purpose=purpose, role=role, proof_key=proof
    )


@attrs.define
class Pki:
    oem: DeterministicBackend
    prog: DeterministicBackend
    root: x509.Certificate
    oem_id: x509.Certificate
    prog_id: x509.Certificate
    ka: x509.Certificate
    lic: x509.Certificate
    ledger: x509.Certificate
    pca: x509.Certificate


def job_window(root: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """The job's window; its production CA and devices are valid exactly then."""
    nb = root.not_valid_before_utc
    return nb, nb + datetime.timedelta(days=30)


def make_pki() -> Pki:
    oem, prog = DeterministicBackend("oem"), DeterministicBackend("programmer")
    root = create_root_ca(oem, label="root")
    rk = oem.private_key("root")
    P = EnclavePurpose
    oem_id = _enclave(oem, rk, root, label="id", name="oem", role="oem", purpose=P.IDENTITY)
    prog_id = _enclave(
        prog, rk, root, label="id", name="prog1", role="programmer", purpose=P.IDENTITY
    )
    ka = _enclave(
        prog, rk, root, label="ka", name="prog1", role="programmer", purpose=P.KEY_AGREEMENT,
        signer=prog.private_key("id"), proof=prog_id.public_key(),  # type: ignore[arg-type]
    )  # fmt: skip
    lic = _enclave(
        prog, rk, root, label="lic", name="prog1", role="programmer", purpose=P.LICENSE_SIGNING
    )
    led = _enclave(
        prog, rk, root, label="ledger", name="prog1", role="programmer", purpose=P.LEDGER_SIGNING
    )
    pca = certify_production_ca(
        rk,
        root,
        create_production_ca_csr(prog, label="pca", job_id=JOB_ID),
        job_id=JOB_ID,
        not_before=root.not_valid_before_utc,
        not_after=job_window(root)[1],
    )
    return Pki(oem, prog, root, oem_id, prog_id, ka, lic, led, pca)


@attrs.define
class World:
    """Everything a fuzz target needs: valid seeds and the context to check them in."""

    pki: Pki
    seeds: dict[str, list[bytes]]
    ring: Keyring
    ctx: dict[str, Any]

    @property
    def corpus(self) -> list[bytes]:
        return [s for seeds in self.seeds.values() for s in seeds]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _der_csr(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def _odd_certificates(pki: Pki) -> list[bytes]:
    """Hostile but well-formed seeds: non-EC keys, other curves, odd names and strings."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    now = datetime.datetime.now(datetime.UTC)
    signer = ec.generate_private_key(ec.SECP256R1())
    out = []
    name = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(x509.NameOID.COMMON_NAME, "a"),
                    x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "b"),
                ]
            ),
            x509.RelativeDistinguishedName([x509.NameAttribute(x509.NameOID.COMMON_NAME, "c")]),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(x509.NameOID.COMMON_NAME, "0011223344556677", _type=_bmp())]
            ),
        ]
    )
    keys: list[Any] = [
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        ec.generate_private_key(ec.SECP256K1()).public_key(),
    ]
    for key in keys:
        out.append(
            _der(
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(pki.root.subject)
                .public_key(key)
                .serial_number(1)
                .not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.SubjectAlternativeName([x509.DNSName("a.example")]), critical=False
                )
                .sign(signer, hashes.SHA256())
            )
        )
    return out


def _bmp() -> Any:
    from cryptography.x509.name import _ASN1Type

    return _ASN1Type.BMPString


def build() -> World:  # noqa: PLR0915 - one straight line of artefact making
    pki = make_pki()
    oem, prog = pki.oem, pki.prog
    rk = oem.private_key("root")
    now = datetime.datetime.now(datetime.UTC)
    seeds: dict[str, list[bytes]] = {}
    ctx: dict[str, Any] = {"pki": pki}

    # Image, manifest.
    fw = oem.generate_ec("fw", curve=Curve.P256, policy=SIGNING)
    image_key = oem.generate_aes("image", policy=IMAGE_KEY)
    out = io.BytesIO()
    mcuboot_image = build_image(
        bytes(range(256)) * 12, signer=fw, version=ImageVersion(1, 3), security_counter=3
    )
    seeds["mcuboot_image"] = [mcuboot_image]
    m = encrypt_image(
        io.BytesIO(mcuboot_image), out, key=image_key, image_id=IMAGE_ID,
        image_version="1.3", security_counter=3, device_class=DEVICE_CLASS, chunk_size=CHUNK,
    )  # fmt: skip
    manifest = sign_manifest(m, fw)
    image = out.getvalue()
    header_len = 10 + int.from_bytes(image[8:10], "big")
    seeds["manifest"] = [manifest]
    seeds["image_header"] = [image[:header_len]]
    seeds["encrypted_image"] = [image]
    ctx.update(fw=fw, image_key=image_key, manifest=m, manifest_signed=manifest, image=image)

    # Job, signed by two officers.
    officers = [oem.generate_ec(f"officer{i}", curve=Curve.P256, policy=SIGNING) for i in (1, 2)]
    t = int(now.timestamp())
    nb, na = job_window(pki.root)
    # the job's device profile, which the line issues under and reconciliation checks
    profile = DeviceProfile(organisation="securethread", not_after=na)
    vendor = SiliconVendor()
    job = ProductionJob(
        job_id=JOB_ID, device_class=DEVICE_CLASS,
        targets=Targets(ranges=((0, (1 << 64) - 1),)), quota=4,
        not_before=int(nb.timestamp()), not_after=int(na.timestamp()),
        image_id=IMAGE_ID, manifest_sha256=hashlib.sha256(manifest).digest(),
        programmer=hashlib.sha256(_der(pki.prog_id)).digest(), threshold=2,
        certificate=profile,
        production_ca=hashlib.sha256(_der(pki.pca)).digest(),
        vendors=(vendor_ca_id(vendor.root_certificate),),
    )  # fmt: skip
    job_signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    officer_keys = {fingerprint(k.public_key()): k.public_key() for k in officers}
    # A job of each stage (docs/formats.md "Job stages"): the fab's provision job (no image
    # keys) and a programming centre's program job (provisioned_by, no vendor, no CA).
    provision_job = attrs.evolve(job, stage="provision", image_id=None, manifest_sha256=None)
    program_job = attrs.evolve(job, stage="program", vendors=(), production_ca=None,
                               provisioned_by=(job.production_ca or b"",))  # fmt: skip
    seeds["job"] = [job_signed] + [
        cosign_job(sign_job(j, [officers[0]]), officers[1]) for j in (provision_job, program_job)
    ]
    seeds["envelope"] = [job_signed, manifest]
    seeds["envelope_sign1"] = [manifest, job_signed]  # a COSE_Sign1, then a COSE_Sign
    ctx.update(job_signed=job_signed, officers=officer_keys)
    verified = verify_job(
        job_signed, officers=officer_keys, programmer=job.programmer, min_threshold=2
    )

    # Device trust, chips, the production line (identification, provisioning, licenses,
    # programming, boot confirmations, the ledger), through the library's own pipeline.
    trust = sign_device_trust(
        DeviceTrust(
            job_id=JOB_ID, job_sha256=verified.sha256,
            device_class=DEVICE_CLASS, firmware_signing_key=fw.public_key(),
            min_security_counter=2,
        ),
        rk,
    )  # fmt: skip
    root_hash = oem_root_hash(pki.root)
    chips = [vendor.make_chip(oem_root_hash=root_hash, flash_size=1 << 16) for _ in range(3)]
    challenge = bytes(range(32))
    seeds["identification"] = [c.identify(challenge) for c in chips[:2]]
    ctx.update(vendor=vendor, challenge=challenge, chips=chips, root_hash=root_hash)
    ident = IdentityVerifier([vendor.root_certificate])
    licenses = LicenseIssuer(
        ka_key=prog.private_key("ka"), ka_certificate=pki.ka,
        signing_key=prog.private_key("lic"), signing_certificate=pki.lic,
        image_key=image_key, manifest=m,
    )  # fmt: skip
    packager = ProvisioningData.packager(
        production_ca_certificate=pki.pca, oem_root_certificate=pki.root, device_trust=trust,
        job_sha256=verified.sha256,
    )
    tmp = Path(tempfile.mkdtemp(prefix="securethread-fuzz-"))
    store = SQLiteStore(tmp / "production.sqlite")
    line = ProductionLine(
        job=verified, store=store,
        identify=lambda resp, ch: ident.verify(resp, challenge=ch),
        issuer=DeviceCertificateIssuer(
            prog.private_key("pca"), pki.pca, job_id=JOB_ID, job_tag=verified.sha256,
            profile=profile,
        ),
        licenses=licenses, ledger_key=prog.private_key("ledger"), packager=packager,
        batch_size=2, guard=UNGUARDED,  # the fuzz world's store has no token mark
    )  # fmt: skip
    provisioned = [o for o in line.provision(chips) if isinstance(o, Provisioned)]
    assert len(provisioned) == 3, provisioned
    first = provisioned[0]
    device_cert_der = _der(first.certificate)
    seeds["provisioning"] = [packager(device_cert_der)]
    # A provisioned chip answers with its OEM device certificate too (a program job's view).
    seeds["identification"].append(chips[0].identify(challenge))
    seeds["provisioned_identification"] = seeds["identification"][-1:]
    seeds["license"] = [p.license for p in provisioned[:2]]
    boots: list[tuple[str, bytes, bytes]] = []

    def verify_boot(cert: x509.Certificate, nonce: bytes, boot: bytes) -> None:
        boots.append((str(cert.serial_number), nonce, boot))
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        verify_boot_confirmation(
            boot, device_public_key=key, device_id=str(cn), manifest=m, nonce=nonce
        )

    done = list(
        line.program(
            [(chips[0], provisioned[0]), (chips[1], provisioned[1])],
            manifest=manifest, open_image=lambda: io.BytesIO(image), verify_boot=verify_boot,
        )
    )  # fmt: skip
    assert all(err is None for _, err in done), done
    seeds["boot_confirmation"] = [boots[0][2]]
    # The image key as the device holds it after opening its license.
    ctx["device_image_key"] = open_license(
        first.license, device_id=chips[0].device_id, device_key=chips[0]._key,
        oem_root=pki.root, image_id=m.image_id, image_key_id=m.image_key_id,
    )  # fmt: skip
    ctx.update(boot_nonce=boots[0][1], device=chips[0], device_cert=first.certificate)
    job_hash = verified.sha256
    store.close_job(job_hash, ledger.close_signer(prog.private_key("ledger"), job=job_hash, time=t))
    buf = io.BytesIO()
    ledger.write_export(buf, job_signed, store.export(job_hash))
    store.close()
    export = buf.getvalue()
    seeds["ledger_export"] = [export]
    seeds["reconciliation"] = [export]
    records = [p for tag, p in ledger.read_export(io.BytesIO(export))[1] if tag == "r"]
    # ... and a provision job's record: no license_sha256 (ledger.ProvisionOnlyRecord)
    fab_record = ledger.PendingRecord(
        kind=ledger.KIND_PROVISIONED, slot=0, device_id="0000000000000001", time=t,
        cert=b"\x30\x00", vendor_ca=b"\x0a" * 32,
    ).encode(job=job_hash, seq=0, prev=job_hash)  # fmt: skip
    # ... and a program job's counted record (ledger.LicensedRecord)
    licensed_record = ledger.PendingRecord(
        kind=ledger.KIND_LICENSED, slot=0, device_id="0000000000000001", time=t,
        license_sha256=b"\x01" * 32, cert_sha256=b"\x02" * 32, production_ca=b"\x03" * 32,
    ).encode(job=job_hash, seq=0, prev=job_hash)  # fmt: skip
    seeds["ledger_record"] = records[:1] + records[-1:] + [fab_record, licensed_record]
    seeds["device_trust"] = [trust]
    seeds["job_package"] = [
        JobPackage(
            job=job_signed, production_ca=_der(pki.pca), manifest=manifest, device_trust=trust,
            vendors=(_der(vendor.root_certificate),),
        ).to_bytes()
    ]  # fmt: skip
    ctx.update(job_hash=job_hash, trust=trust, line_dir=tmp, vendors=job.vendors)

    # Zero-secret programming: the vendor's lot manifest (one COSE_Sign1 by its CA), the
    # OEM's programming package for one factory and lot (signed by the root), the factory's
    # confirmations (the chips' own boot confirmations).
    lot = sign_lot(
        LotManifest.build(
            lot_id=LOT_ID, device_class=DEVICE_CLASS, vendor_ca=vendor.root_certificate,
            chips=[(c.device_id, c.public_key) for c in chips],
        ),
        vendor.private_key,
    )  # fmt: skip
    lot_sha = verify_lot(lot, vendor_cas=[vendor.root_certificate]).sha256
    lot_job = lot_job_hash(
        job_id=JOB_ID, factory=FACTORY, lot_sha256=lot_sha,
        manifest_sha256=hashlib.sha256(manifest).digest(),
        production_ca_sha256=hashlib.sha256(_der(pki.pca)).digest(),
    )  # fmt: skip
    lot_trust = sign_device_trust(
        DeviceTrust(job_id=JOB_ID, job_sha256=lot_job, device_class=DEVICE_CLASS,
                    firmware_signing_key=fw.public_key(), min_security_counter=2),
        rk,
    )  # fmt: skip
    programming = ProgrammingPackage(
        factory=FACTORY, lot_id=LOT_ID, lot_sha256=lot_sha, job_id=JOB_ID, job_sha256=lot_job,
        image_id=IMAGE_ID, image_sha256=hashlib.sha256(image).digest(), manifest=manifest,
        production_ca=_der(pki.pca), device_trust=lot_trust,
        chips=tuple(sorted(
            (PackageChip(c.device_id, fingerprint(c.public_key), _der(p.certificate), p.license)
             for c, p in zip(chips, provisioned, strict=True)),
            key=lambda e: e.device_id,
        )),
    )  # fmt: skip
    seeds["lot"] = [lot]
    seeds["programming_package"] = [sign_package(programming, rk)]
    seeds["confirmations"] = [
        Confirmations(
            package_sha256=bytes(32), factory=FACTORY, lot_id=LOT_ID,
            confirmations={chips[0].device_id: boots[0][2], chips[1].device_id: boots[1][2]},
        ).to_bytes()
    ]  # fmt: skip

    # A ceremony transcript (root, keys, certificates, artefacts).
    tpath = tmp / "oem.transcript"
    tx = Transcript(tpath, oem.private_key("id"), "oem", clock=lambda: t)
    tx.append(
        "root-ca", keys=[KeyEntry.from_key(rk)], certificates=[CertEntry.from_certificate(pki.root)]
    )
    tx.append(
        "job-issuance", artefacts={"job": hashlib.sha256(job_signed).digest()}, details={"quota": 4}
    )
    seeds["transcript"] = [tpath.read_bytes()]

    # The channel: four recorded messages, replayable against fresh deterministic endpoints.
    channel = _Channel(pki)
    o, p = channel.endpoints()
    m1 = o.start()
    m2 = p.receive_hello(m1)
    m3 = o.receive_hello(m2)
    m4 = p.receive_finish(m3)
    o.receive_finish(m4)
    so, sp = channel.established()
    sender, receiver = KeySender(so), KeyReceiver(sp)
    transfer = sender.send([TRANSFER_LABEL])
    ack = receiver.receive(transfer)
    commit = sender.commit(sender.verify_ack(ack))
    committed = receiver.commit(commit)
    seeds.update(
        oem_hello=[m1], programmer_hello=[m2], oem_finish=[m3], programmer_finish=[m4],
        transfer=[transfer], transfer_ack=[ack], transfer_commit=[commit],
        transfer_committed=[committed],
    )  # fmt: skip
    ctx["channel"] = channel

    # Sealed package to the programmer's key-agreement certificate.
    oem.generate_aes("sealed-key", policy=IMAGE_KEY)
    package = seal_package(
        oem, ["sealed-key"], identity_key=oem.private_key("id"), identity_cert=pki.oem_id,
        expected_programmer=pki.prog_id, recipient_cert=pki.ka, root_cert=pki.root,
    )  # fmt: skip
    seeds["sealed_package"] = [package]
    receipt = open_package(
        package, backend=prog, ka_key=prog.private_key("ka"), ka_cert=pki.ka,
        identity_key=prog.private_key("id"), identity_cert=pki.prog_id, root_cert=pki.root,
        registry=MemoryPackageRegistry(),
    )  # fmt: skip
    for key in receipt.keys:  # the receiver's backend stays as it was
        prog.destroy(key.label)
    seeds["package_receipt"] = [receipt.signed]

    # Certificates, CSRs, keys, URIs.
    seeds["certificate"] = [_der(c) for c in (pki.lic, pki.prog_id, pki.pca)] + _odd_certificates(
        pki
    )
    seeds["device_certificate"] = [device_cert_der]
    spare = DeterministicBackend("spare")
    csr = create_enclave_csr(
        spare, label="lic", enclave_name="prog1", purpose=EnclavePurpose.LICENSE_SIGNING
    )
    seeds["csr"] = [
        csr.public_bytes(serialization.Encoding.DER),
        csr.public_bytes(serialization.Encoding.PEM),
    ]
    ctx["csr_root_key"] = rk
    seeds["spki"] = [
        fw.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        rk.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ]
    seeds["pkcs11_uri"] = [
        b"pkcs11:token=oem;object=root-ca;type=private;id=%01%02?pin-source=file:/tmp/pin",
        b"pkcs11:token=programmer%20one;slot-id=3;serial=abc?module-path=/usr/lib/x.so",
        b"pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;object=x;type=cert",
    ]
    # Onboarding: the enclave's enrolment request, the OEM's certificate bundle (with the
    # officer bundle), and PEM as the parties write certificates and keys to files.
    enrol_csrs = {"identity": _der_csr(create_enclave_csr(
        spare, label="e-id", enclave_name="prog2", purpose=EnclavePurpose.IDENTITY))}
    for purpose, p_enum in (("license-signing", EnclavePurpose.LICENSE_SIGNING),
                            ("ledger-signing", EnclavePurpose.LEDGER_SIGNING),
                            ("key-agreement", EnclavePurpose.KEY_AGREEMENT)):
        enrol_csrs[purpose] = _der_csr(create_enclave_csr(
            spare, label=f"e-{purpose}", enclave_name="prog2", purpose=p_enum,
            signer=spare.private_key("e-id") if purpose == "key-agreement" else None))
    seeds["enrolment_request"] = [
        EnrolmentRequest("prog2", enrol_csrs).seal(spare.private_key("e-id"))
    ]
    officer_bundle = OfficerBundle(
        tuple(spki_der(k.public_key()) for k in officers), threshold=2
    ).seal(rk)
    seeds["certificate_bundle"] = [CertificateBundle(
        programmer="prog1", root=_der(pki.root), oem_identity=_der(pki.oem_id),
        enclave={"identity": _der(pki.prog_id), "license-signing": _der(pki.lic),
                 "ledger-signing": _der(pki.ledger), "key-agreement": _der(pki.ka)},
        officers=officer_bundle, firmware_signing=spki_der(fw.public_key()),
    ).seal(rk)]
    ctx["root_fingerprint"] = fingerprint(pki.root.public_key())  # type: ignore[arg-type]
    seeds["pem_certificate"] = [
        c.public_bytes(serialization.Encoding.PEM) for c in (pki.root, pki.lic, pki.pca)
    ]
    seeds["pem_public_key"] = [
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for k in (fw, rk)
    ]  # fmt: skip
    seeds["cbor"] = [job_signed, seeds["identification"][0], m3]
    seeds["inspect"] = [job_signed, manifest, seeds["license"][0], export, records[0],
                        seeds["transcript"][0], ack, trust]  # fmt: skip

    signers = [rk, fw, *officers, prog.private_key("lic"), prog.private_key("ledger"),
               oem.private_key("id"), prog.private_key("id"),
               spare.private_key("e-id")]  # fmt: skip
    vfp = fingerprint(vendor.private_key.public_key())  # the lot's signer, a software fab
    ring = Keyring(
        {fingerprint(k.public_key()): k._key for k in signers}  # the software keys' raw keys
        | {vfp: vendor.private_key},
        curve_orders={fingerprint(k.public_key()): _ORDERS[k.curve] for k in signers}
        | {vfp: _ORDERS[Curve.P256]},
        hashes={fingerprint(k.public_key()): hash_for(k.curve) for k in signers}
        | {vfp: hashes.SHA256()},
        ledger_fp=fingerprint(prog.private_key("ledger").public_key()),
        ledger_job=job_hash,
    )
    return World(pki=pki, seeds=seeds, ring=ring, ctx=ctx)


class _Channel:
    """Fresh deterministic endpoints, and the handshake replayed up to any state."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki

    def endpoints(self) -> tuple[OemChannel, ProgrammerChannel]:
        pki = self.pki
        oem, prog = DeterministicBackend("oem-ch"), DeterministicBackend("programmer-ch")
        # The identity keys are the PKI's: the channel backends hold only ephemerals.
        o = OemChannel(
            oem, identity_key=pki.oem.private_key("id"), identity_cert=pki.oem_id,
            root_cert=pki.root, expected_peer=pki.prog_id,
        )  # fmt: skip
        p = ProgrammerChannel(
            prog, identity_key=pki.prog.private_key("id"), identity_cert=pki.prog_id,
            root_cert=pki.root,
        )  # fmt: skip
        return o, p

    def established(self) -> tuple[ChannelSession, ChannelSession]:
        """Both ends of a fresh session; the OEM's backend holds the key to transfer."""
        o, p = self.endpoints()
        o.backend.generate_aes(TRANSFER_LABEL, policy=IMAGE_KEY)
        so = o.receive_finish(p.receive_finish(o.receive_hello(p.receive_hello(o.start()))))
        return so, p.session
