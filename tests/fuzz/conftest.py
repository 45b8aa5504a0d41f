"""Hypothesis profiles for the fuzz suite and the shared fuzz world.

``ci`` (default): derandomized, no example database, a per-target example budget scaled by
the target's cost so the whole suite stays well under a minute.  ``SECURETHREAD_FUZZ_PROFILE=dev``
draws fresh random examples on every run and ten times as many.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.targets import Target, make_targets
from tests.fuzz.world import World, build

settings.register_profile(
    "ci",
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    max_examples=1200,
)
settings.register_profile("dev", parent=settings.get_profile("ci"), derandomize=False,
                          max_examples=12000)  # fmt: skip
PROFILE = os.environ.get("SECURETHREAD_FUZZ_PROFILE", "ci")


def examples_for(target: Target) -> int:
    """The profile's budget divided by the target's relative cost (at least 25)."""
    budget = settings.get_profile(PROFILE).max_examples
    return max(25, min(budget // 2, budget // target.cost))


@pytest.fixture(scope="session")
def fuzz_world() -> World:
    return build()


@pytest.fixture(scope="session")
def fuzz_targets(fuzz_world: World) -> dict[str, Target]:
    return make_targets(fuzz_world)
