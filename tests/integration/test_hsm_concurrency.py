"""Threads and processes on one SoftHSM token (OS locking, a session per thread, one login per
process; docs/hsm.md for processes starting and logging in at once)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from securethread.hsm import (
    EPHEMERAL_AGREEMENT,
    SIGNING,
    TEMP_DERIVE,
    Curve,
    HsmPrivateKey,
    Token,
    default_module_path,
    open_token,
    verify_signature,
)
from securethread.hsm.pin import PinSet

THREADS = 4
SIGNATURES_PER_THREAD = 2000
SAMPLE = 100


def _message(worker: int, i: int) -> bytes:
    return f"worker {worker} signature {i}".encode()


@pytest.fixture
def signer(oem: Token, label: str) -> Iterator[HsmPrivateKey]:
    key = oem.generate_ec(label, curve=Curve.P256, policy=SIGNING)
    yield key
    oem.destroy(label)


def test_four_threads_sign_2000_each(signer: HsmPrivateKey) -> None:
    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            results[worker] = [
                signer.sign(_message(worker, i)) for i in range(SIGNATURES_PER_THREAD)
            ]
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(THREADS))
    assert all(len(sigs) == SIGNATURES_PER_THREAD for sigs in results.values())
    rng = random.Random(0)
    public = signer.public_key()
    for worker, sigs in results.items():
        for i in rng.sample(range(SIGNATURES_PER_THREAD), SAMPLE) + [0, SIGNATURES_PER_THREAD - 1]:
            verify_signature(public, sigs[i], _message(worker, i), what=f"t{worker}/{i}")


def test_threads_use_separate_sessions(oem: Token) -> None:
    sessions: list[object] = []

    def grab() -> None:
        sessions.append(oem.session)

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in sessions}) == 3
    assert all(s is not oem.session for s in sessions)


def test_threads_derive_concurrently(oem: Token) -> None:
    """Temporary-object create/destroy from several threads (SoftHSMv2 #573) stays safe."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                a = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
                k = a.derive_aes(a.public_key(), policy=TEMP_DERIVE)
                k.destroy()
                a.destroy()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    before = len(list(oem.session.get_objects()))
    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(oem.session.get_objects())) == before


