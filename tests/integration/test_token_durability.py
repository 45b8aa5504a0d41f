"""A token survives a kill at any instant of start-up (module load, token open, login), and a
damaged token.object is restored from its verified copy (docs/hsm.md, securethread.hsm.filestore).

The token lives in its own party directory, created with ``init_party_tokens``; this process's
SoftHSM module is bound to the conftest directory, so everything that opens the party's token
runs in a child process, which receives the PIN on its stdin (a pipe), never in the environment.

``SECURETHREAD_LONG=1`` runs the kill loop for 500 kills (``SECURETHREAD_KILLS`` overrides the
count) and prints the counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from securethread.hsm.filestore import (
    COPY_NAME,
    TMP_SUFFIX,
    TOKEN_OBJECT,
    FileStore,
    read_token_object,
)
from softhsm_config import TokenDirectory, init_party_tokens

REPO = Path(__file__).resolve().parents[2]
LABEL = "durable"
LONG = os.environ.get("SECURETHREAD_LONG") == "1"
KILLS = int(os.environ.get("SECURETHREAD_KILLS", "500" if LONG else "30"))
STRACE = shutil.which("strace")

# One child script, several modes.  Request on stdin: {"dir", "pin", "mode"}.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from pkcs11 import ObjectClass
    from securethread.hsm import IMAGE_KEY, SIGNING, Curve, verify_signature
    from securethread.hsm.pin import PinSet
    from softhsm_config import TokenDirectory

    req = json.loads(sys.stdin.readline())
    tdir = TokenDirectory(Path(req["dir"]))
    pins = PinSet({"@LABEL@": req["pin"]})

    def inventory(tok):
        return {
            cls.name: tok.labels(cls)
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.SECRET_KEY)
        }

    if req["mode"] == "setup":
        tok = tdir.open("@LABEL@", pin=pins)
        for name in ("sign-1", "sign-2"):
            tok.generate_ec(name, curve=Curve.P256, policy=SIGNING)
        tok.generate_aes("aes-1", policy=IMAGE_KEY)
        print(json.dumps(inventory(tok)))
        sys.exit(0)

    print("start", flush=True)
    tok = tdir.open("@LABEL@", pin=pins)
    print("open", flush=True)
    got = inventory(tok)
    if got != req["expected"]:
        print("LOST " + json.dumps(got), flush=True)
        sys.exit(3)
    key = tok.private_key("sign-1")
    verify_signature(key.public_key(), key.sign(b"alive"), b"alive", what="sign-1")
    print("verified", flush=True)
    if req["mode"] == "check":
        sys.exit(0)
    from securethread.hsm.module import default_module_path, reload_module
    while True:  # "loop": start up again and again until killed
        tok.close()
        reload_module(default_module_path())  # check + C_Initialize, as a new process does
        tok = tdir.open("@LABEL@", pin=pins)
    """
).replace("@LABEL@", LABEL)


def _start(tdir: TokenDirectory, pin: str, mode: str, expected: Any = None,
           prefix: list[str] | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURETHREAD_PIN")}
    env["SOFTHSM2_CONF"] = str(tdir.conf)
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"dir": str(tdir.root), "pin": pin, "mode": mode,
                                 "expected": expected}) + "\n")
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() must not flush it again
    return proc


def _run(tdir: TokenDirectory, pin: str, mode: str, expected: Any = None,
         prefix: list[str] | None = None) -> tuple[int, str, str]:
    proc = _start(tdir, pin, mode, expected, prefix)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _token_dir(tdir: TokenDirectory) -> Path:
    (only,) = [d for d in tdir.tokendir.iterdir() if d.is_dir()]
    return only


def _intact(token_dir: Path) -> bool:
    try:
        read_token_object((token_dir / TOKEN_OBJECT).read_bytes(), token_dir)
    except Exception:  # noqa: BLE001 - any failure to read or parse means damaged
        return False
    return True


