"""Flow 1, the OEM key ceremony: ``securethread oem init``.

Creates the OEM's work directory and tokens, then inside them: the root CA (P-384,
self-signed), the OEM's identity key certified by the root, the firmware-signing key, and
one job-signing key per officer -- each in the officer's own token under the officer's own
PIN, so that M-of-N approval needs M people, not one PIN.  The officers' public keys and
the threshold floor go into the officer bundle, signed by the root.  Every key and
certificate is recorded in the OEM's signed transcript.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization

from securethread.errors import ConfigurationError
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.keys import SIGNING, Curve, fingerprint, spki_der
from securethread.oem import layout as L
from securethread.pki import (
    EnclavePurpose,
    certify_enclave,
    create_enclave_csr,
    create_root_ca,
    install_certificate,
)
from securethread.workdir import PartyDir, StepResult, check_name, to_pem

MAX_OFFICERS = 16


def init(
    workdir: str | os.PathLike[str], *, name: str, officers: int = 2, threshold: int = 2
) -> StepResult:
    """Create the OEM ``name``'s work directory, tokens and keys (see the module docstring).

    ``officers`` job-signing officers, of whom ``threshold`` must sign every job (the floor
    every programmer enforces; a job may ask for more).
    """
    check_name("OEM name", name)
    if not 1 <= officers <= MAX_OFFICERS:
        raise ConfigurationError(f"--officers must be 1..{MAX_OFFICERS}, got {officers}")
    if not 1 <= threshold <= officers:
        raise ConfigurationError(
            f"--threshold must be 1..{officers} (the officers), got {threshold}"
        )
    work = PartyDir.create(workdir, L.PARTY, name)
    officer_tokens = [L.officer_token(i + 1) for i in range(officers)]
    work.init_tokens([L.TOKEN, *officer_tokens])
    oem = work.open_token(L.TOKEN)

    root = create_root_ca(oem, label=L.L_ROOT, organisation=name, common_name=f"{name} Root CA")
    root_key = oem.private_key(L.L_ROOT)
    csr = create_enclave_csr(
        oem, label=L.L_IDENTITY, enclave_name=name, purpose=EnclavePurpose.IDENTITY
    )
    identity = certify_enclave(
        root_key, root, csr, enclave_name=name, purpose=EnclavePurpose.IDENTITY, role="oem"
    )
    install_certificate(oem, L.L_IDENTITY, identity)
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append("token-init", details={"token": L.TOKEN, "module": oem.module_path})
    tx.append(
        "root-ca",
        keys=[KeyEntry.from_key(root_key)],
        certificates=[CertEntry.from_certificate(root)],
    )
    tx.append(
        "identity",
        keys=[KeyEntry.from_key(oem.private_key(L.L_IDENTITY))],
        certificates=[CertEntry.from_certificate(identity)],
    )
    fw = oem.generate_ec(L.L_FIRMWARE, curve=Curve.P256, policy=SIGNING)
    tx.append("signing-key", keys=[KeyEntry.from_key(fw)], details={"use": "firmware"})

    officer_keys = []
    for label in officer_tokens:
        token = work.open_token(label)
        key = token.generate_ec(L.L_OFFICER, curve=Curve.P256, policy=SIGNING)
        officer_keys.append(key)
        tx.append(
            "signing-key",
            keys=[KeyEntry.from_key(key)],
            details={"use": "job-signing", "token": label},
        )
    bundle = OfficerBundle(tuple(spki_der(k.public_key()) for k in officer_keys), threshold)
    sealed = bundle.seal(root_key)
    written = [work.write(L.OFFICERS, sealed)]
    tx.append(
        "officer-bundle",
        artefacts={"officer-bundle": _sha256(sealed)},
        details={"officers": officers, "threshold": threshold},
    )
    fw_pem = fw.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    written.append(work.write(L.FIRMWARE_KEY, fw_pem))
    written.append(work.write(L.IDENTITY, to_pem(identity)))
    written.append(work.write(L.ROOT_CA, to_pem(root)))
    work.mark_created()  # last: a crash before this leaves a directory init refuses to reuse
    return work.finish(
        "oem init",
        written,
        [tx],
        {
            "oem": name,
            "root_fingerprint": fingerprint(root.public_key()).hex(),  # type: ignore[arg-type]
            "officers": officers,
            "threshold": threshold,
        },
    )


def _sha256(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()
