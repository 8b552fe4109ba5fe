"""Bounded, reproducible fuzzing of the guest-facing parsers (see fuzz_targets.py).

CI runs a fixed number of derandomized examples per target (VMLAB_FUZZ_EXAMPLES, default 150:
tens of seconds in all); benchmarks/fuzz.py runs >= 100,000 cases with printed figures.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import TARGETS

from vmlab.vsock import accel

EXAMPLES = int(os.environ.get("VMLAB_FUZZ_EXAMPLES", "150"))


def _make(name: str):
    strategy, target = TARGETS[name]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        target(case)
    return run


# Targets that build VsockDevices run on both rx paths: pure Python and the C accelerator.
# rx_fill compares the two paths itself; the others never reach the accelerator.
BOTH_PATHS = {"device", "vhost_user"}
PARAMS = [(name, path) for name in sorted(TARGETS)
          for path in (("python", "accel") if name in BOTH_PATHS else ("default",))]


@pytest.mark.parametrize("name,path", PARAMS)
def test_fuzz_target_holds_its_properties(name: str, path: str, monkeypatch) -> None:
    if path == "python":
        monkeypatch.setenv(accel.ENV_OFF, "1")
    else:
        monkeypatch.delenv(accel.ENV_OFF, raising=False)
        if accel.load() is None:
            if accel.buildable():
                pytest.fail("gcc and Python.h are here but the accelerator did not build")
            if path == "accel":
                pytest.skip("no C compiler or Python headers: accelerator unavailable")
    _make(name)()
