"""A party's work directory: what one organisation keeps on its own machine.

Each party (the OEM, a programming centre) has one work directory holding only its own
things (docs/design.md, "Deployment")::

    <dir>/.securethread      marker: which party this directory belongs to (JSON)
    <dir>/hsm/               softhsm2.conf, tokens/ (this party's tokens only)
    <dir>/pins               this party's user PINs (0600); SO PINs are never kept
    <dir>/transcript.bin     the party's signed, hash-chained ceremony transcript
    <dir>/minutes.txt        each step's transcript anchor (record number and hash)
    <dir>/outbox/            artefacts this party sends to another one
    <dir>/undelivered/       a finished step's result until its caller had it (JSON)

Everything that arrives from another party is given to a step as a file argument and
verified there; nothing here trusts a file it did not write itself.  Steps record what
they did as *state files*: a step refuses to run before the steps it needs, or twice,
before it changes anything (:class:`StepOrderError`).  A step records its result in
``undelivered/`` before it writes the state file that marks it done, and the CLI removes the
record once it printed the result: a step killed after its last write but before its answer
reached the caller answers a second run with that result instead of refusing it as done.

This module knows nothing about either party's steps: :mod:`securethread.oem` and
:mod:`securethread.programmer` build on it.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securethread.errors import ConfigurationError, Error, FormatError, PinMissingError

if TYPE_CHECKING:
    from securethread.formats.transcript import Transcript
    from securethread.hsm.token import Token

MARKER = ".securethread"
#: Written first by ``init`` and removed when it is done: a directory holding it is a
#: killed init's, which a new ``init`` may clear.
INIT_MARK = ".securethread-init"
PIN_FILE = "pins"
HSM_DIR = "hsm"
OUTBOX = "outbox"
TRANSCRIPT = "transcript.bin"
MINUTES = "minutes.txt"
UNDELIVERED = "undelivered"
PARTIES = ("oem", "programmer")

#: The token directory this process activated (the PKCS#11 module reads its config once).
_active_conf: Path | None = None


class StepOrderError(ConfigurationError):
    """A step was run before a step it needs, or again where that is not allowed."""


class WrongWorkdirError(ConfigurationError):
    """The work directory is missing, not a securethread one, or another party's."""


@attrs.frozen
class Anchor:
    """A transcript's head after a step: what an auditor writes down (``--anchor``)."""

    enclave: str
    seq: int
    head: bytes

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "head": self.head.hex()}


@attrs.frozen
class StepResult:
    """What a step did: files written, transcript anchors, step-specific details.

    ``problem`` is set when the step ran to its end but did not do everything asked (some
    devices refused); the CLI reports it and exits non-zero.
    """

    step: str
    workdir: Path
    written: tuple[str, ...] = ()
    anchors: tuple[Anchor, ...] = ()
    details: Mapping[str, Any] = attrs.field(factory=dict)
    problem: Error | None = None
    #: the record of this result in ``undelivered/``, kept until the caller had it
    record: Path | None = attrs.field(default=None, eq=False)

    def delivered(self) -> None:
        """The caller has this result: from now on a second run is refused as done."""
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], record: Path) -> StepResult:
        """The result :meth:`to_json` gave (read back from its ``undelivered/`` record)."""
        known = ("step", "workdir", "written", "anchors")
        anchors = tuple(
            Anchor(enclave, int(a["seq"]), bytes.fromhex(a["head"]))
            for enclave, a in data["anchors"].items()
        )
        details = {k: v for k, v in data.items() if k not in known}
        return cls(data["step"], Path(data["workdir"]), tuple(data["written"]), anchors,
                   details, record=record)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "workdir": str(self.workdir),
            "written": list(self.written),
            "anchors": {a.enclave: a.to_json() for a in self.anchors},
            **self.details,
        }


# --- files -------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically: a crash leaves the old file or none."""
    _replace_atomic(path, mode, lambda f: f.write(data))


