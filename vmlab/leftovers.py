"""What a lab run left behind under a private runtime base: processes, run dirs, sockets, leases.

Used by benchmarks/interrupts.py and the interrupt tests, which run vmlab with their own
XDG_RUNTIME_DIR (so every qemu/backend command line names it) and VMLAB_CID_LOCK_DIR (so
held CID leases can be counted by trying their flocks)."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path


def our_processes(base: Path) -> list[int]:
    """qemu and backend processes whose command line names `base`."""
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(base) in text and ("qemu-system" in text or "vmlab.vsock" in text):
            pids.append(int(cmd.parent.name))
    return pids


def held_leases(locks: Path) -> list[str]:
    """CID lease files in `locks` that some process still holds (flock taken)."""
    held = []
    for lock in locks.glob("*.lock"):
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(lock.name)
    return held


def leftovers(base: Path, locks: Path) -> dict[str, list]:
    """Everything still there: processes, run dirs (under base/vmlab), Unix sockets, leases."""
    runs = base / "vmlab"
    return {"processes": our_processes(base),
            "run_dirs": sorted(p.name for p in runs.glob("*") if p.is_dir()) if runs.exists() else [],
            "sockets": sorted(str(p) for p in base.rglob("*") if stat.S_ISSOCK(os.lstat(p).st_mode)),
            "leases": held_leases(locks)}
