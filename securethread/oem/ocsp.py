"""The OEM's OCSP responder (RFC 6960): the field refuses what the ledger does not know.

``securethread oem ocsp --listen HOST:PORT`` answers OCSP requests over HTTP (GET and POST,
RFC 6960 Appendix A) from the device registry (:mod:`securethread.oem.registry`):

* a device certificate in a reconciled ledger and not revoked: ``good``;
* revoked (by the OEM in the registry, by a CRL, or its production CA by the root's CRL):
  ``revoked``, with the time and reason;
* a serial the registry holds with two certificates (a restored store, or a certificate
  minted with the PIN and seen by ``registry check``): ``revoked``, certificateHold, dated
  when it was flagged;
* a serial in no reconciled ledger -- a certificate the programmer's PIN holder minted off
  the ledger, or a device of a job not yet reconciled: ``revoked``, certificateHold,
  revocationTime 1970-01-01T00:00:00Z, with the extended-revoke extension.  That is RFC
  6960 §2.2's answer for a "non-issued" certificate (and §4.4.8's extension), chosen over
  ``unknown`` because ``unknown`` means "this responder does not serve that issuer" and
  some clients let it pass (soft fail), while every client refuses ``revoked``;
  certificateHold says it may change (the job's ledger may still come).

A CertID whose issuer is not a production CA with an installed responder certificate, nor
the OEM root, gets ``unauthorized`` (§2.3): the responder cannot answer for it.

Who signs (§4.2.2.2, delegated responders): for a device, the job's responder key -- an OEM
token key certified by the job's production CA at open-job (id-kp-OCSPSigning,
id-pkix-ocsp-nocheck; :mod:`securethread.pki.responder`); for a production CA (``nginx
ssl_ocsp on`` asks about every certificate of the chain but the root), the root's responder
key, certified by the root.  The response carries the responder certificate and the
request's nonce (§4.4.1), and is signed with ECDSA-SHA256 in the OEM token.

The keys: ``oem issue-job`` generates ``ocsp-<job>`` in the OEM token and puts its CSR, in
an envelope the root signs (:mod:`securethread.formats.responder`), in the job package;
the programmer's open-job certifies it with the production-CA key and returns the
certificate (``outbox/ocsp-responder-<job>.pem``); ``oem install-responder CERT --job J``
checks and installs it (and, the first time, has the root certify ``ocsp-root``).

A running ``oem ocsp`` picks up responders installed after it started, without a restart:
it reloads them on SIGHUP, when a request names an issuer it does not know (at most once a
second), and when the installed responder files change (checked every second).  A reload
that fails (a file being replaced, a key not yet in the token) keeps the responders it had
and says so in one stderr line.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from securethread.errors import ConfigurationError, Error
from securethread.keys.protocol import PrivateKey
from securethread.oem import layout as L
from securethread.oem.registry import DeviceStatus, Registry, database_of
from securethread.workdir import PartyDir, StepResult, to_pem

__all__ = [
    "EXTENDED_REVOKE",
    "ROOT_RESPONDER",
    "ROOT_RESPONDER_LABEL",
    "Responder",
    "ResponderIdentity",
    "install_responder",
    "make_responder_request",
    "responder_label",
    "serve",
]

#: RFC 6960 §4.4.8 id-pkix-ocsp-extended-revoke (id-pkix-ocsp 9).
EXTENDED_REVOKE = x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.9")
#: RFC 6960 §2.2: a non-issued certificate is revoked at 1970-01-01T00:00:00Z, on hold.
NON_ISSUED_TIME = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
ROOT_RESPONDER_LABEL = "ocsp-root"
ROOT_RESPONDER = "ocsp-root-responder.pem"
#: Largest request accepted (a CertID, a nonce and some slack).
MAX_REQUEST = 8192
_HASHES: tuple[hashes.HashAlgorithm, ...] = (
    hashes.SHA1(),
    hashes.SHA224(),
    hashes.SHA256(),
    hashes.SHA384(),
    hashes.SHA512(),
)


def responder_label(job_id: str) -> str:
    """The OEM token label of job ``job_id``'s OCSP responder key."""
    return f"ocsp-{job_id}"


def request_file(job_id: str) -> str:
    return f"{L.job_dir(job_id)}/ocsp-responder-request.bin"


def certificate_file(job_id: str) -> str:
    return f"{L.job_dir(job_id)}/ocsp-responder.pem"


# --- at issue-job and install-responder -----------------------------------------------------


