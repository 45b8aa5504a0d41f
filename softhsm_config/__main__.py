"""``python -m softhsm_config DIR [LABEL ...]``: create the project-local tokens (idempotent)."""

from __future__ import annotations

import argparse
import sys

from securethread.errors import Error

from . import DEFAULT_TOKENS, ensure_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softhsm_config", description=__doc__)
    parser.add_argument("directory", help="token directory to create or complete")
    parser.add_argument("labels", nargs="*", default=list(DEFAULT_TOKENS))
    parser.add_argument(
        "--generate-pins",
        action="store_true",
        help="generate random PINs where the environment has none (kept in DIR/pins.env)",
    )
    args = parser.parse_args(argv)
    try:
        tdir = ensure_tokens(args.directory, args.labels, generate_missing_pins=args.generate_pins)
    except Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"SOFTHSM2_CONF={tdir.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
