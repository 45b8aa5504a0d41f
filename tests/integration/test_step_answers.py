"""A step killed after its last write but before it printed answers the next run.

A step marks itself done with a state file (a second run is refused: exit 2, "already
done").  A run SIGKILLed between that write and its answer used to leave a step that was done
but whose caller never had the result -- the redo was refused (test_step_kills flaked on
it).  Each step now records its result (``undelivered/``) before the state file and the CLI
drops the record once it printed: the redo prints the earlier result, byte for byte the JSON
the killed run would have printed, and only a run after that is refused.

Each step kind runs once in a process that SIGKILLs itself at the instant it would print
(after every write of the step), then through the real command twice.  Real CLI processes,
real SoftHSM tokens in each party's own work directory.

``programmer open-keys`` marks itself done in the token (the package registry), after its
answer; it is also killed at each instant before that: keys stored, answer written, answer
recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securethread.channel.transfer import (
    PackageReceipt,
    TokenPackageRegistry,
    open_package,
    seal_package,
    verify_receipt,
)
from securethread.demo import child_env
from securethread.demo.line import create_vendor
from securethread.errors import DuplicateObjectError, ReplayError
from securethread.formats import envelope
from securethread.formats.transcript import verify_transcript
from securethread.hsm import Token
from securethread.pki import from_pem
from tests.integration import test_channel as _channel_tests
from tests.integration.test_channel import Pki
from tests.integration.test_transfer import image_keys

pki = _channel_tests.pki  # the session-scoped PKI fixture of the channel tests

CLI = [sys.executable, "-m", "securethread.cli"]
EXIT_CONFIG, EXIT_TOKEN, EXIT_VERIFY = 2, 3, 4

# The command's own main(), with the one change of a kill where it would print its answer:
# the JSON it would have printed goes to a file of the test's instead.
_KILLED_BEFORE_PRINTING = """
import json, os, signal, sys
import securethread.cli as cli

def _emit(args, human, machine):
    with open(os.environ["ANSWER_FILE"], "w") as f:
        json.dump(machine, f, sort_keys=True, default=str)
    os.kill(os.getpid(), signal.SIGKILL)

cli._emit = _emit
sys.exit(cli.main(sys.argv[1:]))
"""


# The command's own main(), SIGKILLed at one instant of open-keys (KILL_AT) before it
# would print: the patches are this test's, in its own process.
_KILLED_IN_OPEN_KEYS = """
import os, signal, sys
import securethread.cli as cli
from securethread import workdir
from securethread.channel import transfer

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

where = os.environ["KILL_AT"]
if where == "keys stored":  # the keys are in the token, nothing else written
    commit = transfer._commit_entries

    def _commit_entries(*args, **kwargs):
        commit(*args, **kwargs)
        die()

    transfer._commit_entries = _commit_entries
elif where == "answer written":  # transcript, receipt and minutes written, not recorded
    workdir.PartyDir.pending = die
elif where == "answer recorded":  # recorded in undelivered/, the token's mark not made
    transfer.TokenPackageRegistry.record = die
else:
    raise SystemExit("unknown KILL_AT " + where)
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True,
                          env=child_env(), timeout=300)  # fmt: skip


def _killed_before_printing(tmp: Path, *args: str) -> dict[str, Any]:
    """Run the step; it is killed once everything is written, before its answer is out."""
    answer = tmp / f"answer-{len(list(tmp.glob('answer-*')))}.json"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_PRINTING, *args, "--json"],
        capture_output=True, text=True, env={**child_env(), "ANSWER_FILE": str(answer)},
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9 and proc.stdout == "", (proc.returncode, proc.stderr)
    result: dict[str, Any] = json.loads(answer.read_text())
    assert result["ok"], result
    return result


def killed_before_its_answer_is_recorded(*args: str) -> None:
    """Run the step; it is killed once its writes are done (its transcript record too) and
    before its answer is recorded (``PartyDir.pending``): the step's state file not written."""
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_OPEN_KEYS, *args, "--json"],
        capture_output=True, text=True, env={**child_env(), "KILL_AT": "answer written"},
        timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9 and killed.stdout == "", (killed.returncode, killed.stderr)


