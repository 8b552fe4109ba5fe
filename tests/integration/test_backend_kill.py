"""kill -9 of the vhost-user backend mid-run: the step fails naming the backend, the rest are
skipped, and the lab leaves nothing behind (no process, socket or runtime dir)."""
from __future__ import annotations

import os
import signal

import pytest

from vmlab.lab import Lab
from vmlab.scenario import GuestConnectStep, HostListenStep, Step, VmSpec, inline_scenario

pytestmark = pytest.mark.integration


def test_kill_9_of_the_backend_fails_the_run_naming_it_and_leaves_nothing():
    scenario = inline_scenario(
        vms=[VmSpec(name="k", cid=None)],
        steps=[Step.of(HostListenStep(id="srv", port=9400)),
               Step.of(GuestConnectStep(id="c", vm="k", cid="host", port=9400, send="hi")),
               Step.of(GuestConnectStep(id="c2", vm="k", cid="host", port=9400, send="again"))],
        transport="vhost-user")
    lab = Lab(scenario)
    try:
        lab.start()
        pid = lab.backend.pid
        run_dir = lab.run_dir
        os.kill(pid, signal.SIGKILL)
        results = lab.run_steps()
    finally:
        lab.close()
    failed = [r for r in results if not r.ok and not r.skipped]
    assert failed, [r.detail for r in results]
    first = failed[0]
    assert f"the vsock backend (pid {pid}) died: killed by SIGKILL" in first.detail, first.detail
    assert all(r.skipped for r in results[results.index(first) + 1:])
    assert not run_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert lab.pids() == [] or all(not os.path.exists(f"/proc/{p}") for p in lab.pids())
