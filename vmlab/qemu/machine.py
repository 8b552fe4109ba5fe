"""One QEMU process and everything attached to it (QMP, serial console, logs).

Modelled on QEMU's python/qemu/machine: launch, connect the control channels, and on shutdown try
the polite way first (QMP quit), then SIGTERM, then SIGKILL, so nothing is ever left running.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from vmlab import proc
from vmlab.qemu.argv import VmConfig, build_argv, format_argv
from vmlab.qemu.console import Console
from vmlab.qemu.qmp import Qmp, QmpFailure
from vmlab.runtime import open_private

log = logging.getLogger("vmlab.machine")

CONNECT_TIMEOUT = 300.0
"""How long a live QEMU may take to create its serial and QMP sockets."""


class MachineError(RuntimeError):
    """QEMU failed to start or died; the message includes the tail of its log."""


class Machine:
    """Owns one qemu-system process. Start from a long-lived thread (see vmlab.proc.spawn)."""

    def __init__(self, config: VmConfig, run_dir: Path, qemu: str = "qemu-system-x86_64") -> None:
        self.config = config
        self.name = config.name
        self.run_dir = run_dir
        self.qemu = qemu
        self.argv = build_argv(config, qemu)
        self.qemu_log = run_dir / f"{config.name}.qemu.log"
        self.qmp_log = run_dir / f"{config.name}.qmp.jsonl"
        self.console = Console(config.serial_socket, config.name)
        self.qmp = Qmp(config.qmp_socket, self.qmp_log, config.name)
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def spawn(self) -> None:
        """Fork QEMU (on the caller's thread: the child's death signal follows that thread)."""
        with open_private(self.qemu_log, "a") as f:
            f.write(f"# {format_argv(self.argv)}\n")
        try:
            self._proc = proc.spawn(self.argv, self.qemu_log)
        except OSError as exc:
            raise MachineError(f"{self.name}: cannot start {self.qemu}: {exc}") from None

    def connect(self) -> None:
        """Connect console and QMP (QEMU waits for the console before booting).

        QEMU creates its sockets after loading its libraries: 0.1 s on a host, but a minute inside
        a busy TCG guest (the nested lab). A QEMU that dies ends the wait at once.
        """
        try:
            self.console.connect(timeout=CONNECT_TIMEOUT, alive=self.alive)
            self.qmp.connect(timeout=CONNECT_TIMEOUT, alive=self.alive)
        except Exception as exc:
            raise self._error(str(exc)) from None

    def _error(self, message: str) -> MachineError:
        return MachineError(f"{message}\n--- {self.qemu_log} ---\n{proc.log_tail(self.qemu_log)}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the guest init printed its ready marker and the shell answers."""
        try:
            self.console.wait_ready(timeout)
        except Exception as exc:
            if not self.alive():
                raise self._error(f"{self.name}: QEMU exited with status {self.exit_code} during boot: {exc}") from None
            raise

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        return self.console.run(command, timeout)

    def wait_exit(self, timeout: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop QEMU for sure and release every channel. Idempotent, never raises."""
        try:
            self.console.close()
        except Exception:  # noqa: BLE001 - teardown must go on
            log.exception("%s: closing console", self.name)
        if self.alive():
            try:
                self.qmp.quit(timeout=min(timeout, 3.0))
            except QmpFailure:
                pass
            if self.wait_exit(timeout) is None and self._proc is not None:
                proc.terminate(self._proc, timeout)
        self.qmp.close()
        for path in (self.config.qmp_socket, self.config.serial_socket):
            path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"<Machine {self.name} pid={self.pid} alive={self.alive()}>"
