"""Shared fixtures: one real SoftHSM2 token directory per test session, in a temp dir.

SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialised, so the directory is
created and activated at import time, before any test loads the module.  Tokens:
``oem``, ``programmer`` and ``spare``; random PINs exported as ``SECURETHREAD_PIN_*`` so
subprocesses (CLI, worker processes) inherit them.  Tests use unique labels (``label``
fixture) so they never collide on the shared tokens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from softhsm_config import ensure_tokens

TOKENS = ("oem", "programmer", "spare")

_HAVE_SOFTHSM = shutil.which("softhsm2-util") is not None or any(
    os.path.exists(p)
    for p in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
)

_ROOT = Path(tempfile.mkdtemp(prefix="securethread-tests-"))
for _label in TOKENS:
    os.environ[f"SECURETHREAD_PIN_{_label.upper()}"] = uuid.uuid4().hex
    os.environ[f"SECURETHREAD_SO_PIN_{_label.upper()}"] = uuid.uuid4().hex
if _HAVE_SOFTHSM:
    TOKEN_DIR = ensure_tokens(_ROOT / "hsm", TOKENS)
    TOKEN_DIR.activate()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def token_dir() -> object:
    if not _HAVE_SOFTHSM:
        pytest.fail("SoftHSM2 is not installed (apt-get install softhsm2)")
    return TOKEN_DIR


@pytest.fixture(scope="session")
def oem(token_dir: object) -> Iterator[object]:
    from securethread.hsm import open_token

    tok = open_token("oem")
    yield tok


@pytest.fixture(scope="session")
def programmer(token_dir: object) -> Iterator[object]:
    from securethread.hsm import open_token

    tok = open_token("programmer")
    yield tok


@pytest.fixture(scope="session")
def spare(token_dir: object) -> Iterator[object]:
    from securethread.hsm import open_token

    tok = open_token("spare")
    yield tok


@pytest.fixture
def label() -> str:
    """A label no other test uses."""
    return "t-" + uuid.uuid4().hex[:12]
