"""A tiny QEMU guest fixture for the backend's integration tests (no vmlab.lab needed).

Each guest: TCG, memfd shared memory, vhost-user-vsock-pci on our backend, serial console on
stdio driven by pexpect; commands run in the busybox shell with a unique rc marker.
"""

from __future__ import annotations

import itertools
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pexpect

from vmlab.vsock.host import HostEndpoint
from vmlab.vsock.process import BackendProcess

_ids = itertools.count()


@dataclass
class Guest:
    name: str
    cid: int
    vu_sock: Path
    uds_path: Path
    child: pexpect.spawn | None = None

    @property
    def endpoint(self) -> HostEndpoint:
        return HostEndpoint("vhost-user", self.name, self.cid, str(self.uds_path))

    def boot(self, kernel: Path, initrd: Path, log: Path, timeout: float = 240) -> None:
        argv = ["-name", f"helper-vsockproto-{self.name}", "-accel", "tcg", "-m", "256",
                "-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                "-machine", "pc,memory-backend=mem",
                "-chardev", f"socket,id=vu,path={self.vu_sock}",
                "-device", "vhost-user-vsock-pci,chardev=vu",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", f"console=ttyS0 panic=-1 quiet vmlab.name={self.name}"]
        self.child = pexpect.spawn("qemu-system-x86_64", argv, encoding="utf-8",
                                   codec_errors="replace", timeout=timeout,
                                   logfile=open(log, "w"))
        self.child.expect("VMLAB-READY")
        self.run("stty -echo 2>/dev/null; PS1=''", timeout=30)

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command; returns (rc, output)."""
        assert self.child is not None
        tag = f"__RC{next(_ids)}__"
        self.child.sendline(f"{cmd}; echo {tag}$?{tag}")
        self.child.expect(re.escape(tag) + r"(\d+)" + re.escape(tag), timeout=timeout)
        out = self.child.before
        out = out.split("\n", 1)[1] if "\n" in out else ""
        return int(self.child.match.group(1)), out.replace("\r", "")

    def start(self, cmd: str, out: str) -> None:
        """Start a background command with its output in a guest file."""
        self.run(f"({cmd}) > {out} 2>&1 & true")

    def file(self, path: str) -> str:
        return self.run(f"cat {shlex.quote(path)}")[1]

    def kill(self) -> None:
        if self.child is not None:
            self.child.terminate(force=True)
            self.child.close(force=True)
            self.child = None


class GuestLab:
    """A backend plus N guests; everything is torn down by close()."""

    def __init__(self, n: int, groups: list[str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vmlab-it-")
        self.dir = Path(self.tmp.name)
        self.guests = [Guest(f"g{i}", 3 + i, self.dir / f"g{i}.vu", self.dir / f"g{i}.vsock")
                       for i in range(n)]
        groups = groups or ["default"] * n
        cfg = {"vms": [{"name": g.name, "cid": g.cid, "socket": str(g.vu_sock),
                        "uds_path": str(g.uds_path), "group": grp}
                       for g, grp in zip(self.guests, groups)],
               "pcap": None, "log": str(self.dir / "backend.log")}
        self.backend = BackendProcess(cfg, self.dir)

    def pids(self) -> list[int]:
        """Our live children (the repo conftest's leak check accepts open labs' pids)."""
        pids = [g.child.pid for g in self.guests if g.child is not None]
        return pids + ([self.backend.pid] if self.backend.pid else [])

    def start(self, kernel: Path, initrd: Path) -> None:
        from vmlab.lab import OPEN_LABS
        OPEN_LABS.add(self)  # type: ignore[arg-type]
        self.backend.start(timeout=30)
        for g in self.guests:                 # boot in parallel: spawn all, then wait
            g.child = None
        import threading
        errs: list[BaseException] = []

        def boot(g: Guest) -> None:
            try:
                g.boot(kernel, initrd, self.dir / f"{g.name}.console.log")
            except BaseException as e:       # reported below
                errs.append(e)
        threads = [threading.Thread(target=boot, args=(g,)) for g in self.guests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errs:
            raise errs[0]

    def close(self) -> None:
        from vmlab.lab import OPEN_LABS
        for g in self.guests:
            g.kill()
        self.backend.stop()
        OPEN_LABS.discard(self)  # type: ignore[arg-type]
        self.tmp.cleanup()
