"""The top-level usage line names every role the CLI has (a role missing from it is invisible)."""

from __future__ import annotations

import argparse

from securethread import cli


def test_usage_lists_every_role() -> None:
    parser = cli.build_parser()
    roles = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert roles.metavar == "{" + ",".join(roles.choices) + "}"