def test_threads_agree_and_wrap_concurrently(oem: Token, label: str) -> None:
    """The license hot path's direct calls from several threads: right bytes, nothing left."""
    from cryptography.hazmat.primitives import keywrap
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from securethread.hsm import IMAGE_KEY, KEY_AGREEMENT

    ka = oem.generate_ec(label, curve=Curve.P256, policy=KEY_AGREEMENT)
    image = oem.generate_aes(label + "-image", policy=IMAGE_KEY)
    devices = [ec.generate_private_key(ec.SECP256R1()) for _ in range(THREADS)]
    results: dict[int, list[tuple[bytes, bytes]]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            out = []
            for _ in range(100):
                info = os.urandom(32)
                out.append((info, ka.agree_and_wrap(devices[worker].public_key(), info, image)))
            results[worker] = out
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        before = len(list(oem.session.get_objects()))
        threads = [threading.Thread(target=work, args=(w,)) for w in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(list(oem.session.get_objects())) == before
        keys = set()
        for worker, out in results.items():
            z = devices[worker].exchange(ec.ECDH(), ka.public_key())
            for info, wrapped in random.sample(out, 10):
                enc = Cipher(algorithms.AES(z), modes.ECB()).encryptor()
                kek = enc.update(info) + enc.finalize()
                keys.add(keywrap.aes_key_unwrap_with_padding(kek, wrapped))
        assert len(keys) == 1  # every thread wrapped the same image key
    finally:
        oem.destroy(label)
        oem.destroy(label + "-image")


def _process_worker(label: str, worker: int, count: int) -> tuple[int, list[bytes], str]:
    """Runs in a spawned process: its own module load, login and sessions."""
    token = open_token("oem")
    key = token.private_key(label)
    sigs = [key.sign(_message(worker, i)) for i in range(count)]
    eph = token.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    derived = eph.derive_aes(eph.public_key(), policy=TEMP_DERIVE)
    derived.destroy()
    eph.destroy()
    token.close()
    return os.getpid(), sigs, label


def test_two_processes_sign_on_the_same_token_directory(signer: HsmPrivateKey) -> None:
    ctx = multiprocessing.get_context("spawn")
    count = 300
    with ctx.Pool(2) as pool:
        results = pool.starmap(_process_worker, [(signer.label, w, count) for w in range(2)])
    pids = {pid for pid, _, _ in results}
    assert len(pids) == 2 and os.getpid() not in pids
    public = signer.public_key()
    for worker, (_, sigs, label) in enumerate(results):
        assert label == signer.label and len(sigs) == count
        for i in (0, count // 2, count - 1):
            verify_signature(public, sigs[i], _message(worker, i), what=f"p{worker}/{i}")
    # This process's token is still logged in and working after the workers logged out.
    verify_signature(public, signer.sign(b"after"), b"after", what="parent")


def test_destroy_invalidates_every_threads_handle_cache(oem: Token, label: str) -> None:
    """Regression: a handle cached by another thread outlived Token.destroy(label), so that
    thread's next sign failed with ObjectHandleInvalid even after the label was re-created."""
    requests: queue.Queue[bool] = queue.Queue()
    replies: queue.Queue[tuple[bytes, object] | BaseException] = queue.Queue()

    def worker() -> None:
        while requests.get():
            try:
                key = oem.private_key(label)
                replies.put((key.sign(b"m"), key.public_key()))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                replies.put(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        first = oem.generate_ec(label, curve=Curve.P256, policy=SIGNING)
        requests.put(True)
        reply = replies.get(timeout=60)
        assert not isinstance(reply, BaseException), reply
        verify_signature(first.public_key(), reply[0], b"m", what="first")
        oem.destroy(label)
        second = oem.generate_ec(label, curve=Curve.P256, policy=SIGNING)
        requests.put(True)
        reply = replies.get(timeout=60)
        assert not isinstance(reply, BaseException), reply
        assert reply[1] == second.public_key()
        verify_signature(second.public_key(), reply[0], b"m", what="second")
    finally:
        requests.put(False)
        thread.join()
        oem.destroy(label)


LOGIN_WORKERS = 4
LOGIN_ROUNDS = 100


def _login_rounds(pins: PinSet, rounds: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: ``rounds`` times, re-initialise the module (SoftHSM reads
    every token file again) and log in, while the other workers do the same.  The PIN
    arrived in ``pins``, pickled through the process-start pipe, not in the environment."""
    from securethread.errors import Error
    from securethread.hsm.module import reload_module

    counts: Counter[str] = Counter()
    if pins("spare") in os.environ.values():
        counts["pin-in-environment"] += 1
    barrier.wait()
    for _ in range(rounds):
        try:
            reload_module(default_module_path())
            token = open_token("spare", pin=pins)
            token.labels()
            token.close()
            counts["ok"] += 1
        except Error as exc:
            counts[f"{type(exc).__name__}: {exc}"] += 1
    results.put(dict(counts))


def test_processes_start_and_log_in_at_once(
    token_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression for the intermittent login failure of two provisioning workers
    (UserPinNotInitialized, NoSuchToken, GeneralError): a process initialising the module
    read token.object while another process's login had truncated it (docs/hsm.md).  The
    token directory's lock serialises both; no retry is involved."""
    pins = PinSet.resolve(["spare"])
    monkeypatch.delenv("SECURETHREAD_PIN_SPARE")  # the workers get the PIN only from `pins`
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(LOGIN_WORKERS)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_login_rounds, args=(pins, LOGIN_ROUNDS, barrier, results))
        for _ in range(LOGIN_WORKERS)
    ]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    total: Counter[str] = Counter()
    for o in outcomes:
        total.update(o)
    assert dict(total) == {"ok": LOGIN_WORKERS * LOGIN_ROUNDS}
