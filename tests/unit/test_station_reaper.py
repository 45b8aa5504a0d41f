"""The station server's reaper pass (``StationServer._reap_once``): which sessions it forgets
and which idle jobs it releases.  Pure bookkeeping: no gRPC server, no token -- the server
object is built without its constructor and given only the state the pass reads."""

from __future__ import annotations

import threading
from typing import Any

from securethread.programmer import stations as S

TTL = 30.0


class _FakeJob:
    """A job as the reaper sees it: when it was last called, and whether it let itself go."""

    def __init__(self, job_id: str, last_call: float) -> None:
        self.job_id = job_id
        self.last_call = last_call
        self.asked: list[bool] = []

    def retire_if_idle(self, idle: bool) -> bool:
        self.asked.append(idle)
        return idle


def _server(jobs: dict[str, Any]) -> S.StationServer:
    srv = S.StationServer.__new__(S.StationServer)
    srv.idle_s = 2.0
    srv.confirm_ttl_s = 600.0
    srv._sessions = {}
    srv._jobs = dict(jobs)
    srv._retiring = {}
    srv._jobs_lock = threading.Lock()
    srv._lock = threading.Lock()
    return srv


def _session(job: Any, made: float, **state: Any) -> S._Session:
    return S._Session(job, "s1", b"c" * 32, made + TTL, **state)


def test_old_dead_sessions_are_forgotten_live_and_recent_ones_kept() -> None:
    job = _FakeJob("j", last_call=1000.0)
    srv = _server({"j": job})
    now = 1000.0
    old = now - TTL - S._KEEP_S - 1  # expired, and kept long enough
    made = {
        b"answered-old": _session(job, old, used=True, confirmed=True),
        b"unanswered-old": _session(job, old),
        b"stranded-old": _session(job, old, used=True, provisioned=object()),  # awaits Confirm
        b"answered-recent": _session(job, now - TTL - 1, used=True, confirmed=True),
        b"open": _session(job, now - 1),
    }
    srv._sessions.update(made)
    assert srv._reap_once(now) == []  # the job was called just now: not idle
    assert set(srv._sessions) == {b"stranded-old", b"answered-recent", b"open"}
    assert job.asked == []


def test_a_pass_over_many_sessions_forgets_every_old_dead_one() -> None:
    job = _FakeJob("j", last_call=5000.0)
    srv = _server({"j": job})
    now = 5000.0
    for n in range(3000):  # made one per 10 ms, in order; every 7th awaits its Confirm
        state: dict[str, Any] = ({"used": True, "provisioned": object()} if n % 7 == 0
                                 else {"used": True, "confirmed": True})  # fmt: skip
        srv._sessions[n.to_bytes(4, "big")] = _session(job, now - 120 + n * 0.01, **state)
    srv._reap_once(now)
    for sid, v in srv._sessions.items():
        assert v.provisioned is not None and not v.confirmed or now <= v.expires + S._KEEP_S, sid
    old_dead = [n for n in range(3000)
                if n % 7 and now - 120 + n * 0.01 + TTL + S._KEEP_S < now]  # fmt: skip
    assert old_dead and not any(n.to_bytes(4, "big") in srv._sessions for n in old_dead)


def test_an_idle_job_is_released_unless_a_live_session_holds_it() -> None:
    now = 100.0
    free, held, busy = (_FakeJob("free", now - 5), _FakeJob("held", now - 5),
                        _FakeJob("busy", now - 0.5))  # fmt: skip
    srv = _server({"free": free, "held": held, "busy": busy})
    srv._sessions[b"h"] = _session(held, now - 1)  # an unanswered challenge, not expired
    released: list[Any] = list(srv._reap_once(now))
    assert released == [free] and free.asked == [True] and held.asked == [False]
    assert busy.asked == [] and set(srv._jobs) == {"held", "busy"}
    assert list(srv._retiring) == ["free"] and srv._retiring["free"] is free  # type: ignore[comparison-overlap]
