"""The OEM's OCSP responder over real HTTP on 127.0.0.1, asked by ``openssl ocsp``.

A synthetic job (``benchmarks.synth_ledger``: software keys, real formats) is reconciled and
ingested into a SQLite registry; its production CA certifies a delegated responder key
(id-kp-OCSPSigning, id-pkix-ocsp-nocheck) and the root certifies the root's responder.  Then
``openssl ocsp -issuer PCA -cert DEVICE -url http://127.0.0.1:PORT -CAfile ROOT``, which
verifies the response under the root (delegation checked by OpenSSL), answers: good for a
ledgered device, revoked for a revoked one, revoked/certificateHold dated 1970 (RFC 6960 §2.2
"non-issued") for one minted off the ledger with the production-CA key, and for the second
certificate of a ledgered serial once ``registry check`` saw it.  GET (RFC 6960 Appendix A)
answers like POST; a request about another issuer is ``unauthorized``, garbage
``malformedRequest``; the nonce comes back.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from benchmarks.synth_ledger import SynthWorld, make_world, write_ledger
from securethread.formats.reconciliation import reconcile_export
from securethread.hsm import SIGNING, Curve
from securethread.oem.ocsp import (
    EXTENDED_REVOKE,
    OcspServer,
    Responder,
    ResponderIdentity,
)
from securethread.oem.registry import Registry, RegistryJob
from securethread.pki import revoke_production_ca
from securethread.pki.responder import certify_responder, responder_csr

DEVICES = 6
PEM = serialization.Encoding.PEM


def _need(binary: str) -> str:
    import os

    path = shutil.which(binary)
    if path is None:
        msg = f"{binary} is not installed (bash scripts/install.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


class Field:
    def __init__(self, w: SynthWorld, d: Path) -> None:
        self.world, self.dir = w, d
        self.certs: list[x509.Certificate] = []
        self.root_crl: bytes | None = None
        self.url = ""

    def pem(self, name: str, cert: x509.Certificate) -> Path:
        p = self.dir / name
        p.write_bytes(cert.public_bytes(PEM))
        return p


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Field]:
    d = tmp_path_factory.mktemp("ocsp")
    w = make_world(32, job_id="ocsp-job", label="ocsp-test")
    path = d / "ledger.bin"
    with open(path, "wb") as out:
        write_ledger(w, out, DEVICES, batch=4)
    with open(path, "rb") as src:
        reconcile_export(src, **w.reconcile_args())
    f = Field(w, d)
    job = RegistryJob(w.job.job_id, w.job_sha256, w.pca, w.ledger_cert.public_key())  # type: ignore[arg-type]
    registry = Registry.open(d / "registry.sqlite")
    with open(path, "rb") as src:
        registry.ingest(src, job=job, ledger_sha256=hashlib.sha256(path.read_bytes()).digest())
    from securethread.formats import ledger

    with open(path, "rb") as src:
        _job, items = ledger.read_export(src)
        for tag, raw in items:
            if tag == "r":
                rec = ledger.parse_record(raw, 0)
                if rec.kind == ledger.KIND_PROVISIONED:
                    f.certs.append(x509.load_der_x509_certificate(rec.body["cert"]))
    b = w.backend
    job_key = b.generate_ec("ocsp-job-responder", curve=Curve.P256, policy=SIGNING)
    root_key = b.generate_ec("ocsp-root-responder", curve=Curve.P256, policy=SIGNING)
    idents = [
        ResponderIdentity(
            w.pca, certify_responder(w.pca_key, w.pca, responder_csr(job_key), job_id="ocsp-job"),
            job_key, "ocsp-job",
        ),
        ResponderIdentity(
            w.root, certify_responder(w.root_key, w.root, responder_csr(root_key), job_id=None),
            root_key, None,
        ),
    ]  # fmt: skip
    revoked: dict[int, tuple[int, str]] = {}
    responder = Responder(
        idents,
        registry,
        root_revocations=lambda: revoked,
        production_cas=lambda: {w.pca.serial_number: w.pca},
    )
    registry.revoke(
        job_id=w.job.job_id, job_sha256=w.job_sha256, production_ca=w.pca,
        serial=f.certs[1].serial_number, reason=x509.ReasonFlags.key_compromise,
    )  # fmt: skip
    f.revoked_root = revoked  # type: ignore[attr-defined]
    server = OcspServer(("127.0.0.1", 0), responder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    f.url = f"http://127.0.0.1:{server.server_address[1]}"
    f.pem("root.pem", w.root)
    f.pem("pca.pem", w.pca)
    try:
        yield f
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        registry.close()


def openssl_ocsp(f: Field, cert: x509.Certificate, *extra: str) -> str:
    path = f.pem(f"cert-{cert.serial_number:x}.pem", cert)
    proc = subprocess.run(
        [_need("openssl"), "ocsp", "-issuer", str(f.dir / "pca.pem"), "-cert", str(path),
         "-url", f.url, "-CAfile", str(f.dir / "root.pem"), "-resp_text", *extra],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Response verify OK" in proc.stderr, proc.stderr
    return proc.stdout


def test_openssl_good_for_a_ledgered_device(field: Field) -> None:
    out = openssl_ocsp(field, field.certs[0])
    assert f"cert-{field.certs[0].serial_number:x}.pem: good" in out
    assert "Responder Id: " in out and "WARNING" not in out


def test_openssl_revoked_for_a_revoked_device(field: Field) -> None:
    out = openssl_ocsp(field, field.certs[1])
    assert f"cert-{field.certs[1].serial_number:x}.pem: revoked" in out
    assert "Reason: keyCompromise" in out


def test_openssl_never_good_off_the_ledger(field: Field) -> None:
    w = field.world
    chip = ec.generate_private_key(ec.SECP256R1()).public_key()
    minted = w.issuer.issue(chip, w.device_id(20), 20)  # the PIN holder, with the CA key
    out = openssl_ocsp(field, minted)
    assert f"cert-{minted.serial_number:x}.pem: revoked" in out
    assert "Reason: certificateHold" in out
    assert "Revocation Time: Jan  1 00:00:00 1970 GMT" in out


def test_duplicate_serial_is_revoked_once_seen(field: Field) -> None:
    w = field.world
    chip = ec.generate_private_key(ec.SECP256R1()).public_key()
    twin = w.issuer.issue(chip, w.device_id(2), 2)  # slot 2 again: a restored store
    # OCSP names only (issuer, serial): until someone shows the second certificate, the
    # serial is the ledgered device's ...
    assert ": good" in openssl_ocsp(field, twin)
    # ... once an onboarding script shows it to the registry, both are refused.
    with Registry.open(field.dir / "registry.sqlite") as reg:
        assert reg.check(twin).status.value == "duplicate"
    for cert in (twin, field.certs[2]):
        out = openssl_ocsp(field, cert)
        assert ": revoked" in out and "Reason: certificateHold" in out


def _request(cert: x509.Certificate, issuer: x509.Certificate, *, nonce: bytes | None = None,
             algorithm: hashes.HashAlgorithm | None = None) -> bytes:  # fmt: skip
    b = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _get(f: Field, der: bytes) -> ocsp.OCSPResponse:
    path = urllib.parse.quote(base64.b64encode(der).decode(), safe="")
    with urllib.request.urlopen(f"{f.url}/{path}", timeout=10) as r:  # noqa: S310 - 127.0.0.1
        assert r.headers["Content-Type"] == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(r.read())


def _post(f: Field, der: bytes, ctype: str = "application/ocsp-request") -> ocsp.OCSPResponse:
    req = urllib.request.Request(f.url, data=der, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - 127.0.0.1
        return ocsp.load_der_ocsp_response(r.read())


def test_get_post_nonce_and_sha256_cert_ids(field: Field) -> None:
    w = field.world
    nonce = b"\x42" * 16
    der = _request(field.certs[0], w.pca, nonce=nonce, algorithm=hashes.SHA256())
    for resp in (_get(field, der), _post(field, der)):
        assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
        assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        responder = resp.certificates[0]
        assert responder.issuer == w.pca.subject
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
        responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
        key = responder.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


def test_non_issued_answer_carries_the_extended_revoke_extension(field: Field) -> None:
    w = field.world
    chip = ec.generate_private_key(ec.SECP256R1()).public_key()
    minted = w.issuer.issue(chip, w.device_id(21), 21)
    resp = _post(field, _request(minted, w.pca))
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.certificate_hold
    assert resp.revocation_time_utc == datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    ext = resp.extensions.get_extension_for_oid(EXTENDED_REVOKE)
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x05\x00" and not ext.critical


def test_the_root_responder_answers_for_production_cas(field: Field) -> None:
    w = field.world
    resp = _post(field, _request(w.pca, w.root))
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert resp.certificates[0].issuer == w.root.subject
    other = make_world(2, job_id="not-this-oem", label="ocsp-other")
    # a serial the root never gave a production CA of this OEM's jobs: never good
    fake = _post(field, _request(other.pca, w.root))
    assert fake.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert fake.revocation_reason is x509.ReasonFlags.certificate_hold
    # the root revokes the production CA: the CA and all its devices are revoked
    crl = revoke_production_ca(w.root_key, w.root, w.pca, reason=x509.ReasonFlags.ca_compromise)
    entry = next(iter(x509.load_pem_x509_crl(crl)))
    revoked: Any = field.revoked_root  # type: ignore[attr-defined]
    revoked[w.pca.serial_number] = (int(entry.revocation_date_utc.timestamp()), "cACompromise")
    try:
        assert _post(field, _request(w.pca, w.root)).revocation_reason is (
            x509.ReasonFlags.ca_compromise
        )
        dev = _post(field, _request(field.certs[0], w.pca))
        assert dev.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert dev.revocation_reason is x509.ReasonFlags.ca_compromise
    finally:
        revoked.clear()


def test_bad_requests(field: Field) -> None:
    w = field.world
    other = make_world(2, job_id="other-oem", label="ocsp-foreign")
    dev = other.issuer.issue(ec.generate_private_key(ec.SECP256R1()).public_key(),
                             other.device_id(0), 0)  # fmt: skip
    assert _post(field, _request(dev, other.pca)).response_status is (
        ocsp.OCSPResponseStatus.UNAUTHORIZED
    )
    assert _post(field, b"\x30\x03\x02\x01\x00").response_status is (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    good = _request(field.certs[0], w.pca)
    assert _post(field, good, ctype="text/plain").response_status is (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    assert _post(field, _request(field.certs[0], w.pca, nonce=b"n" * 40)).response_status is (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    with urllib.request.urlopen(f"{field.url}/not-base64!", timeout=10) as r:  # noqa: S310
        assert ocsp.load_der_ocsp_response(r.read()).response_status is (
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        )
    # after all that, the responder still answers
    assert _get(field, good).certificate_status is ocsp.OCSPCertStatus.GOOD
