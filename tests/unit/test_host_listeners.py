"""Lab-wide host listeners (the `vmlab exec` shim's side of the backend): guest REQUESTs to
CID 2 reach an abstract Unix name with a peer-address preamble; CONNECT may name its source
port. Router + Hybrid in process, fake devices with in-memory rx buffers, real Unix sockets."""
from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from vmlab.vsock.hybrid import PREAMBLE, Hybrid, host_listener_name
from vmlab.vsock.packet import SEQ_EOM, SEQ_EOR, Header, Op, Type
from vmlab.vsock.router import Router


class FakeBuf:
    def __init__(self, cap: int) -> None:
        self.mem = bytearray(cap)
        self.capacity = cap
        self.payload = [memoryview(self.mem)]


class FakeDevice:
    seqpacket = True
    broken = None

    def __init__(self, name: str, cid: int) -> None:
        self.name, self.cid = name, cid
        self.free = [FakeBuf(4096) for _ in range(64)]
        self.got: list[tuple[Header, bytes]] = []

    def rx_pop(self):
        return self.free.pop(0) if self.free else None

    def rx_push(self, buf, header: bytes, n: int) -> None:
        self.got.append((Header.unpack_from(header), bytes(buf.mem[:n])))

    def rx_cancel(self, buf) -> None:
        self.free.insert(0, buf)

    def flush(self) -> None:
        pass

    def take(self):
        got, self.got = self.got, []
        return got


@pytest.fixture
def lab(tmp_path: Path):
    loop = asyncio.new_event_loop()
    router = Router(loop)
    ns = f"vmlab-test:{abs(hash(str(tmp_path))) % 10**12}"
    hybrid = Hybrid(loop, router, close_timeout=0.2, connect_timeout=2, host_ns=ns)
    router.hybrid = hybrid
    a, b = FakeDevice("a", 3), FakeDevice("b", 4)
    for dev in (a, b):
        router.add_device(dev, "g")
        hybrid.add_vm(dev.name, dev.cid, str(tmp_path / f"{dev.name}.vsock"))
    yield loop, router, a, b, ns, tmp_path
    hybrid.close()
    loop.close()


def spin(loop, cond=lambda: False, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        loop.run_until_complete(asyncio.sleep(0.005))
        if cond():
            return


def tx(router, dev, op, src_port, dst_port, data=b"", typ=Type.STREAM, flags=0):
    h = Header(dev.cid, 2, src_port, dst_port, len(data), typ, op, flags, 65536, 0)
    router.on_tx_packet(dev, h.pack(), [memoryview(bytearray(data))] if data else [])


def test_one_listener_serves_every_vm_with_the_peer_in_a_preamble(lab) -> None:
    loop, router, a, b, ns, _ = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(host_listener_name(ns, 9999))
    srv.listen()
    for dev, port in ((a, 1025), (b, 2000)):
        tx(router, dev, Op.REQUEST, port, 9999)
        (h, _), = dev.take()
        assert h.op == Op.RESPONSE
        conn, _ = srv.accept()
        tx(router, dev, Op.RW, port, 9999, b"hello")
        conn.settimeout(3)
        pre = conn.recv(PREAMBLE.size, socket.MSG_WAITALL)
        assert PREAMBLE.unpack(pre) == (b"VSK1", dev.cid, port, 9999)
        assert conn.recv(100) == b"hello"
        conn.close()
    srv.close()


def test_seqpacket_preamble_is_its_own_message_then_messages_are_framed(lab) -> None:
    loop, router, a, b, ns, _ = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(host_listener_name(ns, 7000))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 7000, typ=Type.SEQPACKET)
    (h, _), = a.take()
    assert h.op == Op.RESPONSE
    conn, _ = srv.accept()
    tx(router, a, Op.RW, 1025, 7000, b"one", typ=Type.SEQPACKET, flags=SEQ_EOM | SEQ_EOR)
    tx(router, a, Op.RW, 1025, 7000, b"two", typ=Type.SEQPACKET, flags=SEQ_EOM)
    conn.settimeout(3)
    assert PREAMBLE.unpack(conn.recv(100)) == (b"VSK2", 3, 1025, 7000)
    assert [conn.recv(100), conn.recv(100)] == [b"\x01one", b"\x00two"]   # flags byte: EOR
    # host -> guest: the flags byte is stripped, FRAME_EOR becomes VIRTIO_VSOCK_SEQ_EOR
    conn.send(b"\x01rec")
    conn.send(b"\x00msg")
    conn.send(b"\x00")                                     # empty: vsock cannot carry it
    conn.send(b"\x01end")
    spin(loop, lambda: len([x for x, _ in a.got if x.op == Op.RW]) >= 3)
    rw = [(x.flags, d) for x, d in a.take() if x.op == Op.RW]
    assert rw == [(SEQ_EOM | SEQ_EOR, b"rec"), (SEQ_EOM, b"msg"), (SEQ_EOM | SEQ_EOR, b"end")]
    conn.close()
    srv.close()


