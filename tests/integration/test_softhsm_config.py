"""softhsm_config: idempotent token directories, checked with softhsm2-util in a subprocess
(this process's SoftHSM module is bound to the conftest directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from securethread.errors import (
    ConfigurationError,
    PinMissingError,
    TokenDirectoryError,
    TokenExistsError,
    WorkdirEscapeError,
)
from securethread.hsm import env_var_for
from securethread.hsm.filestore import COPY_NAME, TOKEN_OBJECT, FileStore
from securethread.hsm.pin import PINS_FILE_ENV, read_pin_file, resolve_pin
from softhsm_config import TokenDirectory, ensure_tokens, init_party_tokens, read_pins_file

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
    files = sorted(p.name for p in tdir.tokendir.iterdir() if p.is_dir())
    assert len(files) == 2
    conf_mtime = tdir.conf.stat().st_mtime_ns
    # Second call: nothing new, the same serials, the config not rewritten.
    again = ensure_tokens(tmp_path / "hsm", [a, b], pins=pins)
    assert again.root == tdir.root
    assert _tokens(tdir.conf) == first
    assert sorted(p.name for p in tdir.tokendir.iterdir() if p.is_dir()) == files
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


# --- per-party token directories -------------------------------------------------------------

_LOGIN_PROBE = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from securethread import errors\n"
    "from securethread.hsm.pin import PinSet\n"
    "from softhsm_config import TokenDirectory\n"
    "req = json.loads(sys.stdin.readline())\n"
    "pin_file = Path(req['pin_file']) if req.get('pin_file') else None\n"
    "tdir = TokenDirectory(Path(req['dir']), pin_file=pin_file)\n"
    "pins = PinSet({req['label']: req['pin']}) if req.get('pin') else None\n"
    "try:\n"
    "    tok = tdir.open(req['label'], pin=pins)\n"
    "    print('login ok', sorted(tok.labels()))\n"
    "except errors.Error as exc:\n"
    "    print(type(exc).__name__, exc)\n"
)


def _login(
    directory: Path, label: str, pin: str | None = None, pin_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Log in to ``label`` of the party directory in a fresh process; the PIN (if any) goes
    through stdin.  Returns the probe's one line."""
    request = {"dir": str(directory), "label": label, "pin": pin,
               "pin_file": str(pin_file) if pin_file else None}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SECURETHREAD_PIN")}
    proc = subprocess.run(
        [sys.executable, "-c", _LOGIN_PROBE],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_init_party_tokens_keeps_only_user_pins(tmp_path: Path) -> None:
    a, b = _unique(), _unique()
    env_before = {k: v for k, v in os.environ.items() if k.startswith("SECURETHREAD_")}
    tdir = init_party_tokens(tmp_path / "oem" / "hsm", [a, b])
    assert sorted(_tokens(tdir.conf)) == sorted([a, b])
    assert tdir.labels() == sorted([a, b])
    assert stat.S_IMODE(tdir.pins_file.stat().st_mode) == 0o600
    pins = read_pin_file(tdir.pins_file)
    assert sorted(pins) == sorted([a, b])  # one line per user PIN, no SO PIN
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in pins.values())
    assert pins[a] != pins[b]
    # Nothing else was written beside the configuration, the tokens and the PIN file, and
    # no PIN went into this process's environment.
    assert sorted(p.name for p in tdir.root.iterdir()) == ["pins.env", "softhsm2.conf", "tokens"]
    assert {k: v for k, v in os.environ.items() if k.startswith("SECURETHREAD_")} == env_before
    # Each token has its verified token.object copy already.
    for d in (p for p in tdir.tokendir.iterdir() if p.is_dir()):
        assert (d / COPY_NAME).read_bytes()[8:] == (d / TOKEN_OBJECT).read_bytes()[8:]
    # The user PINs log in -- from the party's PIN file, and from a PinSet.
    assert _login(tdir.root, a).startswith("login ok")
    assert _login(tdir.root, b, pin=pins[b]).startswith("login ok")
    assert _login(tdir.root, b, pin="wrong-pin-4321").startswith("PinIncorrectError")


