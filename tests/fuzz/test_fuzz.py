"""Mutated artefacts of every format: only securethread.Error may escape (CI run).

Each target gets a derandomized hypothesis campaign (see conftest.py for the budget); a
failure names the target, the exception and the exact input in hex.  The long mode is
``python -m tests.fuzz`` (docs/fuzzing.md).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from tests.fuzz.__main__ import main as long_mode
from tests.fuzz.conftest import PROFILE, examples_for
from tests.fuzz.mutate import mutate
from tests.fuzz.targets import Target, run_one
from tests.fuzz.world import World

# cryptography warns (and still parses) on negative serials and over-long name attributes;
# the loaders refuse the former and accept the latter, so the warnings are expected noise.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAMES = sorted(
    "cbor envelope envelope_sign1 job job_package manifest image_header encrypted_image license "
    "ledger_record "
    "ledger_export reconciliation identification provisioning device_trust boot_confirmation "
    "transcript oem_hello programmer_hello oem_finish programmer_finish transfer transfer_ack "
    "transfer_commit transfer_committed package_receipt "
    "sealed_package certificate device_certificate csr spki pkcs11_uri inspect "
    "enrolment_request certificate_bundle pem_certificate pem_public_key mcuboot_image "
    "lot programming_package confirmations provisioned_identification".split()
)


class DrawSource:
    """Mutation choices drawn from hypothesis, so a failing mutation shrinks."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def below(self, n: int) -> int:
        return self._data.draw(st.integers(0, n - 1)) if n > 1 else 0

    def raw(self, n: int) -> bytes:
        return self._data.draw(st.binary(min_size=n, max_size=n))


def test_every_target_is_fuzzed(fuzz_targets: dict[str, Target]) -> None:
    assert sorted(fuzz_targets) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_seed_is_a_valid_artefact(name: str, fuzz_targets: dict[str, Target]) -> None:
    """The unmutated first seed is accepted: mutations start from the real thing."""
    outcome = run_one(fuzz_targets[name], fuzz_targets[name].seeds[0])
    assert outcome.kind == "accepted", (outcome.kind, outcome.error)


@pytest.mark.parametrize("name", NAMES)
def test_only_securethread_errors_escape(
    name: str, fuzz_world: World, fuzz_targets: dict[str, Target], request: pytest.FixtureRequest
) -> None:
    target = fuzz_targets[name]
    if target.xfail:
        request.applymarker(pytest.mark.xfail(reason=target.xfail, strict=False))
    corpus = fuzz_world.corpus

    @settings(settings.get_profile(PROFILE), max_examples=examples_for(target))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        blob = mutate(DrawSource(data), target.seeds, corpus, fuzz_world.ring, text=target.text)
        outcome = run_one(target, blob)
        if outcome.error is not None:
            exc = outcome.error
            raise AssertionError(
                f"{name}: {type(exc).__name__} escaped: {exc}\n"
                f"input ({len(blob)} bytes): {blob.hex()}"
            ) from exc

    fuzz()


def test_long_mode_runs_and_counts(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    assert long_mode(["--inputs", "20", "--target", "spki", "--target", "cbor", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "spki" in out and "non-Error exceptions in total: 0" in out


def test_fresh_endpoints_replay_the_recorded_handshake(fuzz_world: World) -> None:
    """Fresh deterministic endpoints say what the world recorded, so every channel input
    meets the state the recorded messages were made for."""
    o, _p = fuzz_world.ctx["channel"].endpoints()
    assert o.start() == fuzz_world.seeds["oem_hello"][0]
