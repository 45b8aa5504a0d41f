"""Where PINs come from (securethread.hsm.pin; docs/hsm.md): the documented order, bad PIN
files, and PinSet -- the picklable callback that carries PINs to worker processes through the
process-start pipe instead of the environment."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from securethread.errors import Error, PinMissingError
from securethread.hsm import env_var_for, open_token, resolve_pin
from securethread.hsm.pin import PINS_FILE_ENV, PinSet, read_pin_file

LABEL = "pin-order"


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every source set at once, each with its own PIN."""
    var = env_var_for(LABEL)
    pin_file_var = tmp_path / "pin-file-variable"
    pin_file_var.write_text("from-pin-file-variable\n")
    party = tmp_path / "party-pins"
    party.write_text(f"other=other-pin-1234\n{LABEL}=from-party-file\n")
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
    explicit = sources["party"].with_name("explicit")
    explicit.write_text(f"{LABEL}=from-explicit-party-file\n")
    assert resolve_pin(LABEL, pin_file=explicit) == "from-explicit-party-file"
    mp.delenv(PINS_FILE_ENV)
    with pytest.raises(PinMissingError, match=f"no PIN for token '{LABEL}': set {var}"):
        resolve_pin(LABEL)


def test_older_pins_env_lines_are_read(tmp_path: Path) -> None:
    """A demo pins.env: SECURETHREAD_PIN_<LABEL> lines count, SO PIN lines are skipped."""
    old = tmp_path / "pins.env"
    old.write_text(
        f"SECURETHREAD_SO_PIN_PIN_ORDER=so-secret\n{env_var_for(LABEL)}=user-from-pins-env\n"
    )
    assert read_pin_file(old) == {env_var_for(LABEL): "user-from-pins-env"}
    assert resolve_pin(LABEL, pin_file=old) == "user-from-pins-env"


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda p: None, "cannot read PIN file .*No such file", id="missing"),
        pytest.param(lambda p: p.mkdir(), "cannot read PIN file .*Is a directory", id="directory"),
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe=\x80\n"), "not UTF-8", id="binary"),
        pytest.param(lambda p: p.write_text("other=1234\n"), "not in PIN file", id="no-line"),
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
        path.write_text(content)
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