class Chain:
    """Both sites, each step's answer lost once: ``steps`` maps a step to (args, answer)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.oem, self.fac = tmp / "oem", tmp / "factory"
        self.steps: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}

    def lost(self, step: str, *args: str) -> dict[str, Any]:
        answer = _killed_before_printing(self.tmp, *args)
        self.steps[step] = (args, answer)
        return answer


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    c = Chain(tmp_path_factory.mktemp("step-answers"))
    pin = c.tmp / "officer-1" / "pin"
    init = c.lost("oem init", "oem", "init", "--workdir", str(c.oem), "--name", "acme",
                  "--officers", "1", "--threshold", "1", "--officer-pin-file", f"1={pin}")
    c.lost("programmer init", "programmer", "init", "--workdir", str(c.fac), "--name", "f-1")
    enrol = c.lost("enrol", "programmer", "enrol", "--workdir", str(c.fac))
    c.lost("certify-programmer", "oem", "certify-programmer", "--workdir", str(c.oem),
           str(c.fac / "outbox" / "enrolment-request.bin"), "--fingerprint", enrol["fingerprint"])
    c.lost("install-certs", "programmer", "install-certs", "--workdir", str(c.fac),
           str(c.oem / "outbox" / "certificates-f-1.bin"), "--root-fingerprint",
           init["root_fingerprint"])  # fmt: skip
    firmware = c.tmp / "fw.bin"
    firmware.write_bytes(os.urandom(4096))
    c.lost("master-image", "oem", "master-image", "--workdir", str(c.oem), str(firmware),
           "--image-id", "fw", "--version", "1", "--security-counter", "1",
           "--device-class", "c")  # fmt: skip
    c.lost("open-keys", "programmer", "open-keys", "--workdir", str(c.fac),
           str(_sealed(c, "k-print")))  # fmt: skip
    receiver = subprocess.Popen(
        [*CLI, "programmer", "receive-keys", "--workdir", str(c.fac), "--listen", "127.0.0.1:0",
         "--timeout", "120", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert receiver.stderr is not None
        line = receiver.stderr.readline()
        assert line.startswith("listening on "), line
        c.lost("send-keys", "oem", "send-keys", "--workdir", str(c.oem), "--to", "f-1",
               "--image", "fw", "--connect", line.strip().rpartition(" ")[2])  # fmt: skip
        _out, err = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, err
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    c.lost("request-ca", "programmer", "request-ca", "--workdir", str(c.fac), "--job", "j")
    create_vendor(c.tmp / "vendor", oem_root=c.oem / "root-ca.pem")  # the fab the job names
    spec = c.tmp / "j.toml"
    spec.write_text(
        'job_id = "j"\nprogrammer = "f-1"\nimage = "fw"\nquota = 2\n'
        f'vendors = ["{c.tmp / "vendor" / "root-ca.pem"}"]\n[targets]\n'
        'ranges = [["5ec0000000000000", "5ec0000000000001"]]\n[window]\ndays = 1\n'
    )
    draft = _cli("oem", "issue-job", "--workdir", str(c.oem), str(spec), "--ca-request",
                 str(c.fac / "outbox" / "production-ca-request-j.bin"))  # fmt: skip
    assert draft.returncode == 0, draft.stderr
    c.lost("approve-job", "oem", "approve-job", "--workdir", str(c.oem), "--job", "j",
           "--officer", "1", "--pin-file", str(pin))  # fmt: skip
    c.lost("issue-job --job", "oem", "issue-job", "--workdir", str(c.oem), "--job", "j")
    c.lost("open-job", "programmer", "open-job", "--workdir", str(c.fac),
           str(c.oem / "outbox" / "job-j.bin"), "--image", str(c.oem / "outbox" / "image-fw.enc"))
    prov = _cli("programmer", "provision", "--workdir", str(c.fac), "--job", "j", "--chips-from",
                str(c.tmp / "vendor"), "--devices", "2", "--progress", "none")  # fmt: skip
    assert prov.returncode == 0, prov.stderr
    c.lost("close-job", "programmer", "close-job", "--workdir", str(c.fac), "--job", "j")
    c.lost("reconcile", "oem", "reconcile", "--workdir", str(c.oem),
           str(c.fac / "outbox" / "ledger-j.bin"), "--job", "j")  # fmt: skip
    return c


def _sealed(c: Chain, image: str) -> Path:
    """A package sealing the key of a new image ``image`` to f-1 (``oem seal-keys``)."""
    firmware = c.tmp / f"{image}.bin"
    firmware.write_bytes(os.urandom(1024))
    for args in (
        ("master-image", "--workdir", str(c.oem), str(firmware), "--image-id", image,
         "--version", "1", "--security-counter", "1", "--device-class", "c"),
        ("seal-keys", "--workdir", str(c.oem), "--to", "f-1", "--image", image, "--out",
         str(c.tmp / f"{image}.sealed")),
    ):  # fmt: skip
        proc = _cli("oem", *args)
        assert proc.returncode == 0, proc.stderr
    return c.tmp / f"{image}.sealed"


def _key_imports(c: Chain, package: Path) -> int:
    """How many records of the factory's (verified) transcript import ``package``."""
    identity = from_pem((c.fac / "certs" / "identity.pem").read_bytes()).public_key()
    summary = verify_transcript(c.fac / "transcript.bin", public_key=identity)  # type: ignore[arg-type]
    digest = hashlib.sha256(package.read_bytes()).digest()
    return sum(
        r.operation == "key-import" and dict(r.artefacts).get("sealed-package") == digest
        for r in summary.records
    )


