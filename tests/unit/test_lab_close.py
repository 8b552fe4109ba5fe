"""Lab.close() under a Ctrl-C/SIGTERM that arrives while it runs (benchmarks/interrupts.py,
teardown rounds): every stage still runs, then the interrupt goes on up."""

import pytest

from vmlab.cids import CidAllocator
from vmlab.lab import Lab
from vmlab.runtime import RuntimeDir
from vmlab.scenario import VmSpec, inline_scenario


class _InterruptedEndpoint:
    """A host listener whose close() is where the second Ctrl-C lands."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        raise KeyboardInterrupt


def test_an_interrupt_during_close_still_releases_leases_and_removes_the_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    lab = Lab(inline_scenario(vms=[VmSpec(name="a")]))
    lab.runtime = RuntimeDir.create()
    sock = lab.runtime.path / "device.sock"
    sock.write_bytes(b"")
    lease = CidAllocator(lock_dir=tmp_path / "cids").lease(1234, "test")
    lab._leases.append(lease)
    endpoint = _InterruptedEndpoint()
    lab._endpoints.append(endpoint)
    with pytest.raises(KeyboardInterrupt):
        lab.close()
    assert endpoint.closed == 1
    assert not lease.held
    assert not lab.runtime.path.exists()
    lab.close()                                  # idempotent, and quiet the second time
