"""Bad input on real SoftHSM: each a specific securethread.Error subclass naming the problem,
and the token left unchanged (S5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    ConfigurationError,
    Error,
    HSMError,
    InvalidPointError,
    KeyNotFoundError,
    KeyPolicyError,
    ModuleLoadError,
    PinIncorrectError,
    PinMissingError,
    TokenNotFoundError,
    URIError,
)
from securethread.hsm import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    KEY_AGREEMENT,
    SIGNING,
    TEMP_DERIVE,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
    Token,
    Usage,
    default_module_path,
    load_module,
    open_token,
    point_of,
    resolve_pin,
)

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh process: this process may already hold `spare` open (the registry would
# return that instance without a login), and a failed login must be observed on its own.
_PIN_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from securethread import errors
    from securethread.hsm import open_token

    out = {}

    def attempt(name, **kwargs):
        try:
            tok = open_token("spare", **kwargs)
        except errors.Error as exc:
            out[name] = [type(exc).__name__, str(exc)]
            return None
        out[name] = ["ok", sorted(tok.labels())]
        return tok

    real = os.environ.pop("SECURETHREAD_PIN_SPARE")
    attempt("missing")
    attempt("wrong", pin=lambda label: "wrong-" + label + "-7391")
    try:
        open_token("pkcs11:token=spare?pin-value=wrong-uri-5820")
    except errors.Error as exc:
        out["uri"] = [type(exc).__name__, str(exc)]
    try:
        open_token("pkcs11:token=spare?pin-source=/nonexistent/pin-file")
    except errors.Error as exc:
        out["pin-source"] = [type(exc).__name__, str(exc)]
    attempt("right", pin=lambda label: real)
    print(json.dumps(out))
    """
)


def _objects(token: Token) -> int:
    return len(list(token.session.get_objects()))


@pytest.fixture
def unchanged(oem: Token) -> Iterator[None]:
    """The test must leave the number of objects in the token as it found it."""
    before = _objects(oem)
    yield
    assert _objects(oem) == before


@pytest.fixture
def cleanup() -> Iterator[Callable[[Any], None]]:
    keys: list[Any] = []
    yield keys.append
    for k in reversed(keys):
        k.destroy()


def test_wrong_and_missing_pin_in_a_fresh_process(token_dir: object) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PIN_PROBE],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["missing"][0] == "PinMissingError"
    assert "SECURETHREAD_PIN_SPARE" in out["missing"][1]
    assert out["wrong"][0] == "PinIncorrectError"
    assert "'spare' rejected the user PIN" in out["wrong"][1]
    assert out["uri"][0] == "PinIncorrectError"
    assert out["pin-source"][0] == "PinMissingError"
    assert "/nonexistent/pin-file" in out["pin-source"][1]
    # No PIN ever appears in an error message.
    blob = json.dumps(out)
    assert "7391" not in blob and "wrong-uri-5820" not in blob
    # The failed attempts left the token usable with the right PIN and its objects intact.
    assert out["right"][0] == "ok"
    assert issubclass(PinIncorrectError, HSMError)


def test_resolve_pin_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECURETHREAD_PIN_NO_SUCH", raising=False)
    monkeypatch.delenv("SECURETHREAD_PIN_NO_SUCH_FILE", raising=False)
    with pytest.raises(PinMissingError, match="no PIN for token 'no-such'"):
        resolve_pin("no-such")
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\nignored\n")
    pin_file.chmod(0o600)  # a PIN file others may read is refused (test_hsm_pins.py)
    assert resolve_pin("no-such", pin_source=str(pin_file)) == "1234"
    assert resolve_pin("no-such", pin_source=f"file:{pin_file}") == "1234"
    monkeypatch.setenv("SECURETHREAD_PIN_NO_SUCH_FILE", str(pin_file))
    assert resolve_pin("no-such") == "1234"
    with pytest.raises(PinMissingError, match="cannot read pin-source"):
        resolve_pin("no-such", pin_source=str(tmp_path / "absent"))


def test_unknown_token_label(token_dir: object) -> None:
    with pytest.raises(TokenNotFoundError, match="no token labelled 'no-such-token'"):
        open_token("no-such-token", pin=lambda label: "x")
    with pytest.raises(TokenNotFoundError, match="'no-such-token'"):
        open_token("pkcs11:token=no-such-token;object=k", pin=lambda label: "x")


def test_nonexistent_module_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "libnothing.so")
    with pytest.raises(ModuleLoadError, match="does not exist"):
        open_token("oem", module_path=missing)
    with pytest.raises(ModuleLoadError, match="libnothing.so"):
        open_token(f"pkcs11:token=oem?module-path={missing}")
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_bytes(b"\x7fELF not really")
    with pytest.raises(ModuleLoadError, match="cannot load PKCS#11 module"):
        load_module(str(not_a_library))
    assert issubclass(ModuleLoadError, ConfigurationError)


def test_malformed_uri(token_dir: object) -> None:
    for uri, message in [
        ("pkcs11:token=oem;colour=red", "unknown path attribute"),
        ("pkcs11:token=oem;token=programmer", "given twice"),
        ("pkcs11:token=o%zzem", "bad percent-encoding"),
        ("pkcs11:object=root-ca;type=private", "does not name a token"),
        ("pkcs11:token=oem?pin-value=1&pin-source=/p", "mutually exclusive"),
    ]:
        with pytest.raises(URIError, match=message):
            open_token(uri)


