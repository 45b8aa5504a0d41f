"""The documented exit codes (docs/cli.md) and one-line descriptions, as securethread.errors
gives them to the CLI and to the appliance's operator answers alike."""

from __future__ import annotations

import pytest

from securethread import cli
from securethread.errors import (
    AlreadyProvisionedError,
    ConfigurationError,
    Error,
    Interrupted,
    KeyPolicyError,
    PinIncorrectError,
    QuotaExceededError,
    StoreRolledBackError,
    TokenNotFoundError,
    describe,
    exit_code_for,
)
from securethread.station.client import StationCallError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TokenNotFoundError("no token"), 2),
        (PinIncorrectError("pin"), 3),
        (AlreadyProvisionedError("twice"), 4),
        (QuotaExceededError("used up"), 5),
        (StoreRolledBackError("older"), 6),
        (KeyPolicyError("not for that"), 1),  # an Error of no family
        (OSError(28, "No space left on device"), 1),
        (KeyboardInterrupt(), 130),
        (Interrupted("stopped by SIGTERM", 15), 143),
        (StationCallError("refused", code="PERMISSION_DENIED", exit_code=4), 4),  # its own
        (StationCallError("gone", code="UNAVAILABLE", exit_code=1), 1),
        (KeyError("a bug"), 70),
    ],
)
def test_exit_code_per_family(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code
    assert cli.exit_code(exc) == code  # the CLI uses the same map


def test_describe_is_one_line_naming_the_type() -> None:
    assert describe(ConfigurationError("bad\n  --job")) == "ConfigurationError: bad --job"
    assert describe(OSError(2, "No such file", "x.bin")) == "OSError: No such file 'x.bin'"
    assert describe(ValueError("oops")).startswith("internal error (ValueError: oops)")
    assert describe(Interrupted("stopped by SIGTERM", 15)) == "Interrupted: stopped by SIGTERM"


def test_an_error_with_a_non_integer_exit_code_falls_back_to_its_family() -> None:
    class Odd(ConfigurationError):
        exit_code = "2"

    assert exit_code_for(Odd("x")) == 2
    assert isinstance(Odd("x"), Error)
