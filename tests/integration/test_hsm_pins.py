"""Where PINs come from (securethread.hsm.pin; docs/hsm.md): the documented order and
spellings, bad PIN files (unreadable, or readable by others), PinSet -- the picklable callback
that carries PINs to worker processes through the process-start pipe instead of the
environment --, the environment a child process gets, and the hardening of a process that
holds a PIN."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securethread.errors import ConfigurationError, Error, InsecurePinFileError, PinMissingError
from securethread.hsm import env_var_for, open_token, resolve_pin
from securethread.hsm.pin import PINS_FILE_ENV, PinSet, child_environment, read_pin_file

LABEL = "pin-order"


def _private(path: Path, text: str) -> Path:
    """A PIN file as it must be: the owner's alone (0600)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every source set at once, each with its own PIN."""
    var = env_var_for(LABEL)
    pin_file_var = _private(tmp_path / "pin-file-variable", "from-pin-file-variable\n")
    party = _private(tmp_path / "party-pins", f"other=other-pin-1234\n{LABEL}=from-party-file\n")
    monkeypatch.setenv(var, "from-pin-variable")
    monkeypatch.setenv(var + "_FILE", str(pin_file_var))
    monkeypatch.setenv(PINS_FILE_ENV, str(party))
    return {"var": var, "party": party, "monkeypatch": monkeypatch}


def test_order_callback_then_variable_then_file_then_party_file(sources: dict[str, Any]) -> None:
    mp: pytest.MonkeyPatch = sources["monkeypatch"]
    var: str = sources["var"]
    assert resolve_pin(LABEL, callback=lambda label: "from-callback") == "from-callback"
    assert resolve_pin(LABEL) == "from-pin-variable"
    mp.delenv(var)
    assert resolve_pin(LABEL) == "from-pin-file-variable"  # issue 15: beats the party file
    mp.delenv(var + "_FILE")
    assert resolve_pin(LABEL) == "from-party-file"
    explicit = _private(
        sources["party"].with_name("explicit"), f"{LABEL}=from-explicit-party-file\n"
    )
    assert resolve_pin(LABEL, pin_file=explicit) == "from-explicit-party-file"
    mp.delenv(PINS_FILE_ENV)
    with pytest.raises(PinMissingError, match=f"no PIN for token '{LABEL}': set {var}"):
        resolve_pin(LABEL)


def test_older_pins_env_lines_are_read(tmp_path: Path) -> None:
    """A demo pins.env: SECURETHREAD_PIN_<LABEL> lines count, SO PIN lines are skipped."""
    old = _private(
        tmp_path / "pins.env",
        f"SECURETHREAD_SO_PIN_PIN_ORDER=so-secret\n{env_var_for(LABEL)}=user-from-pins-env\n",
    )
    assert read_pin_file(old) == {env_var_for(LABEL): "user-from-pins-env"}
    assert resolve_pin(LABEL, pin_file=old) == "user-from-pins-env"


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda p: None, "cannot read PIN file .*No such file", id="missing"),
        pytest.param(lambda p: p.mkdir(), "cannot read PIN file .*Is a directory", id="directory"),
        pytest.param(
            lambda p: (p.write_bytes(b"\xff\xfe=\x80\n"), p.chmod(0o600)), "not UTF-8", id="binary"
        ),
        pytest.param(lambda p: _private(p, "other=1234\n"), "not in PIN file", id="no-line"),
    ],
)
def test_bad_party_pin_file(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "pins"
    make(path)
    with pytest.raises(PinMissingError, match=message):
        resolve_pin(LABEL, pin_file=path)


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(None, "cannot read PIN file .SECURETHREAD_PIN_PIN_ORDER_FILE.", id="missing"),
        pytest.param("", "is empty", id="empty"),
        pytest.param("\nsecond-line\n", "is empty", id="blank-first-line"),
    ],
)
def test_bad_pin_file_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, message: str
) -> None:
    path = tmp_path / "pin"
    if content is not None:
        _private(path, content)
    monkeypatch.delenv(env_var_for(LABEL), raising=False)
    monkeypatch.setenv(env_var_for(LABEL) + "_FILE", str(path))
    with pytest.raises(PinMissingError, match=message):
        resolve_pin(LABEL)