def test_init_party_tokens_refuses_existing_and_bad_input(tmp_path: Path) -> None:
    a = _unique()
    tdir = init_party_tokens(tmp_path / "hsm", [a], user_pins={a: "user-pin-1234"})
    before = _tree(tmp_path)
    with pytest.raises(TokenExistsError, match=f"token '{a}' already exists in"):
        init_party_tokens(tmp_path / "hsm", [_unique(), a])
    for labels, user_pins, message in [
        ([], None, "no token labels"),
        (["x" * 33], None, "longer than 32 bytes"),
        (["a=b"], None, "no '='"),
        ([" padded"], None, "surrounding blanks"),
        (["dup", "dup"], None, "repeat a label"),
        (["ok-label"], {"ok-label": "123"}, "must be 4-255 bytes"),
        (["ok-label"], {"ok-label": "pin\nwith-newline"}, "control characters"),
        (["ok-label"], {"other": "pin-1234"}, "not initialised here"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            init_party_tokens(tmp_path / "hsm", labels, user_pins=user_pins)
    assert _tree(tmp_path) == before  # nothing changed by any refusal
    assert tdir.labels() == [a]


def test_init_party_tokens_separate_pin_file_merges(tmp_path: Path) -> None:
    """The lead's layout: the PIN file beside the token directory; a second call adds a
    token and its PIN line, keeping the first."""
    a, b = _unique(), _unique()
    pin_file = tmp_path / "work" / "pins"
    tdir = init_party_tokens(tmp_path / "work" / "hsm", [a], pin_file=pin_file)
    assert tdir.pins_file == pin_file.resolve()
    assert not (tdir.root / "pins.env").exists()
    first = read_pin_file(pin_file)
    init_party_tokens(tmp_path / "work" / "hsm", [b], pin_file=pin_file)
    second = read_pin_file(pin_file)
    assert second[a] == first[a] and set(second) == {a, b}
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    assert _login(tdir.root, b, pin_file=pin_file).startswith("login ok")
    # Without naming the PIN file there is no PIN: one clear error.
    assert _login(tdir.root, b).startswith(f"PinMissingError no PIN for token '{b}'")


def test_init_party_tokens_recovers_from_a_kill(tmp_path: Path) -> None:
    """A kill after the PIN file was written but before C_InitToken: the second call uses
    the PIN already in the file.  A kill between C_InitToken and C_InitPIN leaves a token
    without user PIN (and an SO PIN nobody knows): the second call replaces it."""
    a, b = _unique(), _unique()
    pin_file = tmp_path / "pins"
    pin_file.write_text(f"{a}=kept-from-before-1234\n")
    pin_file.chmod(0o600)
    tdir = init_party_tokens(tmp_path / "hsm", [a], pin_file=pin_file)
    assert read_pin_file(pin_file) == {a: "kept-from-before-1234"}
    assert _login(tdir.root, a, pin="kept-from-before-1234").startswith("login ok")
    half = subprocess.run(
        [sys.executable, "-c", _INIT_TOKEN_ONLY, b],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
        env=dict(os.environ, SOFTHSM2_CONF=str(tdir.conf)),
    )
    assert half.stdout.strip() == "0", half.stderr
    assert b in _tokens(tdir.conf) and tdir.labels() == [a]  # initialised, no user PIN
    init_party_tokens(tmp_path / "hsm", [b], pin_file=pin_file)
    assert tdir.labels() == sorted([a, b])
    assert _login(tdir.root, b, pin_file=pin_file).startswith("login ok")


_INIT_TOKEN_ONLY = (
    "import ctypes, sys, pkcs11\n"
    "from securethread.hsm import default_module_path\n"
    "m = default_module_path()\n"
    "c = ctypes.CDLL(m)\n"
    "c.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]\n"
    "lib = pkcs11.lib(m)\n"
    "free = [s.slot_id for s in lib.get_slots(token_present=True)\n"
    "        if not s.get_token().flags & pkcs11.TokenFlag.TOKEN_INITIALIZED][0]\n"
    "so = b'so-pin-lost-1234'\n"
    "print(c.C_InitToken(free, so, len(so), sys.argv[1].encode().ljust(32, b' ')))\n"
)


def test_party_command_line(tmp_path: Path) -> None:
    label = _unique()
    cmd = [sys.executable, "-m", "softhsm_config", str(tmp_path / "hsm"), label, "--party"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert f"PIN file: {(tmp_path / 'hsm' / 'pins.env').resolve()}" in ok.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: token '{label}' already exists in {str((tmp_path / 'hsm' / 'tokens').resolve())!r}"
        "; a token is initialised once (C_InitToken would erase its keys)"
    )


# --- activation, missing directories ---------------------------------------------------------


def test_activate_names_the_pin_file_and_puts_no_pin_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # activate() writes os.environ: let monkeypatch restore this session's values after.
    monkeypatch.setenv("SOFTHSM2_CONF", os.environ.get("SOFTHSM2_CONF", ""))
    monkeypatch.delenv(PINS_FILE_ENV, raising=False)
    label = _unique()
    tdir = init_party_tokens(tmp_path / "hsm", [label])
    pin = read_pin_file(tdir.pins_file)[label]
    tdir.activate()
    assert os.environ["SOFTHSM2_CONF"] == str(tdir.conf)
    assert os.environ[PINS_FILE_ENV] == str(tdir.pins_file)
    assert pin not in os.environ.values()
    assert resolve_pin(label) == pin  # found through the named file
    # Issue 15: the file named by SECURETHREAD_PIN_<LABEL>_FILE wins over the party's file.
    override = tmp_path / "override"
    override.write_text("from-the-pin-file-variable\n")
    override.chmod(0o600)
    monkeypatch.setenv(env_var_for(label) + "_FILE", str(override))
    assert resolve_pin(label) == "from-the-pin-file-variable"
    # A directory without a PIN file un-names the previous one.
    other = _unique()
    bare = ensure_tokens(tmp_path / "bare", [other], pins={other: ("so-x-1234", "user-x-1234")})
    bare.activate()
    assert PINS_FILE_ENV not in os.environ


def test_missing_configuration_or_token_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = _unique()
    tdir = init_party_tokens(tmp_path / "hsm", [label])
    shutil.rmtree(tdir.tokendir)
    with pytest.raises(TokenDirectoryError, match="token directory .* does not exist"):
        tdir.activate()
    monkeypatch.setenv("SOFTHSM2_CONF", str(tdir.conf))
    with pytest.raises(
        TokenDirectoryError,
        match=f"token directory '{tdir.tokendir}' named in '{tdir.conf}' does not exist",
    ):
        FileStore.from_environment()
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "absent.conf"))
    with pytest.raises(
        TokenDirectoryError,
        match=f"SoftHSM configuration '{tmp_path / 'absent.conf'}' .from SOFTHSM2_CONF. does",
    ):
        FileStore.from_environment()
    no_dir = tmp_path / "no-dir.conf"
    no_dir.write_text("objectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(no_dir))
    with pytest.raises(TokenDirectoryError, match="names no directories.tokendir"):
        FileStore.from_environment()


_OPEN_PROBE = (
    "from securethread import errors\n"
    "from securethread.hsm import open_token\n"
    "try:\n"
    "    open_token('x', pin=lambda label: 'pin-1234')\n"
    "except errors.Error as exc:\n"
    "    print(type(exc).__name__ + ': ' + str(exc))\n"
)


def test_open_token_names_a_missing_token_directory(tmp_path: Path) -> None:
    """Was: 'ModuleLoadError: cannot load PKCS#11 module ...: ' with the reason cut off."""
    tdir = init_party_tokens(tmp_path / "hsm", [_unique()])
    shutil.rmtree(tdir.tokendir)
    for conf, expected in [
        (tdir.conf, f"TokenDirectoryError: token directory '{tdir.tokendir}' named in "
                    f"'{tdir.conf}' does not exist"),
        (tmp_path / "nowhere.conf", f"TokenDirectoryError: SoftHSM configuration "
                                    f"'{tmp_path / 'nowhere.conf'}' (from SOFTHSM2_CONF) does "
                                    "not exist"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-c", _OPEN_PROBE], capture_output=True, text=True, cwd=REPO,
            env=dict(os.environ, SOFTHSM2_CONF=str(conf)), timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected


def test_a_moved_directory_names_its_own_tokens(tmp_path: Path) -> None:
    """directories.tokendir is absolute: after a move (or cp -a) the configuration is made
    to name the directory's own tokens at the next open, never the old place."""
    tdir = init_party_tokens(tmp_path / "a" / "hsm", [_unique()])
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = TokenDirectory(tmp_path / "b" / "hsm")
    assert str(tmp_path / "a") in moved.conf.read_text()  # still the old place
    moved.localise()
    text = moved.conf.read_text()
    assert f"directories.tokendir = {moved.tokendir.resolve()}\n" in text
    assert str(tmp_path / "a") not in text
    assert stat.S_IMODE(moved.conf.stat().st_mode) & 0o022 == 0
    before = moved.conf.stat().st_mtime_ns
    moved.localise()  # already its own: not written again
    assert moved.conf.stat().st_mtime_ns == before
    assert tdir.tokendir != moved.tokendir


def test_a_token_directory_resolving_outside_is_refused(tmp_path: Path) -> None:
    other = init_party_tokens(tmp_path / "other" / "hsm", [_unique()])
    mine = init_party_tokens(tmp_path / "mine" / "hsm", [_unique()])
    shutil.rmtree(mine.tokendir)
    mine.tokendir.symlink_to(other.tokendir)
    conf = mine.conf.read_bytes()
    with pytest.raises(WorkdirEscapeError, match="outside"):
        mine.localise()
    assert mine.conf.read_bytes() == conf
