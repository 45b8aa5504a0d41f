"""Officers are people: M-of-N approval needs M officers, each in their own process with
their own token and PIN (issue 22).

Through the real command on real SoftHSM tokens: ``oem init`` gives each officer's PIN to
that officer's own file only; ``oem issue-job SPEC`` prepares a draft and nothing the OEM's
PIN can do issues it; each ``oem approve-job`` is a separate process holding one officer's
PIN source; ``oem issue-job --job`` issues the job once the threshold approved.  Every
refusal is one stderr line with its documented exit code and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securethread.demo import child_env
from securethread.formats import cbor, envelope
from securethread.formats.job import ProductionJob, job_hash, verify_job_signatures
from securethread.formats.onboarding import OfficerBundle
from securethread.keys import fingerprint, load_spki
from securethread.pki import from_pem

CLI = [sys.executable, "-m", "securethread.cli"]
EXIT_CONFIG, EXIT_TOKEN, EXIT_VERIFY = 2, 3, 4
OFFICERS, THRESHOLD = 3, 2
CHOSEN_PIN = "officer-3-chose-this"  # officer 3 brings a PIN of their own choosing


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env or child_env(), timeout=300
    )


def ok(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run(*args, "--json", env=env)
    assert proc.returncode == 0, (args, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _state(*dirs: Path) -> dict[str, str]:
    """Every file's digest; in token directories the object files' names only (SoftHSM
    rewrites a token's own file at each login)."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            rel = str(p.relative_to(d.parent))
            if not p.is_file():
                continue
            if "/hsm/" in rel:
                if p.suffix == ".object" and p.name != "token.object":
                    out[rel] = "object"
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(w: dict[str, Any], code: int, *args: str, match: str, **kw: Any) -> str:
    """A command that must fail: exit ``code``, one stderr line naming ``match``, nothing
    changed in the OEM's or the officers' directories."""
    watched = (w["oem"], w["officers"])
    before = _state(*watched)
    proc = run(*args, **kw)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match.lower() in lines[0].lower(), lines[0]
    assert _state(*watched) == before
    return lines[0]


def pin_file(w: dict[str, Any], n: int) -> Path:
    return w["officers"] / f"officer-{n}" / "pin"  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An OEM with three officers (floor two) and a certified programmer holding the image
    key: everything up to the jobs, through the CLI."""
    tmp = tmp_path_factory.mktemp("officers")
    oem, fac, officers = tmp / "oem", tmp / "factory", tmp / "officers"
    chosen = officers / "officer-3" / "pin"
    chosen.parent.mkdir(parents=True)
    chosen.write_text(CHOSEN_PIN + "\n")
    chosen.chmod(0o600)
    w: dict[str, Any] = {"tmp": tmp, "oem": oem, "factory": fac, "officers": officers}
    init = ok(
        "oem", "init", "--workdir", str(oem), "--name", "acme", "--officers", str(OFFICERS),
        "--threshold", str(THRESHOLD),
        *(x for n in (1, 2, 3) for x in ("--officer-pin-file", f"{n}={pin_file(w, n)}")),
    )  # fmt: skip
    w["init"] = init
    ok("programmer", "init", "--workdir", str(fac), "--name", "f-1")
    fp = ok("programmer", "enrol", "--workdir", str(fac))["fingerprint"]
    ok("oem", "certify-programmer", "--workdir", str(oem),
       str(fac / "outbox/enrolment-request.bin"), "--fingerprint", fp)  # fmt: skip
    ok("programmer", "install-certs", "--workdir", str(fac),
       str(oem / "outbox/certificates-f-1.bin"), "--root-fingerprint",
       init["root_fingerprint"])  # fmt: skip
    (tmp / "fw.bin").write_bytes(os.urandom(4 << 10))
    ok("oem", "master-image", "--workdir", str(oem), str(tmp / "fw.bin"), "--image-id", "fw",
       "--version", "1", "--security-counter", "1", "--device-class", "c")  # fmt: skip
    ok("oem", "seal-keys", "--workdir", str(oem), "--to", "f-1", "--image", "fw", "--out",
       str(tmp / "keys.sealed"))  # fmt: skip
    ok("programmer", "open-keys", "--workdir", str(fac), str(tmp / "keys.sealed"))
    ok("oem", "confirm-keys", "--workdir", str(oem),
       str(next((fac / "outbox").glob("key-receipt-*.bin"))))  # fmt: skip
    ok("vendor", "init", "--workdir", str(tmp / "vendor"), "--oem-root", str(oem / "root-ca.pem"))
    return w


def prepare(w: dict[str, Any], job: str) -> dict[str, Any]:
    """The programmer's production-CA request for ``job``, then ``oem issue-job SPEC``."""
    ok("programmer", "request-ca", "--workdir", str(w["factory"]), "--job", job)
    spec = w["tmp"] / f"{job}.toml"
    spec.write_text(
        f'job_id = "{job}"\nprogrammer = "f-1"\nimage = "fw"\nquota = 3\n'
        f'vendors = ["{w["tmp"] / "vendor" / "root-ca.pem"}"]\n[targets]\n'
        'ranges = [["5ec0000000000000", "5ec0000000000002"]]\n[window]\ndays = 1\n'
    )
    return ok("oem", "issue-job", "--workdir", str(w["oem"]), str(spec), "--ca-request",
              str(w["factory"] / f"outbox/production-ca-request-{job}.bin"))  # fmt: skip


def approve(w: dict[str, Any], job: str, n: int, *extra: str) -> list[str]:
    return ["oem", "approve-job", "--workdir", str(w["oem"]), "--job", job, "--officer", str(n),
            *extra]  # fmt: skip


def issue(w: dict[str, Any], job: str) -> list[str]:
    return ["oem", "issue-job", "--workdir", str(w["oem"]), "--job", job]


def _officer_pins(w: dict[str, Any]) -> dict[int, str]:
    return {n: pin_file(w, n).read_text().splitlines()[0] for n in (1, 2, 3)}


def _oem_pin(w: dict[str, Any]) -> str:
    lines: list[str] = (w["oem"] / "pins").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in lines if line.startswith("oem="))


