"""Project-local SoftHSM2 token directories, created idempotently.

:func:`ensure_tokens` is the one way tests, the CLI and the demo create tokens: it writes
``<dir>/softhsm2.conf`` from the template next to this file, and initialises every named
token that does not exist yet.  PINs come from the environment
(``SECURETHREAD_SO_PIN_<LABEL>``, ``SECURETHREAD_PIN_<LABEL>``), from the caller, or -- only
when ``generate_missing_pins`` is set (the demo) -- are generated at random and written to
``<dir>/pins.env`` with mode 0600.  Token initialisation runs in a child process
(C_InitToken through ctypes, C_InitPIN through python-pkcs11) so PINs never appear on a
command line and this process's PKCS#11 state is untouched.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from securethread.errors import ConfigurationError, PinMissingError
from securethread.hsm.pin import env_var_for

DEFAULT_TOKENS = ("oem", "programmer")
CONF_NAME = "softhsm2.conf"
PINS_NAME = "pins.env"


@dataclass(frozen=True)
class TokenDirectory:
    """Where a project-local SoftHSM2 lives."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / CONF_NAME

    @property
    def tokendir(self) -> Path:
        return self.root / "tokens"

    @property
    def pins_file(self) -> Path:
        return self.root / PINS_NAME

    def activate(self) -> None:
        """Point SoftHSM2 at this directory (before any PKCS#11 module is loaded) and
        export the PINs kept in ``pins.env`` (demo directories only)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        if self.pins_file.exists():
            for name, value in read_pins_file(self.pins_file).items():
                os.environ.setdefault(name, value)


def template_text() -> str:
    return resources.files(__package__).joinpath("softhsm2.conf.template").read_text()


def read_pins_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        name, eq, value = line.partition("=")
        if eq and name.startswith("SECURETHREAD_"):
            out[name.strip()] = value.strip()
    return out


def ensure_tokens(
    directory: str | os.PathLike[str],
    labels: Iterable[str] = DEFAULT_TOKENS,
    *,
    pins: Mapping[str, tuple[str, str]] | None = None,
    generate_missing_pins: bool = False,
    module_path: str | None = None,
) -> TokenDirectory:
    """Create ``directory`` with a SoftHSM2 config and the tokens ``labels``; idempotent.

    ``pins`` maps a label to ``(so_pin, user_pin)``; otherwise the environment is used.
    Returns the :class:`TokenDirectory`; call its :meth:`~TokenDirectory.activate` before
    opening tokens in this process.
    """
    tdir = TokenDirectory(Path(directory).resolve())
    labels = list(labels)
    stored = read_pins_file(tdir.pins_file) if tdir.pins_file.exists() else {}
    wanted: dict[str, tuple[str, str]] = {}
    generated: dict[str, str] = {}
    for label in labels:
        so_var, user_var = env_var_for(label, role="SO_PIN"), env_var_for(label)
        if pins is not None and label in pins:
            wanted[label] = pins[label]
            continue
        so = os.environ.get(so_var) or stored.get(so_var)
        user = os.environ.get(user_var) or stored.get(user_var)
        if so is None or user is None:
            if not generate_missing_pins:
                raise PinMissingError(
                    f"token {label!r}: set {so_var} and {user_var} to initialise it"
                )
            so = so or secrets.token_hex(16)
            user = user or secrets.token_hex(16)
            generated[so_var], generated[user_var] = so, user
        wanted[label] = (so, user)
    # Only now that every PIN is known is anything written (S5: bad input changes nothing).
    tdir.tokendir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = template_text().replace("@TOKENDIR@", str(tdir.tokendir))
    if not tdir.conf.exists() or tdir.conf.read_text() != conf:
        tdir.conf.write_text(conf)
    if generated:
        merged = {**stored, **generated}
        fd = os.open(tdir.pins_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in sorted(merged.items())))
    _run_init_worker(tdir, wanted, module_path)
    return tdir


def _run_init_worker(
    tdir: TokenDirectory, wanted: Mapping[str, tuple[str, str]], module_path: str | None
) -> None:
    from securethread.hsm.module import default_module_path

    request = {
        "module": module_path or default_module_path(),
        "tokens": {label: list(p) for label, p in wanted.items()},
    }
    env = dict(os.environ, SOFTHSM2_CONF=str(tdir.conf))
    proc = subprocess.run(
        [sys.executable, "-m", "softhsm_config._init_worker"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown"
        raise ConfigurationError(f"token initialisation failed: {reason}")
