"""Bounded, reproducible fuzzing of the guest-facing parsers (see fuzz_targets.py).

CI runs a fixed number of derandomized examples per target (VMLAB_FUZZ_EXAMPLES, default 150:
tens of seconds in all); benchmarks/fuzz.py runs >= 100,000 cases with printed figures.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import TARGETS

EXAMPLES = int(os.environ.get("VMLAB_FUZZ_EXAMPLES", "150"))


def _make(name: str):
    strategy, target = TARGETS[name]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        target(case)
    return run


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_holds_its_properties(name: str) -> None:
    _make(name)()
