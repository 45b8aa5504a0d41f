"""A work directory is self-contained (issue 22): ``hsm/softhsm2.conf`` names its token
directory by an absolute path, so a copy (``cp -a factory fc``) used to create keys in the
original's token while its files went to the copy.  Now every open makes the configuration
name the directory's own tokens (softhsm_config.TokenDirectory.localise), and a token
directory that resolves outside the work directory is refused.  Real CLI processes, real
SoftHSM tokens, ``cp -a`` as an operator would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from securethread.demo import child_env

CLI = [sys.executable, "-m", "securethread.cli"]
EXIT_CONFIG = 2


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=child_env())


def _hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _objects(tokens: Path) -> set[str]:
    """The token objects (one file each in SoftHSM's file backend), token file excluded."""
    return {p.name for p in tokens.rglob("*.object") if p.name != "token.object"}


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    fac = tmp_path / "factory"
    proc = cli("programmer", "init", "--workdir", str(fac), "--name", "f-1")
    assert proc.returncode == 0, proc.stderr
    return fac


def test_a_copied_directory_uses_its_own_token(factory: Path, tmp_path: Path) -> None:
    copy = tmp_path / "fc"
    subprocess.run(["cp", "-a", str(factory), str(copy)], check=True)
    original = _hashes(factory)
    before = _objects(copy / "hsm" / "tokens")
    proc = cli("programmer", "enrol", "--workdir", str(copy))  # four keys into the token
    assert proc.returncode == 0, proc.stderr
    assert _hashes(factory) == original  # the original's token files were not touched
    assert len(_objects(copy / "hsm" / "tokens") - before) >= 4
    conf = (copy / "hsm" / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {(copy / 'hsm' / 'tokens').resolve()}\n" in conf
    assert str(factory) not in conf
    # The original still works with its own token (its keys were never made).
    proc = cli("programmer", "enrol", "--workdir", str(factory))
    assert proc.returncode == 0, proc.stderr
    assert len(_objects(factory / "hsm" / "tokens")) == len(_objects(copy / "hsm" / "tokens"))


def test_a_token_directory_outside_the_work_directory_is_refused(
    factory: Path, tmp_path: Path
) -> None:
    """``hsm/tokens`` replaced by a link to another directory's tokens: one line, exit 2,
    and neither directory changed."""
    copy = tmp_path / "fc"
    subprocess.run(["cp", "-a", str(factory), str(copy)], check=True)
    tokens = copy / "hsm" / "tokens"
    subprocess.run(["rm", "-rf", str(tokens)], check=True)
    os.symlink(factory / "hsm" / "tokens", tokens)
    before = (_hashes(factory), _hashes(copy))
    proc = cli("programmer", "enrol", "--workdir", str(copy))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "WorkdirEscapeError" in lines[0] and "outside" in lines[0], lines[0]
    assert (_hashes(factory), _hashes(copy)) == before
