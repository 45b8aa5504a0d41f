"""A real PostgreSQL server for a test session: Debian's ``postgresql`` package, a cluster
made with ``initdb`` in a temporary directory, started with ``pg_ctl`` on a free port of
127.0.0.1 with its unix socket in the same directory, stopped and removed at the end.

``initdb`` and the server refuse to run as root: as root, both run as a throwaway OS user
this helper creates (``useradd``) and removes (``userdel``); otherwise as the current user.
Authentication is ``trust`` on 127.0.0.1 only (the server listens nowhere else).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TIMEOUT = 120


def _bindir() -> Path | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if Path(d, "initdb").is_file() and Path(d, "pg_ctl").is_file():
            return Path(d)
    return None


def need_postgres() -> Path:
    """The server's bin directory; a missing server fails under CI (install.sh installs it)."""
    bindir = _bindir()
    if bindir is None:
        msg = "PostgreSQL is not installed (bash scripts/install.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        msg = "psycopg is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway cluster; yield a ``postgresql://`` URL of an empty database."""
    bindir = need_postgres()
    base = Path(tempfile.mkdtemp(prefix="st-pg-"))
    user = None
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = "stpg" + uuid.uuid4().hex[:8]
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        shutil.chown(base, user, user)
        run_as = ["runuser", "-u", user, "--"]
    role = user or pwd.getpwuid(os.geteuid()).pw_name
    data, log = base / "data", base / "server.log"
    port = _free_port()
    started = False
    try:
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", role, "--auth=trust",
             "-E", "UTF8", "--no-instructions"],
            check=True, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
             "-w", "-t", str(TIMEOUT), "start"],
            check=True, capture_output=True, timeout=TIMEOUT + 10,
        )  # fmt: skip
        started = True
        import psycopg

        admin = f"postgresql://{role}@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE registry")
        yield f"postgresql://{role}@127.0.0.1:{port}/registry"
    finally:
        if started:
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True, timeout=TIMEOUT,
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
        if user is not None:
            subprocess.run(["userdel", user], capture_output=True, timeout=TIMEOUT)


def fresh_database(url: str) -> str:
    """A new, empty database on the server of ``url`` (one per test)."""
    import psycopg

    name = "t" + uuid.uuid4().hex[:12]
    server, _, _db = url.rpartition("/")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"
