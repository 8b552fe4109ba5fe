"""The nested lab: the kernel's vhost-vsock transport end to end on a host that has none.

One outer boot (`scenarios/nested-vhost.yaml`: a rootfs: host guest with vhost_vsock loaded), then
every check inside it: `vmlab check` says vhost is usable, `vmlab run --transport vhost hello.yaml`
passes, and the reference notes' host servers (C and Python, unmodified) print the inner guest's
"Hello, world!". TCG inside TCG is slow; both guests boot vmlab's minimal kernel, and the time of
every step is printed (docs/nested.md). On by default in this repository (pyproject addopts).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmlab.lab import Lab
from vmlab.scenario import load_scenario

pytestmark = [pytest.mark.integration, pytest.mark.vmlab_nested]

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "scenarios" / "nested-vhost.yaml"


def test_vhost_transport_runs_in_the_nested_lab(request, record_property):
    artifacts = request.config.getoption("vmlab_artifacts")
    scenario = load_scenario(SCENARIO)
    t0 = time.monotonic()
    with Lab(scenario, boot_timeout=1200,
             artifacts_dir=Path(artifacts) / "nested-vhost" if artifacts else None) as lab:
        boot = time.monotonic() - t0
        results = lab.run_steps()
    total = time.monotonic() - t0
    lines = [f"outer boot {boot:.0f}s"] + [f"{r.name}: {r.seconds:.0f}s" for r in results]
    timing = f"nested vhost lab: {total:.0f}s total; " + "; ".join(lines)
    record_property("vmlab_timing", timing)
    print(timing)
    failures = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failures, "\n".join(failures) + "\n" + timing
    assert len(results) == len(scenario.steps)
