"""A host program run against a lab (under the shim on vhost-user), owned until closed.

Used by the `host_run` scenario step and the `host_run` pytest fixture. Output (stdout and
stderr together) goes to a log file in the lab's runtime dir; the process runs in its own
session and dies with vmlab (vmlab.proc).
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vmlab import proc as children
from vmlab.shim import LabTarget, ShimError, check_program, shim_env

POLL = 0.05


def unix_listening(name: str) -> bool:
    """Is an abstract Unix socket `name` listening? (/proc/net/unix: flag __SO_ACCEPTCON)"""
    want = "@" + name
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and parts[7].rstrip("\n") == want and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


def vsock_listening(port: int) -> bool:
    """Real AF_VSOCK (vhost transport): does some socket listen on `port`? (ss, sock_diag)"""
    try:
        out = subprocess.run(["ss", "-H", "-l", "--vsock"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(re.search(rf":{port}\s", line + " ") for line in out.splitlines())


@dataclass(eq=False)
class HostProcess:
    """One host program: start(), wait()/wait_for_output()/wait_listening(), close()."""

    argv: list[str]
    target: LabTarget
    log_path: Path
    env: dict[str, str] | None = None           # extra environment
    cwd: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "HostProcess":
        exe = check_program(self.argv[0], self.target)
        env = shim_env(self.target)
        env.update(self.env or {})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        argv = [str(exe), *self.argv[1:]]
        cwd = self.cwd
        if cwd:
            prev = os.getcwd()
            os.chdir(cwd)
        try:
            self.proc = children.spawn(argv, self.log_path, env=env)
        finally:
            if cwd:
                os.chdir(prev)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for exit; on timeout the program is killed and TimeoutError raised."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise TimeoutError(f"{self.argv[0]} still running after {timeout:g}s (killed); "
                               f"output:\n{self.output()[-2000:]}") from None

    def _until(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if self.returncode is not None:
                raise RuntimeError(f"{self.argv[0]} exited {self.returncode} before {what}; "
                                   f"output:\n{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.argv[0]}: no {what} within {timeout:g}s; "
                                   f"output:\n{self.output()[-2000:]}")
            time.sleep(POLL)

    def wait_for_output(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait until the output matches `pattern` (a regular expression, multiline)."""
        rx = re.compile(pattern, re.MULTILINE)
        found: list[re.Match] = []

        def ready() -> bool:
            m = rx.search(self.output())
            if m:
                found.append(m)
            return bool(m)
        self._until(ready, f"output matching {pattern!r}", timeout)
        return found[0]

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        """Wait until the program listens on vsock `port` (any program of the lab, really)."""
        if self.target.shimmed:
            name = f"{self.target.host_ns}:{port}"
            self._until(lambda: unix_listening(name), f"vsock listener on port {port}", timeout)
        else:
            self._until(lambda: vsock_listening(port), f"vsock listener on port {port}", timeout)

    def close(self) -> int | None:
        """Stop the program if it still runs (SIGTERM, then SIGKILL); idempotent."""
        if self.proc is None:
            return None
        return children.terminate(self.proc, timeout=5.0)


def run_host(argv: Sequence[str], target: LabTarget, log_path: Path, **kwargs) -> HostProcess:
    """Start a host program against a lab (ShimError if it cannot run there)."""
    return HostProcess(list(argv), target, log_path, **kwargs).start()


__all__ = ["HostProcess", "ShimError", "run_host", "unix_listening", "vsock_listening"]
