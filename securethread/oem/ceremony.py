"""Flow 1, the OEM key ceremony: ``securethread oem init``.

Creates the OEM's work directory and tokens, then inside them: the root CA (P-384,
self-signed), the OEM's identity key certified by the root, the firmware-signing key, and
one job-signing key per officer -- each in the officer's own token under the officer's own
PIN, so that M-of-N approval needs M people, not one PIN.  The officers' public keys and
the threshold floor go into the officer bundle, signed by the root.  Every key and
certificate is recorded in the OEM's signed transcript.

An officer's PIN is the officer's alone: read from (or generated into) a file the officer
names, or typed by the officer; it is never written to the OEM's ``pins`` (which holds the
``oem`` token's PIN only) nor anywhere in the OEM's work directory.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization

from securethread.errors import ConfigurationError
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.hsm.pin import harden_process, read_pin_source
from securethread.keys import SIGNING, Curve, fingerprint, spki_der
from securethread.oem import layout as L
from securethread.pki import (
    EnclavePurpose,
    certify_enclave,
    create_enclave_csr,
    create_root_ca,
    install_certificate,
)
from securethread.workdir import PartyDir, StepResult, check_name, to_pem, write_atomic

MAX_OFFICERS = 16
#: SoftHSM 2.6's user PIN length bounds (MIN_PIN_LEN, MAX_PIN_LEN), in bytes.
PIN_LENGTHS = (4, 255)


def init(
    workdir: str | os.PathLike[str],
    *,
    name: str,
    officers: int = 2,
    threshold: int = 2,
    officer_pin_files: Mapping[int, str | os.PathLike[str]] | None = None,
    officer_pin: Callable[[int], str] | None = None,
) -> StepResult:
    """Create the OEM ``name``'s work directory, tokens and keys (see the module docstring).

    ``officers`` job-signing officers, of whom ``threshold`` must sign every job (the floor
    every programmer enforces; a job may ask for more).  Officer ``n``'s PIN is the first
    line of ``officer_pin_files[n]`` -- a file that does not exist yet is created (0600)
    holding a new random PIN -- else ``officer_pin(n)`` (the officer typing it); with
    neither, init refuses before it writes anything.
    """
    check_name("OEM name", name)
    if not 1 <= officers <= MAX_OFFICERS:
        raise ConfigurationError(f"--officers must be 1..{MAX_OFFICERS}, got {officers}")
    if not 1 <= threshold <= officers:
        raise ConfigurationError(
            f"--threshold must be 1..{officers} (the officers), got {threshold}"
        )
    earlier = PartyDir.undelivered_init(workdir, L.PARTY, name)
    if earlier is not None:  # killed after it made the directory, before its answer
        return earlier
    plan = _officer_pins(Path(workdir).resolve(), officers, officer_pin_files or {}, officer_pin)
    work = PartyDir.create(workdir, L.PARTY, name)
    for path, pin in plan.new_files.items():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, f"{pin}\n".encode(), mode=0o600)
    officer_tokens = [L.officer_token(i + 1) for i in range(officers)]
    work.init_tokens([L.TOKEN, *officer_tokens], private_pins=plan.pins)
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
        # The ceremony is the one step with the officers present: each key is made in the
        # officer's token under the PIN the officer gave.
        token = work.open_token(label, plan.pins.__getitem__)
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
    result = work.finish(
        "oem init",
        written,
        [tx],
        {
            "oem": name,
            "root_fingerprint": fingerprint(root.public_key()).hex(),  # type: ignore[arg-type]
            "officers": officers,
            "threshold": threshold,
            "officer_pins": plan.sources,
        },
    )
    result = work.pending("init", result)  # its answer, until the caller had it
    work.mark_created()  # last: a crash before this leaves a directory init refuses to reuse
    return result


@attrs.frozen
class _OfficerPins:
    pins: dict[str, str]  # token label -> PIN
    new_files: dict[Path, str]  # PIN files to create -> the new PIN they hold
    sources: dict[str, str]  # token label -> where the PIN came from (no PIN in it)


def _officer_pins(
    root: Path,
    officers: int,
    files: Mapping[int, str | os.PathLike[str]],
    ask: Callable[[int], str] | None,
) -> _OfficerPins:
    """Each officer's PIN and where it comes from, checked before anything is written."""
    harden_process()  # no core file of this process, which is about to hold officers' PINs
    paths: dict[int, Path] = {}
    for n, given in files.items():
        if type(n) is not int or not 1 <= n <= officers:
            raise ConfigurationError(
                f"--officer-pin-file names officer {n!r}; this OEM has officers 1..{officers}"
            )
        path = Path(given).expanduser().resolve()
        if path == root or root in path.parents:
            raise ConfigurationError(
                f"officer {n}'s PIN file {str(path)!r} is inside the OEM's work directory: an "
                "officer's PIN must stay out of what the OEM's processes read"
            )
        twin = [m for m, p in paths.items() if p == path]
        if twin:
            raise ConfigurationError(
                f"officers {twin[0]} and {n} name the same PIN file {str(path)!r}: each "
                "officer's PIN is their own"
            )
        paths[n] = path
    pins: dict[str, str] = {}
    new_files: dict[Path, str] = {}
    sources: dict[str, str] = {}
    for n in range(1, officers + 1):
        label = L.officer_token(n)
        own = paths.get(n)
        if own is not None and own.exists():
            pin = read_pin_source(str(own))
            sources[label] = f"read from {own}"
        elif own is not None:
            _check_creatable(own, n)
            pin = secrets.token_hex(16)
            new_files[own] = pin
            sources[label] = f"new, written to {own} only"
        elif ask is not None:
            pin = ask(n)
            sources[label] = "typed by the officer"
        else:
            raise ConfigurationError(
                f"officer {n} has no PIN: give --officer-pin-file {n}=PATH (officer {n}'s own "
                "file: read if it exists, else created holding a new PIN) or run init on a "
                f"terminal where officer {n} types it"
            )
        pins[label] = _check_pin(pin, f"officer {n}'s PIN ({sources[label]})")
    seen: dict[str, str] = {}
    for label, pin in pins.items():
        if pin in seen:
            raise ConfigurationError(
                f"{seen[pin]} and {label} have the same PIN: each officer's PIN is theirs alone"
            )
        seen[pin] = label
    return _OfficerPins(pins, new_files, sources)


def _check_pin(pin: str, what: str) -> str:
    low, high = PIN_LENGTHS
    if not low <= len(pin.encode()) <= high:
        raise ConfigurationError(f"{what} must be {low}-{high} bytes")
    if pin != pin.strip() or not pin.isprintable():
        raise ConfigurationError(f"{what}: no control characters or surrounding blanks")
    return pin


def _check_creatable(path: Path, officer: int) -> None:
    """Refuse, before anything is written, a new PIN file that could not be created."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"officer {officer}'s PIN file {str(path)!r} cannot be created ({str(parent)!r} "
            "is not a writable directory)"
        )


def prompt_officer_pin(officer: int) -> str:
    """Officer ``officer`` chooses their PIN on the terminal (asked twice; nothing echoed)."""
    import getpass

    first = getpass.getpass(f"officer {officer}: choose the PIN of your token officer-{officer}: ")
    if getpass.getpass(f"officer {officer}: the same PIN again: ") != first:
        raise ConfigurationError(f"officer {officer}'s two PIN entries differ")
    return first


def _sha256(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()
