"""Test-only entry: one production run in this process, from a pickled setup, with a fault hook.

``python -m tests.integration.run_entry SETUP [--fault POINT:N[:ACTION]] [--workers N]``

(ACTION ``pause`` waits at the fault point until the file ``SETUP.go`` exists.)

SETUP is ``Job.dump``'s pickle of (RunConfig, devices).  The hook
(:class:`tests.integration.line_support.FaultAt`) is installed here, outside the library's
production path, and reaches worker processes with the configuration.  Every process that
passes a fault point first notes its pid in ``<SETUP>.pids`` (the leader-death test waits
for them to be gone).  Prints the run's result as JSON on the last line of stdout; on a
securethread error prints one line on stderr and exits with: the error's ``exit_code``
(interrupted: 128 + signal), 4 worker died, 5 another run holds the job, 6 store refused by
the quota mark, 7 other store trouble, 2 any other error.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from typing import Any

import attrs

from securethread.errors import Error, StoreError, StoreGuardError
from securethread.programmer import runner
from tests.integration.line_support import FaultAt


@attrs.frozen
class NotingFault:
    """Notes this process's pid once, then defers to ``inner``."""

    pids: str
    inner: FaultAt | None

    def __call__(self, point: str) -> None:
        if not _noted:
            _noted.append(True)
            fd = os.open(self.pids, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.inner is not None:
            self.inner(point)


_noted: list[bool] = []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("setup")
    ap.add_argument("--fault", default=None, help="POINT:N[:ACTION]")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args(argv)
    with open(args.setup, "rb") as f:
        config, devices = pickle.load(f)
    changes: dict[str, Any] = {}
    if args.workers is not None:
        changes["workers"] = args.workers
    if args.batch is not None:
        changes["batch_size"] = args.batch
    config = attrs.evolve(config, **changes)
    inner = None
    if args.fault:
        point, _, rest = args.fault.partition(":")
        nth, _, action = rest.partition(":")
        inner = FaultAt(point, int(nth or 1), action or "kill", os.getpid(), args.setup + ".go")
    hook = NotingFault(args.setup + ".pids", inner)
    try:
        result = runner.run(config, devices, faults=hook)
    except runner.RunInterruptedError as exc:
        print(json.dumps(exc.result.to_json()), flush=True)
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except runner.WorkerDiedError as exc:
        print(json.dumps(exc.result.to_json()), flush=True)
        print(f"worker died: {exc}", file=sys.stderr)
        return 4
    except runner.RunLockedError as exc:
        print(f"locked: {exc}", file=sys.stderr)
        return 5
    except StoreGuardError as exc:
        print(f"store refused: {exc}", file=sys.stderr)
        return 6
    except StoreError as exc:
        print(f"store: {exc}", file=sys.stderr)
        return 7
    except Error as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