def make_responder_request(
    token: Any, root_key: PrivateKey, *, job_id: str, job_sha256: bytes
) -> bytes:
    """Generate job ``job_id``'s responder key in the OEM token (replacing one an earlier
    draft of the job left) and return its root-signed request for the production CA."""
    from securethread.formats.responder import ResponderRequest
    from securethread.hsm import SIGNING, Curve
    from securethread.pki.responder import responder_csr

    label = responder_label(job_id)
    token.destroy(label)
    key = token.generate_ec(label, curve=Curve.P256, policy=SIGNING)
    csr = responder_csr(key).public_bytes(serialization.Encoding.DER)
    return ResponderRequest(job_id, job_sha256, csr).seal(root_key)


def install_responder(
    workdir: str | os.PathLike[str], cert_path: str | os.PathLike[str], *, job_id: str
) -> StepResult:
    """``oem install-responder CERT --job J``: install the responder certificate job J's
    production CA issued for the OEM's ``ocsp-J`` key; the first time, also have the root
    certify the root's responder key ``ocsp-root``."""
    from securethread.formats.transcript import CertEntry
    from securethread.oem.registry import load_certificate_file
    from securethread.pki import from_pem
    from securethread.pki.responder import check_responder_certificate

    work = L.open_oem(workdir)
    jdir = L.job_dir(job_id)
    step = f"install-responder {job_id}"
    work.require(f"{jdir}/production-ca.pem", step=step, needs=f"issue-job ({job_id})")
    work.require(request_file(job_id), step=step, needs=f"issue-job ({job_id})")
    cert = load_certificate_file(cert_path, "OCSP responder certificate")
    pca = from_pem(work.read(f"{jdir}/production-ca.pem", "production CA"))
    oem = work.open_token(L.TOKEN)
    check_responder_certificate(cert, pca, key=oem.public_key(responder_label(job_id)))
    written = [work.write(certificate_file(job_id), to_pem(cert))]
    installed = [CertEntry.from_certificate(cert)]
    if not work.exists(ROOT_RESPONDER):
        root_cert = _certify_root_responder(oem)
        written.append(work.write(ROOT_RESPONDER, to_pem(root_cert)))
        installed.append(CertEntry.from_certificate(root_cert))
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append("ocsp-responder", certificates=installed, details={"job": job_id})
    return work.finish(
        "oem install-responder",
        written,
        [tx],
        {"job": job_id, "responder": cert.subject.rfc4514_string()},
    )


def _certify_root_responder(oem: Any) -> x509.Certificate:
    """The root certifies the OEM's key that answers for production CAs (once)."""
    from securethread.hsm import SIGNING, Curve
    from securethread.pki.responder import certify_responder, responder_csr

    oem.destroy(ROOT_RESPONDER_LABEL)  # one left by a run killed before it wrote the cert
    key = oem.generate_ec(ROOT_RESPONDER_LABEL, curve=Curve.P256, policy=SIGNING)
    return certify_responder(
        oem.private_key(L.L_ROOT), oem.certificate(L.L_ROOT), responder_csr(key), job_id=None
    )


# --- answering ---------------------------------------------------------------------------------


@attrs.frozen
class ResponderIdentity:
    """One issuer this responder answers for, and the key and certificate it signs with.

    ``job_id`` None: the OEM root (its CertIDs are about production CAs)."""

    issuer: x509.Certificate
    certificate: x509.Certificate
    key: PrivateKey
    job_id: str | None

    @property
    def issuer_sha256(self) -> bytes:
        return hashlib.sha256(self.issuer.public_bytes(serialization.Encoding.DER)).digest()

    def cert_ids(self) -> Iterable[tuple[str, bytes, bytes]]:
        """(hash name, issuerNameHash, issuerKeyHash) for every CertID hash (§4.1.1)."""
        name = self.issuer.subject.public_bytes()
        # issuerKeyHash: the hash of the subjectPublicKey BIT STRING's value (§4.1.1)
        key = self.issuer.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        for algorithm in _HASHES:
            h1, h2 = hashes.Hash(algorithm), hashes.Hash(algorithm)
            h1.update(name)
            h2.update(key)
            yield algorithm.name, h1.finalize(), h2.finalize()


@attrs.frozen
class _Answer:
    status: ocsp.OCSPCertStatus
    at: datetime.datetime | None = None
    reason: x509.ReasonFlags | None = None
    non_issued: bool = False


_GOOD = _Answer(ocsp.OCSPCertStatus.GOOD)
_NON_ISSUED = _Answer(
    ocsp.OCSPCertStatus.REVOKED, NON_ISSUED_TIME, x509.ReasonFlags.certificate_hold, True
)