def copy_atomic(src: str | os.PathLike[str], dst: Path, *, mode: int = 0o644) -> None:
    """Copy the file ``src`` to ``dst`` atomically, streaming (images and ledgers may be
    larger than memory should hold)."""
    with open(src, "rb") as source:
        _replace_atomic(dst, mode, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def _replace_atomic(path: Path, mode: int, fill: Callable[[Any], object]) -> None:
    """A temporary file beside ``path``, filled and fsynced, renamed over it, and the
    directory fsynced: a kill at any instant leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_file(path: str | os.PathLike[str], what: str, *, limit: int = 64 << 20) -> bytes:
    """Read a whole (bounded) file, or raise one clear :class:`ConfigurationError`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {str(p)!r}: {exc.strerror}") from None
    if len(data) > limit:
        raise FormatError(f"{what} {str(p)!r} is larger than {limit} bytes")
    return data


def open_file(path: str | os.PathLike[str], what: str) -> BinaryIO:
    """Open a file to stream it, or raise one clear :class:`ConfigurationError` (the
    streaming twin of :func:`read_file`, for ledgers that do not fit in memory)."""
    try:
        return open(path, "rb")  # noqa: SIM115 -- the caller closes it
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {what} {os.fspath(path)!r}: {exc.strerror}"
        ) from None


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- the directory -----------------------------------------------------------------------------