@pytest.fixture
def party(tmp_path: Path) -> tuple[TokenDirectory, str, Any]:
    """A party directory with one token holding two EC key pairs and an AES key."""
    tdir = init_party_tokens(tmp_path / "party", [LABEL])
    pin = tdir.pins_file.read_text().split("=", 1)[1].strip()
    rc, out, err = _run(tdir, pin, "setup")
    assert rc == 0, err
    expected = json.loads(out)
    assert expected == {
        "PRIVATE_KEY": ["sign-1", "sign-2"],
        "PUBLIC_KEY": ["sign-1", "sign-2"],
        "SECRET_KEY": ["aes-1"],
    }
    return tdir, pin, expected


def test_kill_loop_over_startup(party: tuple[TokenDirectory, str, Any]) -> None:
    """SIGKILL a child at random instants while it starts: loads the module, opens the token
    and logs in, then does all three again and again.  After a kill that left token.object
    damaged on disk, the next child must first open the token with its PIN and find every
    key (which restores the file) before it is killed in turn; a last child checks at the
    end."""
    tdir, pin, expected = party
    token_dir = _token_dir(tdir)
    rng = random.Random(int(os.environ.get("SECURETHREAD_SEED", "0")) or None)
    counts: Counter[str] = Counter()
    must_verify = False
    for _ in range(KILLS):
        proc = _start(tdir, pin, "loop", expected)
        assert proc.stdout is not None
        seen = [proc.stdout.readline().strip()]  # "start": imports done, token files next
        if must_verify:  # the previous kill damaged the file: this start must restore it
            while seen[-1] not in ("verified", ""):
                seen.append(proc.stdout.readline().strip())
            assert seen[-1] == "verified", f"token not usable after a kill: {seen}"
            counts["restored-and-verified"] += 1
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        lines = seen + out.split()
        counts["kills"] += 1
        phase = [line for line in lines if line in ("start", "open", "verified")] or ["nothing"]
        counts[f"killed-after-{phase[-1]}"] += 1
        assert not any(line.startswith("LOST") for line in lines), f"keys lost: {lines} {err}"
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        must_verify = not _intact(token_dir)
        counts["damaged-on-disk"] += must_verify
    rc, out, err = _run(tdir, pin, "check", expected)
    assert rc == 0 and out.split()[-1] == "verified", (rc, out, err)
    assert _intact(token_dir)
    counts["damaged-tokens"] = 0  # reaching this line: every start opened all the keys
    print(f"\nkill loop over start-up: {dict(sorted(counts.items()))}")
    assert counts["kills"] == KILLS


