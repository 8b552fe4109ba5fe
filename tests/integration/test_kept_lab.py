"""A lab kept by `vmlab run --keep --gdb`: vmlab qmp, exec-guest, capture, and the gdb line."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def vmlab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmlab", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """Read the run's output (unbuffered: select() must see every byte) until pattern shows."""
    seen = b""
    end = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                break
            seen += data
            if re.search(pattern, seen.decode(errors="replace")):
                return seen.decode(errors="replace")
    raise AssertionError(f"never saw {pattern!r}:\n{seen.decode(errors='replace')}")


def test_kept_lab_answers_qmp_exec_guest_and_capture(tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-m", "vmlab", "run", "scenarios/hello.yaml", "--keep",
                            "--gdb"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        out = read_until(run, r"capture: vmlab capture", 900)
        lab_id = re.search(r"lab (\S+) is up", out).group(1)
        gdb = re.search(r"gdb for guest: gdb -ex 'target remote (\S+)' vmlinux", out)
        assert gdb and Path(gdb.group(1)).is_socket(), out
        assert f"vmlab qmp guest query-status --lab {lab_id}" in out

        r = vmlab("qmp", "guest", "query-status", "--lab", lab_id)
        assert r.returncode == 0 and '"status": "running"' in r.stdout, r.stdout + r.stderr
        r = vmlab("qmp", "guest", "no-such-command", "--lab", lab_id)
        assert r.returncode == 1 and "CommandNotFound" in r.stderr
        r = vmlab("exec-guest", "guest", "--lab", lab_id, "--", "echo hi from the guest; exit 3")
        assert (r.returncode, r.stdout) == (3, "hi from the guest\n"), r.stderr

        pcap = tmp_path / "kept.pcap"
        cap = subprocess.Popen([sys.executable, "-m", "vmlab", "capture", "--lab", lab_id, "-w",
                                str(pcap)], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
        try:
            end = time.monotonic() + 30
            while not pcap.exists() and time.monotonic() < end:
                time.sleep(0.2)
            r = vmlab("exec-guest", "guest", "--lab", lab_id, "--",
                      "vmlab-guest connect 2 4444 --send x")     # nobody listens: REQUEST, RST
            time.sleep(1.5)                                      # the backend flushes each second
        finally:
            cap.send_signal(signal.SIGINT)
            cap.wait(30)
        if shutil.which("tshark"):
            rows = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e",
                                   "vsock.virtio.op", "-e", "vsock.virtio.dst_prot"],
                                  capture_output=True, text=True, timeout=60).stdout.split()
            assert "4444" in rows and "1" in rows, rows          # the REQUEST to port 4444
        else:
            assert pcap.stat().st_size > 24
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(120)
    assert vmlab("qmp", "guest", "query-status", "--lab", lab_id).returncode == 1   # gone