class PartyDir:
    """One party's work directory (see the module docstring)."""

    def __init__(self, root: Path, party: str, name: str) -> None:
        self.root = root
        self.party = party
        self.name = name

    def __repr__(self) -> str:
        return f"<PartyDir {self.party} {self.name!r} {self.root}>"

    # creation and opening

    @classmethod
    def create(cls, workdir: str | os.PathLike[str], party: str, name: str) -> PartyDir:
        """Make a new work directory for ``party``; refuse one that is not empty."""
        if party not in PARTIES:
            raise ValueError(f"unknown party {party!r}")
        root = Path(workdir).resolve()
        if root.exists():
            if not root.is_dir():
                raise WrongWorkdirError(f"work directory {str(root)!r} is not a directory")
            if (root / MARKER).exists():
                other = _read_marker(root)
                raise StepOrderError(
                    f"{str(root)!r} is already the work directory of the {other['party']} "
                    f"{other['name']!r} (init was run)"
                )
            if (root / INIT_MARK).is_file():
                # An init of ours that was killed before it finished (the marker is written
                # last): everything here is its own, half made; start again.
                for child in root.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            elif any(root.iterdir()):
                raise WrongWorkdirError(
                    f"work directory {str(root)!r} is not empty; init needs a new directory"
                )
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(root / INIT_MARK, f"{party} {name}\n".encode())
        (root / OUTBOX).mkdir(exist_ok=True)
        return cls(root, party, name)

    @classmethod
    def undelivered_init(
        cls, workdir: str | os.PathLike[str], party: str, name: str
    ) -> StepResult | None:
        """The result of the ``init`` that made ``workdir`` ``party`` ``name``'s directory
        if it was killed before that result reached its caller (else None: :meth:`create`
        decides)."""
        root = Path(workdir).resolve()
        if not (root / MARKER).is_file():
            return None
        marker = _read_marker(root)
        if marker["party"] != party or marker["name"] != name:
            return None
        return cls(root, party, name).undelivered("init")

    def mark_created(self) -> None:
        """Write the marker: the last thing ``init`` does (a crashed init can be redone
        after deleting the directory; the marker never names a half-made one)."""
        write_atomic(
            self.root / MARKER,
            (json.dumps({"party": self.party, "name": self.name, "version": 1}) + "\n").encode(),
        )
        (self.root / INIT_MARK).unlink(missing_ok=True)

    @classmethod
    def open(cls, workdir: str | os.PathLike[str], party: str) -> PartyDir:
        """Open ``party``'s existing work directory; refuse anything else by name."""
        root = Path(workdir).resolve()
        if not root.is_dir():
            raise WrongWorkdirError(
                f"{str(root)!r} is not a work directory (run '{_cmd(party)} init' first)"
            )
        if not (root / MARKER).exists():
            raise WrongWorkdirError(
                f"{str(root)!r} is not a securethread {party} work directory "
                f"(run '{_cmd(party)} init' first)"
            )
        marker = _read_marker(root)
        if marker["party"] != party:
            raise WrongWorkdirError(
                f"{str(root)!r} is the {marker['party']}'s work directory "
                f"({marker['name']!r}); {_cmd(party)} commands need the {party}'s"
            )
        return cls(root, party, marker["name"])

    # paths

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def outbox(self) -> Path:
        return self.root / OUTBOX

    @property
    def hsm(self) -> Path:
        return self.root / HSM_DIR

    # files

    def write(self, rel: str, data: bytes, *, mode: int = 0o644) -> str:
        write_atomic(self.root / rel, data, mode=mode)
        return rel

    def read(self, rel: str, what: str) -> bytes:
        return read_file(self.root / rel, what)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def require(self, rel: str, *, step: str, needs: str) -> None:
        """Refuse ``step`` unless the state file ``rel`` that ``needs`` writes exists."""
        if not self.exists(rel):
            raise StepOrderError(
                f"{step} needs {needs} first ({rel} does not exist in {self.root})"
            )

    def done_before(self, rel: str, *, step: str) -> StepResult | None:
        """``step``'s earlier result if its state file ``rel`` exists but that result never
        reached its caller (the run was killed after its last write); refuse ``step`` if it
        was done and delivered; None if it was not done."""
        if not self.exists(rel):
            return None
        earlier = self.undelivered(step)
        if earlier is None:
            raise StepOrderError(f"{step} was already done in {self.root} ({rel} exists)")
        return earlier

    def _record_path(self, step: str) -> Path:
        return self.root / UNDELIVERED / (hashlib.sha256(step.encode()).hexdigest()[:32] + ".json")

    def undelivered(self, step: str) -> StepResult | None:
        """The result ``step`` recorded with :meth:`pending` and its caller never had."""
        path = self._record_path(step)
        if not path.is_file():
            return None
        try:
            data = json.loads(read_file(path, "step result record", limit=1 << 20))
            if data.get("record_of") != step:
                raise ValueError("another step's record")
            return StepResult.from_json(data["result"], path)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise FormatError(f"{str(path)!r} is damaged") from None

    def pending(self, step: str, result: StepResult) -> StepResult:
        """Record ``result`` as ``step``'s answer until the caller had it (see
        :meth:`StepResult.delivered`); call it before writing the state file that marks
        ``step`` done, so that a done step always has its answer or gave it."""
        path = self._record_path(step)
        path.parent.mkdir(exist_ok=True)
        record = {"record_of": step, "result": result.to_json()}
        write_atomic(path, json.dumps(record, sort_keys=True, default=str).encode(), mode=0o600)
        return attrs.evolve(result, record=path)

    # tokens and PINs

    def init_tokens(
        self, labels: Sequence[str], *, private_pins: Mapping[str, str] | None = None
    ) -> None:
        """Create this party's SoftHSM2 directory and tokens with fresh random PINs.

        The user PINs go to ``<dir>/pins`` (0600, written before the tokens so a kill in
        between cannot lock the party out); each SO PIN lives only in the child process that
        initialises the token and is kept nowhere (docs/hsm.md, "Token directories per
        party").  ``private_pins`` (label -> PIN) are PINs their holders keep, an OEM
        officer's: they initialise those tokens and are written nowhere here.  A label that
        already exists is refused by the initialiser.
        """
        from softhsm_config import init_party_tokens

        init_party_tokens(
            self.hsm, labels, pin_file=self.root / PIN_FILE, private_pins=private_pins
        )

    def pin_callback(self) -> Callable[[str], str]:
        """PINs for this party's tokens, in the order of :func:`securethread.hsm.pin.resolve_pin`
        (``SECURETHREAD_PIN_<LABEL>``, then ``SECURETHREAD_PIN_<LABEL>_FILE``, then this
        directory's ``pins``), else a prompt on a terminal.  Nothing is ever written to the
        environment."""
        from securethread.hsm.pin import resolve_pin

        pin_file = self.root / PIN_FILE

        def pin_for(label: str) -> str:
            try:
                return resolve_pin(label, pin_file=pin_file if pin_file.exists() else None)
            except PinMissingError:
                if not sys.stdin.isatty():
                    raise
            return getpass.getpass(f"PIN for token {label!r}: ")

        return pin_for

    def activate(self) -> None:
        """Point SoftHSM2 at this party's token directory, before the module loads.

        The PKCS#11 module reads ``SOFTHSM2_CONF`` once per process, so one process works
        with one party's tokens; refusing a second party here avoids opening the wrong
        token by label.  The configuration is made to name this directory's own tokens
        first, so a copied or moved directory never uses the original's
        (:meth:`softhsm_config.TokenDirectory.localise`).
        """
        from softhsm_config import TokenDirectory

        conf = self.hsm / "softhsm2.conf"
        if not conf.is_file():
            raise WrongWorkdirError(f"no SoftHSM configuration at {str(conf)!r}")
        TokenDirectory(self.hsm).localise()
        global _active_conf
        if _active_conf is not None and _active_conf != conf:
            raise ConfigurationError(
                f"this process already uses the tokens of {str(_active_conf)!r}; "
                f"run {self.party} steps in their own process"
            )
        _active_conf = conf
        os.environ["SOFTHSM2_CONF"] = str(conf)

    def open_token(self, label: str, pin: Callable[[str], str] | None = None) -> Token:
        from securethread.hsm import open_token

        self.activate()
        return open_token(label, pin=pin or self.pin_callback())

    # the transcript and the minutes

    def transcript(self, signer: Any) -> Transcript:
        from securethread.formats.transcript import Transcript

        return Transcript(self.root / TRANSCRIPT, signer, self.party)

    def finish(
        self,
        step: str,
        written: Sequence[str],
        transcripts: Sequence[Transcript] = (),
        details: Mapping[str, Any] | None = None,
        problem: Error | None = None,
    ) -> StepResult:
        """Write the transcripts' new heads in the minutes; build the step's result."""
        anchors = tuple(
            Anchor(t.enclave, t.last.seq, t.last.hash) for t in transcripts if t.last is not None
        )
        if anchors:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            with open(self.root / MINUTES, "a") as f:
                for a in anchors:
                    f.write(
                        f"{stamp} {step}: {a.enclave} transcript record #{a.seq} {a.head.hex()}\n"
                    )
        return StepResult(step, self.root, tuple(written), anchors, dict(details or {}), problem)


