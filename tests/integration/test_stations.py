"""The station API over real gRPC with mutual TLS on 127.0.0.1, the station server in a
process of its own on a real SoftHSM token, stations as separate processes (``securethread
station run``) or, for the message-level bad input, as a gRPC client in this process.

Every refusal is one gRPC status with one line, and changes no count; the store (quota and
ledger) says afterwards that nothing was counted twice or lost: a job shared by two station
processes reaches exactly its quota, a station that vanishes mid-device strands nothing, and
a SIGKILL of the serving process mid-run loses no device and counts none twice.
"""

from __future__ import annotations

import datetime
import io
import json
import queue
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.demo.line import SimulatedFab
from securethread.proto import station_pb2 as pb
from securethread.proto import station_pb2_grpc as pb_grpc
from securethread.station.client import SERVER_NAME
from tests.integration.station_world import (
    CLI,
    FIRST_UID,
    ServerProcess,
    add_station,
    build_sites,
    cli,
    last_json,
    station_args,
)

TTL = 3  # seconds a challenge lives on the test server
EXIT_OS, EXIT_VERIFY, EXIT_QUOTA = 1, 4, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Jobs ``j`` (quota 300), ``q`` (quota 40, shared by two stations), ``k`` (the
    kill test's own server), ``m`` and ``n`` (quotas 12 and 9, run at once), ``x`` and
    ``y`` (quota 5, the unanswered-challenge test's own server); stations s1, s2 and s3
    certified; one server process."""
    tmp = tmp_path_factory.mktemp("stations")
    sites = build_sites(tmp, {"j": (300, 1000), "q": (40, 200), "k": (200, 400),
                              "m": (12, 100), "n": (9, 100), "x": (5, 10),
                              "y": (5, 10)})  # fmt: skip
    files = {n: add_station(sites, n) for n in ("s1", "s2", "s3")}
    server = ServerProcess(sites["factory"], "--challenge-ttl", str(TTL))
    try:
        yield {**sites, "files": files, "server": server}
    finally:
        if server.proc.poll() is None:
            server.kill()


def _channel(files: dict[str, str], target: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(files["ca"]).read_bytes(),
        private_key=Path(files["key"]).read_bytes(),
        certificate_chain=Path(files["cert"]).read_bytes(),
    )
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override",
                                                        SERVER_NAME)])  # fmt: skip


def _stub(world: dict[str, Any], station: str = "s1") -> pb_grpc.StationServiceStub:
    return pb_grpc.StationServiceStub(_channel(world["files"][station], world["server"].target))


def _refused(call: Any, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    assert err.code() == code, (err.code(), err.details())
    text = str(err.details())
    assert "\n" not in text and all(w in text for w in words), text
    return text


def _counts(factory: Path, job: str) -> dict[str, int]:
    db = sqlite3.connect(f"{(factory / 'jobs' / job / 'store.sqlite').as_uri()}?mode=ro",
                         uri=True)  # fmt: skip
    try:
        out = {"provisioned": 0, "programmed": 0}  # a test run alone finds none yet
        out.update(db.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind"))
        out["distinct_provisioned"] = db.execute(
            "SELECT COUNT(DISTINCT device_id) FROM records WHERE kind = 'provisioned'"
        ).fetchone()[0]
        out["reserved"], out["burned"] = db.execute("SELECT reserved, burned FROM jobs").fetchone()
        out["releases"] = db.execute("SELECT COUNT(*) FROM releases").fetchone()[0]
        return out
    finally:
        db.close()


def _chip(world: dict[str, Any], n: int) -> Any:
    return SimulatedFab(world["vendor"]).chip(FIRST_UID + n).open()


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- a station through the whole flow ---------------------------------------------------------


def test_a_station_programs_its_chips_and_a_rerun_says_they_were_done(
    world: dict[str, Any],
) -> None:
    args = station_args(world["files"]["s1"], world["server"].target, "j", devices=20, first=0,
                        chips=world["vendor"])  # fmt: skip
    r = last_json(cli(*args))
    assert (r["provisioned"], r["programmed"], r["already_done"], r["refused"]) == (20, 20, 0, {})
    assert r["p50_ms"] is not None and r["p99_ms"] >= r["p50_ms"]
    again = cli(*[a for a in args if a != "--json"])
    assert "20 already provisioned and programmed (a resumed run)" in again.stdout
    c = _counts(world["factory"], "j")
    assert c["provisioned"] == c["programmed"] == c["distinct_provisioned"] == 20


def test_challenges_asked_ahead_are_one_per_chip_to_come_and_fresh(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A station asks for the next chip's challenge while the chip in hand programs: one per
    chip still to come (every challenge it asked for is answered, none left over holding the
    job open), and one with less than half its lifetime left is replaced by a fresh one."""
    from securethread.station import SimulatedChips, StationCredentials, run_station
    from securethread.station.client import ApplianceClient, StationCallError

    asked: list[str] = []
    made: list[ApplianceClient] = []
    real_ask, real_init = ApplianceClient.ask_ahead, ApplianceClient.__init__

    def ask(self: ApplianceClient, job_id: str) -> None:
        asked.append(job_id)
        real_ask(self, job_id)

    def init(self: ApplianceClient, *a: Any) -> None:
        real_init(self, *a)
        made.append(self)

    monkeypatch.setattr(ApplianceClient, "ask_ahead", ask)
    monkeypatch.setattr(ApplianceClient, "__init__", init)
    f = world["files"]["s1"]
    creds = StationCredentials.from_files(cert=f["cert"], key=f["key"], ca=f["ca"])
    chips = SimulatedChips(SimulatedFab(world["vendor"]), range(FIRST_UID + 700, FIRST_UID + 712))
    before = _counts(world["factory"], "j")
    r = run_station(creds, [world["server"].target], job_id="j", chips=chips, parallel=3)
    assert (r.provisioned, r.programmed, r.refused) == (12, 12, {})
    # 12 chips: the first of each of the 3 sockets asks at once, at most the 9 others
    # ahead; each asked ahead was taken by a chip
    assert 1 <= len(asked) <= 9 and made and made[0].ahead("j") == 0
    after = _counts(world["factory"], "j")
    assert after["provisioned"] - before["provisioned"] == 12 == after["programmed"] - before[
        "programmed"]  # fmt: skip

    client = ApplianceClient(world["server"].target, creds)
    try:
        stream = client._stream()
        client.ask_ahead("j")
        assert client.ahead("j") == 1
        time.sleep(TTL / 2 + 0.2)  # past half its lifetime: not handed to a chip
        fresh = client._challenge(stream, "j")
        # the stale one was read and dropped, a second asked: the fresh one is its answer
        assert stream._sent == 2 and client.ahead("j") == 0 and len(fresh.challenge) == 32
        client.ask_ahead("no-such-job")  # an ahead call that failed: the fresh one's error
        with pytest.raises(StationCallError, match="refused Challenge"):
            client._challenge(stream, "no-such-job")
    finally:
        client.close()


# --- who may call ------------------------------------------------------------------------------


def _self_signed(tmp: Path, name: str) -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    return {"cert": str(tmp / "cert.pem"), "key": str(tmp / "key.pem")}


def test_a_station_without_a_certificate_of_this_appliance_is_refused(
    world: dict[str, Any], tmp_path: Path
) -> None:
    before = _counts(world["factory"], "j")

    def run(files: dict[str, str]) -> str:
        proc = cli(*station_args(files, world["server"].target, "j", devices=2, first=900,
                                 chips=world["vendor"]), ok=False)  # fmt: skip
        assert proc.returncode == EXIT_VERIFY, proc.stderr
        return _one_line(proc.stderr)

    (tmp_path / "self").mkdir()
    forged = {**_self_signed(tmp_path / "self", "s1"), "ca": world["files"]["s1"]["ca"]}
    assert "not issued by the station CA" in run(forged)
    mixed = {**world["files"]["s1"], "key": world["files"]["s2"]["key"]}
    assert "not the key of the certificate" in run(mixed)
    # a CA of its own, trusted by the station: the appliance's certificate is not under it
    # and the appliance does not know the station's: the handshake fails at both ends
    (tmp_path / "ca").mkdir()
    own = _self_signed(tmp_path / "ca", "s1")
    assert "TLS handshake failed" in run({**own, "ca": own["cert"]})
    assert _counts(world["factory"], "j") == before


def test_a_removed_station_is_refused_on_its_live_connection(world: dict[str, Any]) -> None:
    stub = _stub(world, "s3")
    assert len(stub.Challenge(pb.ChallengeRequest(job_id="j")).challenge) == 32
    cli("programmer", "remove-station", "--workdir", str(world["factory"]), "--name", "s3")
    _refused(lambda: stub.Challenge(pb.ChallengeRequest(job_id="j")),
             grpc.StatusCode.PERMISSION_DENIED, "not (or no longer) allowed")  # fmt: skip
    # and as a process: one line, exit 4
    proc = cli(*station_args(world["files"]["s3"], world["server"].target, "j", devices=1,
                             first=901, chips=world["vendor"]), ok=False)  # fmt: skip
    assert proc.returncode == EXIT_VERIFY and "PERMISSION_DENIED" not in proc.stdout
    assert "no longer) allowed" in _one_line(proc.stderr)
    again = cli("programmer", "remove-station", "--workdir", str(world["factory"]), "--name",
                "s3", ok=False)  # fmt: skip
    assert again.returncode == 2 and "withdrawn already" in _one_line(again.stderr)


def test_add_and_remove_station_are_in_the_appliance_transcript(world: dict[str, Any]) -> None:
    """Who may call is the appliance's decision: each certificate issued to a station and
    each withdrawal is a signed record of its transcript, next to the registry's entry."""
    from securethread.formats.onboarding import EnrolmentRequest
    from securethread.formats.transcript import verify_transcript

    fac = world["factory"]
    request = EnrolmentRequest.open((fac / "outbox" / "enrolment-request.bin").read_bytes())
    records = verify_transcript(fac / "transcript.bin", public_key=request.identity_key()).records
    registry = json.loads((fac / "stations" / "stations.json").read_text())
    added = {dict(r.details)["station"]: r for r in records if r.operation == "station-added"}
    assert set(added) == set(registry) >= {"s1", "s2", "s3"}
    for name, record in added.items():
        assert [c.fingerprint.hex() for c in record.certificates] == [registry[name]["sha256"]]
    removed = [r for r in records if r.operation == "station-removed"]
    assert [dict(r.details)["station"] for r in removed] == ["s3"]  # removed by the test above
    assert dict(removed[0].artefacts)["certificate"].hex() == registry["s3"]["sha256"]


def test_add_station_refuses_a_bad_request_and_a_taken_name(
    world: dict[str, Any], tmp_path: Path
) -> None:
    csr = Path(world["tmp"] / "stations" / "s1" / "csr.pem")
    taken = cli("programmer", "add-station", "--workdir", str(world["factory"]), str(csr),
                "--name", "s1", ok=False)  # fmt: skip
    assert taken.returncode == 2 and "already certified" in _one_line(taken.stderr)
    bad = tmp_path / "bad.csr"
    bad.write_bytes(csr.read_bytes().replace(b"A", b"B", 3))
    proc = cli("programmer", "add-station", "--workdir", str(world["factory"]), str(bad),
               "--name", "s9", ok=False)  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    _one_line(proc.stderr)
    assert "s9" not in (world["factory"] / "stations" / "stations.json").read_text()


def test_add_station_refuses_a_key_certified_under_another_name(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """One key, one station: the key of k1 under a second name is refused while k1 is
    certified and after it is withdrawn (else remove-station k1 would leave the key let in
    as k2).  Each refusal is one line, exit 2, and leaves the station list as it was."""
    key, csr = tmp_path / "k.pem", tmp_path / "k.csr"
    cli("station", "keygen", "--name", "k1", "--key", str(key), "--csr", str(csr))
    fac = world["factory"]

    def add(name: str) -> subprocess.CompletedProcess[str]:
        return cli("programmer", "add-station", "--workdir", str(fac), str(csr), "--name", name,
                   ok=False)  # fmt: skip

    assert add("k1").returncode == 0
    for then in ("certified", "withdrawn"):
        listed = (fac / "stations" / "stations.json").read_bytes()
        proc = add(f"k2-{then}")
        assert proc.returncode == 2, proc.stderr
        assert f"this key was certified as station 'k1' ({then})" in _one_line(proc.stderr)
        assert (fac / "stations" / "stations.json").read_bytes() == listed
        if then == "certified":
            cli("programmer", "remove-station", "--workdir", str(fac), "--name", "k1")


# --- the chip's answer -------------------------------------------------------------------------


def test_answers_for_another_challenge_late_replayed_or_garbage_count_nothing(
    world: dict[str, Any],
) -> None:
    stub = _stub(world)
    before = _counts(world["factory"], "j")
    chip = _chip(world, 500)
    a = stub.Challenge(pb.ChallengeRequest(job_id="j"))
    b = stub.Challenge(pb.ChallengeRequest(job_id="j"))
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=a.session,
                                                        chip_answer=chip.identify(b.challenge))),
             grpc.StatusCode.INVALID_ARGUMENT, "challenge")  # fmt: skip
    # a session is answered once: the same request again is a replay
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=a.session,
                                                        chip_answer=chip.identify(a.challenge))),
             grpc.StatusCode.ALREADY_EXISTS, "replay")  # fmt: skip
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=b.session, chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=b"x" * 16, chip_answer=b"")),
             grpc.StatusCode.INVALID_ARGUMENT, "unknown session")  # fmt: skip
    late = stub.Challenge(pb.ChallengeRequest(job_id="j"))
    time.sleep(TTL + 0.5)
    _refused(lambda: stub.Provision(pb.ProvisionRequest(
        session=late.session, chip_answer=chip.identify(late.challenge))),
        grpc.StatusCode.DEADLINE_EXCEEDED, "expired")  # fmt: skip
    # another station's session
    c = stub.Challenge(pb.ChallengeRequest(job_id="j"))
    _refused(lambda: _stub(world, "s2").Provision(pb.ProvisionRequest(
        session=c.session, chip_answer=chip.identify(c.challenge))),
        grpc.StatusCode.PERMISSION_DENIED, "another station")  # fmt: skip
    for job, code in (("nope", grpc.StatusCode.FAILED_PRECONDITION),
                      ("../j", grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
        _refused(lambda job=job: stub.Challenge(pb.ChallengeRequest(job_id=job)), code)
    assert _counts(world["factory"], "j") == before
    # a Confirm that does not verify: refused, nothing recorded as programmed
    d = stub.Challenge(pb.ChallengeRequest(job_id="j"))
    prov = stub.Provision(pb.ProvisionRequest(session=d.session,
                                              chip_answer=chip.identify(d.challenge)))
    assert prov.state == pb.ProvisionResponse.PROVISIONED
    _refused(lambda: stub.Confirm(pb.ConfirmRequest(session=d.session, boot=b"\x00" * 80)),
             grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    after = _counts(world["factory"], "j")
    assert after["provisioned"] == before["provisioned"] + 1
    assert after["programmed"] == before["programmed"]


def test_a_station_that_disconnects_after_each_message_strands_nothing(
    world: dict[str, Any],
) -> None:
    """Each message on a fresh connection, closed at once; the station vanishes after
    Provision: the chip's next Provision (a new challenge) is RECOVERED -- the same
    certificate and license, no second count -- and its Confirm is recorded."""
    files, target = world["files"]["s2"], world["server"].target
    chip = _chip(world, 510)
    before = _counts(world["factory"], "j")

    def once(method: str, request: Any) -> Any:
        channel = _channel(files, target)
        try:
            return getattr(pb_grpc.StationServiceStub(channel), method)(request)
        finally:
            channel.close()

    ch = once("Challenge", pb.ChallengeRequest(job_id="j"))
    first = once("Provision", pb.ProvisionRequest(session=ch.session,
                                                  chip_answer=chip.identify(ch.challenge)))
    assert first.state == pb.ProvisionResponse.PROVISIONED
    # the station vanished here; the same chip comes back
    ch2 = once("Challenge", pb.ChallengeRequest(job_id="j"))
    again = once("Provision", pb.ProvisionRequest(session=ch2.session,
                                                  chip_answer=chip.identify(ch2.challenge)))
    assert again.state == pb.ProvisionResponse.RECOVERED
    assert (again.certificate, again.license) == (first.certificate, first.license)
    chip.provision(again.provisioning_data)
    image = b"".join(c.data for c in _stub(world, "s2").GetImage(pb.ImageRequest(job_id="j")))
    import io

    boot = chip.program(again.manifest, io.BytesIO(image), again.license, again.boot_nonce)
    assert once("Confirm", pb.ConfirmRequest(session=ch2.session, boot=boot)).programmed
    assert not once("Confirm", pb.ConfirmRequest(session=ch2.session, boot=boot)).programmed
    after = _counts(world["factory"], "j")
    assert after["provisioned"] == before["provisioned"] + 1
    assert after["programmed"] == before["programmed"] + 1


# --- the Socket stream ---------------------------------------------------------------------------


class _Sock:
    """A raw ``Socket`` stream of one station: ``send`` writes a request, ``answer`` reads
    the next answer (answers come in the order the requests were written)."""

    def __init__(self, files: dict[str, str], target: str) -> None:
        self._out: queue.SimpleQueue[pb.SocketRequest | None] = queue.SimpleQueue()
        self.call: Any = pb_grpc.StationServiceStub(_channel(files, target)).Socket(
            iter(self._out.get, None))  # fmt: skip

    def send(self, request: pb.SocketRequest | None = None, **call: Any) -> None:
        self._out.put(request if request is not None else pb.SocketRequest(**call))

    def answer(self) -> pb.SocketResponse:
        out: pb.SocketResponse = next(self.call)
        return out

    def ask(self, request: pb.SocketRequest | None = None, **call: Any) -> pb.SocketResponse:
        self.send(request, **call)
        return self.answer()

    def end(self) -> None:
        """Close the stream and read its end: the server's handler has returned (and
        forgotten the challenges this stream left unanswered) when this returns."""
        self._out.put(None)
        with pytest.raises(StopIteration):
            self.answer()


def _socket(world: dict[str, Any], station: str = "s1") -> _Sock:
    return _Sock(world["files"][station], world["server"].target)


def _refusal(answer: pb.SocketResponse, code: grpc.StatusCode, *words: str) -> str:
    """``answer`` is a Refusal with ``code`` (the unary call's status) and one line naming
    ``words``."""
    assert answer.WhichOneof("answer") == "refusal", answer
    text = answer.refusal.message
    assert answer.refusal.code == code.value[0], (answer.refusal.code, text)
    assert text and "\n" not in text and all(w in text for w in words), text
    return text


def _image(world: dict[str, Any]) -> bytes:
    """The job j's encrypted image, fetched once for these tests (GetImage is bounded per
    station)."""
    if "image_j" not in world:
        world["image_j"] = b"".join(
            c.data for c in _stub(world).GetImage(pb.ImageRequest(job_id="j")))  # fmt: skip
    image: bytes = world["image_j"]
    return image


def _challenge(sock: _Sock, job: str = "j") -> pb.ChallengeResponse:
    answer = sock.ask(challenge=pb.ChallengeRequest(job_id=job))
    assert answer.WhichOneof("answer") == "challenge", answer
    return answer.challenge


def _provision(sock: _Sock, ch: pb.ChallengeResponse, chip: Any) -> pb.ProvisionResponse:
    answer = sock.ask(provision=pb.ProvisionRequest(session=ch.session,
                                                    chip_answer=chip.identify(ch.challenge)))
    assert answer.WhichOneof("answer") == "provision", answer
    return answer.provision


def _boot(world: dict[str, Any], chip: Any, prov: pb.ProvisionResponse) -> bytes:
    """The chip takes what Provision released and programs the image: its boot confirmation."""
    chip.provision(prov.provisioning_data)
    boot: bytes = chip.program(prov.manifest, io.BytesIO(_image(world)), prov.license,
                               prov.boot_nonce)  # fmt: skip
    return boot


def _grew(before: dict[str, int], after: dict[str, int], **by: int) -> None:
    """The store counts grew by exactly ``by`` (the others not at all)."""
    keys = ("provisioned", "programmed", "distinct_provisioned", "releases")
    assert {k: after.get(k, 0) - before.get(k, 0) for k in keys} == {
        k: by.get(k, 0) for k in keys}, (before, after)  # fmt: skip


def test_one_chip_through_the_stream_is_provisioned_programmed_and_counted_once(
    world: dict[str, Any],
) -> None:
    """Challenge -> the chip's answer -> Provision -> the chip programs -> Confirm, as
    messages of one stream: PROVISIONED with the chip's device id, then programmed; a
    retried Confirm says 'recorded before'; the store counts the device once."""
    before = _counts(world["factory"], "j")
    chip = _chip(world, 521)
    sock = _socket(world)
    ch = _challenge(sock)
    assert len(ch.session) == 16 and len(ch.challenge) == 32 and ch.expires_in_s == TTL
    prov = _provision(sock, ch, chip)
    assert prov.state == pb.ProvisionResponse.PROVISIONED
    assert prov.device_id == f"{FIRST_UID + 521:016x}", prov.device_id
    assert x509.load_der_x509_certificate(prov.certificate) and len(prov.boot_nonce) == 16
    boot = _boot(world, chip, prov)
    confirm = pb.SocketRequest(confirm=pb.ConfirmRequest(session=ch.session, boot=boot))
    assert sock.ask(confirm).confirm.programmed is True
    again = sock.ask(confirm)
    assert again.WhichOneof("answer") == "confirm" and again.confirm.programmed is False
    sock.end()
    _grew(before, _counts(world["factory"], "j"), provisioned=1, programmed=1,
          distinct_provisioned=1)  # fmt: skip


def test_a_replayed_answer_on_the_stream_is_refused_and_the_stream_goes_on(
    world: dict[str, Any],
) -> None:
    """The same ProvisionRequest twice (written back to back): the first is PROVISIONED,
    the second a Refusal ALREADY_EXISTS naming the replay, counting nothing; the stream
    then still hands out a challenge and records the device's Confirm."""
    before = _counts(world["factory"], "j")
    chip = _chip(world, 520)
    sock = _socket(world)
    ch = _challenge(sock)
    request = pb.SocketRequest(provision=pb.ProvisionRequest(
        session=ch.session, chip_answer=chip.identify(ch.challenge)))  # fmt: skip
    sock.send(request)
    sock.send(request)
    first = sock.answer()
    assert first.provision.state == pb.ProvisionResponse.PROVISIONED, first
    _refusal(sock.answer(), grpc.StatusCode.ALREADY_EXISTS, "replay")
    assert len(_challenge(sock).challenge) == 32  # the stream goes on after a refusal
    boot = _boot(world, chip, first.provision)
    assert sock.ask(confirm=pb.ConfirmRequest(session=ch.session, boot=boot)).confirm.programmed
    sock.end()
    _grew(before, _counts(world["factory"], "j"), provisioned=1, programmed=1,
          distinct_provisioned=1)  # fmt: skip


def test_bad_requests_on_the_stream_are_refusals_that_count_nothing(
    world: dict[str, Any],
) -> None:
    """Each bad request on one stream is answered with a Refusal carrying the unary call's
    status and one line, and the next request is still served: an answer to another
    session's challenge, an unknown session, garbage, a request with no call, a Confirm of
    a session never provisioned, a bad job id, and (last) an answer after the challenge
    expired.  Nothing is counted."""
    before = _counts(world["factory"], "j")
    chip = _chip(world, 530)
    sock = _socket(world)
    late = _challenge(sock)  # answered last, after it expired
    asked_late = time.monotonic()
    a, b = _challenge(sock), _challenge(sock)
    _refusal(sock.ask(provision=pb.ProvisionRequest(session=a.session,
                                                    chip_answer=chip.identify(b.challenge))),
             grpc.StatusCode.INVALID_ARGUMENT, "challenge")  # fmt: skip
    _refusal(sock.ask(provision=pb.ProvisionRequest(session=b"x" * 16,
                                                    chip_answer=chip.identify(b.challenge))),
             grpc.StatusCode.INVALID_ARGUMENT, "unknown session")  # fmt: skip
    _refusal(sock.ask(provision=pb.ProvisionRequest(session=b.session, chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT, "identification")  # fmt: skip
    _refusal(sock.ask(pb.SocketRequest()), grpc.StatusCode.INVALID_ARGUMENT,
             "must carry a challenge, provision or confirm")  # fmt: skip
    c = _challenge(sock)
    _refusal(sock.ask(confirm=pb.ConfirmRequest(session=c.session, boot=b"\x00" * 80)),
             grpc.StatusCode.FAILED_PRECONDITION, "nothing was provisioned")  # fmt: skip
    _refusal(sock.ask(confirm=pb.ConfirmRequest(session=b"y" * 16, boot=b"")),
             grpc.StatusCode.INVALID_ARGUMENT, "unknown session")  # fmt: skip
    _refusal(sock.ask(challenge=pb.ChallengeRequest(job_id="nope")),
             grpc.StatusCode.FAILED_PRECONDITION, "job nope")  # fmt: skip
    _refusal(sock.ask(challenge=pb.ChallengeRequest(job_id="../j")),
             grpc.StatusCode.INVALID_ARGUMENT, "job id")  # fmt: skip
    time.sleep(max(0.0, asked_late + TTL + 0.5 - time.monotonic()))
    _refusal(sock.ask(provision=pb.ProvisionRequest(session=late.session,
                                                    chip_answer=chip.identify(late.challenge))),
             grpc.StatusCode.DEADLINE_EXCEEDED, "expired")  # fmt: skip
    assert len(_challenge(sock).challenge) == 32
    sock.end()
    assert _counts(world["factory"], "j") == before


def test_a_challenge_refused_as_too_large_on_a_stream_dies_with_the_stream(
    world: dict[str, Any],
) -> None:
    """A Provision refused before its challenge was used (the answer is too large) leaves
    the challenge unanswered: when the stream ends it must be forgotten like the stream's
    other unanswered challenges (station.proto, rpc Socket), so it cannot be answered later
    on another connection nor hold the job until it expires."""
    before = _counts(world["factory"], "j")
    sock = _socket(world)
    ch = _challenge(sock)
    _refusal(sock.ask(provision=pb.ProvisionRequest(session=ch.session,
                                                    chip_answer=b"\x00" * ((16 << 10) + 1))),
             grpc.StatusCode.INVALID_ARGUMENT, "too large")  # fmt: skip
    sock.end()
    _refused(lambda: _stub(world).Provision(pb.ProvisionRequest(session=ch.session,
                                                                chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT, "unknown session")  # fmt: skip
    assert _counts(world["factory"], "j") == before


def test_the_appliance_reads_no_request_above_64_kib(world: dict[str, Any]) -> None:
    """gRPC reads a message whole before any check of the servicer (its default limit is
    4 MiB): a larger one is refused by gRPC itself, unary or on the stream (which ends), and
    counts nothing; the session it named can still be answered."""
    before = _counts(world["factory"], "j")
    stub = _stub(world)
    ch = stub.Challenge(pb.ChallengeRequest(job_id="j"))
    big = b"\x00" * (100 << 10)
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=ch.session, chip_answer=big)),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")  # fmt: skip
    sock = _socket(world)
    with pytest.raises(grpc.RpcError) as info:
        sock.ask(confirm=pb.ConfirmRequest(session=ch.session, boot=big))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=ch.session,
                                                        chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT, "identification")  # fmt: skip
    assert _counts(world["factory"], "j") == before


def test_a_chip_answer_the_appliance_would_refuse_for_its_size_is_that_chips_refusal(
    world: dict[str, Any],
) -> None:
    """A hostile chip's answer 17 KiB too long is refused at the station as that chip's
    (CHIP), never sent (above 64 KiB gRPC would end the stream with RESOURCE_EXHAUSTED, read
    on a Provision as the quota used up), and the run goes on with the next chip."""
    from securethread.station import SimulatedChips, StationCredentials, run_station

    class _Loud:
        def __init__(self, chip: Any) -> None:
            self._chip = chip

        def identify(self, challenge: bytes) -> bytes:
            return bytes(self._chip.identify(challenge)) + b"\x00" * (17 << 10)

    real = list(SimulatedChips(SimulatedFab(world["vendor"]), range(FIRST_UID + 730,
                                                                    FIRST_UID + 732)))
    chips = [(real[0][0], lambda: _Loud(real[0][1]())), real[1]]
    f = world["files"]["s1"]
    creds = StationCredentials.from_files(cert=f["cert"], key=f["key"], ca=f["ca"])
    before = _counts(world["factory"], "j")
    r = run_station(creds, [world["server"].target], job_id="j", chips=chips,  # type: ignore[arg-type]
                    parallel=1)  # fmt: skip
    assert (r.provisioned, r.refused, r.quota_exhausted) == (1, {"CHIP": 1}, False), r
    assert re.search(r"answer to its challenge is 18\d{3} bytes \(at most 16384\)",
                     r.notes[0]), r.notes  # a signature's DER length varies
    assert _counts(world["factory"], "j")["provisioned"] == before["provisioned"] + 1


def test_a_station_holds_at_most_16_streams_and_a_stream_64_unanswered_challenges(
    world: dict[str, Any],
) -> None:
    """Each open stream holds a server thread: a station's 17th is refused
    (RESOURCE_EXHAUSTED, one line) and, once one of its 16 ends, a new one is served.  One
    stream holds at most 64 challenges unanswered: the 65th is a Refusal (RESOURCE_EXHAUSTED)
    and the stream goes on; answering one makes room."""
    before = _counts(world["factory"], "j")
    world["files"]["s5"] = add_station(world, "s5")  # its own: no other test's streams count
    socks = [_socket(world, "s5") for _ in range(16)]
    for sock in socks:
        assert len(_challenge(sock).challenge) == 32
    extra = _socket(world, "s5")
    with pytest.raises(grpc.RpcError) as info:
        extra.ask(challenge=pb.ChallengeRequest(job_id="j"))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "16 socket streams open already" in err.details() and "\n" not in err.details()
    socks.pop().end()
    again = _socket(world, "s5")
    assert len(_challenge(again).challenge) == 32
    for sock in [*socks, again]:
        sock.end()

    sock = _socket(world, "s5")
    asked = [_challenge(sock) for _ in range(64)]
    _refusal(sock.ask(challenge=pb.ChallengeRequest(job_id="j")),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "64 challenges unanswered")  # fmt: skip
    _refusal(sock.ask(provision=pb.ProvisionRequest(session=asked[0].session,
                                                    chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT, "identification")  # fmt: skip
    assert len(_challenge(sock).challenge) == 32  # the answered one made room
    sock.end()
    assert _counts(world["factory"], "j") == before


def test_a_station_holds_at_most_256_unanswered_challenges_over_its_unary_calls(
    world: dict[str, Any],
) -> None:
    """Unary Challenge calls too: a station holding 256 challenges unanswered is refused the
    next (RESOURCE_EXHAUSTED, one line); answering one makes room.  (A station certified
    here; its challenges expire after the test server's TTL.)"""
    before = _counts(world["factory"], "j")
    files = add_station(world, "s6")
    stub = pb_grpc.StationServiceStub(_channel(files, world["server"].target))
    asked = [stub.Challenge(pb.ChallengeRequest(job_id="j")) for _ in range(256)]
    text = _refused(lambda: stub.Challenge(pb.ChallengeRequest(job_id="j")),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "256 challenges unanswered")  # fmt: skip
    assert "s6" in text
    _refused(lambda: stub.Provision(pb.ProvisionRequest(session=asked[0].session,
                                                        chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT, "identification")  # fmt: skip
    assert len(stub.Challenge(pb.ChallengeRequest(job_id="j")).challenge) == 32
    assert _counts(world["factory"], "j") == before


def test_station_run_parallel_is_bounded_by_what_an_appliance_serves(
    world: dict[str, Any],
) -> None:
    args = station_args(world["files"]["s1"], world["server"].target, "j", devices=1, first=0,
                        chips=world["vendor"], parallel=17)  # fmt: skip
    proc = cli(*args, ok=False)
    assert proc.returncode == 2, proc.stderr
    assert "--parallel must be 1 to 16" in _one_line(proc.stderr)


def test_station_run_refuses_a_bad_address_or_job_id_in_one_line_before_any_call(
    world: dict[str, Any],
) -> None:
    """Not each device's failure to connect (exit 4, a refusal per chip): one line, exit 2."""
    target = world["server"].target
    for appliance, job, says in (("", "j", "is not HOST:PORT"),
                                 ("127.0.0.1:notaport", "j", "is not HOST:PORT"),
                                 (f"{target},{target}", "j", "is not HOST:PORT"),
                                 (target, "", "job id must be")):  # fmt: skip
        args = station_args(world["files"]["s1"], appliance, job, devices=2, first=0,
                            chips=world["vendor"])  # fmt: skip
        proc = cli(*args, ok=False)
        assert proc.returncode == 2, proc.stderr
        assert says in _one_line(proc.stderr)


def test_a_station_run_refused_more_streams_says_so_and_not_that_the_quota_is_used_up(
    world: dict[str, Any],
) -> None:
    """Another process of the same station holds its 16 streams: ``station run`` is refused
    its own with RESOURCE_EXHAUSTED, the code the quota's refusal also has.  It ends with the
    appliance's reason (exit 1, one line), counts nothing, and says nothing of the quota."""
    before = _counts(world["factory"], "j")
    world["files"]["s7"] = add_station(world, "s7")
    socks = [_socket(world, "s7") for _ in range(16)]
    for sock in socks:
        assert len(_challenge(sock).challenge) == 32
    args = station_args(world["files"]["s7"], world["server"].target, "j", devices=3,
                        first=740, chips=world["vendor"])  # fmt: skip
    proc = cli(*args, ok=False)
    assert proc.returncode == 1, proc.stderr
    line = _one_line(proc.stderr)
    assert "16 socket streams open already" in line and "quota" not in line.lower(), line
    proc = cli(*args, "--json", ok=False)
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and "quota" not in json.dumps(out).lower(), out
    for sock in socks:
        sock.end()
    assert _counts(world["factory"], "j") == before


def test_another_stations_session_is_refused_on_its_stream_and_unary(
    world: dict[str, Any],
) -> None:
    """A session s1's stream opened, used by s2: its unary Provision ends with
    PERMISSION_DENIED and its stream answers a Refusal PERMISSION_DENIED and goes on; s2's
    attempts did not use the session (s1's own answer is then judged, not a replay)."""
    before = _counts(world["factory"], "j")
    chip = _chip(world, 531)
    s1, s2 = _socket(world, "s1"), _socket(world, "s2")
    ch = _challenge(s1)
    stolen = pb.ProvisionRequest(session=ch.session, chip_answer=chip.identify(ch.challenge))
    _refused(lambda: _stub(world, "s2").Provision(stolen), grpc.StatusCode.PERMISSION_DENIED,
             "another station")  # fmt: skip
    _refusal(s2.ask(provision=stolen), grpc.StatusCode.PERMISSION_DENIED, "another station")
    _refusal(s2.ask(confirm=pb.ConfirmRequest(session=ch.session, boot=b"")),
             grpc.StatusCode.PERMISSION_DENIED, "another station")  # fmt: skip
    assert len(_challenge(s2).challenge) == 32  # s2's stream goes on
    _refusal(s1.ask(provision=pb.ProvisionRequest(session=ch.session, chip_answer=b"\xa1")),
             grpc.StatusCode.INVALID_ARGUMENT, "identification")  # fmt: skip
    s1.end()
    s2.end()
    assert _counts(world["factory"], "j") == before


def test_requests_written_before_reading_are_answered_in_order(world: dict[str, Any]) -> None:
    """Challenge, Challenge, Provision (of an earlier challenge) and an empty request
    written before any is read: the answers come in that order (two fresh challenges, the
    chip's provisioning, the refusal); the two challenges left unanswered die with the
    stream (unknown afterwards on a unary call)."""
    before = _counts(world["factory"], "j")
    chip = _chip(world, 522)
    sock = _socket(world)
    ch = _challenge(sock)
    sock.send(challenge=pb.ChallengeRequest(job_id="j"))
    sock.send(challenge=pb.ChallengeRequest(job_id="j"))
    sock.send(provision=pb.ProvisionRequest(session=ch.session,
                                            chip_answer=chip.identify(ch.challenge)))
    sock.send(pb.SocketRequest())
    answers = [sock.answer() for _ in range(4)]
    assert [a.WhichOneof("answer") for a in answers] == [
        "challenge", "challenge", "provision", "refusal"]  # fmt: skip
    left = [answers[0].challenge, answers[1].challenge]
    assert len({ch.session, left[0].session, left[1].session}) == 3
    prov = answers[2].provision
    assert prov.state == pb.ProvisionResponse.PROVISIONED
    assert prov.device_id == f"{FIRST_UID + 522:016x}"
    _refusal(answers[3], grpc.StatusCode.INVALID_ARGUMENT, "must carry")
    boot = _boot(world, chip, prov)
    assert sock.ask(confirm=pb.ConfirmRequest(session=ch.session, boot=boot)).confirm.programmed
    sock.end()
    for unanswered in left:
        _refused(lambda u=unanswered: _stub(world).Provision(pb.ProvisionRequest(
            session=u.session, chip_answer=chip.identify(u.challenge))),
            grpc.StatusCode.INVALID_ARGUMENT, "unknown session")  # fmt: skip
    _grew(before, _counts(world["factory"], "j"), provisioned=1, programmed=1,
          distinct_provisioned=1)  # fmt: skip


def test_a_removed_station_is_refused_on_its_open_stream(world: dict[str, Any]) -> None:
    """A station withdrawn while its stream is open: the stream's next message ends the
    stream with PERMISSION_DENIED (checked on every message, not per connection), counting
    nothing.  (A station certified here, so the other tests keep theirs.)"""
    files = add_station(world, "s4")
    before = _counts(world["factory"], "j")
    sock = _Sock(files, world["server"].target)
    ch = _challenge(sock)
    cli("programmer", "remove-station", "--workdir", str(world["factory"]), "--name", "s4")
    sock.send(provision=pb.ProvisionRequest(session=ch.session,
                                            chip_answer=_chip(world, 532).identify(ch.challenge)))
    with pytest.raises(grpc.RpcError) as info:
        sock.answer()
    err: Any = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "no longer) allowed" in err.details() and "\n" not in err.details()
    assert _counts(world["factory"], "j") == before


def test_a_stream_cancelled_after_provision_strands_nothing(world: dict[str, Any]) -> None:
    """A stream cancelled once Provision was answered (the station vanished before Confirm):
    the chip sent again through a new stream is RECOVERED -- the same device, certificate
    and license -- and programmed, counted once; another device provisioned on the cancelled
    stream is recorded by a unary Confirm with its session (the session outlives the stream)."""
    before = _counts(world["factory"], "j")
    chip, other = _chip(world, 523), _chip(world, 524)
    gone = _socket(world)
    first = _provision(gone, _challenge(gone), chip)
    assert first.state == pb.ProvisionResponse.PROVISIONED
    ch_other = _challenge(gone)
    prov_other = _provision(gone, ch_other, other)
    gone.call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        gone.answer()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    sock = _socket(world)
    ch = _challenge(sock)
    again = _provision(sock, ch, chip)
    assert again.state == pb.ProvisionResponse.RECOVERED
    assert (again.device_id, again.certificate, again.license) == (
        first.device_id, first.certificate, first.license)  # fmt: skip
    boot = _boot(world, chip, again)
    assert sock.ask(confirm=pb.ConfirmRequest(session=ch.session, boot=boot)).confirm.programmed
    sock.end()
    unary = _stub(world).Confirm(pb.ConfirmRequest(session=ch_other.session,
                                                   boot=_boot(world, other, prov_other)))
    assert unary.programmed is True
    _grew(before, _counts(world["factory"], "j"), provisioned=2, programmed=2,
          distinct_provisioned=2)  # fmt: skip


def test_unanswered_challenges_die_with_their_stream_and_release_the_job(
    world: dict[str, Any],
) -> None:
    """Challenges a stream asked for and never answered hold nothing once the stream ends
    (closed or cancelled): on a server whose challenges live 120 s, job x -- 2 challenges on
    a stream then closed, 1 on another then cancelled -- is released once idle (2 s), so
    ``programmer close-job`` gets its run lock and closes it; job y, asked at the same time
    by one unary Challenge left unanswered, is still held at that moment ("another run of
    job y": the appliance's run lock, as close-job reports it)."""
    server = ServerProcess(world["factory"], "--challenge-ttl", "120", "--drain", "0")
    try:
        closed = _Sock(world["files"]["s1"], server.target)
        cancelled = _Sock(world["files"]["s1"], server.target)
        asked = [_challenge(closed, "x"), _challenge(closed, "x"), _challenge(cancelled, "x")]
        assert {a.expires_in_s for a in asked} == {120}
        unary = pb_grpc.StationServiceStub(_channel(world["files"]["s1"], server.target))
        assert unary.Challenge(pb.ChallengeRequest(job_id="y")).expires_in_s == 120
        closed.end()
        cancelled.call.cancel()
        for a in asked[:2]:  # forgotten when the closed stream ended, long before expiry
            _refused(lambda a=a: unary.Provision(pb.ProvisionRequest(session=a.session,
                                                                     chip_answer=b"\xa1")),
                     grpc.StatusCode.INVALID_ARGUMENT, "unknown session")  # fmt: skip

        def close(job: str) -> subprocess.CompletedProcess[str]:
            return cli("programmer", "close-job", "--workdir", str(world["factory"]), "--job",
                       job, "--json", ok=False)  # fmt: skip

        time.sleep(2.0)  # the server releases a job 2 s after it was last used
        deadline = time.monotonic() + 10
        while (proc := close("x")).returncode != 0:
            assert "another run of job x" in _one_line(proc.stderr), proc.stderr
            assert time.monotonic() < deadline, "job x is still held by its dead challenges"
            time.sleep(0.3)
        assert last_json(proc)["ok"] is True
        held = close("y")
        assert held.returncode == 2, held.stderr
        assert "another run of job y is going on" in _one_line(held.stderr)
        server.stop()
    finally:
        if server.proc.poll() is None:
            server.kill()


def test_a_station_cannot_make_the_appliance_stream_the_image_without_end(
    world: dict[str, Any],
) -> None:
    """GetImage is bounded per station (here 3 calls a minute): the next is refused with
    RESOURCE_EXHAUSTED in one line, other stations are not held back, and a station process
    refused its image says so in one line (exit 1, not the quota's 5), counting nothing."""
    before = _counts(world["factory"], "n")
    server = ServerProcess(world["factory"], "--image-fetches", "3")
    try:
        stub = pb_grpc.StationServiceStub(_channel(world["files"]["s2"], server.target))

        def fetch(s: Any = stub) -> bytes:
            return b"".join(c.data for c in s.GetImage(pb.ImageRequest(job_id="n")))

        images = [fetch() for _ in range(3)]
        assert images[0] and images.count(images[0]) == 3
        _refused(fetch, grpc.StatusCode.RESOURCE_EXHAUSTED, "station s2", "at most 3")
        other = pb_grpc.StationServiceStub(_channel(world["files"]["s1"], server.target))
        assert fetch(other) == images[0]
        proc = cli(*station_args(world["files"]["s2"], server.target, "n", devices=2, first=0,
                                 chips=world["vendor"]), ok=False)  # fmt: skip
        assert proc.returncode == EXIT_OS, proc.stderr
        assert "refused GetImage" in _one_line(proc.stderr) and "at most 3" in proc.stderr
    finally:
        server.stop()
    assert _counts(world["factory"], "n") == before


def test_two_jobs_at_once_each_reach_exactly_their_quota_with_a_ledger_of_their_own(
    world: dict[str, Any],
) -> None:
    """Jobs m (quota 12) and n (quota 9) on one appliance at once, a station on each asking
    for 20 devices: each job stops at its own quota, and each closes into its own ledger
    that reconciles at the OEM with exactly its devices."""
    quotas = {"m": 12, "n": 9}
    procs = {
        job: _start(station_args(world["files"][s], world["server"].target, job, devices=20,
                                 first=0, chips=world["vendor"]))  # fmt: skip
        for job, s in (("m", "s1"), ("n", "s2"))
    }
    for job, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == EXIT_QUOTA, err
        r = last_json(subprocess.CompletedProcess([], 0, out, err))
        assert (r["programmed"], r["quota_exhausted"], r["job_id"]) == (quotas[job], True, job)
    for job, quota in quotas.items():
        c = _counts(world["factory"], job)
        assert c["provisioned"] == c["programmed"] == c["distinct_provisioned"] == quota
        assert c["reserved"] == quota and c["releases"] == 0
    for job, quota in quotas.items():
        deadline = time.monotonic() + 30  # the server releases a job 2 s after its last call
        while True:
            proc = cli("programmer", "close-job", "--workdir", str(world["factory"]), "--job",
                       job, "--json", ok=False)  # fmt: skip
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            assert "another run of job" in proc.stderr, proc.stderr
            time.sleep(0.5)
        assert last_json(proc)["ok"] is True, proc.stderr
        rec = last_json(cli("oem", "reconcile", "--workdir", str(world["oem"]),
                            str(world["factory"] / "outbox" / f"ledger-{job}.bin"), "--job", job,
                            "--json"))  # fmt: skip
        assert rec["ok"] is True and rec["provisioned"] == rec["programmed"] == quota, rec


# --- sharing a job; killing the server ---------------------------------------------------------


def _start(args: list[str]) -> subprocess.Popen[str]:
    from securethread.demo import child_env

    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env())  # fmt: skip


def test_two_station_processes_share_a_job_and_reach_exactly_its_quota(
    world: dict[str, Any],
) -> None:
    procs = [
        _start(station_args(world["files"][s], world["server"].target, "q", devices=40,
                            first=first, chips=world["vendor"]))  # fmt: skip
        for s, first in (("s1", 0), ("s2", 100))
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode in (0, EXIT_QUOTA), err
        results.append(last_json(subprocess.CompletedProcess([], 0, out, err)))
    assert sum(r["programmed"] for r in results) == 40
    assert any(r["quota_exhausted"] for r in results)
    c = _counts(world["factory"], "q")
    assert c["provisioned"] == c["programmed"] == c["distinct_provisioned"] == 40
    assert c["reserved"] == 40 and c["releases"] == 0


def test_sigkill_of_the_server_mid_run_loses_nothing_and_counts_nothing_twice(
    world: dict[str, Any],
) -> None:
    server = ServerProcess(world["factory"])
    args = station_args(world["files"]["s1"], server.target, "k", devices=150, first=0,
                        chips=world["vendor"], parallel=6)  # fmt: skip
    station = _start(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if _counts(world["factory"], "k").get("programmed", 0) >= 20:
                break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    server.kill()
    _out, err = station.communicate(timeout=120)
    assert station.returncode == EXIT_OS, err
    assert "no appliance answered" in _one_line(err) or "Provision" in err
    mid = _counts(world["factory"], "k")
    assert 20 <= mid["provisioned"] < 150
    again = ServerProcess(world["factory"])
    try:
        r = last_json(cli(*station_args(world["files"]["s1"], again.target, "k", devices=150,
                                         first=0, chips=world["vendor"])))  # fmt: skip
    finally:
        again.stop()
    assert r["provisioned"] + r["recovered"] + r["already_done"] == 150
    assert r["refused"] == {}
    c = _counts(world["factory"], "k")
    assert c["provisioned"] == c["programmed"] == c["distinct_provisioned"] == 150
    assert c["releases"] == 0
    # the kill may burn the slots the quota mark covered, never re-use one
    assert c["reserved"] >= 150 and c["reserved"] - 150 <= c["burned"] + 32


def test_the_stations_benchmark_measures_two_station_processes(world: dict[str, Any]) -> None:
    """benchmarks/bench_stations.py's measurement on this world (its figures are reported by
    ``python -m benchmarks``, never asserted)."""
    from benchmarks import bench_stations

    files = [world["files"]["s1"], world["files"]["s2"]]
    point = bench_stations._stations(world, files, world["server"].target, "j", 20, 2, 600)
    assert point["stations"] == 2 and point["devices"] == 20
    assert 0 < point["p50_ms"] <= point["p99_ms"] and point["devices_per_s"] > 0
    assert "2 station process(es)" in bench_stations.format_lines(
        {"line": {"devices_per_s": 1.0, "provision_devices_per_s": 2.0,
                  "ms_per_device_batch_1": 3.0}, "points": [point],
         "one_socket": point, "ratio_2_stations_to_line": 1.0, "service_added_p99_ms": 0.0})


def test_sigterm_drains_and_reports_status(world: dict[str, Any]) -> None:
    """SIGTERM with a station mid-run: no new challenge is handed out, the devices in flight
    are provisioned, programmed and committed, and nothing is left released-unconfirmed."""
    before = _counts(world["factory"], "j")
    station = _start(station_args(world["files"]["s1"], world["server"].target, "j",
                                  devices=150, first=100, chips=world["vendor"]))  # fmt: skip
    deadline = time.monotonic() + 120
    while _counts(world["factory"], "j").get("programmed", 0) < before["programmed"] + 10:
        assert time.monotonic() < deadline and station.poll() is None
        time.sleep(0.05)
    status = world["server"].stop()
    _out, err = station.communicate(timeout=120)
    assert station.returncode in (0, EXIT_OS), err
    after = _counts(world["factory"], "j")
    # (one device an earlier test left released-unconfirmed stays so: its boot was refused)
    assert after["releases"] == before["releases"]
    new = after["provisioned"] - before["provisioned"]
    assert new == after["programmed"] - before["programmed"] >= 10
    assert "s1" in status["stations_seen"]
    served = {j["job_id"]: j for j in status["jobs"]}
    assert served["j"]["programmed"] >= new and served["q"]["provisioned"] == 40
    jobs = {j["job_id"]: j for j in status["jobs"]}
    assert status["draining"] is True
    # jobs idle for 2 s are released (close-job can take them); whatever is still
    # served was counted consistently with the store
    for job_id, j in jobs.items():
        assert j["quota_used"] <= j["quota"], job_id
    # the ledger says so too: the shared job and the killed one close and reconcile at the
    # OEM with every device once
    for job, devices in (("q", 40), ("k", 150)):
        proc = cli("programmer", "close-job", "--workdir", str(world["factory"]), "--job", job,
                   "--json")  # fmt: skip
        assert last_json(proc)["ok"] is True
        rec = last_json(cli("oem", "reconcile", "--workdir", str(world["oem"]),
                            str(world["factory"] / "outbox" / f"ledger-{job}.bin"), "--job", job,
                            "--json"))  # fmt: skip
        assert rec["ok"] is True and rec["provisioned"] == rec["programmed"] == devices, rec
