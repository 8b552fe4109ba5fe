"""Host clients of the hybrid socket that misbehave: partial CONNECT lines, silence, floods,
and guests that flood connections. None of them stalls the backend or the other clients."""
from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from vmlab.vsock.hybrid import Hybrid
from vmlab.vsock.packet import Header, Op, Type
from vmlab.vsock.router import Router


class Buf:
    def __init__(self, cap: int = 4096) -> None:
        self.mem = bytearray(cap)
        self.capacity = cap
        self.payload = [memoryview(self.mem)]


class Dev:
    seqpacket = True
    broken = None

    def __init__(self, name: str, cid: int) -> None:
        self.name, self.cid = name, cid
        self.got: list[Header] = []

    def rx_pop(self):
        return Buf()

    def rx_push(self, buf, header: bytes, n: int) -> None:
        self.got.append(Header.unpack_from(header))

    def rx_cancel(self, buf) -> None:
        pass

    def flush(self) -> None:
        pass


@pytest.fixture
def lab(tmp_path: Path):
    loop = asyncio.new_event_loop()
    router = Router(loop)
    hybrid = Hybrid(loop, router, handshake_timeout=0.3, max_handshakes_per_vm=8,
                    max_conns_per_vm=5, connect_timeout=2)
    router.hybrid = hybrid
    a, b = Dev("a", 3), Dev("b", 4)
    for dev in (a, b):
        router.add_device(dev, "g")
        hybrid.add_vm(dev.name, dev.cid, str(tmp_path / f"{dev.name}.vsock"))
    yield loop, router, hybrid, a, b, tmp_path
    hybrid.close()
    loop.close()


def spin(loop, cond=lambda: False, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        loop.run_until_complete(asyncio.sleep(0.005))
        if cond():
            return True
    return False


def client(path: Path, data: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.setblocking(False)
    if data:
        s.sendall(data)
    return s


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(10) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def good_connect(loop, router, dev, path: Path, port: int) -> socket.socket:
    """A well-behaved client: CONNECT, the guest answers RESPONSE, the client reads OK."""
    s = client(path, f"CONNECT {port}\n".encode())
    assert spin(loop, lambda: any(h.op == Op.REQUEST and h.dst_port == port for h in dev.got))
    req = [h for h in dev.got if h.op == Op.REQUEST and h.dst_port == port][-1]
    resp = Header(dev.cid, 2, port, req.src_port, 0, Type.STREAM, Op.RESPONSE, 0, 65536, 0)
    router.on_tx_packet(dev, resp.pack(), [])
    s.setblocking(True)
    s.settimeout(3)
    assert s.recv(100) == f"OK {req.src_port}\n".encode()
    s.setblocking(False)
    return s


def test_partial_connect_line_and_silent_client_time_out_without_stalling_others(lab) -> None:
    loop, router, hybrid, a, b, tmp = lab
    partial = client(tmp / "a.vsock", b"CONNECT 12")       # no newline, ever
    silent = client(tmp / "a.vsock")
    spin(loop, timeout=0.05)
    assert len(hybrid.handshakes) == 2
    ok = good_connect(loop, router, a, tmp / "a.vsock", 5000)   # meanwhile: served at once
    assert spin(loop, lambda: closed(partial) and closed(silent), timeout=3)
    assert hybrid.handshakes == set() and hybrid.handshakes_per_vm["a"] == 0
    assert router.stats["handshake_rejected"] == 2
    assert not closed(ok)
    for s in (partial, silent, ok):
        s.close()


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"CONNECT -1\n", b"CONNECT 99999999999\n",
                                     b"connect 5\n", b"CONNECT 5 6 7\n", b"\xff\xfe\n",
                                     b"GET / HTTP/1.1\r\n"])
def test_garbage_handshake_is_refused_at_once(lab, garbage: bytes) -> None:
    loop, router, hybrid, a, b, tmp = lab
    s = client(tmp / "a.vsock", garbage)
    assert spin(loop, lambda: closed(s), timeout=0.25)    # well before the handshake timeout
    assert router.stats["handshake_rejected"] == 1 and a.got == []
    s.close()


