"""The backend end to end with real QEMU guests (TCG) and the real Linux vsock stack.

One backend and two guests (g0 cid 3, g1 cid 4) are shared by every test in this module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from vmlab.vsock.host import HostEndpoint, host_connect, host_listen
from vmlab.vsock.process import BackendProcess

pytestmark = pytest.mark.integration

# --- a tiny guest fixture (no vmlab.lab needed): TCG, memfd memory, vhost-user-vsock-pci on
# our backend, serial console on stdio driven by pexpect -----------------------------------
_ids = itertools.count()
SHELL_BANNER = "built-in shell (ash)"   # what a new guest shell prints first



@dataclass
class Guest:
    name: str
    cid: int
    vu_sock: Path
    uds_path: Path
    child: pexpect.spawn | None = None
    shell_restarts: int = 0

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
        # ash's line editor asks the terminal for the cursor position (ESC[6n) and may eat
        # input typed meanwhile: wait for the prompt, then retry the first command if needed
        self.child.expect(r"# ", timeout=60)
        for attempt in range(6):
            try:
                self.run("stty -echo 2>/dev/null; PS1=''", timeout=10)
                return
            except pexpect.TIMEOUT:
                if attempt == 5:
                    raise

    def run(self, cmd: str, timeout: float = 60, retried: bool = False) -> tuple[int, str]:
        """Run a shell command; returns (rc, output).

        Rarely (seen a few times in hundreds of runs, under load) the guest's busybox ash exits
        while idle at its prompt, right after a background vmlab-guest job ends; /init starts a
        new shell, which never saw the command (it was typed into the dying one). Then the command
        is typed again, once, into the new shell. The cause is still open (docs/reliability.md)."""
        assert self.child is not None
        tag = f"__RC{next(_ids)}__"
        self.child.sendline(f"{cmd}; echo {tag}$?{tag}")
        got = self.child.expect([re.escape(tag) + r"(\d+)" + re.escape(tag),
                                 re.escape(SHELL_BANNER)], timeout=timeout)
        if got == 1:
            if retried:
                raise AssertionError(f"the guest shell restarted twice running {cmd!r}")
            self.shell_restarts += 1
            self.child.expect(r"# ", timeout=60)
            self.run("stty -echo 2>/dev/null; PS1=''", timeout=30, retried=True)
            return self.run(cmd, timeout, retried=True)
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


# --- tests ------------------------------------------------------------------------------

MIB = 1024 * 1024


def pattern(n: int, start: int = 0) -> bytes:
    block = bytes(range(251)) * (n // 251 + 2)
    off = start % 251
    return block[off:off + n]


def pattern_sha(n: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < n:
        k = min(MIB, n - done)
        h.update(pattern(k, done))
        done += k
    return h.hexdigest()


def events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        i = line.find("{")                     # a shell prompt may precede it
        if i >= 0:
            try:
                out.append(json.loads(line[i:].strip()))
            except json.JSONDecodeError:
                pass
    return out


def wait_event(g: Guest, path: str, name: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ev in events(g.file(path)):
            if ev.get("event") in (name, "error"):
                return ev
        time.sleep(0.3)
    raise AssertionError(f"{g.name}: no {name} in {path}: {g.file(path)!r}")


@pytest.fixture(scope="module")
def lab():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    from vmlab.image import ensure_image
    img = ensure_image()
    lab = GuestLab(2)
    try:
        lab.start(img.kernel, img.initrd)
        yield lab
    finally:
        lab.close()


def test_guest_connects_to_host_and_host_gets_exactly_the_message(lab) -> None:
    g0 = lab.guests[0]
    with host_listen(9999, vms=[g0.endpoint]) as listener:
        rc, out = g0.run('vmlab-guest connect 2 9999 --send "Hello, world!"')
        assert rc == 0, out
        conn = listener.accept(timeout=30)
        with conn:
            conn.settimeout(30)
            assert conn.peer_cid == 3
            assert conn.recv_all() == b"Hello, world!"


def test_host_connects_to_guest_listener(lab) -> None:
    g0 = lab.guests[0]
    g0.start("vmlab-guest listen 5000 --once", "/tmp/l5000")
    wait_event(g0, "/tmp/l5000", "listening")
    msg = b"ping from the host"
    with host_connect(3, 5000, endpoint=g0.endpoint, timeout=30) as conn:
        assert conn.local_port is not None
        conn.sendall(msg)
        conn.shutdown_write()
        assert conn.recv_all() == b""          # the guest closes after reading to EOF
    ev = wait_event(g0, "/tmp/l5000", "received")
    assert ev["bytes"] == len(msg) and ev["sha256"] == hashlib.sha256(msg).hexdigest()
    accepted = [e for e in events(g0.file("/tmp/l5000")) if e["event"] == "accepted"]
    assert accepted and accepted[0]["peer_cid"] == 2


def test_unused_ports_are_refused_fast_both_ways(lab) -> None:
    g0 = lab.guests[0]
    rc, out = g0.run("vmlab-guest connect 2 4444 --timeout 20", timeout=30)
    assert rc != 0
    err = [e for e in events(out) if e["event"] == "error"]
    assert err and err[0]["op"] == "connect" and err[0]["errno"] in (104, 111), out
    with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
        host_connect(3, 4445, endpoint=g0.endpoint, timeout=20)
    rc, out = g0.run("vmlab-guest connect 77 80 --timeout 20", timeout=30)   # no such CID
    assert rc != 0 and any(e["event"] == "error" for e in events(out)), out


def test_vm_to_vm_message_and_4mib(lab) -> None:
    g0, g1 = lab.guests
    g1.start("vmlab-guest listen 6000 --once", "/tmp/l6000")
    wait_event(g1, "/tmp/l6000", "listening")
    rc, out = g0.run('vmlab-guest connect 4 6000 --send "hi g1"')
    assert rc == 0, out
    ev = wait_event(g1, "/tmp/l6000", "received")
    assert ev["sha256"] == hashlib.sha256(b"hi g1").hexdigest()

    g1.start("vmlab-guest listen 6001 --once", "/tmp/l6001")
    wait_event(g1, "/tmp/l6001", "listening")
    rc, out = g0.run("vmlab-guest connect 4 6001 --send-bytes 4M", timeout=300)
    assert rc == 0, out
    ev = wait_event(g1, "/tmp/l6001", "received", timeout=120)
    assert ev["bytes"] == 4 * MIB and ev["sha256"] == pattern_sha(4 * MIB)

    # SEQPACKET between guests: 9000-byte messages cross 4 KiB rx buffers (split by the router)
    g1.start("vmlab-guest listen 6002 --seqpacket --once", "/tmp/l6002")
    wait_event(g1, "/tmp/l6002", "listening")
    rc, out = g0.run("vmlab-guest connect 4 6002 --seqpacket --send-bytes 20000 --chunk 9000")
    assert rc == 0, out
    wait_event(g1, "/tmp/l6002", "received")
    msgs = [e["len"] for e in events(g1.file("/tmp/l6002")) if e["event"] == "message"]
    assert msgs == [9000, 9000, 2000]


def test_seqpacket_keeps_message_boundaries(lab) -> None:
    g0 = lab.guests[0]
    with host_listen(7000, vms=[g0.endpoint], type="seqpacket") as listener:
        rc, out = g0.run("vmlab-guest connect 2 7000 --seqpacket --send-bytes 10000 --chunk 3000")
        assert rc == 0, out
        conn = listener.accept(timeout=30)
        with conn:
            conn.settimeout(30)
            sizes = []
            while True:
                m = conn.recv(65536)
                if not m:
                    break
                sizes.append(len(m))
            assert sizes == [3000, 3000, 3000, 1000]
    g0.start("vmlab-guest listen 7001 --seqpacket --once", "/tmp/l7001")
    wait_event(g0, "/tmp/l7001", "listening")
    with host_connect(3, 7001, endpoint=g0.endpoint, type="seqpacket", timeout=30) as conn:
        for n in (100, 5000, 7):
            conn.sendall(pattern(n))
        conn.shutdown_write()
        conn.settimeout(30)
        assert conn.recv(100) == b""
    wait_event(g0, "/tmp/l7001", "received")
    msgs = [e["len"] for e in events(g0.file("/tmp/l7001")) if e["event"] == "message"]
    assert msgs == [100, 5000, 7]


def test_64mib_each_way_with_a_stalled_host_reader(lab) -> None:
    g0 = lab.guests[0]
    size = 64 * MIB
    want = pattern_sha(size)
    with host_listen(8000, vms=[g0.endpoint]) as listener:
        g0.start(f"vmlab-guest connect 2 8000 --send-bytes {size}", "/tmp/c8000")
        conn = listener.accept(timeout=30)
        with conn:
            conn.settimeout(120)
            first = conn.recv_exact(1000)
            time.sleep(4)                       # stall: the guest must wait, not lose data
            h = hashlib.sha256(first)
            total = len(first)
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                total += len(chunk)
        assert total == size and h.hexdigest() == want
    ev = wait_event(g0, "/tmp/c8000", "sent", timeout=60)
    assert ev["sha256"] == want

    g0.start("vmlab-guest listen 8001 --once", "/tmp/l8001")
    wait_event(g0, "/tmp/l8001", "listening")
    with host_connect(3, 8001, endpoint=g0.endpoint, timeout=30) as conn:
        conn.settimeout(300)
        for off in range(0, size, MIB):
            conn.sendall(pattern(MIB, off))
        conn.shutdown_write()
        assert conn.recv_all() == b""
    ev = wait_event(g0, "/tmp/l8001", "received", timeout=120)
    assert ev["bytes"] == size and ev["sha256"] == want


def test_pcap_capture_and_stats_over_the_control_socket(lab) -> None:
    g0 = lab.guests[0]
    cap = lab.dir / "cap.pcap"
    assert lab.backend.control({"cmd": "pcap", "path": str(cap)})["ok"]
    with host_listen(9998, vms=[g0.endpoint]) as listener:
        rc, out = g0.run('vmlab-guest connect 2 9998 --send "captured"')
        assert rc == 0, out
        with listener.accept(timeout=30) as conn:
            conn.settimeout(30)
            assert conn.recv_all() == b"captured"
    time.sleep(0.5)
    assert lab.backend.control({"cmd": "pcap", "path": None})["ok"]
    stats = lab.backend.control({"cmd": "stats"})
    assert stats["stats"].get("spoofed", 0) == 0            # Linux guests never spoof
    assert stats["vms"]["g0"]["broken"] is None and stats["vms"]["g1"]["broken"] is None
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(cap), "-T", "fields", "-e", "vsock.src_cid",
                              "-e", "vsock.dst_port", "-e", "vsock.virtio.op"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        rows = [r.split("\t") for r in out.splitlines() if r]
        assert ["3", "9998", "1"] in rows              # the guest's REQUEST
        assert any(r[0] == "2" and r[2] == "2" for r in rows)   # our RESPONSE


def test_transport_reset_fault_resets_live_connections(lab) -> None:
    g0 = lab.guests[0]
    g0.start("vmlab-guest listen 5100 --once", "/tmp/l5100")
    wait_event(g0, "/tmp/l5100", "listening")
    with host_connect(3, 5100, endpoint=g0.endpoint, timeout=30) as conn:
        conn.sendall(b"before the reset")
        wait_event(g0, "/tmp/l5100", "accepted")
        reply = lab.backend.control({"cmd": "fault", "kind": "transport_reset", "vm": "g0"})
        assert reply["ok"] and reply["reset"] >= 1
        conn.settimeout(30)
        try:
            assert conn.recv(100) == b""
        except ConnectionResetError:
            pass
    # Linux ends the guest socket on RST: EOF after the data (6.1), ECONNRESET on newer kernels
    ev = wait_event(g0, "/tmp/l5100", "received")          # "error" also ends the wait
    assert (ev["event"] == "received" and ev["bytes"] == 16) or ev.get("errno") == 104, ev
    assert lab.backend.control({"cmd": "stats"})["hybrid"]["connections"] == 0


def test_drop_fault_loses_one_request_then_connects(lab) -> None:
    g0 = lab.guests[0]
    with host_listen(5200, vms=[g0.endpoint]) as listener:
        assert lab.backend.control({"cmd": "fault", "kind": "drop", "vm": "g0", "direction": "tx",
                                    "op": "REQUEST", "port": 5200, "count": 1})["ok"]
        try:
            rc, out = g0.run("vmlab-guest connect 2 5200 --timeout 3", timeout=30)
            assert rc != 0
            err = [e for e in events(out) if e["event"] == "error"]
            assert err and err[0]["errno"] == 110, out       # ETIMEDOUT: the REQUEST vanished
            rc, out = g0.run('vmlab-guest connect 2 5200 --send "second try"', timeout=30)
            assert rc == 0, out
            with listener.accept(timeout=30) as conn:
                conn.settimeout(30)
                assert conn.recv_all() == b"second try"
        finally:
            lab.backend.control({"cmd": "fault", "kind": "clear"})
    stats = lab.backend.control({"cmd": "stats"})["stats"]
    assert stats["fault_drop"] == 1


def test_fifty_concurrent_guest_connections(lab) -> None:
    g0 = lab.guests[0]
    n = 50
    with host_listen(9100, vms=[g0.endpoint]) as listener:
        g0.start(f"for i in $(seq {n}); do vmlab-guest connect 2 9100 --send msg$i & done; wait",
                 "/tmp/c9100")
        conns = [listener.accept(timeout=60) for _ in range(n)]
        got = set()
        for c in conns:
            with c:
                c.settimeout(60)
                got.add(c.recv_all())
    assert got == {f"msg{i}".encode() for i in range(1, n + 1)}
    end = time.monotonic() + 30
    while lab.backend.control({"cmd": "stats"})["hybrid"]["connections"] and \
            time.monotonic() < end:
        time.sleep(0.2)
    assert lab.backend.control({"cmd": "stats"})["hybrid"]["connections"] == 0


def test_a_dying_vm_takes_down_neither_the_backend_nor_its_peer(lab) -> None:
    g0, g1 = lab.guests
    g1.start("vmlab-guest listen 5300 --once", "/tmp/l5300")
    wait_event(g1, "/tmp/l5300", "listening")
    conn = host_connect(4, 5300, endpoint=g1.endpoint, timeout=30)
    with conn:
        conn.sendall(b"x")
        g1.kill()                                           # qemu gone mid-connection
        conn.settimeout(30)
        try:
            assert conn.recv(10) == b""
        except ConnectionResetError:
            pass
    assert lab.backend.running()
    stats = lab.backend.control({"cmd": "stats"})
    assert stats["vms"]["g1"]["connected"] is False and stats["hybrid"]["connections"] == 0
    with host_listen(9997, vms=[g0.endpoint]) as listener:   # the peer VM still works
        rc, out = g0.run('vmlab-guest connect 2 9997 --send "still here"')
        assert rc == 0, out
        with listener.accept(timeout=30) as c:
            c.settimeout(30)
            assert c.recv_all() == b"still here"
    rc, out = g0.run("vmlab-guest connect 4 80 --timeout 5", timeout=30)   # dead VM: fails
    assert rc != 0