def test_per_vm_listener_comes_first_and_nobody_means_rst(lab) -> None:
    loop, router, a, b, ns, tmp = lab
    wide = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wide.bind(host_listener_name(ns, 5000))
    wide.listen()
    own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    own.bind(str(tmp / "a.vsock_5000"))
    own.listen()
    tx(router, a, Op.REQUEST, 1025, 5000)
    conn, _ = own.accept()                  # no preamble on the per-VM (hybrid) path
    tx(router, a, Op.RW, 1025, 5000, b"raw")
    conn.settimeout(3)
    assert conn.recv(100) == b"raw"
    conn.close()
    own.close()
    wide.setblocking(False)
    with pytest.raises(BlockingIOError):
        wide.accept()
    wide.close()
    a.take()
    tx(router, a, Op.REQUEST, 1026, 5001)    # nobody anywhere
    (h, _), = a.take()
    assert h.op == Op.RST
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(host_listener_name(ns, 5002))  # bound, not listening: refused, as vsock
    tx(router, a, Op.REQUEST, 1027, 5002)
    (h, _), = a.take()
    assert h.op == Op.RST
    bound.close()


def test_connect_may_ask_for_a_source_port(lab) -> None:
    loop, router, a, b, ns, tmp = lab
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.connect(str(tmp / "a.vsock"))
    h.sendall(b"CONNECT 5000 4242\n")
    spin(loop, lambda: bool(a.got))
    (req, _), = a.take()
    assert (req.op, req.src_port, req.dst_port) == (Op.REQUEST, 4242, 5000)
    tx_resp = Header(3, 2, 5000, 4242, 0, Type.STREAM, Op.RESPONSE, 0, 65536, 0)
    router.on_tx_packet(a, tx_resp.pack(), [])
    h.settimeout(3)
    assert h.recv(100) == b"OK 4242\n"
    # the same 4-tuple again: the backend picks a free port instead
    h2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h2.connect(str(tmp / "a.vsock"))
    h2.sendall(b"CONNECT 5000 4242\n")
    spin(loop, lambda: bool(a.got))
    (req2, _), = a.take()
    assert req2.op == Op.REQUEST and req2.src_port != 4242
    for bad in (b"CONNECT 5000 4294967295\n", b"CONNECT 5000 x\n"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp / "a.vsock"))
        s.sendall(bad)
        spin(loop, timeout=0.05)
        s.settimeout(3)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()
    h.close()
    h2.close()


def test_host_listener_accepts_when_its_fd_is_past_fd_setsize(tmp_path: Path) -> None:
    """select() cannot watch fds >= 1024: a host program holding many connections (a guest
    flooding it) made HostListener.accept fail with "listener is closed". It polls now."""
    import os
    import resource
    import threading

    from vmlab.vsock.host import HostEndpoint, host_listen

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("needs a file limit of 1200")
    ballast = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        ep = HostEndpoint("vhost-user", "a", 3, str(tmp_path / "a.vsock"))
        with host_listen(7000, vms=[ep]) as listener:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(tmp_path / "a.vsock_7000"))
            with listener.accept(timeout=5) as conn:
                assert conn.fileno() >= 1024 and conn.peer_cid == 3
                c.sendall(b"hi")
                assert conn.recv(2) == b"hi"
            c.close()
            threading.Timer(0.3, listener.close).start()    # closed by another thread meanwhile
            with pytest.raises(OSError):
                listener.accept(timeout=10)
    finally:
        for fd in ballast:
            os.close(fd)