def test_flood_of_silent_clients_is_capped_per_vm(lab) -> None:
    loop, router, hybrid, a, b, tmp = lab
    flood = [client(tmp / "a.vsock") for _ in range(20)]
    spin(loop, timeout=0.1)
    assert hybrid.handshakes_per_vm["a"] == 8                      # the per-VM cap
    assert router.stats["handshake_overflow"] == 12
    good_connect(loop, router, b, tmp / "b.vsock", 6000).close()   # the other VM is unaffected
    assert spin(loop, lambda: hybrid.handshakes_per_vm["a"] == 0, timeout=3)
    good_connect(loop, router, a, tmp / "a.vsock", 6001).close()   # and a recovers
    for s in flood:
        s.close()


def test_guest_connection_flood_is_refused_past_the_per_vm_limit(lab) -> None:
    loop, router, hybrid, a, b, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_7000"))
    srv.listen(64)
    for port in range(1000, 1010):
        req = Header(3, 2, port, 7000, 0, Type.STREAM, Op.REQUEST, 0, 65536, 0)
        router.on_tx_packet(a, req.pack(), [])
    replies = {h.dst_port: h.op for h in a.got}
    assert sorted(p for p, op in replies.items() if op == Op.RESPONSE) == list(range(1000, 1005))
    assert sorted(p for p, op in replies.items() if op == Op.RST) == list(range(1005, 1010))
    assert router.stats["conn_limit"] == 5 and hybrid.conns_per_vm["a"] == 5
    rst = Header(3, 2, 1000, 7000, 0, Type.STREAM, Op.RST, 0, 0, 0)
    router.on_tx_packet(a, rst.pack(), [])                        # one closes: room for one
    assert hybrid.conns_per_vm["a"] == 4
    again = Header(3, 2, 1100, 7000, 0, Type.STREAM, Op.REQUEST, 0, 65536, 0)
    router.on_tx_packet(a, again.pack(), [])
    assert a.got[-1].op == Op.RESPONSE and a.got[-1].dst_port == 1100
    srv.close()


def test_guest_connects_to_a_listener_that_never_accepts_are_capped_per_vm(tmp_path: Path) -> None:
    """A full host listen backlog parks a guest connect (retried every 50 ms for up to 10 s);
    a guest flooding such a listener must not park without bound (timers, socket() calls)."""
    loop = asyncio.new_event_loop()
    router = Router(loop)
    hybrid = Hybrid(loop, router, max_pending_per_vm=4, connect_timeout=2)
    router.hybrid = hybrid
    a, b = Dev("a", 3), Dev("b", 4)
    for dev in (a, b):
        router.add_device(dev, "g")
        hybrid.add_vm(dev.name, dev.cid, str(tmp_path / f"{dev.name}.vsock"))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "a.vsock_7000"))
    srv.listen(0)                                   # never accepted: the backlog fills at once
    try:
        for port in range(1000, 1040):
            router.on_tx_packet(a, Header(3, 2, port, 7000, 0, Type.STREAM, Op.REQUEST, 0,
                                          65536, 0).pack(), [])
        parked = hybrid.snapshot()["per_vm"]["a"]["pending_connects"]
        assert parked == 4 == len(hybrid.pending_guest)
        rst = {h.dst_port for h in a.got if h.op == Op.RST}
        accepted = {h.dst_port for h in a.got if h.op == Op.RESPONSE}
        assert len(rst) == 40 - 4 - len(accepted) and router.stats["pending_limit"] == len(rst)
        assert hybrid.snapshot()["limits"]["pending_connects_per_vm"] == 4
        # the other VM is not affected by a's parked connects
        srv_b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv_b.bind(str(tmp_path / "b.vsock_7000"))
        srv_b.listen(8)
        router.on_tx_packet(b, Header(4, 2, 2000, 7000, 0, Type.STREAM, Op.REQUEST, 0,
                                      65536, 0).pack(), [])
        assert b.got[-1].op == Op.RESPONSE
        # a guest RST of a parked connect frees its slot
        first = next(iter(hybrid.pending_guest))
        router.on_tx_packet(a, Header(3, 2, first[3], 7000, 0, Type.STREAM, Op.RST, 0, 0,
                                      0).pack(), [])
        assert hybrid.snapshot()["per_vm"]["a"]["pending_connects"] == 3
        srv_b.close()
    finally:
        srv.close()
        hybrid.close()
        loop.close()
