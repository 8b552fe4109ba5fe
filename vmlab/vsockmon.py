"""`--pcap` on the vhost transport: the kernel's own capture point, a vsockmon link.

vhost-vsock packets never pass vmlab's backend, so the capture comes from the host kernel:
``ip link add NAME type vsockmon``, ``ip link set NAME up``, dumpcap (or tshark) on it, and
``ip link del NAME`` afterwards. That needs root (CAP_NET_ADMIN) and the vsockmon module; where
either is missing the lab does not start and the error says which. A vsockmon link sees every
vsock packet of the host (all labs, all VMs), each once, in the same LINKTYPE_VSOCK format as
the backend's capture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vmlab import proc


class VsockmonError(RuntimeError):
    """vsockmon capture cannot run here; the message says why and what to do instead."""


def _module_loaded() -> bool:
    return Path("/sys/module/vsockmon").exists()


def _modprobe() -> bool:
    try:
        return subprocess.run(["modprobe", "vsockmon"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class VsockmonCapture:
    """One vsockmon link and the capture process on it; start() and stop() own both."""

    pcap: Path
    link: str = field(default_factory=lambda: f"vmlabmon{os.getpid() % 100000}")
    euid: Callable[[], int] = os.geteuid
    module_loaded: Callable[[], bool] = _module_loaded
    modprobe: Callable[[], bool] = _modprobe
    which: Callable[[str], str | None] = shutil.which
    _proc: subprocess.Popen | None = None
    _link_made: bool = False

    def tool(self) -> list[str]:
        """The capture command: dumpcap if there, else tshark, writing classic pcap (dumpcap's -P,
        tshark's -F pcap), the format the backend's capture has."""
        for name, fmt in (("dumpcap", ["-P"]), ("tshark", ["-F", "pcap"])):
            path = self.which(name)
            if path:
                return [path, "-q", "-i", self.link, *fmt, "-w", str(self.pcap)]
        raise VsockmonError("--pcap on the vhost transport needs dumpcap or tshark "
                            "(apt-get install tshark)")

    def preflight(self) -> list[str]:
        """Raise VsockmonError unless a vsockmon capture can work here; return the tool argv."""
        if self.euid() != 0:
            raise VsockmonError("--pcap on the vhost transport creates a vsockmon link (`ip link add "
                                "type vsockmon`), which needs root (CAP_NET_ADMIN); run as root or "
                                "capture with --transport vhost-user")
        if not self.module_loaded():
            self.modprobe()  # may fail where vsockmon is built in (vmlab's minimal kernel): start() tells
        if self.which("ip") is None:
            raise VsockmonError("--pcap on the vhost transport needs `ip` (apt-get install iproute2)")
        return self.tool()

    def link_commands(self) -> tuple[list[str], list[str], list[str]]:
        """(add, up, delete) argv for the link."""
        return (["ip", "link", "add", self.link, "type", "vsockmon"],
                ["ip", "link", "set", self.link, "up"],
                ["ip", "link", "del", self.link])

    def start(self, log_path: Path) -> None:
        argv = self.preflight()
        add, up, _ = self.link_commands()
        for cmd in (add, up):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                self.stop()
                if cmd is add and not self.module_loaded():
                    raise VsockmonError("--pcap on the vhost transport needs the vsockmon kernel module: "
                                        f"`{' '.join(cmd)}` failed ({r.stderr.strip()}) and `modprobe "
                                        "vsockmon` did not load it; or capture with --transport vhost-user")
                raise VsockmonError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
            self._link_made = True
        self._proc = proc.spawn(argv, log_path)
        self._wait_capturing(log_path)

    def _wait_capturing(self, log_path: Path, timeout: float = 60.0) -> None:
        """Until the tool has opened the link (it creates the pcap then): packets sent before that
        would be missing from the capture. A tool that exits instead is an error with its log."""
        import time

        deadline = time.monotonic() + timeout
        while not self.pcap.exists():
            if self._proc is not None and self._proc.poll() is not None:
                detail = log_path.read_text(errors="replace").strip()[-400:] if log_path.exists() else ""
                self.stop()
                raise VsockmonError(f"the capture on {self.link} exited at once: {detail or 'no output'}")
            if time.monotonic() > deadline:
                break  # slow (a TCG guest); the capture may still start: go on
            time.sleep(0.05)

    def stop(self) -> None:
        """End the capture (its file is complete afterwards) and remove the link. Idempotent."""
        if self._proc is not None:
            proc.terminate(self._proc)
            self._proc = None
        if self._link_made:
            subprocess.run(self.link_commands()[2], capture_output=True, timeout=30)
            self._link_made = False