def _state(*dirs: Path) -> dict[str, bytes]:
    """Every file but the tokens' own (SoftHSM rewrites a token file at each login)."""
    return {
        str(p): p.read_bytes()
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file() and "/hsm/" not in str(p)
    }


STEPS = ["oem init", "programmer init", "enrol", "certify-programmer", "install-certs",
         "master-image", "open-keys", "send-keys", "request-ca", "approve-job", "issue-job --job",
         "open-job", "close-job", "reconcile"]  # fmt: skip


@pytest.mark.parametrize("step", STEPS)
def test_a_step_killed_before_its_answer_answers_the_next_run(chain: Chain, step: str) -> None:
    args, lost = chain.steps[step]
    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == lost  # the answer it lost
    # Answered once: from now on the step is done, refused as before, and nothing changes.
    before = _state(chain.oem, chain.fac)
    twice = _cli(*args)
    lines = twice.stderr.strip().splitlines()
    # a job opens once, a package imports once: a second open-job or open-keys is a
    # verification refusal (exit 4, docs/cli.md)
    code = EXIT_VERIFY if step in ("open-job", "open-keys") else EXIT_CONFIG
    assert twice.returncode == code and len(lines) == 1, twice.stderr
    assert any(w in lines[0] for w in ("already", "init was run")), lines[0]
    assert _state(chain.oem, chain.fac) == before