def _reason(name: str | None) -> x509.ReasonFlags | None:
    if name is None or name == x509.ReasonFlags.unspecified.value:
        return None  # RFC 5280 §5.3.1: absent rather than "unspecified"
    return x509.ReasonFlags(name)


def _utc(ts: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


class Responder:
    """Builds signed OCSP responses from the registry (thread-safe: one lock around the
    registry and the token, each response takes ~one token signature)."""

    def __init__(
        self,
        identities: Sequence[ResponderIdentity],
        registry: Registry,
        *,
        root_revocations: Callable[[], dict[int, tuple[int, str]]] = dict,
        production_cas: Callable[[], dict[int, x509.Certificate]] = dict,
    ) -> None:
        """``root_revocations()``: production-CA serial -> (time, reason) from the root's
        CRL; ``production_cas()``: serial -> certificate of every production CA the root
        certified for this OEM's jobs (what the root's responder answers ``good`` for)."""
        self._registry = registry
        self._root_revocations = root_revocations
        self._production_cas = production_cas
        self._lock = threading.Lock()
        self._by_id = self._index(identities)
        #: Called (outside the lock) when a request names an issuer no identity answers for:
        #: the server's reload of newly installed responders (:meth:`replace`).
        self.on_unknown_issuer: Callable[[], None] | None = None

    @staticmethod
    def _index(
        identities: Sequence[ResponderIdentity],
    ) -> dict[tuple[str, bytes, bytes], ResponderIdentity]:
        by_id = {cert_id: ident for ident in identities for cert_id in ident.cert_ids()}
        if not by_id:
            raise ConfigurationError(
                "no OCSP responder certificate is installed (oem install-responder)"
            )
        return by_id

    def replace(self, identities: Sequence[ResponderIdentity]) -> None:
        """Answer from now on for ``identities`` (a job's responder installed, or one gone):
        requests in flight finish with the identity they found."""
        by_id = self._index(identities)
        with self._lock:
            self._by_id = by_id

    @property
    def lock(self) -> threading.Lock:
        """Held while a response is signed: whoever else uses the token takes it too."""
        return self._lock

    def respond(self, data: bytes, *, now: datetime.datetime | None = None) -> bytes:
        """The DER OCSPResponse for the DER OCSPRequest ``data`` (never raises on bad
        input: a malformed request gets malformedRequest, §2.3)."""
        try:
            req = ocsp.load_der_ocsp_request(data)
            algorithm = req.hash_algorithm.name
            nonce = _nonce(req)
        except Exception:  # ValueError, cryptography's UnsupportedAlgorithm: not ours to parse
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        cert_id = (algorithm, req.issuer_name_hash, req.issuer_key_hash)
        ident = self._by_id.get(cert_id)
        if ident is None and self.on_unknown_issuer is not None:
            self.on_unknown_issuer()  # a job's responder installed since: reload, ask again
            ident = self._by_id.get(cert_id)
        if ident is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        when = (now or datetime.datetime.now(datetime.UTC)).replace(microsecond=0)
        with self._lock:
            try:
                answer = self._answer(ident, req.serial_number)
                return _signed(req, ident, answer, nonce, when)
            except Error:
                return _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)

    def _answer(self, ident: ResponderIdentity, serial: int) -> _Answer:
        root_revoked = self._root_revocations()
        if ident.job_id is None:  # about a production CA
            if serial in root_revoked:
                at, reason = root_revoked[serial]
                return _Answer(ocsp.OCSPCertStatus.REVOKED, _utc(at), _reason(reason))
            return _GOOD if serial in self._production_cas() else _NON_ISSUED
        pca_serial = ident.issuer.serial_number
        if pca_serial in root_revoked:  # RFC 5280 §6.3: below a revoked CA nothing is good
            at, reason = root_revoked[pca_serial]
            return _Answer(ocsp.OCSPCertStatus.REVOKED, _utc(at), _reason(reason))
        return _device_answer(self._registry.status(ident.issuer_sha256, serial))


def _device_answer(s: DeviceStatus) -> _Answer:
    if s.state == "good":
        return _GOOD
    if s.state == "revoked":
        return _Answer(ocsp.OCSPCertStatus.REVOKED, _utc(s.at or 0), _reason(s.reason))
    if s.state == "duplicate":
        return _Answer(
            ocsp.OCSPCertStatus.REVOKED, _utc(s.at or 0), x509.ReasonFlags.certificate_hold
        )
    return _NON_ISSUED


def _nonce(req: ocsp.OCSPRequest) -> bytes | None:
    try:
        nonce = req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None
    if not 1 <= len(nonce) <= 32:  # RFC 8954 §2.1
        raise ValueError("nonce length outside 1..32")
    return nonce


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


