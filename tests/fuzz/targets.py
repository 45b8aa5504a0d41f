"""The fuzz targets: one parser or verifier per artefact, fed with mutated valid artefacts.

Each target takes bytes and runs what the receiving party runs on them, with the context a
real receiver has (pinned roots, trusted keys, fresh protocol state).  The only acceptable
outcomes are a return or a :class:`securethread.Error`; anything else is a bug.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any

import attrs

from securethread.errors import Error
from tests.fuzz.world import World

Runner = Callable[[bytes], object]


@attrs.frozen
class Target:
    """A parser under fuzz: its seeds, how to run it, and how to mutate for it."""

    name: str
    run: Runner
    seeds: tuple[bytes, ...]
    text: bool = False
    #: Relative cost: the CI run gives cheap targets more examples for the same time.
    cost: int = 1
    #: Set while a known, reported failure is being fixed by the module's owner.
    xfail: str | None = None


@attrs.frozen
class Outcome:
    """What one input did: ``accepted`` or the name of the securethread.Error it raised,
    or ``bug`` with the non-Error exception."""

    kind: str
    error: BaseException | None = None


def run_one(target: Target, data: bytes) -> Outcome:
    try:
        target.run(data)
    except Error as exc:
        return Outcome(type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer is looking for
        return Outcome("bug", exc)
    return Outcome("accepted")


def make_targets(w: World) -> dict[str, Target]:  # noqa: PLR0915 - one target per artefact
    from securethread.audit.inspect import describe
    from securethread.channel.transfer import (
        KeyReceiver,
        KeySender,
        MemoryPackageRegistry,
        verify_receipt,
    )
    from securethread.channel.transfer import open_package as _open_package
    from securethread.device.sbm import ProvisioningData, SimulatedDevice
    from securethread.device.sbm import verify_boot_confirmation as _verify_boot
    from securethread.formats import cbor, envelope, ledger
    from securethread.formats.device_trust import verify_device_trust
    from securethread.formats.identity import (
        IdentityVerifier,
        ProvisionedIdentityVerifier,
        check_vendor_cas,
    )
    from securethread.formats.image import ImageHeader, decrypt_image, verify_manifest
    from securethread.formats.job import verify_job
    from securethread.formats.jobpackage import JobPackage
    from securethread.formats.license import open_license
    from securethread.formats.mcuboot import verify_image as verify_mcuboot
    from securethread.formats.onboarding import CertificateBundle, EnrolmentRequest
    from securethread.formats.reconciliation import reconcile_export
    from securethread.formats.transcript import verify_transcript
    from securethread.hsm.uri import PKCS11URI
    from securethread.keys.ecutil import load_spki
    from securethread.pki import (
        EnclavePurpose,
        certify_enclave,
        from_pem,
        load_csr,
        untrusted,
        validate_device_chain,
        validate_enclave_certificate,
    )
    from tests.fuzz.world import TRANSFER_LABEL

    pki, ctx, s = w.pki, w.ctx, w.seeds
    root = pki.root
    m = ctx["manifest"]
    dev = ctx["device"]
    identity = IdentityVerifier([ctx["vendor"].root_certificate])
    channel = ctx["channel"]
    out: dict[str, Target] = {}

    def add(name: str, run: Runner, *, seeds: str | None = None, **kw: Any) -> None:
        out[name] = Target(name, run, tuple(s[seeds or name]), **kw)

    # The codec as the envelope parser calls it: a top-level COSE tag (18/98) allowed, and
    # the integer labels of COSE header maps (RFC 9052 §3).
    add("cbor", lambda d: cbor.decode(d, max_size=64 << 10, cose_tag=True, int_keys=True))
    add("envelope", lambda d: envelope.open_envelope(d, kind="job", keys=ctx["officers"]))
    add(
        "envelope_sign1",
        lambda d: envelope.open_envelope(d, kind="manifest", keys=ctx["fw"].public_key()),
        seeds="envelope_sign1",
    )
    add(
        "job",
        lambda d: verify_job(
            d, officers=ctx["officers"], programmer=_job_programmer(w), min_threshold=2
        ),
    )
    add("manifest", lambda d: verify_manifest(d, key=ctx["fw"].public_key()))
    add("image_header", ImageHeader.from_bytes)
    add("mcuboot_image", lambda d: verify_mcuboot(d, key=ctx["fw"].public_key()))
    add(
        "encrypted_image",
        lambda d: decrypt_image(
            io.BytesIO(d), io.BytesIO(), key=ctx["device_image_key"], manifest=m,
            max_size=1 << 16,
        ),
        cost=2,
    )
    add(
        "license",
        lambda d: open_license(
            d, device_id=dev.device_id, device_key=dev._key, oem_root=root,
            image_id=m.image_id, image_key_id=m.image_key_id,
        ),
        cost=4,
    )  # fmt: skip
    ledger_bug = _ledger_kind_bug()
    add("ledger_record", lambda d: ledger.parse_record(d, 0), xfail=ledger_bug)

    def ledger_export(d: bytes) -> None:
        job, items = ledger.read_export(io.BytesIO(d))
        ledger.verify_ledger(
            items, job=ctx["job_hash"], ledger_key=pki.prog.public_key("ledger")
        )

    add("ledger_export", ledger_export, cost=4, xfail=ledger_bug)
    def reconciliation(d: bytes) -> None:
        reconcile_export(
            io.BytesIO(d), issued_job=ctx["job_signed"], officers=ctx["officers"],
            min_threshold=2, root_cert=root, programmer_cert=pki.prog_id,
            ledger_cert=pki.ledger, production_ca_cert=pki.pca, manifest=ctx["manifest_signed"],
        )  # fmt: skip

    add("reconciliation", reconciliation, cost=8, xfail=ledger_bug)
    add("identification", lambda d: identity.verify(d, challenge=ctx["challenge"]), cost=2)
    provisioned = ProvisionedIdentityVerifier([pki.pca], root)  # a program job's verifier
    add(
        "provisioned_identification",
        lambda d: provisioned.verify(d, challenge=ctx["challenge"]),
        cost=3,
    )

    def job_package(d: bytes) -> None:
        package = JobPackage.from_bytes(d)
        check_vendor_cas(package.vendors, named=ctx["vendors"], what="vendor CA")

    add("job_package", job_package)

    def provisioning(d: bytes) -> None:
        ProvisioningData.from_bytes(d)
        chip = SimulatedDevice(
            device_id=dev.device_id, private_key=dev._key,
            vendor_certificate=dev.vendor_certificate, oem_root_hash=ctx["root_hash"],
        )  # fmt: skip
        chip.provision(d)

    add("provisioning", provisioning, cost=4)
    add("device_trust", lambda d: verify_device_trust(d, oem_root=root), cost=2)
    add(
        "boot_confirmation",
        lambda d: _verify_boot(
            d, device_public_key=dev.public_key, device_id=dev.device_id, manifest=m,
            nonce=ctx["boot_nonce"],
        ),
    )  # fmt: skip
    add(
        "transcript",
        lambda d: verify_transcript(d, public_key=pki.oem.public_key("id")),
        cost=2,
    )

    def oem_hello(d: bytes) -> None:
        _o, p = channel.endpoints()
        p.receive_hello(d)

    def programmer_hello(d: bytes) -> None:
        o, _p = channel.endpoints()
        o.start()
        o.receive_hello(d)

    def oem_finish(d: bytes) -> None:
        o, p = channel.endpoints()
        p.receive_hello(o.start())
        p.receive_finish(d)

    def programmer_finish(d: bytes) -> None:
        o, p = channel.endpoints()
        o.receive_hello(p.receive_hello(o.start()))
        o.receive_finish(d)

    def transfer(d: bytes) -> None:
        _so, sp = channel.established()
        KeyReceiver(sp).receive(d)

    def transfer_ack(d: bytes) -> None:
        so, _sp = channel.established()
        sender = KeySender(so)
        sender.send([TRANSFER_LABEL])
        sender.verify_ack(d)

    def transfer_commit(d: bytes) -> None:
        _so, sp = channel.established()
        receiver = KeyReceiver(sp)
        receiver.receive(s["transfer"][0])
        # Staged as after the recorded acknowledgement, which the recorded commit names
        # (an acknowledgement's ECDSA signature differs on every run).
        staged = receiver._staged
        assert staged is not None
        recorded = hashlib.sha256(s["transfer_ack"][0]).digest()
        receiver._staged = attrs.evolve(staged, ack_digest=recorded)
        receiver.commit(d)

    def transfer_committed(d: bytes) -> None:
        so, _sp = channel.established()
        sender = KeySender(so)
        sender.send([TRANSFER_LABEL])
        sender.commit(sender.verify_ack(s["transfer_ack"][0]))
        sender.verify_committed(d)

    add("oem_hello", oem_hello, cost=6)
    add("programmer_hello", programmer_hello, cost=6)
    add("oem_finish", oem_finish, cost=8)
    add("programmer_finish", programmer_finish, cost=10)
    add("transfer", transfer, cost=12)
    add("transfer_ack", transfer_ack, cost=12)
    add("transfer_commit", transfer_commit, cost=14)
    add("transfer_committed", transfer_committed, cost=14)

    def sealed_package(d: bytes) -> None:
        receipt = _open_package(
            d, backend=pki.prog, ka_key=pki.prog.private_key("ka"), ka_cert=pki.ka,
            identity_key=pki.prog.private_key("id"), identity_cert=pki.prog_id,
            root_cert=root, registry=MemoryPackageRegistry(),
        )  # fmt: skip
        for key in receipt.keys:  # keep the receiver's backend as it was for the next input
            pki.prog.destroy(key.label)

    add("sealed_package", sealed_package, cost=4, xfail=_wrapped_entry_bug())
    add(
        "package_receipt",
        lambda d: verify_receipt(
            d, package=s["sealed_package"][0], programmer_cert=pki.prog_id, root_cert=root
        ),
        cost=4,
    )

    def certificate(d: bytes) -> None:
        cert = untrusted.load_certificate(d, what="certificate")
        validate_enclave_certificate(cert, root, purpose=EnclavePurpose.LICENSE_SIGNING)

    def device_certificate(d: bytes) -> None:
        cert = untrusted.load_certificate(d, what="device certificate")
        validate_device_chain(cert, pki.pca, root)

    add("certificate", certificate, cost=2)
    add("device_certificate", device_certificate, cost=2)

    def csr(d: bytes) -> None:
        req = load_csr(d)
        certify_enclave(
            ctx["csr_root_key"], root, req, enclave_name="prog1",
            purpose=EnclavePurpose.LICENSE_SIGNING, role="programmer",
        )  # fmt: skip

    add("csr", csr, cost=2)
    add("spki", lambda d: load_spki(d, what="public key"))

    def uri(d: bytes) -> None:
        str(PKCS11URI.parse(d.decode("utf-8", "surrogateescape")))

    add("pkcs11_uri", uri, text=True)
    add("inspect", describe, cost=2, xfail=ledger_bug)
    add("enrolment_request", lambda d: EnrolmentRequest.open(d).fingerprint, cost=2)
    add(
        "certificate_bundle",
        lambda d: CertificateBundle.open(d, root_fingerprint=ctx["root_fingerprint"]),
        cost=4,
    )
    add("pem_certificate", from_pem)
    from securethread.formats.lot import verify_lot
    from securethread.formats.programming import Confirmations, verify_package
    from tests.fuzz.world import FACTORY, LOT_ID

    add("lot", lambda d: verify_lot(d, vendor_cas=[ctx["vendor"].root_certificate]))
    add(
        "programming_package",
        lambda d: verify_package(d, oem_root=root, factory=FACTORY, lot_id=LOT_ID),
        cost=2,
    )
    add("confirmations", Confirmations.from_bytes)
    add("pem_public_key", lambda d: untrusted.load_public_key_pem(d, what="public key"))
    return out


def _ledger_kind_bug() -> str | None:
    """A known non-Error escape in formats/ledger.py (reported to its owner): a record whose
    ``kind`` is a map or list makes ``parse_record`` raise TypeError (unhashable).  The
    targets that reach parse_record are expected to fail only while it is still there."""
    from securethread.formats import ledger

    try:
        ledger.parse_record(bytes.fromhex("a1646b696e64a0"), 0)  # {"kind": {}}
    except Error:
        return None
    except TypeError:
        return "formats/ledger.py parse_record: TypeError on an unhashable kind ({'kind': {}})"
    return None


def _wrapped_entry_bug() -> str | None:
    """A known non-Error escape in channel/transfer.py (reported to its owner): a wrapped-key
    entry whose ``usage`` is a list or map raises TypeError (unhashable).  Reached only behind
    the OEM's signature (the fuzz world re-signs mutated packages)."""
    from securethread.channel.transfer import WrappedEntry

    entry = {"label": "k", "key_id": b"\x01", "usage": [], "transferable": True,
             "wrapped": bytes(40), "kcv": bytes(8)}  # fmt: skip
    try:
        WrappedEntry.from_cbor(entry)
    except Error:
        return None
    except TypeError:
        return "channel/transfer.py WrappedEntry: TypeError on an unhashable usage ([])"
    return None


def _job_programmer(w: World) -> bytes:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(w.pki.prog_id.public_bytes(serialization.Encoding.DER)).digest()