@pytest.mark.parametrize("kill_at", ["keys stored", "answer written", "answer recorded"])
def test_open_keys_killed_before_its_answer_is_out_answers_the_next_run(
    chain: Chain, kill_at: str
) -> None:
    """Killed with the keys in the token (no answer), with its answer written but not
    recorded, or recorded but the token's import mark not made: the next run answers with
    the receipt (the OEM verifies it), the transcript holds one import of the package, and
    the run after is refused as a replay, nothing changed."""
    package = _sealed(chain, "k-" + kill_at.replace(" ", "-"))
    args = ("programmer", "open-keys", "--workdir", str(chain.fac), str(package))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_OPEN_KEYS, *args, "--json"],
        capture_output=True, text=True, env={**child_env(), "KILL_AT": kill_at}, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9 and killed.stdout == "", (killed.returncode, killed.stderr)
    step = f"programmer open-keys {hashlib.sha256(package.read_bytes()).hexdigest()}"
    records = [r for r in (chain.fac / "undelivered").iterdir()
               if json.loads(r.read_text())["record_of"] == step]  # fmt: skip
    assert len(records) == (kill_at == "answer recorded")
    recorded = [json.loads(r.read_text())["result"] for r in records]

    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout.strip().splitlines()[-1])
    if recorded:  # the answer the killed run had recorded, as it would have printed it
        assert answer == {"ok": True, **recorded[0]}
    assert answer["ok"] and answer["keys"] == [f"image-{package.stem}"]
    assert not any(r.exists() for r in records)  # answered: the record is gone
    confirmed = _cli("oem", "confirm-keys", "--workdir", str(chain.oem),
                     str(chain.fac / answer["receipt"]))  # fmt: skip
    assert confirmed.returncode == 0, confirmed.stderr
    assert _key_imports(chain, package) == 1

    before = _state(chain.oem, chain.fac)
    twice = _cli(*args)
    lines = twice.stderr.strip().splitlines()
    assert twice.returncode == EXIT_VERIFY and len(lines) == 1, twice.stderr
    assert "already imported" in lines[0], lines[0]
    assert _state(chain.oem, chain.fac) == before


# Puts a key of the package's label and id, with the programmer's policy, but another value
# into the factory token.
_ANOTHER_KEY = """
import sys
from securethread.formats import envelope
from securethread.keys.policy import PROGRAMMER_IMAGE_KEY
from securethread.programmer import layout as L

_kind, body, _signers = envelope.peek_body(open(sys.argv[2], "rb").read())
(entry,) = body["entries"]
work = L.open_programmer(sys.argv[1])
work.open_token(L.TOKEN).generate_aes(entry["label"], policy=PROGRAMMER_IMAGE_KEY,
                                      key_id=entry["key_id"])
"""