def _read_marker(root: Path) -> dict[str, str]:
    try:
        marker = json.loads(read_file(root / MARKER, "work directory marker", limit=4096))
    except (ValueError, UnicodeDecodeError):
        raise WrongWorkdirError(f"{str(root / MARKER)!r} is damaged") from None
    if (
        not isinstance(marker, dict)
        or marker.get("party") not in PARTIES
        or not isinstance(marker.get("name"), str)
    ):
        raise WrongWorkdirError(f"{str(root / MARKER)!r} is damaged")
    return marker


def _cmd(party: str) -> str:
    return f"securethread {party}"


def check_name(what: str, value: object, *, limit: int = 64) -> str:
    """A party, job or image name: 1-``limit`` characters of ``[A-Za-z0-9._-]``, usable as
    a file name (no path separators, no leading dot)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= limit
        or value.startswith(".")
        or any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in value)
    ):
        raise ConfigurationError(
            f"{what} must be 1-{limit} characters of letters, digits, '.', '_' or '-' "
            f"(not starting with '.'), got {value!r}"
        )
    return value


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint as 64 hex digits (colons and spaces allowed)."""
    cleaned = text.replace(":", "").replace(" ", "").lower()
    try:
        fp = bytes.fromhex(cleaned)
    except ValueError:
        fp = b""
    if len(fp) != 32:
        raise ConfigurationError(f"a fingerprint is 64 hex digits (SHA-256), got {text!r}")
    return fp
