"""Flow 2 at the OEM: ``securethread oem certify-programmer REQUEST --fingerprint HEX``.

The OEM certifies an enclave's four keys (identity, license signing, ledger signing, key
agreement) under its root, and sends back a certificate bundle signed by the root.  The
request proves possession of each key; the fingerprint given out of band proves whose
appliance holds them -- without it anyone could enrol a key of their own.
"""

from __future__ import annotations

import hmac
import os

from securethread.errors import CertificateError
from securethread.formats.onboarding import PURPOSES, CertificateBundle, EnrolmentRequest
from securethread.formats.transcript import CertEntry
from securethread.keys import spki_der
from securethread.oem import layout as L
from securethread.pki import EnclavePurpose, certify_enclave, from_pem, to_der, untrusted
from securethread.workdir import StepResult, check_name, parse_fingerprint, read_file, to_pem

_PURPOSE = {
    "identity": EnclavePurpose.IDENTITY,
    "license-signing": EnclavePurpose.LICENSE_SIGNING,
    "ledger-signing": EnclavePurpose.LEDGER_SIGNING,
    "key-agreement": EnclavePurpose.KEY_AGREEMENT,
}


def certify_programmer(
    workdir: str | os.PathLike[str], request: str | os.PathLike[str], *, fingerprint: str
) -> StepResult:
    """Certify the enclave that sent ``request`` if its identity key is ``fingerprint``."""
    work = L.open_oem(workdir)
    expected = parse_fingerprint(fingerprint)
    raw = read_file(request, "enrolment request", limit=64 << 10)
    req = EnrolmentRequest.open(raw)
    if not hmac.compare_digest(req.fingerprint, expected):
        raise CertificateError(
            f"enrolment request: identity key {req.fingerprint.hex()} is not the fingerprint "
            "you were given; refusing to certify it"
        )
    name = check_name("programmer name", req.name)
    pdir = L.programmer_dir(name)
    step = f"certify-programmer {name}"
    if (earlier := work.done_before(f"{pdir}/identity.pem", step=step)) is not None:
        return earlier
    for purpose in PURPOSES:
        req.csr(purpose)  # every CSR parses before anything is signed

    oem = work.open_token(L.TOKEN)
    root_key = oem.private_key(L.L_ROOT)
    root = oem.certificate(L.L_ROOT)
    identity_key = req.identity_key()
    certs = {}
    for purpose in PURPOSES:
        certs[purpose] = certify_enclave(
            root_key,
            root,
            req.csr(purpose),
            enclave_name=name,
            purpose=_PURPOSE[purpose],
            role="programmer",
            proof_key=identity_key if purpose == "key-agreement" else None,
        )
    fw_key = untrusted.load_public_key_pem(
        work.read(L.FIRMWARE_KEY, "firmware-signing key"), what="firmware-signing key"
    )
    bundle = CertificateBundle(
        programmer=name,
        root=to_der(root),
        oem_identity=to_der(from_pem(work.read(L.IDENTITY, "OEM identity certificate"))),
        enclave={p: to_der(c) for p, c in certs.items()},
        officers=work.read(L.OFFICERS, "officer bundle"),
        firmware_signing=spki_der(fw_key),
    ).seal(root_key)
    written = [work.write(f"outbox/certificates-{name}.bin", bundle)]
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "enclave-onboarding",
        certificates=[CertEntry.from_certificate(c) for c in certs.values()],
        details={"programmer": name},
    )
    written.append(work.write(f"{pdir}/enrolment-request.bin", raw))
    for purpose in reversed(PURPOSES[1:]):
        written.append(work.write(f"{pdir}/{purpose}.pem", to_pem(certs[purpose])))
    written.append(f"{pdir}/identity.pem")
    result = work.finish(
        "oem certify-programmer", written, [tx], {"programmer": name, "bundle": written[0]}
    )
    result = work.pending(step, result)
    # identity.pem last: it marks the programmer certified
    work.write(f"{pdir}/identity.pem", to_pem(certs["identity"]))
    return result
