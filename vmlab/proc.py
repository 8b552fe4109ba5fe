"""Child processes that cannot outlive vmlab.

Every qemu and backend process is started here: in its own session (a Ctrl-C on the terminal reaches
vmlab, which then tears down in order, not the children directly) and with PR_SET_PDEATHSIG so that
even `kill -9` of vmlab takes its children with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, Sequence

from vmlab.runtime import open_private

PR_SET_PDEATHSIG = 1

_spawn_lock = threading.Lock()


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL the child when its parent goes away (and if it already has, exit now)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - never fail the fork over the safety net
        pass
    if os.getppid() != parent:
        os._exit(1)


def spawn(argv: Sequence[str], log_path: Path, *, stdout: int | IO | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start argv with stderr (and stdout unless given) appended to log_path.

    PDEATHSIG fires when the *thread* that forked exits, so callers must spawn from a long-lived
    thread (the main thread): the lab boots VMs in parallel but forks them all from one thread.
    """
    parent = os.getpid()
    with _spawn_lock, open_private(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log if stdout is None else stdout,
            stderr=log,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
            env=env,
            close_fds=True,
        )


def terminate(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """SIGTERM, wait, then SIGKILL. Idempotent; returns the exit status."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return proc.poll()
    proc.kill()
    return proc.wait(timeout)


def log_tail(path: Path, lines: int = 20) -> str:
    """Last lines of a log file, for error messages (empty if the file is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
