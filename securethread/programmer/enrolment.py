"""Flow 2 at the programming centre: ``programmer init``, ``enrol``, ``install-certs``.

``init`` creates the work directory and the enclave's token.  ``enrol`` generates the
enclave's four keys inside the token (identity P-384; license signing, ledger signing P-256;
key agreement P-256, whose CSR the identity key signs) and writes the enrolment request;
the operator reads the printed identity fingerprint to the OEM out of band.  ``install-certs``
takes the OEM's certificate bundle, pinned by the root fingerprint the OEM gave out of band,
checks that every certificate certifies the key of the same purpose in this token, and
installs them.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError
from securethread.formats.onboarding import PURPOSES, CertificateBundle, EnrolmentRequest
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.keys import fingerprint, spki_der
from securethread.pki import EnclavePurpose, create_enclave_csr, install_certificate
from securethread.programmer import layout as L
from securethread.workdir import (
    TRANSCRIPT,
    PartyDir,
    StepResult,
    check_name,
    parse_fingerprint,
    read_file,
    to_pem,
)

_PURPOSE = {
    "identity": EnclavePurpose.IDENTITY,
    "license-signing": EnclavePurpose.LICENSE_SIGNING,
    "ledger-signing": EnclavePurpose.LEDGER_SIGNING,
    "key-agreement": EnclavePurpose.KEY_AGREEMENT,
}


def init(workdir: str | os.PathLike[str], *, name: str) -> StepResult:
    """Create the programming centre ``name``'s work directory and its token."""
    check_name("programmer name", name)
    earlier = PartyDir.undelivered_init(workdir, L.PARTY, name)
    if earlier is not None:  # killed after it made the directory, before its answer
        return earlier
    work = PartyDir.create(workdir, L.PARTY, name)
    work.init_tokens([L.TOKEN])
    result = work.finish(
        "programmer init", ["hsm/softhsm2.conf", "pins"], (), {"programmer": name}
    )
    result = work.pending("init", result)
    work.mark_created()
    return result


def enrol(workdir: str | os.PathLike[str]) -> StepResult:
    """Generate the enclave's keys in its token and write the enrolment request."""
    work = L.open_programmer(workdir)
    if (earlier := work.done_before(L.ENROLMENT, step="enrol")) is not None:
        return earlier
    token = work.open_token(L.TOKEN)
    # Keys left by an enrol that was killed before writing its request are this step's own
    # (their labels are reserved for it): remove them and start again.
    for label in L.LABELS.values():
        token.destroy(label)
    # enrol starts the transcript: one left without the request is that killed run's, its
    # records signed by the identity key just destroyed (a new one would not verify them).
    work.path(TRANSCRIPT).unlink(missing_ok=True)
    identity_csr = create_enclave_csr(
        token, label=L.L_IDENTITY, enclave_name=work.name, purpose=EnclavePurpose.IDENTITY
    )
    identity = token.private_key(L.L_IDENTITY)
    csrs = {"identity": identity_csr}
    for purpose in PURPOSES[1:]:
        csrs[purpose] = create_enclave_csr(
            token,
            label=L.LABELS[purpose],
            enclave_name=work.name,
            purpose=_PURPOSE[purpose],
            signer=identity if purpose == "key-agreement" else None,
        )
    der = serialization.Encoding.DER
    request = EnrolmentRequest(work.name, {p: c.public_bytes(der) for p, c in csrs.items()})
    sealed = request.seal(identity)
    tx = work.transcript(identity)
    tx.append("token-init", details={"token": L.TOKEN, "module": token.module_path})
    tx.append(
        "enrolment",
        keys=[KeyEntry.from_key(token.private_key(L.LABELS[p])) for p in PURPOSES],
        details={"programmer": work.name},
    )
    fp = fingerprint(identity.public_key()).hex()
    result = work.finish(
        "programmer enrol", [L.ENROLMENT], [tx], {"programmer": work.name, "fingerprint": fp}
    )
    result = work.pending("enrol", result)  # before the file that marks enrol done
    work.write(L.ENROLMENT, sealed)
    return result


def install_certs(
    workdir: str | os.PathLike[str], bundle_path: str | os.PathLike[str], *, root_fingerprint: str
) -> StepResult:
    """Install the OEM's certificate bundle, pinned by ``root_fingerprint`` (hex)."""
    work = L.open_programmer(workdir)
    work.require(L.ENROLMENT, step="install-certs", needs="enrol")
    if (earlier := work.done_before(L.cert_path("identity"), step="install-certs")) is not None:
        return earlier
    bundle = CertificateBundle.open(
        read_file(bundle_path, "certificate bundle", limit=256 << 10),
        root_fingerprint=parse_fingerprint(root_fingerprint),
    )
    if bundle.programmer != work.name:
        raise CertificateError(
            f"the certificate bundle is for programmer {bundle.programmer!r}, this is {work.name!r}"
        )
    token = work.open_token(L.TOKEN)
    certs = {p: bundle.certificate(p) for p in PURPOSES}
    for purpose, cert in certs.items():  # all checked before any is installed (S5)
        certified = cert.public_key()  # an EC key: the bundle's loader checked it
        mine = token.public_key(L.LABELS[purpose])
        if not isinstance(certified, ec.EllipticCurvePublicKey) or spki_der(mine) != spki_der(
            certified
        ):
            raise CertificateError(
                f"the bundle's {purpose} certificate does not certify this enclave's {purpose} key"
            )
    for purpose, cert in certs.items():
        label = L.LABELS[purpose]
        if token.has_certificate(label):
            # Installed by an install-certs that was killed before it finished: the same
            # certificate is its own; another one is not ours to replace.
            if token.certificate(label) != cert:
                raise CertificateError(f"the token already holds another certificate {label!r}")
            continue
        install_certificate(token, label, cert)
    root = bundle.root_certificate()
    written = [
        work.write(L.ROOT_CA, to_pem(root)),
        work.write(L.OEM_IDENTITY, _pem_of(bundle.oem_identity)),
        work.write(L.OFFICERS, bundle.officers),
        work.write(L.FIRMWARE_KEY, bundle.firmware_signing),
    ]
    tx = work.transcript(token.private_key(L.L_IDENTITY))
    tx.append(
        "identity",
        certificates=[CertEntry.from_certificate(c) for c in [root, *certs.values()]],
        details={"programmer": work.name},
    )
    for purpose in reversed(PURPOSES[1:]):
        written.append(work.write(L.cert_path(purpose), to_pem(certs[purpose])))
    written.append(L.cert_path("identity"))
    result = work.finish("programmer install-certs", written, [tx], {"programmer": work.name})
    result = work.pending("install-certs", result)
    work.write(L.cert_path("identity"), to_pem(certs["identity"]))  # last: marks the step done
    return result


def _pem_of(der: bytes) -> bytes:
    from securethread.pki import load_der

    return to_pem(load_der(der))