def test_pinset_pickles_hides_and_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_var_for("a"), "pin-a-1234")
    monkeypatch.setenv(env_var_for("b"), "pin-b-1234")
    pins = PinSet.resolve(["a", "b"])
    assert pins("a") == "pin-a-1234" and pins.labels == {"a", "b"}
    assert "pin-a" not in repr(pins) and "pin-a" not in str(pins)
    again = pickle.loads(pickle.dumps(pins))
    assert again("b") == "pin-b-1234" and again.labels == pins.labels
    with pytest.raises(PinMissingError, match="no PIN for token 'c' in this PinSet"):
        pins("c")
    with pytest.raises(TypeError):
        PinSet({"a": ""})
    monkeypatch.delenv(env_var_for("b"))
    monkeypatch.delenv(PINS_FILE_ENV, raising=False)
    with pytest.raises(PinMissingError, match="'b'"):
        PinSet.resolve(["a", "b"])


def _worker(pins: PinSet, results: Any) -> None:
    """Spawned: the PIN is not in this process's environment, only in ``pins``."""
    try:
        pin = pins("spare")
        leaked = [k for k, v in os.environ.items() if pin in v]
        token = open_token("spare", pin=pins)
        results.put(("ok", leaked, token.random(4).hex() != ""))
    except Error as exc:
        results.put((type(exc).__name__, str(exc), False))


def test_pinset_reaches_a_spawned_worker_without_the_environment(
    token_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins = PinSet.resolve(["spare"])
    monkeypatch.delenv("SECURETHREAD_PIN_SPARE")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=_worker, args=(pins, results))
    worker.start()
    outcome = results.get(timeout=120)
    worker.join(timeout=60)
    assert outcome == ("ok", [], True)


# --- the documented spellings ----------------------------------------------------------------


def test_the_label_as_given_and_upper_cased_are_both_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/cli.md writes ``SECURETHREAD_PIN_programmer``; the code upper-cases labels: both
    spellings are read, and both set at once is refused rather than guessed."""
    for name in ("SECURETHREAD_PIN_PIN_ORDER", "SECURETHREAD_PIN_pin-order"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_FILE", raising=False)
    monkeypatch.delenv(PINS_FILE_ENV, raising=False)
    monkeypatch.setenv("SECURETHREAD_PIN_pin-order", "as-given-1234")
    assert resolve_pin(LABEL) == "as-given-1234"
    monkeypatch.setenv("SECURETHREAD_PIN_PIN_ORDER", "upper-cased-1234")
    with pytest.raises(ConfigurationError, match="both SECURETHREAD_PIN_PIN_ORDER and "
                       "SECURETHREAD_PIN_pin-order are set; set only one"):  # fmt: skip
        resolve_pin(LABEL)
    monkeypatch.delenv("SECURETHREAD_PIN_pin-order")
    assert resolve_pin(LABEL) == "upper-cased-1234"
    monkeypatch.setenv("SECURETHREAD_PIN_programmer", "lower-case-1234")
    monkeypatch.delenv("SECURETHREAD_PIN_PROGRAMMER", raising=False)
    assert resolve_pin("programmer") == "lower-case-1234"


def test_file_variables_in_both_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env_var_for(LABEL), raising=False)
    monkeypatch.delenv(PINS_FILE_ENV, raising=False)
    pin = _private(tmp_path / "pin", "from-a-file-1234\n")
    monkeypatch.setenv("SECURETHREAD_PIN_pin-order_FILE", str(pin))
    assert resolve_pin(LABEL) == "from-a-file-1234"
    monkeypatch.setenv("SECURETHREAD_PIN_PIN_ORDER_FILE", str(pin))
    with pytest.raises(ConfigurationError, match="set only one"):
        resolve_pin(LABEL)


def test_a_label_whose_variable_is_another_labels_file_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SECURETHREAD_PIN_X_FILE`` is token X's PIN-file variable: it is never read as the
    PIN of a token labelled ``x_file``."""
    monkeypatch.setenv("SECURETHREAD_PIN_X_FILE", "1234-or-a-path")
    with pytest.raises(ConfigurationError, match="also the PIN-file variable of token 'x'"):
        resolve_pin("x_file")


