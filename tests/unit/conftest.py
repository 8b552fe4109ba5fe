"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from vmlab.vsock import accel


@pytest.fixture(params=["python", "accel"])
def rx_accel(request):
    """The rx fill's two paths: None (pure Python) and the compiled C accelerator. Skipped only
    where it cannot be built (no compiler or Python headers); a failed build fails."""
    if request.param == "python":
        return None
    mod = accel.load()
    if mod is None:
        if accel.buildable():
            pytest.fail("gcc and Python.h are here but the accelerator did not build")
        pytest.skip("no C compiler or Python headers: accelerator unavailable")
    return mod
