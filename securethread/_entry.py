"""The ``securethread`` console script: Ctrl-C is one line from the first instant.

Python turns SIGINT into KeyboardInterrupt, which prints a traceback if it arrives while
modules are still being imported -- before :func:`securethread.cli.main` can catch it.  This
entry point (importing nothing but the standard library and the light package root) first
makes an early SIGINT or SIGTERM print one line and exit 130 / 143, then hands over to the
CLI, which handles both itself from then on.
"""

from __future__ import annotations

import os
import signal
import sys


def _stopped_early(signum: int, _frame: object) -> None:
    # Nothing has been done yet: nothing to undo.
    name = signal.Signals(signum).name
    os.write(2, f"securethread: Interrupted: stopped by {name}\n".encode())
    os._exit(128 + signum)


def main() -> int:
    previous = {s: signal.signal(s, _stopped_early) for s in (signal.SIGINT, signal.SIGTERM)}
    from securethread import cli

    for s, handler in previous.items():
        signal.signal(s, handler)
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