# --- PIN files others may read ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666])
@pytest.mark.parametrize("source", ["party", "party-variable", "file-variable", "pin-source"])
def test_a_pin_file_others_may_read_or_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, source: str
) -> None:
    """Every PIN file source: one line naming the file and its mode, and the PIN unused."""
    for name in (env_var_for(LABEL), env_var_for(LABEL) + "_FILE", PINS_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "pins"
    path.write_text(f"{LABEL}=secret-pin-1234\n" if source.startswith("party") else "secret\n")
    path.chmod(mode)
    kwargs: dict[str, Any] = {}
    if source == "party":
        kwargs["pin_file"] = path
    elif source == "party-variable":
        monkeypatch.setenv(PINS_FILE_ENV, str(path))
    elif source == "file-variable":
        monkeypatch.setenv(env_var_for(LABEL) + "_FILE", str(path))
    else:
        kwargs["pin_source"] = f"file:{path}"
    with pytest.raises(InsecurePinFileError) as info:
        resolve_pin(LABEL, **kwargs)
    message = str(info.value)
    assert str(path) in message and f"mode {mode:04o}" in message
    assert "secret" not in message
    path.chmod(0o600)
    assert resolve_pin(LABEL, **kwargs).startswith("secret")


def test_a_pin_source_others_may_read_is_refused_before_login(
    tmp_path: Path, token_dir: object
) -> None:
    """Through open_token and an RFC 7512 URI (pin-source, §2.3), in a fresh process (this
    one has the token open already): refused before C_Login, naming the file's mode."""
    path = tmp_path / "pin"
    path.write_text(os.environ["SECURETHREAD_PIN_SPARE"] + "\n")
    path.chmod(0o644)
    code = (
        "import sys\n"
        "from securethread.errors import Error\n"
        "from securethread.hsm import open_token\n"
        "try:\n"
        "    open_token(f'pkcs11:token=spare?pin-source=file:{sys.argv[1]}')\n"
        "except Error as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("InsecurePinFileError") and "mode 0644" in proc.stdout


# --- what a child process gets ---------------------------------------------------------------


def test_child_environment_holds_no_pin(tmp_path: Path) -> None:
    pin_file = _private(tmp_path / "pin", "1234\n")
    base = {
        "PATH": "/usr/bin",
        "SOFTHSM2_CONF": "/x/softhsm2.conf",
        "SECURETHREAD_PINS_FILE": "/x/pins",  # a path, by definition
        "SECURETHREAD_PIN_PROGRAMMER": "pin-1",
        "SECURETHREAD_PIN_programmer": "pin-2",
        "SECURETHREAD_SO_PIN_PROGRAMMER": "so-pin",
        "securethread_pin_lower": "pin-3",
        "SECURETHREAD_PIN_OEM_FILE": str(pin_file),  # a file name: kept
        "SECURETHREAD_PIN_X_FILE": "pin-of-token-x_file",  # names no file: a PIN, dropped
        "SECURETHREAD_SO_PIN_OEM_FILE": str(tmp_path / "absent"),
    }
    env = child_environment(base)
    assert env == {
        "PATH": "/usr/bin",
        "SOFTHSM2_CONF": "/x/softhsm2.conf",
        "SECURETHREAD_PINS_FILE": "/x/pins",
        "SECURETHREAD_PIN_OEM_FILE": str(pin_file),
    }
    assert "SECURETHREAD_PIN_PROGRAMMER" in base  # the caller's mapping is not changed


_HARDENED_PROBE = """
import ctypes, json, resource, sys
from securethread.hsm.pin import resolve_pin
libc = ctypes.CDLL(None)
before = [libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[1]]
resolve_pin("probe", callback=lambda label: "1234")
after = [libc.prctl(3, 0, 0, 0, 0), list(resource.getrlimit(resource.RLIMIT_CORE))]
print(json.dumps({"before": before, "after": after}))
"""


def test_resolving_a_pin_makes_the_process_non_dumpable_without_core() -> None:
    """PR_GET_DUMPABLE (prctl(2) option 3) 1 -> 0 and RLIMIT_CORE -> (0, 0) once a PIN is
    resolved; a fresh process (execve resets the flag) starts dumpable."""
    proc = subprocess.run(
        [sys.executable, "-c", _HARDENED_PROBE], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"][0] == 1
    assert out["after"] == [0, [0, 0]]
