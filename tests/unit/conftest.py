"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from vmlab.vsock import accel


def _accel_or_skip():
    """The compiled C accelerator. Skipped only where it cannot be built (no compiler or
    Python headers); a failed build fails."""
    mod = accel.load()
    if mod is None:
        if accel.buildable():
            pytest.fail("gcc and Python.h are here but the accelerator did not build")
        pytest.skip("no C compiler or Python headers: accelerator unavailable")
    return mod


@pytest.fixture(params=["python", "accel"])
def rx_accel(request):
    """The rx fill's two paths: None (pure Python) and the compiled C accelerator."""
    if request.param == "python":
        return None
    return _accel_or_skip()


@pytest.fixture
def relay_accel():
    """The C accelerator alone (its batched paths have no pure-Python twin to run; tests
    that compare it with the Python path run both themselves)."""
    return _accel_or_skip()