def test_open_by_uri_returns_the_process_instance(oem: Token) -> None:
    uri = f"pkcs11:token=oem?module-path={default_module_path()}"
    again = open_token(uri)
    assert again is oem
    again.close()  # drops the extra reference only
    assert oem.random(4)


def test_sign_with_key_agreement_key(oem: Token, label: str, unchanged: None) -> None:
    key = oem.generate_ec(label, curve=Curve.P256, policy=KEY_AGREEMENT)
    try:
        with pytest.raises(KeyPolicyError, match=f"key '{label}' is not allowed to sign"):
            key.sign(b"data")
        with pytest.raises(KeyPolicyError, match="not allowed to sign"):
            key.as_cryptography().sign(b"data", ec.ECDSA(hashes.SHA256()))
    finally:
        key.destroy()


def test_derive_with_signing_key(oem: Token, label: str, unchanged: None) -> None:
    key = oem.generate_ec(label, curve=Curve.P256, policy=SIGNING)
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    try:
        with pytest.raises(KeyPolicyError, match=f"key '{label}' is not allowed to derive"):
            key.derive_aes(peer, policy=TEMP_DERIVE)
    finally:
        key.destroy()


def test_secret_key_of_wrong_type_for_operation(
    oem: Token, unchanged: None, cleanup: Callable[[Any], None]
) -> None:
    kek = oem.generate_aes("", policy=TEMP_WRAP)
    cleanup(kek)
    enc = oem.generate_aes("", policy=KeyPolicy(usage=Usage.ENCRYPT, persistent=False))
    cleanup(enc)
    movable = oem.generate_aes(
        "", policy=KeyPolicy(usage=Usage.ENCRYPT, transferable=True, persistent=False)
    )
    cleanup(movable)
    eph = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    cleanup(eph)
    nonce = os.urandom(12)
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: enc.wrap(movable), "not allowed to wrap"),
        (lambda: enc.unwrap(b"\x00" * 40, label="", key_id=b"", policy=TEMP_DERIVE), "unwrap"),
        (lambda: kek.wrap(enc), "is not extractable"),
        (lambda: kek.wrap(eph), "can only wrap a secret key"),
        (lambda: kek.encrypt_gcm(nonce, b"x", b""), "not allowed to encrypt"),
        (lambda: kek.decrypt_gcm(nonce, b"x" * 32, b""), "not allowed to decrypt"),
        (lambda: kek.cmac(b"x"), "not allowed to compute a CMAC"),
        (lambda: enc.derive_ecb(b"\x00" * 32, policy=TEMP_DERIVE), "not allowed to derive"),
        (
            lambda: oem.generate_ec("", curve=Curve.P256, policy=TEMP_WRAP),
            "can only sign and derive",
        ),
    ]
    for call, message in cases:
        with pytest.raises(KeyPolicyError, match=message):
            call()
    # The keys still work for what they are allowed to do.
    assert enc.decrypt_gcm(nonce, enc.encrypt_gcm(nonce, b"ok", b""), b"") == b"ok"
    assert len(kek.wrap(movable)) == 40


def test_wrap_across_tokens_refused(oem: Token, programmer: Token) -> None:
    kek = oem.generate_aes("", policy=TEMP_WRAP)
    other = programmer.generate_aes(
        "", policy=KeyPolicy(usage=Usage.ENCRYPT, transferable=True, persistent=False)
    )
    try:
        with pytest.raises(KeyPolicyError, match="same token"):
            kek.wrap(other)
    finally:
        kek.destroy()
        other.destroy()


@pytest.mark.parametrize("curve", [Curve.P256, Curve.P384])
def test_peer_point_not_on_curve(oem: Token, curve: Curve, unchanged: None) -> None:
    key = oem.generate_ec("", curve=curve, policy=EPHEMERAL_AGREEMENT)
    try:
        good = bytearray(point_of(key.public_key()))
        off_curve = bytes(good[:-1] + bytes([good[-1] ^ 1]))
        for bad in (
            off_curve,
            b"\x04" + b"\x00" * (len(good) - 1),
            bytes(good[:-1]),
            b"\x05" + bytes(good[1:]),
        ):
            with pytest.raises(InvalidPointError, match=f"not a valid {curve.name} point"):
                key.derive_aes(bad, policy=TEMP_DERIVE)
        other = ec.SECP384R1() if curve is Curve.P256 else ec.SECP256R1()
        with pytest.raises(KeyPolicyError, match="peer key is on"):
            key.derive_aes(ec.generate_private_key(other).public_key(), policy=TEMP_DERIVE)
    finally:
        key.destroy()


def test_missing_keys(oem: Token, label: str, unchanged: None) -> None:
    with pytest.raises(KeyNotFoundError, match=f"no private_key labelled '{label}'"):
        oem.private_key(label)
    with pytest.raises(KeyNotFoundError, match=f"no secret_key labelled '{label}'"):
        oem.secret_key(label)
    with pytest.raises(KeyNotFoundError, match=f"no certificate labelled '{label}'"):
        oem.certificate(label)
    key = oem.generate_aes(label, policy=IMAGE_KEY)
    try:
        with pytest.raises(KeyNotFoundError, match="no private_key"):
            oem.private_key(label)  # an AES key is not an EC private key
    finally:
        key.destroy()


def test_all_bad_input_errors_are_securethread_errors() -> None:
    for cls in (
        PinIncorrectError,
        PinMissingError,
        TokenNotFoundError,
        ModuleLoadError,
        URIError,
        KeyPolicyError,
        InvalidPointError,
    ):
        assert issubclass(cls, Error)
