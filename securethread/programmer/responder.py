"""Open-job's part in the OEM's OCSP responder: the production CA certifies the OEM's
responder key (RFC 6960 §4.2.2.2 delegated responder).

The job package carries the OEM's request (:mod:`securethread.formats.responder`): a CSR of
a key in the OEM's token, bound to this job's identity, in an envelope the OEM root signed.
Nothing in it is used before the root's signature verified under the pinned root, the job it
names is the job being opened (id and identity), and the CSR proves possession of a P-256
key.  The production CA then certifies it with the key in this token (id-kp-OCSPSigning,
id-pkix-ocsp-nocheck; :func:`securethread.pki.responder.certify_responder`), and the
certificate goes to the outbox for the OEM (``outbox/ocsp-responder-<job>.pem``; the OEM
installs it with ``oem install-responder``).  A package without a request (an OEM that runs
no responder) opens as before.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError, JobError
from securethread.formats.job import VerifiedJob
from securethread.formats.jobpackage import JobPackage
from securethread.formats.responder import ResponderRequest
from securethread.pki import from_pem
from securethread.pki.responder import certify_responder
from securethread.programmer import layout as L
from securethread.workdir import PartyDir, to_pem


def responder_files(job_id: str) -> tuple[str, str]:
    """Where open-job keeps the responder certificate, and the outbox copy for the OEM."""
    return f"{L.job_dir(job_id)}/ocsp-responder.pem", f"outbox/ocsp-responder-{job_id}.pem"


def certify_oem_responder(
    work: PartyDir, token: object, package: JobPackage, job: VerifiedJob, pca: x509.Certificate
) -> list[tuple[str, bytes]]:
    """Verify the package's responder request and certify its key with the job's production
    CA; returns the files to write (none when the package carries no request).  Signs,
    writes nothing: open-job writes once every part verified."""
    if package.ocsp_responder is None:
        return []
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    root_key = root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise CertificateError("the pinned OEM root holds no EC key")
    request = ResponderRequest.open(package.ocsp_responder, oem_root=root_key)
    job_id = job.job.job_id
    if request.job_id != job_id or request.job_sha256 != job.sha256:
        raise JobError(
            f"the OCSP responder request is for job {request.job_id!r} "
            f"({request.job_sha256.hex()[:16]}), not the job being opened"
        )
    ca_key = token.private_key(L.production_ca_label(job_id))  # type: ignore[attr-defined]
    cert = certify_responder(ca_key, pca, request.certificate_request(), job_id=job_id)
    pem = to_pem(cert)
    return [(rel, pem) for rel in responder_files(job_id)]
