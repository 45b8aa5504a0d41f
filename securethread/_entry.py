"""The ``securethread`` console script: Ctrl-C is one line from the first instant.

Python turns SIGINT into KeyboardInterrupt, which prints a traceback if it arrives while
modules are still being imported -- before :func:`securethread.cli.main` can catch it.  This
entry point (importing nothing but the standard library and the light package root) first
makes an early SIGINT or SIGTERM print one line and exit 130 / 143, then hands over to the
CLI, which installs its own handlers as its first act, inside its last-resort ``try``.

The early handlers stay in place until then: putting the previous ones back first (SIG_DFL
for SIGTERM, KeyboardInterrupt for SIGINT) left an instant in which SIGTERM killed the
process without a word and SIGINT printed a traceback.
"""

from __future__ import annotations

import os
import signal
import sys

EARLY_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stopped_early(signum: int, _frame: object) -> None:
    # Nothing has been done yet: nothing to undo.
    name = signal.Signals(signum).name
    os.write(2, f"securethread: Interrupted: stopped by {name}\n".encode())
    os._exit(128 + signum)


def main() -> int:
    for s in EARLY_SIGNALS:
        signal.signal(s, _stopped_early)
    from securethread import cli

    return cli.main()  # replaces _stopped_early itself, with no instant between the two


if __name__ == "__main__":
    sys.exit(main())