def _signed(
    req: ocsp.OCSPRequest,
    ident: ResponderIdentity,
    answer: _Answer,
    nonce: bytes | None,
    now: datetime.datetime,
) -> bytes:
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=req.issuer_name_hash,
            issuer_key_hash=req.issuer_key_hash,
            serial_number=req.serial_number,
            algorithm=req.hash_algorithm,
            cert_status=answer.status,
            this_update=now,
            next_update=None,  # §2.4: newer information is always available (a live registry)
            revocation_time=answer.at,
            revocation_reason=answer.reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ident.certificate)  # §4.2.2.3 byKey
        .certificates([ident.certificate])
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    if answer.non_issued:
        # §4.4.8: NULL extension value; it tells the client "revoked" may mean non-issued
        builder = builder.add_extension(
            x509.UnrecognizedExtension(EXTENDED_REVOKE, b"\x05\x00"), critical=False
        )
    response = builder.sign(ident.key.as_cryptography(), hashes.SHA256())
    return response.public_bytes(serialization.Encoding.DER)


# --- the OEM's responder, from its work directory ---------------------------------------------


def identities(work: PartyDir, token: Any) -> list[ResponderIdentity]:
    """Every installed responder: each job's and the root's."""
    from securethread.pki import from_pem
    from securethread.pki.responder import check_responder_certificate

    out = []
    jobs = work.path("jobs")
    for jdir in sorted(jobs.iterdir()) if jobs.is_dir() else []:
        job_id = jdir.name
        if not work.exists(certificate_file(job_id)):
            continue
        pca = from_pem(work.read(f"{L.job_dir(job_id)}/production-ca.pem", "production CA"))
        cert = from_pem(work.read(certificate_file(job_id), "OCSP responder certificate"))
        label = responder_label(job_id)
        check_responder_certificate(cert, pca, key=token.public_key(label))
        out.append(ResponderIdentity(pca, cert, token.private_key(label), job_id))
    if work.exists(ROOT_RESPONDER):
        root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
        cert = from_pem(work.read(ROOT_RESPONDER, "root OCSP responder certificate"))
        check_responder_certificate(cert, root, key=token.public_key(ROOT_RESPONDER_LABEL))
        out.append(ResponderIdentity(root, cert, token.private_key(ROOT_RESPONDER_LABEL), None))
    return out


class _RootState:
    """The root's CRL (re-read when ``oem revoke`` replaces it) and the production CAs."""

    def __init__(self, work: PartyDir) -> None:
        from securethread.pki import from_pem

        self._work = work
        self._root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
        self._stamp: tuple[int, int] | None = None
        self._revoked: dict[int, tuple[int, str]] = {}
        self._cas: dict[int, x509.Certificate] = {}
        self._cas_at = 0.0

    def revocations(self) -> dict[int, tuple[int, str]]:
        from securethread.oem.revoke import ROOT_CRL
        from securethread.pki import load_crl

        path = self._work.path(ROOT_CRL)
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            crl = load_crl(path.read_bytes(), self._root)
            revoked = {}
            for e in crl:
                try:
                    why = e.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
                except x509.ExtensionNotFound:
                    why = x509.ReasonFlags.unspecified.value
                revoked[e.serial_number] = (int(e.revocation_date_utc.timestamp()), why)
            self._revoked, self._stamp = revoked, stamp
        return self._revoked

    def production_cas(self) -> dict[int, x509.Certificate]:
        import time

        from securethread.pki import from_pem

        if time.monotonic() - self._cas_at > 5.0:  # new jobs appear while the server runs
            cas = {}
            for p in sorted(self._work.path("jobs").glob("*/production-ca.pem")):
                cert = from_pem(p.read_bytes())
                cas[cert.serial_number] = cert
            self._cas, self._cas_at = cas, time.monotonic()
        return self._cas


class _Handler(BaseHTTPRequestHandler):
    """RFC 6960 Appendix A: POST (``application/ocsp-request``) or GET of the base64 DER,
    URL-escaped, after the path's last '/'; the answer is ``application/ocsp-response``."""

    server_version = "securethread-ocsp"
    protocol_version = "HTTP/1.0"
    timeout = 10.0  # seconds per request: a slow client cannot hold a thread forever

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if ctype != "application/ocsp-request" or not 0 < length <= MAX_REQUEST:
            self._reply(_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST))
            return
        self._reply(self._responder().respond(self.rfile.read(length)))

    def do_GET(self) -> None:  # noqa: N802
        encoded = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not 0 < len(data) <= MAX_REQUEST:
            self._reply(_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST))
            return
        self._reply(self._responder().respond(data))

    def _responder(self) -> Responder:
        return self.server.responder  # type: ignore[attr-defined, no-any-return]

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/ocsp-response")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # one line per request would drown the server's own lines


class OcspServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], responder: Responder) -> None:
        super().__init__(address, _Handler)
        self.responder = responder
        #: Run by serve_forever between requests (at most every poll interval).
        self.between_requests: Callable[[], None] | None = None

    def service_actions(self) -> None:
        if self.between_requests is not None:
            self.between_requests()


class _Reloader:
    """Reloads the installed responders into a running :class:`Responder`: on SIGHUP (the
    handler only sets a flag), on a request about an unknown issuer (at most once a second)
    and when the responder files changed (looked at once a second)."""

    INTERVAL = 1.0

    def __init__(self, work: PartyDir, token: Any, responder: Responder) -> None:
        self._work, self._token, self._responder = work, token, responder
        self._hup = threading.Event()
        self._mutex = threading.Lock()
        self._stamp = self._files()
        self._looked = time.monotonic()
        self._tried = self._looked - self.INTERVAL  # the first unknown issuer reloads at once

    def _files(self) -> tuple[tuple[str, int, int], ...]:
        """(path, mtime, size) of every installed responder certificate."""
        out = []
        paths = [*self._work.path("jobs").glob("*/ocsp-responder.pem"),
                 self._work.path(ROOT_RESPONDER)]  # fmt: skip
        for p in sorted(paths):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def hangup(self, _signum: int, _frame: Any) -> None:
        self._hup.set()

    def unknown_issuer(self) -> None:
        now = time.monotonic()
        if now - self._tried >= self.INTERVAL:
            self._tried = now
            self.reload("a request named an issuer not loaded")

    def between_requests(self) -> None:
        if self._hup.is_set():
            self._hup.clear()
            self.reload("SIGHUP")
            return
        now = time.monotonic()
        if now - self._looked >= self.INTERVAL:
            self._looked = now
            if self._files() != self._stamp:
                self.reload("responder files changed")

    def reload(self, why: str) -> None:
        with self._mutex:
            stamp = self._files()
            try:
                with self._responder.lock:  # the token: not while a response is signed
                    found = identities(self._work, self._token)
                self._responder.replace(found)
            except Error as exc:
                print(f"oem ocsp: reload ({why}) failed, answering as before: {exc}",
                      file=sys.stderr, flush=True)  # fmt: skip
                return
            self._stamp = stamp
            jobs = sorted(i.job_id for i in found if i.job_id is not None)
            print(f"oem ocsp: reloaded ({why}): responders for {len(jobs)} job(s)"
                  f"{' and the root' if len(found) > len(jobs) else ''}",
                  file=sys.stderr, flush=True)  # fmt: skip


def open_responder(work: PartyDir, database: str | None) -> tuple[Responder, Registry]:
    """The OEM's responder over its registry and token (the caller closes the registry);
    it reloads newly installed responders when a request names an unknown issuer."""
    responder, registry, _reloader = _open(work, database)
    return responder, registry


def _open(work: PartyDir, database: str | None) -> tuple[Responder, Registry, _Reloader]:
    token = work.open_token(L.TOKEN)
    found = identities(work, token)
    registry = Registry.open(database_of(work, database))
    try:
        root = _RootState(work)
        responder = Responder(
            found,
            registry,
            root_revocations=root.revocations,
            production_cas=root.production_cas,
        )
    except BaseException:
        registry.close()
        raise
    reloader = _Reloader(work, token, responder)
    responder.on_unknown_issuer = reloader.unknown_issuer
    return responder, registry, reloader


def serve(
    workdir: str | os.PathLike[str],
    *,
    host: str,
    port: int,
    database: str | None = None,
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """``oem ocsp --listen HOST:PORT``: serve until interrupted (SIGINT, SIGTERM); SIGHUP
    reloads the installed responders (so do new files and requests about new issuers)."""
    work = L.open_oem(workdir)
    responder, registry, reloader = _open(work, database)
    hup = None
    if threading.current_thread() is threading.main_thread():
        hup = signal.signal(signal.SIGHUP, reloader.hangup)
    try:
        try:
            server = OcspServer((host, port), responder)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        server.between_requests = reloader.between_requests
        with server:
            if ready is not None:
                ready(server.server_address[:2])  # type: ignore[arg-type]
            server.serve_forever(poll_interval=0.2)
    finally:
        if hup is not None:
            signal.signal(signal.SIGHUP, hup)
        registry.close()

