"""CID leases across real processes: no sharing, clear conflicts, nothing stale after kill -9."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab import hostcheck, kernelioctl
from vmlab.cids import (CidAllocator, CidInUse, CidLease, CidRangeExhausted, _describe_holder,
                        _usable_dir, default_lock_dir)

REPO = Path(__file__).resolve().parents[2]

# A second "lab": leases what argv asks for, prints the CIDs as JSON, holds them until stdin closes.
CHILD = r"""
import json, sys
from pathlib import Path
from vmlab.cids import CidAllocator
mode, lock_dir, arg, owner = sys.argv[1:5]
alloc = CidAllocator(Path(lock_dir), first=5000, last=5011, probe_vhost=False)
leases = alloc.allocate(int(arg), owner) if mode == "allocate" else [alloc.lease(int(arg), owner)]
print(json.dumps([l.cid for l in leases]), flush=True)
sys.stdin.read()
"""


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def _alloc(tmp_path: Path, **kw) -> CidAllocator:
    kw.setdefault("probe_vhost", False)
    return CidAllocator(tmp_path / "locks", first=5000, last=5011, **kw)


def test_pinned_cid_conflict_names_holder_and_fix(tmp_path):
    a, b = _alloc(tmp_path), _alloc(tmp_path)
    held = a.lease(7, owner="lab boot.yaml vm a")
    with pytest.raises(CidInUse) as err:
        b.lease(7, owner="other")
    msg = str(err.value)
    assert err.value.cid == 7
    assert "guest CID 7 is already in use by lab boot.yaml vm a" in msg
    assert f"pid {os.getpid()}" in msg
    assert "pick another `cid:`" in msg
    held.release()
    b.lease(7).release()


def test_same_allocator_cannot_lease_twice(tmp_path):
    a = _alloc(tmp_path)
    with a.lease(9):
        with pytest.raises(CidInUse):
            a.lease(9)


def test_release_is_idempotent_and_context_manager_frees(tmp_path):
    a = _alloc(tmp_path)
    lease = a.lease(11)
    assert isinstance(lease, CidLease) and lease.held
    lease.release()
    lease.release()
    assert not lease.held
    with a.lease(11) as again:
        assert again.cid == 11
    assert not again.held
    a.lease(11).release()


def test_invalid_cids_rejected(tmp_path):
    a = _alloc(tmp_path)
    for cid in (0, 1, 2, 0xFFFFFFFF, -1):
        with pytest.raises(ValueError, match="not a valid guest CID"):
            a.lease(cid)
    with pytest.raises(ValueError, match="bad CID range"):
        CidAllocator(tmp_path, first=2, last=10, probe_vhost=False)


def test_allocate_skips_held_and_is_all_or_nothing(tmp_path):
    a = _alloc(tmp_path)
    pinned = a.lease(5000)
    got = a.allocate(3, owner="t")
    assert [l.cid for l in got] == [5001, 5002, 5003]
    with pytest.raises(CidRangeExhausted, match="found 8 of 9"):
        a.allocate(9)
    rest = a.allocate(8)  # the failed call above must have given back what it took
    assert sorted(l.cid for l in rest) == list(range(5004, 5012))
    for l in [pinned, *got, *rest]:
        l.release()


def test_holder_info_written_for_other_labs(tmp_path):
    a = _alloc(tmp_path)
    with a.lease(5005, owner="xdist gw1") as lease:
        info = json.loads(lease.path.read_text())
        assert info["pid"] == os.getpid() and info["owner"] == "xdist gw1"


def test_stale_holder_info_is_not_blamed(tmp_path):
    f = tmp_path / "42.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    f.write_text(json.dumps({"pid": dead.pid, "owner": "old lab"}))
    assert "has exited" in _describe_holder(f)
    f.write_text("garbage")
    assert "holder unknown" in _describe_holder(f)


def test_concurrent_labs_in_processes_never_share(tmp_path):
    lock_dir = str(tmp_path / "locks")
    kids = [_child("allocate", lock_dir, "4", f"lab{i}") for i in range(3)]
    try:
        got = [json.loads(k.stdout.readline()) for k in kids]
    finally:
        for k in kids:
            k.stdin.close()
            k.wait(timeout=30)
    flat = [c for cids in got for c in cids]
    assert len(flat) == 12 and len(set(flat)) == 12  # 3 labs x 4 = the whole 5000..5011 range
    assert set(flat) == set(range(5000, 5012))


def test_lease_freed_when_holder_is_killed(tmp_path):
    lock_dir = tmp_path / "locks"
    kid = _child("lease", str(lock_dir), "5003", "doomed lab")
    try:
        assert json.loads(kid.stdout.readline()) == [5003]
        a = CidAllocator(lock_dir, first=5000, last=5011, probe_vhost=False)
        with pytest.raises(CidInUse, match=rf"doomed lab \(pid {kid.pid}"):
            a.lease(5003)
        others = a.allocate(11)
        assert 5003 not in [l.cid for l in others]
        for l in others:
            l.release()
    finally:
        kid.send_signal(signal.SIGKILL)
        kid.wait(timeout=30)
    a.lease(5003).release()


def test_release_wins_over_a_forked_child_sharing_the_fd(tmp_path):
    """A child forked while the lease is held must not keep it after release()."""
    a = _alloc(tmp_path)
    lease = a.lease(5007)
    pid = os.fork()
    if pid == 0:  # child: hold the inherited fd for a while, do nothing else
        import time
        time.sleep(5)
        os._exit(0)
    try:
        lease.release()
        a.lease(5007).release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_shared_lock_dir_is_sticky_and_world_writable(tmp_path):
    d = tmp_path / "shared"
    assert _usable_dir(d, shared=True)
    assert stat.S_IMODE(d.stat().st_mode) == 0o1777
    f = tmp_path / "file"
    f.write_text("")
    assert not _usable_dir(f, shared=True)


def test_default_lock_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLAB_CID_LOCK_DIR", str(tmp_path / "mine"))
    assert default_lock_dir() == tmp_path / "mine"
    monkeypatch.delenv("VMLAB_CID_LOCK_DIR")
    d = default_lock_dir()
    assert d.is_dir() and os.access(d, os.W_OK)


@pytest.mark.skipif(not hostcheck.vhost_vsock_usable().ok, reason="/dev/vhost-vsock not usable here")
def test_kernel_probe_sees_cid_used_outside_vmlab(tmp_path):
    """Stand in for a foreign VM: claim a CID directly with the vhost-vsock ioctls."""
    a = CidAllocator(tmp_path / "locks", first=5000, last=5011, probe_vhost=True)
    fd = os.open(kernelioctl.VHOST_VSOCK_DEV, os.O_RDWR)
    try:
        fcntl.ioctl(fd, kernelioctl.VHOST_SET_OWNER)
        fcntl.ioctl(fd, kernelioctl.VHOST_VSOCK_SET_GUEST_CID, struct.pack("Q", 5002))
        with pytest.raises(CidInUse, match="EADDRINUSE"):
            a.lease(5002)
        others = a.allocate(3)
        assert [l.cid for l in others] == [5000, 5001, 5003]
        for l in others:
            l.release()
    finally:
        os.close(fd)
    a.lease(5002).release()
