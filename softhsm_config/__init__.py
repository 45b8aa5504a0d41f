"""Project-local SoftHSM2 token directories (docs/hsm.md).

Two ways to create one:

* :func:`init_party_tokens` -- one party's (the OEM's, a programming centre's) token
  directory: ``softhsm2.conf``, the tokens, and a PIN file (mode 0600) holding only that
  party's user PINs.  Each token's SO PIN is generated in the initialising child process,
  used for C_InitToken and C_InitPIN, and written nowhere.  A label that already exists is
  refused: C_InitToken would erase its keys.
* :func:`ensure_tokens` -- idempotent; PINs from the caller or the environment
  (``SECURETHREAD_SO_PIN_<LABEL>``, ``SECURETHREAD_PIN_<LABEL>``; tests and benchmarks), or
  -- only with ``generate_missing_pins`` (the single-host demo) -- generated and kept in
  ``<dir>/pins.env`` (0600, SO PINs included: that demo path predates per-party files).

Token initialisation runs in a child process (C_InitToken through ctypes, C_InitPIN through
python-pkcs11) that reads its request from a pipe, so PINs never appear on a command line
and this process's PKCS#11 state is untouched.  It runs under the token directory's
inter-process lock, and each new token gets its verified ``token.object`` copy at once
(:mod:`securethread.hsm.filestore`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from securethread.errors import (
    ConfigurationError,
    PinMissingError,
    TokenDirectoryError,
    TokenExistsError,
    WorkdirEscapeError,
)
from securethread.hsm.filestore import FileStore, TokenFile, _parse_conf, replace_file
from securethread.hsm.pin import (
    PINS_FILE_ENV,
    PinCallback,
    PinSet,
    child_environment,
    env_var_for,
    harden_process,
    read_pin_file,
    read_private_text,
    resolve_pin,
)

if TYPE_CHECKING:
    from securethread.hsm.token import Token

DEFAULT_TOKENS = ("oem", "programmer")
CONF_NAME = "softhsm2.conf"
PINS_NAME = "pins.env"
#: SoftHSM 2.6's PIN length bounds (MIN_PIN_LEN, MAX_PIN_LEN).
PIN_LENGTHS = (4, 255)


@dataclass(frozen=True)
class TokenDirectory:
    """Where a project-local SoftHSM2 lives: ``root/softhsm2.conf``, ``root/tokens/`` and
    the party's PIN file (``pin_file``, by default ``root/pins.env``)."""

    root: Path
    pin_file: Path | None = None

    @property
    def conf(self) -> Path:
        return self.root / CONF_NAME

    @property
    def tokendir(self) -> Path:
        return self.root / "tokens"

    @property
    def pins_file(self) -> Path:
        return self.pin_file if self.pin_file is not None else self.root / PINS_NAME

    @property
    def store(self) -> FileStore:
        return FileStore(conf=self.conf, tokendir=self.tokendir)

    def labels(self) -> list[str]:
        """The initialised tokens (user PIN set), read from their files: no module load."""
        return sorted(t.label for t in self.store.tokens() if t.user_pin_set)

    def check(self) -> None:
        """:class:`TokenDirectoryError` naming the configuration or token directory that is
        missing."""
        if not self.conf.is_file():
            raise TokenDirectoryError(f"no SoftHSM configuration at {str(self.conf)!r}")
        if not self.tokendir.is_dir():
            raise TokenDirectoryError(f"token directory {str(self.tokendir)!r} does not exist")

    def localise(self) -> None:
        """Make the configuration name this directory's own ``tokens/``.

        ``directories.tokendir`` is an absolute path, so a directory copied (``cp -a``) or
        moved would go on using the original's tokens while its files go to the copy.  A
        configuration naming any other token directory is written again from the template
        for this one; a ``tokens/`` that resolves outside the directory (a symbolic link) is
        refused (:class:`~securethread.errors.WorkdirEscapeError`), never used.
        """
        self.check()
        root = self.root.resolve()
        own = self.tokendir.resolve()
        if not own.is_relative_to(root):
            raise WorkdirEscapeError(
                f"token directory {str(self.tokendir)!r} resolves to {str(own)!r}, outside "
                f"{str(root)!r}: a work directory uses only its own tokens"
            )
        if self._names(own):
            return
        with self.store.lock():  # one writer, if several processes open the copy at once
            if not self._names(own):
                replace_file(self.conf, _conf_text(own).encode())

    def _names(self, tokendir: Path) -> bool:
        """Whether the configuration is a file naming ``tokendir`` (SoftHSM 2.6: the only
        path it reads from its configuration is ``directories.tokendir``)."""
        if self.conf.is_symlink():
            return False
        named = _parse_conf(self.conf.read_text()).get("directories.tokendir")
        return named is not None and Path(named) == tokendir

    def activate(self) -> None:
        """Point SoftHSM2 at this directory (``SOFTHSM2_CONF``, read when the module loads)
        and name the party's PIN file for :func:`~securethread.hsm.pin.resolve_pin`
        (``SECURETHREAD_PINS_FILE``: a path; no PIN is put in the environment).  The
        configuration is made to name this directory's tokens first (:meth:`localise`)."""
        self.localise()
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        if self.pins_file.is_file():
            os.environ[PINS_FILE_ENV] = str(self.pins_file)
        else:
            os.environ.pop(PINS_FILE_ENV, None)

    def pins(self, labels: Iterable[str], *, callback: PinCallback | None = None) -> PinSet:
        """A :class:`PinSet` for ``labels`` to hand to worker processes, resolved now
        (callback, environment, then this directory's PIN file)."""
        party = self.pins_file if self.pins_file.is_file() else None
        return PinSet.resolve(labels, callback=callback, pin_file=party)

    def open(self, label: str, *, pin: PinCallback | None = None) -> Token:
        """Activate this directory and open (log in to) its token ``label``.  One process
        works with one token directory: opening another's while a token is open is a
        :class:`~securethread.errors.ConfigurationError`."""
        from securethread.hsm.token import open_token

        self.activate()
        party = self.pins_file if self.pins_file.is_file() else None

        def from_sources(name: str) -> str:
            return resolve_pin(name, pin_file=party)

        return open_token(label, pin=pin if pin is not None else from_sources)


