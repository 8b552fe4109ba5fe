"""Host-wide guest CID allocation.

With the vhost transport a guest CID is global to the host kernel, so two labs
(two `vmlab run`, two pytest-xdist workers, two users) must never pick the same
one. Each CID has a lock file in a host-wide directory; a lease is an open fd
holding `flock(LOCK_EX)` on it, so a process that dies (even by SIGKILL) frees
its CIDs with no stale state to clean up. Lock files are never unlinked:
unlinking a flock file races with a concurrent locker.

When /dev/vhost-vsock works the kernel is asked as well, which catches VMs that
vmlab did not start (libvirt, firecracker, another tool).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from vmlab.kernelioctl import kernel_cid_in_use, vhost_vsock_works

FIRST_GUEST_CID = 3          # 0, 1, 2 are hypervisor, local and host
MAX_GUEST_CID = 0xFFFFFFFE   # 0xFFFFFFFF is VMADDR_CID_ANY
MAX_SCAN = 4096              # allocate() gives up after this many busy CIDs


class CidInUse(Exception):
    """A pinned CID is held by another lab or used by a VM the kernel knows."""

    def __init__(self, cid: int, holder: str):
        self.cid = cid
        self.holder = holder
        super().__init__(
            f"guest CID {cid} is already in use by {holder}; pick another `cid:` for this VM "
            f"in the scenario, or leave it out to let vmlab allocate a free one")


class CidRangeExhausted(RuntimeError):
    """No free CID in the allocator's range."""


@dataclass
class CidLease:
    """One held CID; released explicitly, on `with` exit, or when the process dies.

    Deliberately no __del__: a lease must not vanish with a dropped reference while
    qemu is using the CID."""

    cid: int
    owner: str = ""
    path: Optional[Path] = None
    _fd: Optional[int] = field(default=None, repr=False, compare=False)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Idempotent. LOCK_UN first, so a forked child sharing the fd cannot keep it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "CidLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _usable_dir(path: Path, shared: bool) -> bool:
    """Create `path` if needed (01777 when shared) and say whether we can lock in it."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return False
        if shared and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o1777:
            os.chmod(path, 0o1777)  # mkdir's mode is cut by the umask
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def default_lock_dir() -> Path:
    """VMLAB_CID_LOCK_DIR, else a host-wide dir shared by all users, else a per-user one."""
    env = os.environ.get("VMLAB_CID_LOCK_DIR")
    if env:
        p = Path(env)
        if not _usable_dir(p, shared=False):
            raise OSError(errno.EACCES, f"VMLAB_CID_LOCK_DIR={env} is not a writable directory")
        return p
    for p in (Path("/run/lock/vmlab-cids"), Path("/tmp/vmlab-cids")):
        if _usable_dir(p, shared=True):
            return p
    p = Path(tempfile.gettempdir()) / f"vmlab-cids-{os.geteuid()}"
    if _usable_dir(p, shared=False):
        return p
    raise OSError(errno.EACCES, "no writable directory for CID lock files")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(path: Path) -> str:
    """Who holds this lock file, from what the holder wrote into it."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    pid = info.get("pid")
    if not isinstance(pid, int):
        return "another vmlab lab (holder unknown)"
    who = f"{info.get('owner') or 'a vmlab lab'} (pid {pid}"
    if info.get("user"):
        who += f", user {info['user']}"
    if info.get("since"):
        who += f", since {info['since']}"
    who += ")"
    if not _pid_alive(pid):
        who = f"another vmlab lab (last recorded holder {who} has exited)"
    return who


class CidAllocator:
    """Leases guest CIDs so that concurrent labs on one host never share one."""

    def __init__(self, lock_dir: Optional[Path] = None, first: int = 1000,
                 last: int = MAX_GUEST_CID - 1, probe_vhost: Optional[bool] = None) -> None:
        if not FIRST_GUEST_CID <= first <= last <= MAX_GUEST_CID:
            raise ValueError(f"bad CID range {first}..{last}: must be within "
                             f"{FIRST_GUEST_CID}..{MAX_GUEST_CID}")
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        if lock_dir is not None:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.first, self.last = first, last
        if probe_vhost is None:
            probe_vhost = vhost_vsock_works()
        self.probe_vhost = probe_vhost

    def _open_lock(self, cid: int) -> int:
        path = self.lock_dir / f"{cid}.lock"
        flags = os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
        except PermissionError:  # another user's file in the shared dir: locking needs no write
            return os.open(path, os.O_RDONLY | flags)
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o666)  # so other users can write their holder info later
        except OSError:
            pass
        return fd

    def _try_lease(self, cid: int, owner: str) -> tuple[Optional[CidLease], Optional[str]]:
        """(lease, None) or (None, holder description)."""
        path = self.lock_dir / f"{cid}.lock"
        fd = self._open_lock(cid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None, _describe_holder(path)
        except BaseException:
            os.close(fd)
            raise
        lease = CidLease(cid, owner, path, fd)
        if self.probe_vhost:
            busy = kernel_cid_in_use(cid)
            if busy:
                lease.release()
                return None, busy
        _write_holder(fd, owner)
        return lease, None

    def lease(self, cid: int, owner: str = "") -> CidLease:
        """Hold a pinned CID (any valid guest CID, not only this allocator's range)."""
        if not FIRST_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise ValueError(f"CID {cid} is not a valid guest CID "
                             f"({FIRST_GUEST_CID}..{MAX_GUEST_CID}; 0-2 are reserved)")
        lease, holder = self._try_lease(cid, owner)
        if lease is None:
            raise CidInUse(cid, holder)
        return lease

    def _candidates(self) -> Iterator[int]:
        """`first` upward, at most MAX_SCAN: busy CIDs cost one failed flock each, and
        starting low keeps CIDs readable and the number of lock files small."""
        return iter(range(self.first, min(self.last, self.first + MAX_SCAN - 1) + 1))

    def allocate(self, count: int = 1, owner: str = "") -> list[CidLease]:
        """`count` free CIDs; all or nothing."""
        leases: list[CidLease] = []
        try:
            for cid in self._candidates():
                if len(leases) == count:
                    break
                lease, _ = self._try_lease(cid, owner)
                if lease is not None:
                    leases.append(lease)
            if len(leases) < count:
                raise CidRangeExhausted(
                    f"found {len(leases)} of {count} free guest CIDs in {self.first}..{self.last} "
                    f"(lock dir {self.lock_dir})")
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return leases


def _write_holder(fd: int, owner: str) -> None:
    """Record who holds the lease, for other labs' CidInUse messages (best effort)."""
    try:
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = str(os.geteuid())
        info = {"pid": os.getpid(), "owner": owner, "user": user, "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = json.dumps(info).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # read-only fd on another user's lock file
