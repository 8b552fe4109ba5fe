"""Permissions: runtime dirs 0700, every Unix socket 0600, no planted symlink is followed, and
a guest of one lab never reaches another lab's host listener."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from vmlab.runtime import RuntimeDir, open_private, runtime_base
from vmlab.vsock.host import HostEndpoint, host_listen
from vmlab.vsock.hybrid import Hybrid
from vmlab.vsock.packet import Header, Op, Type
from vmlab.vsock.process import BackendError, BackendProcess
from vmlab.vsock.router import Router
from vmlab.vsock.unixsock import listen_unix


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def config(d: Path) -> dict:
    return {"vms": [{"name": f"vm{i}", "cid": 3 + i, "socket": str(d / f"vm{i}.vu"),
                     "uds_path": str(d / f"vm{i}.vsock"), "group": "default"} for i in range(2)],
            "pcap": None, "log": str(d / "backend.log")}


@pytest.fixture
def run_dir():
    rd = RuntimeDir.create(prefix="perm-")
    yield rd.path
    rd.remove()


def test_runtime_dirs_are_0700_and_every_socket_0600(run_dir: Path) -> None:
    assert mode(runtime_base()) == 0o700 and mode(run_dir) == 0o700
    old = os.umask(0)                           # even with a careless umask
    try:
        bp = BackendProcess(config(run_dir), run_dir)
        bp.start(timeout=30)
        try:
            lst = host_listen(5000, vms=[HostEndpoint("vhost-user", "vm0", 3,
                                                      str(run_dir / "vm0.vsock"))])
            socks = sorted(p for p in run_dir.iterdir() if p.is_socket())
            names = {p.name for p in socks}
            assert {"vm0.vu", "vm1.vu", "vm0.vsock", "vm0.vsock_seqpacket", "vm1.vsock",
                    "vm1.vsock_seqpacket", "backend.ctl", "vm0.vsock_5000"} <= names
            assert {p.name: oct(mode(p)) for p in socks} == {p.name: "0o600" for p in socks}
            files = [p for p in run_dir.iterdir() if p.is_file()]
            assert files and all(mode(p) & 0o077 == 0 for p in files), \
                {p.name: oct(mode(p)) for p in files}
            lst.close()
        finally:
            bp.stop()
    finally:
        os.umask(old)


def test_a_symlink_planted_in_the_run_dir_is_never_followed(run_dir: Path, tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = run_dir / "backend.log"
    os.symlink(victim, link)
    bp = BackendProcess(config(run_dir), run_dir)
    with pytest.raises(OSError):                    # ELOOP: no log through the link
        bp.start(timeout=30)
    assert victim.read_text() == "precious\n"
    with pytest.raises(OSError):
        open_private(link, "w")
    os.unlink(link)
    os.symlink(tmp_path / "elsewhere.sock", run_dir / "vm1.vu")   # a device socket path
    bp = BackendProcess(config(run_dir), run_dir)
    with pytest.raises(BackendError, match="symlink"):
        bp.start(timeout=30)
    assert not (tmp_path / "elsewhere.sock").exists()
    with pytest.raises(OSError, match="symlink"):
        listen_unix(str(run_dir / "vm1.vu"))


class Dev:
    seqpacket = True
    broken = None

    def __init__(self, name: str, cid: int) -> None:
        self.name, self.cid, self.got = name, cid, []

    def rx_pop(self):
        class B:
            capacity = 4096
            payload = [memoryview(bytearray(4096))]
        return B()

    def rx_push(self, buf, header: bytes, n: int) -> None:
        self.got.append(Header.unpack_from(header))

    def rx_cancel(self, buf) -> None:
        pass

    def flush(self) -> None:
        pass


def make_lab(d: Path, name: str, cid: int):
    loop = asyncio.new_event_loop()
    router = Router(loop)
    hybrid = Hybrid(loop, router)
    router.hybrid = hybrid
    dev = Dev(name, cid)
    router.add_device(dev)
    hybrid.add_vm(name, cid, str(d / f"{name}.vsock"))
    return loop, router, hybrid, dev


def request(router, dev, port: int) -> Op:
    router.on_tx_packet(dev, Header(dev.cid, 2, 1000, port, 0, Type.STREAM, Op.REQUEST, 0,
                                    65536, 0).pack(), [])
    return dev.got[-1].op


def test_guest_connect_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    loop, router, hybrid, dev = make_lab(tmp_path, "a", 3)
    try:
        elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        elsewhere.bind(str(tmp_path / "private.sock"))  # e.g. some daemon's socket
        elsewhere.listen(4)
        elsewhere.setblocking(False)
        os.symlink(tmp_path / "private.sock", tmp_path / "a.vsock_7000")
        assert request(router, dev, 7000) == Op.RST
        with pytest.raises(BlockingIOError):
            elsewhere.accept()                          # nobody was connected to it
        elsewhere.close()
    finally:
        hybrid.close()
        loop.close()


def test_host_listener_of_one_lab_refuses_a_guest_of_another(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "lab1", tmp_path / "lab2"
    d1.mkdir()
    d2.mkdir()
    lab1 = make_lab(d1, "g", 3)
    lab2 = make_lab(d2, "g", 3)                        # same VM name and CID, other lab
    lst = host_listen(7000, vms=[HostEndpoint("vhost-user", "g", 3, str(d1 / "g.vsock"))])
    try:
        assert request(lab2[1], lab2[3], 7000) == Op.RST          # lab 2's guest: refused
        with pytest.raises(TimeoutError):
            lst.accept(timeout=0.2)
        assert request(lab1[1], lab1[3], 7000) == Op.RESPONSE     # lab 1's guest: served
        lst.accept(timeout=5).close()
    finally:
        lst.close()
        for loop, router, hybrid, dev in (lab1, lab2):
            hybrid.close()
            loop.close()
