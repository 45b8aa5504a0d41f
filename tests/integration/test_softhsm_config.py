"""softhsm_config: idempotent token directories, checked with softhsm2-util in a subprocess
(this process's SoftHSM module is bound to the conftest directory)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from securethread.errors import PinMissingError
from securethread.hsm import env_var_for
from softhsm_config import ensure_tokens, read_pins_file

SOFTHSM2_UTIL = shutil.which("softhsm2-util")
pytestmark = pytest.mark.skipif(SOFTHSM2_UTIL is None, reason="softhsm2-util not installed")
REPO = Path(__file__).resolve().parents[2]


def _tokens(conf: Path) -> dict[str, str]:
    """label -> serial of every initialised token, as softhsm2-util reports them."""
    assert SOFTHSM2_UTIL is not None
    proc = subprocess.run(
        [SOFTHSM2_UTIL, "--show-slots"],
        capture_output=True,
        text=True,
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        timeout=60,
        check=True,
    )
    out: dict[str, str] = {}
    for block in proc.stdout.split("Slot ")[1:]:
        if "Initialized:      yes" not in block:
            continue
        label = re.search(r"Label:\s*(.*)", block)
        serial = re.search(r"Serial number:\s*(\S+)", block)
        assert label and serial, block
        out[label.group(1).strip()] = serial.group(1)
    return out


def _unique() -> str:
    return "cfg-" + uuid.uuid4().hex[:8]


def test_ensure_tokens_is_idempotent(tmp_path: Path) -> None:
    a, b = _unique(), _unique()
    pins = {a: ("so-a-1234", "user-a-1234"), b: ("so-b-1234", "user-b-1234")}
    tdir = ensure_tokens(tmp_path / "hsm", [a, b], pins=pins)
    assert tdir.conf.read_text().count(str(tdir.tokendir)) == 1
    first = _tokens(tdir.conf)
    assert sorted(first) == sorted([a, b])
    files = sorted(p.name for p in tdir.tokendir.iterdir())
    assert len(files) == 2
    conf_mtime = tdir.conf.stat().st_mtime_ns
    # Second call: nothing new, the same serials, the config not rewritten.
    again = ensure_tokens(tmp_path / "hsm", [a, b], pins=pins)
    assert again.root == tdir.root
    assert _tokens(tdir.conf) == first
    assert sorted(p.name for p in tdir.tokendir.iterdir()) == files
    assert tdir.conf.stat().st_mtime_ns == conf_mtime
    # Adding a label creates only that token.
    c = _unique()
    ensure_tokens(tmp_path / "hsm", [a, b, c], pins={**pins, c: ("so-c-1234", "user-c-1234")})
    third = _tokens(tdir.conf)
    assert {k: third[k] for k in (a, b)} == first and c in third
    assert stat.S_IMODE(tdir.tokendir.stat().st_mode) == 0o700


def test_pins_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label = _unique()
    monkeypatch.setenv(env_var_for(label, role="SO_PIN"), "env-so-pin")
    monkeypatch.setenv(env_var_for(label), "env-user-pin")
    tdir = ensure_tokens(tmp_path / "hsm", [label])
    assert list(_tokens(tdir.conf)) == [label]
    assert not tdir.pins_file.exists()  # nothing generated, nothing written


def test_missing_pins_raise_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = _unique()
    for role in ("SO_PIN", "PIN"):
        monkeypatch.delenv(env_var_for(label, role=role), raising=False)
    with pytest.raises(PinMissingError, match=f"token '{label}': set SECURETHREAD_SO_PIN_"):
        ensure_tokens(tmp_path / "hsm", [label])
    assert not (tmp_path / "hsm").exists()  # not even the directory or its config
    # Only the SO PIN set is still missing a PIN.
    monkeypatch.setenv(env_var_for(label, role="SO_PIN"), "so-only")
    with pytest.raises(PinMissingError, match=env_var_for(label)):
        ensure_tokens(tmp_path / "hsm", [label])
    assert not (tmp_path / "hsm").exists()
    # A directory that already holds tokens keeps them untouched by a failed call.
    other = _unique()
    tdir = ensure_tokens(tmp_path / "hsm", [other], pins={other: ("so-o-1234", "user-o-1234")})
    before = _tokens(tdir.conf)
    with pytest.raises(PinMissingError):
        ensure_tokens(tmp_path / "hsm", [other, label])
    assert _tokens(tdir.conf) == before


def test_generate_missing_pins_writes_pins_env_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = _unique()
    for role in ("SO_PIN", "PIN"):
        monkeypatch.delenv(env_var_for(label, role=role), raising=False)
    tdir = ensure_tokens(tmp_path / "hsm", [label], generate_missing_pins=True)
    assert stat.S_IMODE(tdir.pins_file.stat().st_mode) == 0o600
    pins = read_pins_file(tdir.pins_file)
    assert set(pins) == {env_var_for(label, role="SO_PIN"), env_var_for(label)}
    assert all(len(v) == 32 for v in pins.values())
    tokens = _tokens(tdir.conf)
    assert list(tokens) == [label]
    # Second run re-uses the stored PINs: same file, same token.
    content = tdir.pins_file.read_bytes()
    ensure_tokens(tmp_path / "hsm", [label], generate_missing_pins=True)
    assert tdir.pins_file.read_bytes() == content
    assert _tokens(tdir.conf) == tokens
    # The generated user PIN logs in.
    probe = (
        "import sys, pkcs11\n"
        "from securethread.hsm import default_module_path\n"
        "lib = pkcs11.lib(default_module_path())\n"
        "with lib.get_token(token_label=sys.argv[1]).open(user_pin=sys.argv[2]):\n"
        "    print('login ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, label, pins[env_var_for(label)]],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, SOFTHSM2_CONF=str(tdir.conf)),
        timeout=60,
        check=False,
    )
    assert proc.stdout.strip() == "login ok", proc.stderr


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label = _unique()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (env_var_for(label), env_var_for(label, role="SO_PIN"))
    }
    cmd = [sys.executable, "-m", "softhsm_config", str(tmp_path / "hsm"), label]
    failed = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False
    )
    assert failed.returncode == 2
    assert f"token '{label}'" in failed.stderr
    ok = subprocess.run(
        [*cmd, "--generate-pins"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    conf = tmp_path / "hsm" / "softhsm2.conf"
    assert ok.stdout.strip() == f"SOFTHSM2_CONF={conf.resolve()}"
    assert list(_tokens(conf)) == [label]
