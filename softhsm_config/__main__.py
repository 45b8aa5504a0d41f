"""``python -m softhsm_config DIR [LABEL ...]``: create the project-local tokens (idempotent);
with ``--party``, a party's directory with random PINs in its PIN file (SO PINs not kept)."""

from __future__ import annotations

import argparse
import sys

from securethread.errors import Error

from . import DEFAULT_TOKENS, ensure_tokens, init_party_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softhsm_config", description=__doc__)
    parser.add_argument("directory", help="token directory to create or complete")
    parser.add_argument("labels", nargs="*", default=list(DEFAULT_TOKENS))
    parser.add_argument(
        "--generate-pins",
        action="store_true",
        help="generate random PINs where the environment has none (kept in DIR/pins.env)",
    )
    parser.add_argument(
        "--party",
        action="store_true",
        help="initialise new tokens only (refuse existing labels); random user PINs in the "
        "PIN file, SO PINs generated and not kept",
    )
    parser.add_argument("--pin-file", help="with --party: the PIN file (default DIR/pins.env)")
    args = parser.parse_args(argv)
    if args.pin_file and not args.party:
        parser.error("--pin-file needs --party")
    try:
        if args.party:
            tdir = init_party_tokens(args.directory, args.labels, pin_file=args.pin_file)
        else:
            tdir = ensure_tokens(
                args.directory, args.labels, generate_missing_pins=args.generate_pins
            )
    except Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"SOFTHSM2_CONF={tdir.conf}")
    if args.party:
        print(f"PIN file: {tdir.pins_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