def template_text() -> str:
    return resources.files(__package__).joinpath("softhsm2.conf.template").read_text()


def read_pins_file(path: Path) -> dict[str, str]:
    """The ``SECURETHREAD_*=value`` lines of a demo ``pins.env`` (SO PINs included); like
    every PIN file, refused if group or others may read or write it."""
    out = {}
    for line in read_private_text(path, "PIN file").splitlines():
        name, eq, value = line.partition("=")
        if eq and name.startswith("SECURETHREAD_"):
            out[name.strip()] = value.strip()
    return out


def _check_label(label: object) -> str:
    if not isinstance(label, str) or not label:
        raise ConfigurationError(f"token label {label!r} must be a non-empty string")
    if len(label.encode()) > 32:
        raise ConfigurationError(f"token label {label!r} is longer than 32 bytes (CK_UTF8CHAR[32])")
    if label != label.strip() or any(c in label for c in "=\r\n") or not label.isprintable():
        raise ConfigurationError(
            f"token label {label!r}: no '=', control characters or surrounding blanks"
        )
    return label


def _check_pin(label: str, pin: object) -> str:
    low, high = PIN_LENGTHS
    if not isinstance(pin, str) or not low <= len(pin.encode()) <= high:
        raise ConfigurationError(f"user PIN for token {label!r} must be {low}-{high} bytes")
    if pin != pin.strip() or not pin.isprintable():
        raise ConfigurationError(
            f"user PIN for token {label!r}: no control characters or surrounding blanks"
        )
    return pin


def _conf_text(tokendir: Path) -> str:
    return template_text().replace("@TOKENDIR@", str(tokendir))


def _write_conf(tdir: TokenDirectory) -> None:
    tdir.tokendir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = _conf_text(tdir.tokendir)
    if not tdir.conf.exists() or tdir.conf.read_text() != conf:
        tdir.conf.write_text(conf)


def _half_initialised(store: FileStore, labels: Iterable[str]) -> list[TokenFile]:
    """Tokens of ``labels`` that C_InitToken created but C_InitPIN never reached (a kill
    in between): no user PIN, so nothing could ever have logged in to them."""
    wanted = set(labels)
    return [t for t in store.tokens() if t.label in wanted and not t.user_pin_set]