def _ptrace_works() -> bool:
    if STRACE is None:
        return False
    probe = subprocess.run([STRACE, "-o", "/dev/null", "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_strace = pytest.mark.skipif(
    not _ptrace_works(), reason="strace with ptrace is needed to kill at an exact system call"
)


@needs_strace
def test_kill_between_truncate_and_write_of_token_object(
    party: tuple[TokenDirectory, str, Any],
) -> None:
    """strace kills the child at the exact instant SoftHSM writes token.object during login
    (after its ftruncate): the file is left empty -- the damage of issue 15 -- and the next
    start restores it from the verified copy, with every key."""
    tdir, pin, expected = party
    token_dir = _token_dir(tdir)
    target = str(token_dir / TOKEN_OBJECT)
    assert STRACE is not None
    kill_at_write = [STRACE, "-f", "-qq", "-o", "/dev/null", "-P", target,
                     "-e", "trace=write", "-e", "inject=write:signal=KILL"]
    rc, out, _ = _run(tdir, pin, "check", expected, prefix=kill_at_write)
    assert rc == -signal.SIGKILL or rc == 128 + signal.SIGKILL, rc
    assert "verified" not in out
    assert (token_dir / TOKEN_OBJECT).stat().st_size == 0  # SoftHSM's own damage
    copy = (token_dir / COPY_NAME).read_bytes()
    rc, out, err = _run(tdir, pin, "check", expected)
    assert rc == 0 and out.split()[-1] == "verified", (rc, out, err)
    assert "restored" in err and str(token_dir / TOKEN_OBJECT) in err
    restored = (token_dir / TOKEN_OBJECT).read_bytes()
    assert restored[8:] == copy[8:]  # the copy's content; SoftHSM bumped its counter since


@needs_strace
def test_kill_during_the_restore_itself(party: tuple[TokenDirectory, str, Any]) -> None:
    """A kill at the rename(2) that puts the restored file in place leaves the damaged file
    and a temporary; the next start removes the temporary and restores again."""
    tdir, pin, expected = party
    token_dir = _token_dir(tdir)
    (token_dir / TOKEN_OBJECT).write_bytes(b"")
    assert STRACE is not None
    tmp = token_dir / (TOKEN_OBJECT + TMP_SUFFIX)
    kill_at_rename = [STRACE, "-f", "-qq", "-o", "/dev/null", "-P", str(tmp),
                      "-e", "trace=rename,renameat,renameat2",
                      "-e", "inject=rename,renameat,renameat2:signal=KILL"]
    rc, out, _ = _run(tdir, pin, "check", expected, prefix=kill_at_rename)
    assert rc in (-signal.SIGKILL, 128 + signal.SIGKILL), rc
    assert (token_dir / TOKEN_OBJECT).stat().st_size == 0
    assert tmp.exists()  # killed at the rename
    rc, out, err = _run(tdir, pin, "check", expected)
    assert rc == 0 and out.split()[-1] == "verified", (rc, out, err)
    assert not tmp.exists()
    assert _intact(token_dir)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:8], id="generation-only"),
        pytest.param(lambda data: data[:8] + b"\xff" * (len(data) - 8), id="garbled"),
        pytest.param(None, id="deleted"),
    ],
)
def test_damaged_token_object_is_restored(
    party: tuple[TokenDirectory, str, Any], damage: Any
) -> None:
    tdir, pin, expected = party
    token_dir = _token_dir(tdir)
    path = token_dir / TOKEN_OBJECT
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes()))
    assert not _intact(token_dir)
    rc, out, err = _run(tdir, pin, "check", expected)
    assert rc == 0 and out.split()[-1] == "verified", (rc, out, err)
    assert _intact(token_dir)


def test_damaged_without_copy_is_named(party: tuple[TokenDirectory, str, Any]) -> None:
    """No verified copy to restore from: one clear error naming the damaged token directory,
    and nothing written."""
    tdir, pin, expected = party
    token_dir = _token_dir(tdir)
    (token_dir / COPY_NAME).unlink()
    (token_dir / TOKEN_OBJECT).write_bytes(b"")
    rc, out, err = _run(tdir, pin, "check", expected)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("securethread.errors.TokenDamagedError: no token labelled 'durable'")
    assert token_dir.name in last and "restore them from a backup" in last
    assert (token_dir / TOKEN_OBJECT).read_bytes() == b""
    assert not (token_dir / COPY_NAME).exists()
    assert FileStore(conf=tdir.conf, tokendir=tdir.tokendir).damaged() == [token_dir]


def test_leftover_empty_object_file_is_moved_aside(
    party: tuple[TokenDirectory, str, Any],
) -> None:
    """A kill while SoftHSM creates an object leaves a file with no attribute, which makes an
    object search without a template fail; once old enough it is moved aside at start-up
    (a fresh one may belong to a creation in progress in another process)."""
    tdir, pin, expected = party
    token_dir = _token_dir(tdir)
    old = token_dir / "00000000-dead-0000-0000-000000000001.object"
    old.write_bytes(b"\x00" * 7 + b"\x01")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = token_dir / "00000000-dead-0000-0000-000000000002.object"
    fresh.write_bytes(b"")
    store = FileStore(conf=tdir.conf, tokendir=tdir.tokendir)
    with store.lock():
        report = store.repair()
    assert report.moved_aside == [old.with_name(old.name + ".damaged")]
    assert not old.exists() and fresh.exists()
    fresh.unlink()
    rc, out, err = _run(tdir, pin, "check", expected)
    assert rc == 0, err
