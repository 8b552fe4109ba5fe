"""SIGTERM to the controller of `pytest -n 2` mid-boot: nothing of either worker's lab is left.

Found by benchmarks/interrupts.py (issue 13 item 4): execnet interrupted a worker only 5 s
after the controller's teardown began and killed it 5 s later, so a worker still closing its
lab (slow under load) lost its runtime dir. One inner test's lab closes 6 s slower (a
conftest wraps `Lab.close`, as a loaded machine would), which lost it every time before.
Private XDG_RUNTIME_DIR and VMLAB_CID_LOCK_DIR make processes, dirs, sockets and leases
countable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from vmlab.leftovers import leftovers, our_processes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

INNER_TESTS = '''
import pytest


@pytest.mark.parametrize("n", [1, 2])
def test_boots(lab, n):
    assert lab.vms[0].run("echo up") == (0, "up\\n")
'''

# one of the two labs (the one with the odd CID) is slow to close, as on a loaded machine
INNER_CONFTEST = '''
import time
from vmlab.lab import Lab

_halt = Lab._halt_machines


def slow_halt(self):
    if self.vms and self.vms[0].cid % 2:
        time.sleep(6)
    _halt(self)


Lab._halt_machines = slow_halt
'''


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private dir: Unix socket paths under the runtime dir must stay below 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vi-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_sigterm_to_xdist_controller_mid_boot_leaves_nothing(tmp_path: Path, short_dir: Path) -> None:
    base, locks, tests = short_dir / "run", tmp_path / "cids", tmp_path / "inner"
    for d in (base, locks, tests):
        d.mkdir(mode=0o700)
    (tests / "test_inner.py").write_text(INNER_TESTS)
    (tests / "conftest.py").write_text(INNER_CONFTEST)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(base), VMLAB_CID_LOCK_DIR=str(locks),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "pytest.out"
    with open(out, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider",
                              "--rootdir", str(tests), str(tests)], cwd=tests, env=env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len([q for q in our_processes(base) if b"qemu-system" in _cmdline(q)]) < 2:
            assert p.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the two guests never started"
            time.sleep(0.05)
        assert "passed" not in out.read_text()     # both guests are booting
        p.send_signal(signal.SIGTERM)              # the controller only, as `kill PID` does
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = out.read_text()
    time.sleep(0.5)
    left = leftovers(base, locks)
    for pid in left["processes"]:
        os.kill(pid, signal.SIGKILL)
    assert rc == pytest.ExitCode.INTERRUPTED, text
    assert left == {"processes": [], "run_dirs": [], "sockets": [], "leases": []}, text
    assert len(list(locks.glob("*.lock"))) >= 2       # both workers did take a CID lease


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