def init_party_tokens(
    directory: str | os.PathLike[str],
    labels: Iterable[str],
    *,
    pin_file: str | os.PathLike[str] | None = None,
    user_pins: Mapping[str, str] | None = None,
    private_pins: Mapping[str, str] | None = None,
    module_path: str | None = None,
) -> TokenDirectory:
    """Create one party's token directory with the tokens ``labels``.

    Writes ``directory/softhsm2.conf``, ``directory/tokens/`` and the PIN file
    (``pin_file``, default ``directory/pins.env``; ``label=PIN`` lines, mode 0600, merged
    with the lines it already has).  User PINs are ``user_pins[label]`` or random (32 hex
    digits); each SO PIN is random, lives only in the initialising child process and is
    written nowhere.  ``private_pins`` are the user PINs of tokens whose holders keep them
    themselves (an OEM officer's): used for C_InitPIN, never written to the PIN file.
    Refuses (:class:`TokenExistsError`, nothing written) if a token of ``labels`` already
    exists.  The PIN file is written before the tokens, so a kill in
    between leaves PINs for tokens that a second call creates with the same PINs.
    """
    harden_process()  # this process will hold user PINs
    labels = [_check_label(label) for label in labels]
    if not labels:
        raise ConfigurationError("no token labels to initialise")
    if len(set(labels)) != len(labels):
        raise ConfigurationError(f"token labels {labels!r} repeat a label")
    given = dict(user_pins or {})
    private = dict(private_pins or {})
    unknown = sorted((set(given) | set(private)) - set(labels))
    if unknown:
        raise ConfigurationError(f"user PINs given for tokens not initialised here: {unknown!r}")
    both = sorted(set(given) & set(private))
    if both:
        raise ConfigurationError(f"user PINs given as both kept and private: {both!r}")
    for label, pin in {**given, **private}.items():
        _check_pin(label, pin)
    root = Path(directory).resolve()
    pins_path = Path(pin_file).resolve() if pin_file is not None else None
    tdir = TokenDirectory(root, pin_file=pins_path)
    existing = {t.label for t in tdir.store.tokens() if t.user_pin_set}
    clash = [label for label in labels if label in existing]
    if clash:
        raise TokenExistsError(
            f"token {clash[0]!r} already exists in {str(tdir.tokendir)!r}; a token is "
            "initialised once (C_InitToken would erase its keys)"
        )
    stored = read_pin_file(tdir.pins_file) if tdir.pins_file.exists() else {}
    module = _module(module_path)
    pins = {
        label: private.get(label) or given.get(label) or stored.get(label) or secrets.token_hex(16)
        for label in labels
    }
    # Only now that every input is checked is anything written (bad input changes nothing).
    tdir.pins_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    merged = {k: v for k, v in {**stored, **pins}.items() if k not in private}
    replace_file(tdir.pins_file, "".join(f"{k}={v}\n" for k, v in sorted(merged.items())).encode())
    _write_conf(tdir)
    store = tdir.store
    with store.lock():
        store.repair()
        for half in _half_initialised(store, labels):
            shutil.rmtree(half.directory)
        _run_init_worker(tdir, {label: (None, pins[label]) for label in labels}, module)
        for info in store.tokens():
            if info.label in pins:
                store.keep_copy(serial=info.serial, label=info.label)
    return tdir


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
    PINs are needed only for tokens that do not exist yet.  Returns the
    :class:`TokenDirectory`; call its :meth:`~TokenDirectory.activate` before opening
    tokens in this process.
    """
    harden_process()  # this process will hold PINs
    tdir = TokenDirectory(Path(directory).resolve())
    labels = [_check_label(label) for label in labels]
    existing = {t.label for t in tdir.store.tokens() if t.user_pin_set}
    stored = read_pins_file(tdir.pins_file) if tdir.pins_file.exists() else {}
    wanted: dict[str, tuple[str | None, str]] = {}
    generated: dict[str, str] = {}
    for label in labels:
        if label in existing:
            continue
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
    module = _module(module_path)
    # Only now that every PIN is known is anything written (S5: bad input changes nothing).
    _write_conf(tdir)
    if generated:
        merged = {**stored, **generated}
        replace_file(
            tdir.pins_file, "".join(f"{k}={v}\n" for k, v in sorted(merged.items())).encode()
        )
    if wanted:
        store = tdir.store
        with store.lock():
            store.repair()
            for half in _half_initialised(store, wanted):
                shutil.rmtree(half.directory)
            _run_init_worker(tdir, wanted, module)
            for info in store.tokens():
                if info.label in wanted:
                    store.keep_copy(serial=info.serial, label=info.label)
    return tdir


def _module(module_path: str | None) -> str:
    from securethread.errors import ModuleLoadError
    from securethread.hsm.module import default_module_path

    module = module_path or default_module_path()
    if not os.path.isfile(module):
        raise ModuleLoadError(f"PKCS#11 module {module!r} does not exist")
    return module


def _run_init_worker(
    tdir: TokenDirectory, wanted: Mapping[str, tuple[str | None, str]], module: str
) -> None:
    """Initialise the missing tokens of ``wanted`` (label -> (SO PIN or None to generate
    one in the child, user PIN)) in a child process; call with the store's lock held."""
    request = {"module": module, "tokens": {label: list(p) for label, p in wanted.items()}}
    # The PINs go through the pipe; the child's environment holds none of the caller's.
    env = dict(child_environment(), SOFTHSM2_CONF=str(tdir.conf))
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