def test_open_keys_refuses_a_key_of_its_label_with_another_value(chain: Chain) -> None:
    """Only the package's own key is taken for an earlier run's: the same label (and id
    and policy) with another value is refused, one line, nothing written."""
    package = _sealed(chain, "k-taken")
    made = subprocess.run([sys.executable, "-c", _ANOTHER_KEY, str(chain.fac), str(package)],
                          capture_output=True, text=True, env=child_env(), timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr
    before = _state(chain.oem, chain.fac)
    for _ in range(2):  # refused, and refused again: nothing was recorded
        proc = _cli("programmer", "open-keys", "--workdir", str(chain.fac), str(package))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == EXIT_TOKEN and len(lines) == 1, proc.stderr
        assert "already has a key 'image-k-taken'" in lines[0], lines[0]
        assert _state(chain.oem, chain.fac) == before


class _Stopped(Exception):
    """The caller's answer failed (a full disk, say) after the keys were stored."""


def _stop(_receipt: PackageReceipt) -> None:
    raise _Stopped


def test_open_package_stopped_after_storing_takes_its_own_keys_only(
    pki: Pki, oem: Token, programmer: Token
) -> None:
    """open_package stopped between storing the keys and recording the package (here its
    ``answer`` fails) leaves the keys; the next import takes exactly those keys -- also when
    only some were stored -- and records the package.  A key that is not transferable cannot
    be compared (it cannot be wrapped): refused, the package not recorded."""
    ident, ka = pki.programmer, pki.programmer_ka

    def seal(labels: list[str], transferable: bool) -> bytes:
        return seal_package(
            oem, labels, identity_key=oem.private_key(pki.oem.identity), identity_cert=pki.oem.cert,
            expected_programmer=ident.cert, recipient_cert=ka.cert, root_cert=pki.root,
            transferable=transferable,
        )  # fmt: skip

    def open_(data: bytes, registry: TokenPackageRegistry, **kw: object) -> PackageReceipt:
        return open_package(
            data, backend=programmer, ka_key=programmer.private_key(ka.identity),
            ka_cert=ka.cert, identity_key=programmer.private_key(ident.identity),
            identity_cert=ident.cert, root_cert=pki.root, registry=registry, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    registry = TokenPackageRegistry(programmer)
    labels = image_keys(oem, 2)
    data = seal(labels, True)
    with pytest.raises(_Stopped):
        open_(data, registry, answer=_stop)
    assert all(programmer.has_key(lb) for lb in labels)
    programmer.destroy(labels[1])  # a kill in the middle of storing them: one is there
    answered: list[PackageReceipt] = []
    receipt = open_(data, registry, answer=answered.append)
    assert answered == [receipt] and registry.seen(receipt.package_id)
    assert all(programmer.has_key(lb) for lb in labels)
    verify_receipt(receipt.signed, package=data, programmer_cert=ident.cert, root_cert=pki.root)
    with pytest.raises(ReplayError, match="already imported"):
        open_(data, registry)

    kept = image_keys(oem, 1)
    data = seal(kept, False)
    with pytest.raises(_Stopped):
        open_(data, registry, answer=_stop)
    with pytest.raises(DuplicateObjectError, match=kept[0]):
        open_(data, registry)
    assert programmer.has_key(kept[0])  # the earlier run's, left as it was
    assert not registry.seen(envelope.peek_body(data)[1]["package_id"])


def test_an_answered_step_is_refused_at_once(tmp_path: Path) -> None:
    """The record lives only until the answer is out: a step that printed keeps none."""
    work = tmp_path / "factory"
    first = _cli("programmer", "init", "--workdir", str(work), "--name", "f-2")
    assert first.returncode == 0, first.stderr
    assert not any((work / "undelivered").iterdir())
    again = _cli("programmer", "init", "--workdir", str(work), "--name", "f-2")
    assert again.returncode == EXIT_CONFIG and "init was run" in again.stderr


def test_a_damaged_record_is_one_line(tmp_path: Path) -> None:
    """A record that is not a step's result: one line naming the file (FormatError, exit 4),
    and nothing changed."""
    work = tmp_path / "factory"
    _killed_before_printing(tmp_path, "programmer", "init", "--workdir", str(work), "--name", "f-3")
    (record,) = (work / "undelivered").iterdir()
    record.write_text('{"record_of": "init", "result": {"step": 1}}')
    before = _state(work)
    proc = _cli("programmer", "init", "--workdir", str(work), "--name", "f-3")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_VERIFY and len(lines) == 1 and "damaged" in lines[0], proc.stderr
    assert str(record) in lines[0]
    assert _state(work) == before


def test_reconcile_killed_right_after_its_transcript_record_records_it_once(
    chain: Chain, tmp_path: Path
) -> None:
    """``oem reconcile`` SIGKILLed after its transcript record and before its answer is
    recorded (no reconciliation.json, nothing in undelivered/): the rerun reconciles and
    answers, and the transcript ends with that one record, not two.  On a copy of the
    chain's OEM directory (the same token) with its reconciliation undone."""
    import shutil

    oem = tmp_path / "oem"
    shutil.copytree(chain.oem, oem)
    (oem / "jobs" / "j" / "reconciliation.json").unlink()
    shutil.rmtree(oem / "undelivered", ignore_errors=True)
    ledger = chain.fac / "outbox" / "ledger-j.bin"
    args = ("oem", "reconcile", "--workdir", str(oem), str(ledger), "--job", "j")
    identity = from_pem((oem / "oem-identity.pem").read_bytes()).public_key()
    digest = hashlib.sha256(ledger.read_bytes()).digest()

    def records() -> list[int]:
        summary = verify_transcript(oem / "transcript.bin", public_key=identity)  # type: ignore[arg-type]
        return [r.seq for r in summary.records if r.operation == "reconciliation"
                and dict(r.artefacts).get("ledger") == digest]  # fmt: skip

    killed_before_its_answer_is_recorded(*args)
    assert not (oem / "jobs" / "j" / "reconciliation.json").exists()
    after_kill = records()
    summary = verify_transcript(oem / "transcript.bin", public_key=identity)  # type: ignore[arg-type]
    assert after_kill and summary.records[-1].seq == after_kill[-1]  # its record is the newest
    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["reconciled"] is True
    assert records() == after_kill  # recorded once
    assert (oem / "jobs" / "j" / "reconciliation.json").is_file()
