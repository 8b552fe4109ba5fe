"""The suite's guest kernel: vmlab's minimal kernel where it is built, the stock one otherwise.

The minimal kernel (`vmlab kernel build`, made by scripts/install-deps) reaches the ready marker
on about a quarter of the stock kernel's CPU under TCG, so every lab of the suite, including
`vmlab run` subprocesses and nested guests, boots it through $VMLAB_KERNEL unless a scenario pins
a kernel. Tests about the stock kernel's image and modules unset it (test_image_boot.py); tests
that load modules accept a module-free kernel. VMLAB_SUITE_KERNEL=stock, or a VMLAB_KERNEL of
your own, keeps the suite off it; without a cached minimal build (VMLAB_SKIP_KERNEL_BUILD=1) the
suite runs on the stock kernel.
"""
from __future__ import annotations

import os

import pytest

SUITE_KERNEL_ENV = "VMLAB_SUITE_KERNEL"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("VMLAB_KERNEL") or os.environ.get(SUITE_KERNEL_ENV, "minimal") != "minimal":
        return
    from vmlab.kernel.build import cached_minimal

    build = cached_minimal()
    if build is not None:
        os.environ["VMLAB_KERNEL"] = str(build.kernel)
        os.environ[SUITE_KERNEL_ENV] = "minimal"   # workers and subprocesses see the choice
    else:
        os.environ[SUITE_KERNEL_ENV] = "stock"


def pytest_report_header(config: pytest.Config) -> str:
    kernel = os.environ.get("VMLAB_KERNEL") or "the stock distribution kernel"
    return f"vmlab suite kernel: {kernel} ({SUITE_KERNEL_ENV}={os.environ.get(SUITE_KERNEL_ENV, '')})"