# --- oem init -----------------------------------------------------------------------------------


def test_init_gives_each_officer_pin_to_that_officer_only(world: dict[str, Any]) -> None:
    """The OEM's pins hold the oem token's PIN alone; each officer's PIN is in the file the
    officer named (0600; new ones generated there, officer 3's own kept) and in no file of
    the OEM's work directory."""
    lines = (world["oem"] / "pins").read_text().splitlines()
    assert [line.split("=")[0] for line in lines] == ["oem"]
    pins = _officer_pins(world)
    assert pins[3] == CHOSEN_PIN
    assert len({*pins.values(), _oem_pin(world)}) == 4
    for n in (1, 2, 3):
        assert pin_file(world, n).stat().st_mode & 0o077 == 0
    sources = world["init"]["officer_pins"]
    assert sources["officer-1"].startswith("new, written to")
    assert sources["officer-3"].startswith("read from")
    assert not any(pin in json.dumps(world["init"]) for pin in pins.values())
    for path in world["oem"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(pin.encode() in data for pin in pins.values()), path


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((), "officer 1 has no PIN"),
        (("--officer-pin-file", "1=INSIDE", "--officer-pin-file", "2=B"), "inside the OEM's work"),
        (("--officer-pin-file", "1=A", "--officer-pin-file", "2=A"), "name the same PIN file"),
        (("--officer-pin-file", "1=A", "--officer-pin-file", "3=B"), "officers 1..2"),
        (("--officer-pin-file", "1=A", "--officer-pin-file", "1=B"), "officer 1 twice"),
        (("--officer-pin-file", "one=A"), "takes N=PATH"),
        (("--officer-pin-file", "1=SHORT", "--officer-pin-file", "2=B"), "must be 4-255 bytes"),
        (("--officer-pin-file", "1=SAME", "--officer-pin-file", "2=SAME2"), "have the same PIN"),
        (("--officer-pin-file", "1=A", "--officer-pin-file", "2=NODIR/x/pin"), "cannot be created"),
        (("--officer-pin-file", "1=OPEN", "--officer-pin-file", "2=B"), "has mode 0644"),
    ],
)
def test_init_refuses_officer_pins_it_cannot_keep_apart(
    tmp_path: Path, args: tuple[str, ...], match: str
) -> None:
    """No PIN source (and no terminal), a PIN file inside the OEM's directory, one file for
    two officers, a bad PIN: one line, exit 2, nothing made (no directory, no PIN file)."""
    for name, text in (("SHORT", "abc"), ("SAME", "same-pin-1234"), ("SAME2", "same-pin-1234"),
                       ("OPEN", "readable-by-all")):  # fmt: skip
        (tmp_path / name).write_text(text + "\n")
        (tmp_path / name).chmod(0o644 if name == "OPEN" else 0o600)
    (tmp_path / "NODIR").write_text("a file, not a directory\n")
    oem = tmp_path / "oem"
    subst = {"INSIDE": str(oem / "officer-1.pin")}
    real = [
        a if "=" not in a else a.split("=")[0] + "=" + subst.get(
            a.split("=", 1)[1], str(tmp_path / a.split("=", 1)[1])
        )
        for a in args
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run("oem", "init", "--workdir", str(oem), "--name", "acme", *real)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert len(lines) == 1 and match.lower() in lines[0].lower(), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no oem/, no A or B


# --- issue-job: the OEM alone -------------------------------------------------------------------


def test_the_oem_pin_alone_cannot_issue_a_job(world: dict[str, Any]) -> None:
    """issue-job with the OEM's PIN prepares a draft and shows what to approve; issuing it
    without approvals is refused, and no package leaves."""
    draft = prepare(world, "alone")
    assert draft["approvals"] == [] and draft["threshold"] == THRESHOLD
    summary = "\n".join(draft["summary"])
    assert "job alone for programmer f-1" in summary and draft["job_sha256"] in summary
    assert (world["oem"] / "jobs/alone/draft.bin").is_file()
    assert not (world["oem"] / "jobs/alone/job.bin").exists()
    refused(world, EXIT_CONFIG, *issue(world, "alone"),
            match="needs the approval of 2 officers, has 0")  # fmt: skip
    assert not (world["oem"] / "outbox/job-alone.bin").exists()


def test_approving_as_an_officer_needs_that_officers_pin(world: dict[str, Any]) -> None:
    """Officer 2's token opens with officer 2's PIN only: officer 1's PIN or the OEM's fails
    at login (exit 3, nothing written); a PIN file others can read is refused; the OEM's pins
    file is never read for it, even when it holds officer 2's PIN."""
    prepare(world, "login")
    wrong = world["tmp"] / "wrong-pin"
    for pin in (_officer_pins(world)[1], _oem_pin(world)):
        wrong.write_text(pin + "\n")
        wrong.chmod(0o600)
        refused(world, EXIT_TOKEN, *approve(world, "login", 2, "--pin-file", str(wrong)),
                match="rejected the user PIN")  # fmt: skip
    open_file = world["tmp"] / "open-pin"
    open_file.write_text(_officer_pins(world)[2] + "\n")
    open_file.chmod(0o644)  # officer 2's PIN, but readable by every user of the host
    refused(world, EXIT_CONFIG, *approve(world, "login", 2, "--pin-file", str(open_file)),
            match="has mode 0644")  # fmt: skip
    env = dict(child_env(), SECURETHREAD_PIN_OFFICER_2=_oem_pin(world))
    refused(world, EXIT_TOKEN, *approve(world, "login", 2), match="rejected the user PIN", env=env)
    pins = world["oem"] / "pins"
    saved = pins.read_bytes()
    pins.write_bytes(saved + f"officer-2={_officer_pins(world)[2]}\n".encode())
    try:
        refused(world, EXIT_CONFIG, *approve(world, "login", 2), match="no PIN for officer 2")
    finally:
        pins.write_bytes(saved)
    assert not (world["oem"] / "jobs/login/approvals").exists()


def test_one_officer_approving_alone_does_not_issue_the_job(world: dict[str, Any]) -> None:
    prepare(world, "one")
    done = ok(*approve(world, "one", 1, "--pin-file", str(pin_file(world, 1))))
    assert done["approvals"] == [1] and done["ready"] is False
    refused(world, EXIT_CONFIG, *issue(world, "one"), match="has 1 (officer 1)")
    assert not (world["oem"] / "outbox/job-one.bin").exists()


def test_two_officers_in_separate_processes_issue_the_job(world: dict[str, Any]) -> None:
    """Officers 1 and 3 (officer 3 with the PIN they chose, given through their own
    environment) approve in their own processes; the OEM issues; the programmer opens it."""
    draft = prepare(world, "two")
    ok(*approve(world, "two", 1, "--pin-file", str(pin_file(world, 1)), "--job-hash",
                draft["job_sha256"]))  # fmt: skip
    env = dict(child_env(), SECURETHREAD_PIN_OFFICER_3_FILE=str(pin_file(world, 3)))
    assert ok(*approve(world, "two", 3), env=env)["ready"] is True
    issued = ok(*issue(world, "two"))
    assert issued["approvals"] == [1, 3] and issued["job_sha256"] == draft["job_sha256"]
    signed = (world["oem"] / "jobs/two/job.bin").read_bytes()
    root = from_pem((world["oem"] / "root-ca.pem").read_bytes())
    bundle = OfficerBundle.open((world["oem"] / "officers.bin").read_bytes(), root.public_key())  # type: ignore[arg-type]
    verified = verify_job_signatures(signed, officers=bundle.public_keys(), min_threshold=THRESHOLD)
    keys = [fingerprint(load_spki(k)) for k in bundle.keys]
    assert set(verified.signers) == {keys[0], keys[2]}
    assert job_hash(signed).hex() == draft["job_sha256"]
    ok("programmer", "open-job", "--workdir", str(world["factory"]),
       str(world["oem"] / "outbox/job-two.bin"), "--image",
       str(world["oem"] / "outbox/image-fw.enc"))  # fmt: skip


def test_an_officer_approves_once(world: dict[str, Any]) -> None:
    """A second approval by one officer is refused; one officer's approval filed as another's
    is refused at issue; the issued job carries one signature per officer."""
    prepare(world, "twice")
    ok(*approve(world, "twice", 1, "--pin-file", str(pin_file(world, 1))))
    refused(world, EXIT_CONFIG, *approve(world, "twice", 1, "--pin-file", str(pin_file(world, 1))),
            match="officer 1 approved job 'twice' already")  # fmt: skip
    approvals = world["oem"] / "jobs/twice/approvals"
    shutil.copyfile(approvals / "officer-1.bin", approvals / "officer-2.bin")
    refused(world, EXIT_VERIFY, *issue(world, "twice"), match="approval is not officer 2's")
    refused(world, EXIT_VERIFY, *approve(world, "twice", 3, "--pin-file", str(pin_file(world, 3))),
            match="approval is not officer 2's")  # fmt: skip
    (approvals / "officer-2.bin").unlink()
    ok(*approve(world, "twice", 2, "--pin-file", str(pin_file(world, 2))))
    ok(*issue(world, "twice"))
    signed = (world["oem"] / "jobs/twice/job.bin").read_bytes()
    signers = envelope.parse_message(signed, kind="job").kids
    assert len(signers) == len(set(signers)) == 2


def test_a_draft_altered_after_an_approval_is_refused(world: dict[str, Any]) -> None:
    """The draft changed after officer 1 approved it (a larger quota): officer 2's approval
    and the issue are refused, and an officer given the job hash refuses any other draft."""
    original = prepare(world, "altered")
    ok(*approve(world, "altered", 1, "--pin-file", str(pin_file(world, 1))))
    draft = world["oem"] / "jobs/altered/draft.bin"
    saved = draft.read_bytes()
    body = cbor.decode(saved)
    body["quota"] = 3000
    ProductionJob.from_obj(body)  # a well-formed job, only not the one prepared
    draft.write_bytes(cbor.encode(body))
    try:
        refused(world, EXIT_VERIFY,
                *approve(world, "altered", 2, "--pin-file", str(pin_file(world, 2))),
                match="is not the one the OEM prepared")  # fmt: skip
        refused(world, EXIT_VERIFY, *issue(world, "altered"), match="not the one the OEM prepared")
    finally:
        draft.write_bytes(saved)
    refused(world, EXIT_VERIFY,
            *approve(world, "altered", 2, "--pin-file", str(pin_file(world, 2)), "--job-hash",
                     "ab" * 32), match="not the job hash you were given")  # fmt: skip
    ok(*approve(world, "altered", 2, "--pin-file", str(pin_file(world, 2)), "--job-hash",
                original["job_sha256"]))  # fmt: skip
    assert ok(*issue(world, "altered"))["quota"] == 3


def test_preparing_a_job_again_changes_nothing(world: dict[str, Any]) -> None:
    """The same spec again shows the draft awaiting approval (nothing re-certified, the
    approvals kept); another spec under the job id is refused."""
    first = prepare(world, "again")
    ok(*approve(world, "again", 3, "--pin-file", str(pin_file(world, 3))))
    spec = world["tmp"] / "again.toml"
    req = world["factory"] / "outbox/production-ca-request-again.bin"
    before = _state(world["oem"])
    second = ok("oem", "issue-job", "--workdir", str(world["oem"]), str(spec), "--ca-request",
                str(req))  # fmt: skip
    assert second["job_sha256"] == first["job_sha256"] and second["approvals"] == [3]
    assert second["written"] == [] and _state(world["oem"]) == before
    other = world["tmp"] / "again-2.toml"
    other.write_text(spec.read_text().replace("quota = 3", "quota = 2"))
    refused(world, EXIT_VERIFY, "oem", "issue-job", "--workdir", str(world["oem"]), str(other),
            "--ca-request", str(req), match="already used")  # fmt: skip


# --- an officer at the terminal -------------------------------------------------------------------


def _on_a_terminal(args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run the command with a pseudo-terminal as its controlling terminal, typing each answer
    when a prompt ending in ': ' appears; its exit code and everything it showed."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal (stdin, stdout, stderr, /dev/tty)
        os.execve(sys.executable, [sys.executable, "-m", "securethread.cli", *args], child_env())
    shown, pending, answered = b"", list(answers), 0
    while True:
        ready, _, _ = select.select([fd], [], [], 120)
        assert ready, shown.decode(errors="replace")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
        # A new prompt (getpass turns echo off before it writes one): answer it once.
        if pending and shown[answered:].rstrip().endswith(b":"):
            os.write(fd, pending.pop(0).encode() + b"\n")
            answered = len(shown)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_officers_type_their_pins_on_a_terminal(tmp_path: Path) -> None:
    """Without PIN files, init on a terminal asks each officer for their PIN, twice, echoing
    nothing; the PINs log in to the officers' tokens and appear in no file.  Two entries that
    differ: refused, nothing made."""
    oem = tmp_path / "oem"
    code, shown = _on_a_terminal(
        ["oem", "init", "--workdir", str(oem), "--name", "acme"],
        ["typed-by-one", "typed-by-one", "typed-by-two", "typed-by-TWO"],
    )
    assert code == EXIT_CONFIG and "officer 2's two PIN entries differ" in shown, shown
    assert not oem.exists()
    pins = ["typed-by-one", "typed-by-two"]
    code, shown = _on_a_terminal(
        ["oem", "init", "--workdir", str(oem), "--name", "acme"], [p for p in pins for _ in "12"]
    )
    assert code == 0, shown
    assert "choose the PIN of your token officer-1" in shown and "typed by the officer" in shown
    assert not any(p in shown for p in pins)  # nothing echoed
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert not any(p.encode() in path.read_bytes() for p in pins), path
    login = (
        "import sys\nfrom securethread.workdir import PartyDir\n"
        "w = PartyDir.open(sys.argv[1], 'oem')\n"
        "for n, pin in ((1, sys.argv[2]), (2, sys.argv[3])):\n"
        "    w.open_token(f'officer-{n}', lambda _l, pin=pin: pin).private_key('job-signing')\n"
        "print('logged in')\n"
    )
    proc = subprocess.run([sys.executable, "-c", login, str(oem), *pins], capture_output=True,
                          text=True, env=child_env(), timeout=120)  # fmt: skip
    assert proc.stdout.strip() == "logged in", proc.stderr


def test_an_officer_sees_the_job_before_typing_their_pin(world: dict[str, Any]) -> None:
    """approve-job on a terminal with no PIN source shows the job, then asks for the PIN."""
    draft = prepare(world, "typed")
    code, shown = _on_a_terminal(approve(world, "typed", 2), [_officer_pins(world)[2]])
    assert code == 0, shown
    prompt = shown.index("PIN of officer 2 (token 'officer-2') to approve:")
    assert 0 <= shown.index(f"job hash (what the officers sign): {draft['job_sha256']}") < prompt
    assert _officer_pins(world)[2] not in shown
    assert (world["oem"] / "jobs/typed/approvals/officer-2.bin").is_file()
