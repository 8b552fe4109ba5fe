"""`BackendProcess`: the lab's handle on one backend process (spawn, READY, control, stop).

The child gets its own session (Ctrl-C in a terminal reaches only vmlab, which then stops it
in order) and PR_SET_PDEATHSIG=SIGKILL, so even a ``kill -9`` of vmlab does not leave a
backend behind. Note: the death signal follows the *thread* that spawned the child, so call
start() from a thread that lives as long as the lab (the main thread in vmlab).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmlab import proc as children
from vmlab.runtime import open_private
from vmlab.vsock import accel


class BackendError(RuntimeError):
    """The backend did not come up (or died); the message carries the log tail."""


def _tail(path: Path, lines: int = 30) -> str:
    return children.log_tail(path, lines) or "(no backend log, or it is empty)"


class BackendProcess:
    def __init__(self, config: dict, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.config.setdefault("log", str(self.run_dir / "backend.log"))
        self.config.setdefault("control", str(self.run_dir / "backend.ctl"))
        self.log_path = Path(self.config["log"])
        self.control_path = Path(self.config["control"])
        self.config_path = self.run_dir / "backend.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.command_prefix: list[str] = []   # benchmarks: e.g. valgrind --tool=callgrind
        self.env_overrides: dict[str, str] = {}   # benchmarks/tests: e.g. VMLAB_NO_ACCEL=1
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def death(self) -> str | None:
        """Why the started backend is gone (None while it runs, or if it was never started or
        stopped by us): every VM it served has lost its vsock device."""
        p = self.proc
        if p is None or self._stopping or p.poll() is None:
            return None
        rc = p.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        return f"the vsock backend (pid {p.pid}) died: {how}; see {self.log_path}"

    def start(self, timeout: float = 10) -> None:
        """Spawn the backend and wait for its READY line; raise BackendError with the log tail."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Fork the backend without waiting: the lab prepares guest images while it starts up."""
        if self.proc is not None:
            raise BackendError("backend already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open_private(self.config_path, "w") as f:        # never through a planted link
            f.write(json.dumps(self.config, indent=2))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env_overrides)
        if env.get(accel.ENV_OFF, "") in ("", "0"):
            accel.load()    # the first build happens here, not inside the READY timeout
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        # tracebacks and config errors land in the log; stdout carries only READY
        self.proc = children.spawn([*self.command_prefix, sys.executable, "-m", "vmlab.vsock.backend", "--config", str(self.config_path)],
                                   self.log_path, stdout=subprocess.PIPE, env=env)

    def wait_ready(self, timeout: float = 10) -> None:
        """Wait for the READY line of a spawned backend; raise BackendError with the log tail."""
        assert self.proc is not None and self.proc.stdout is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        out = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in out:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"backend not READY after {timeout:.0f}s")
            r, _, _ = select.select([fd], [], [], min(left, 0.2))
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._fail(f"backend exited with {self.proc.wait()} before READY")
                out += chunk
            elif self.proc.poll() is not None:
                self._fail(f"backend exited with {self.proc.returncode} before READY")
        if out.split(b"\n", 1)[0].strip() != b"READY":
            self._fail(f"backend said {out[:200]!r} instead of READY")
        # the backend writes nothing more to stdout; closing our end is harmless
        self.proc.stdout.close()

    def _fail(self, why: str) -> None:
        self._kill()
        raise BackendError(f"{why}\n--- {self.log_path} (tail) ---\n{_tail(self.log_path)}")

    def _kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        if p is not None and p.stdout is not None and not p.stdout.closed:
            p.stdout.close()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (the backend resets connections and unlinks its sockets), then SIGKILL."""
        p = self.proc
        if p is None:
            return
        self._stopping = True
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._kill()
        self._cleanup_sockets()

    def _cleanup_sockets(self) -> None:
        """Backstop for a backend that had to be killed: remove what it would have unlinked."""
        paths = [self.control_path]
        for vm in self.config.get("vms", []):
            paths += [Path(vm["socket"]), Path(vm["uds_path"]),
                      Path(vm["uds_path"] + "_seqpacket")]
        for p in paths:
            try:
                if p.is_socket():
                    p.unlink()
            except OSError:
                pass

    def control(self, request: dict, timeout: float = 10) -> dict[str, Any]:
        """One JSON request over the control socket; returns the JSON reply."""
        if not self.running():
            raise BackendError(f"backend is not running\n{_tail(self.log_path)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control_path))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise BackendError("backend closed the control socket without a reply")
                buf += chunk
        return json.loads(buf)

    def __enter__(self) -> "BackendProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
