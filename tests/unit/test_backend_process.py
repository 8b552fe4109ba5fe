"""BackendProcess: a real backend process, READY, control socket, clean stop, clean errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from vmlab.vsock.process import BackendError, BackendProcess


@pytest.fixture
def run_dir():
    # short paths: Unix socket names are limited to 107 bytes
    with tempfile.TemporaryDirectory(prefix="vmlab-bt-") as d:
        yield Path(d)


def _config(d: Path, n: int = 2) -> dict:
    return {"vms": [{"name": f"vm{i}", "cid": 3 + i, "socket": str(d / f"vm{i}.vu"),
                     "uds_path": str(d / f"vm{i}.vsock"), "group": "default"}
                    for i in range(n)],
            "pcap": str(d / "cap.pcap"), "log": str(d / "backend.log")}


def test_start_ready_control_stop_leaves_nothing(run_dir: Path) -> None:
    bp = BackendProcess(_config(run_dir, 16), run_dir)
    bp.start(timeout=20)
    try:
        pid = bp.pid
        assert pid is not None and bp.running()
        for i in range(16):
            assert (run_dir / f"vm{i}.vu").is_socket()       # never connect: QEMU's only
            assert (run_dir / f"vm{i}.vsock").is_socket()
        assert bp.control({"cmd": "ping"})["pid"] == pid
        stats = bp.control({"cmd": "stats"})
        assert stats["ok"] and set(stats["vms"]) == {f"vm{i}" for i in range(16)}
        assert stats["vms"]["vm3"]["cid"] == 6
        assert bp.control({"cmd": "fault", "kind": "drop", "vm": "vm1", "count": 2})["ok"]
        assert not bp.control({"cmd": "fault", "kind": "explode"})["ok"]
        assert not bp.control({"cmd": "reset", "vm": "nope"})["ok"]
        assert bp.control({"cmd": "reset", "vm": "vm0"})["ok"]
    finally:
        bp.stop()
        bp.stop()                                             # idempotent
    assert not bp.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    left = sorted(p.name for p in run_dir.iterdir() if p.is_socket())
    assert left == []
    assert (run_dir / "cap.pcap").stat().st_size >= 24      # pcap header written
    assert "SIGTERM: shutting down" in (run_dir / "backend.log").read_text()


def test_bad_config_raises_with_the_reason(run_dir: Path) -> None:
    cfg = _config(run_dir)
    cfg["vms"][1]["cid"] = 3                                  # duplicate CID
    bp = BackendProcess(cfg, run_dir)
    with pytest.raises(BackendError) as ei:
        bp.start(timeout=20)
    assert "cid: 3 used twice" in str(ei.value)
    assert not bp.running()
    bp.stop()


def test_socket_path_in_use_by_a_directory_fails_cleanly(run_dir: Path) -> None:
    cfg = _config(run_dir, 1)
    (run_dir / "vm0.vsock").mkdir()
    bp = BackendProcess(cfg, run_dir)
    with pytest.raises(BackendError) as ei:
        bp.start(timeout=20)
    assert "startup failed" in str(ei.value)
    assert not (run_dir / "vm0.vu").exists()                 # the device socket was unlinked


def test_backend_dies_with_a_killed_parent(run_dir: Path) -> None:
    import json
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from vmlab.vsock.process import BackendProcess\n"
        f"bp = BackendProcess(json.loads({json.dumps(json.dumps(_config(run_dir, 1)))}), "
        f"Path({str(run_dir)!r}))\n"
        "bp.start(timeout=20)\n"
        "print(bp.pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)                                      # the backend runs
        parent.send_signal(signal.SIGKILL)                   # no cleanup code runs in it
        parent.wait()
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        parent.kill()
        parent.wait()
