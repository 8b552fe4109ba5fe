"""Routing logic with in-process fake devices (in-memory rx buffers) and real Unix sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from vmlab.vsock.connection import State
from vmlab.vsock.host import HostEndpoint, host_connect, host_listen
from vmlab.vsock.hybrid import Hybrid
from vmlab.vsock.packet import (
    SEQ_EOM, SEQ_EOR, SHUTDOWN_BOTH, SHUTDOWN_RCV, Header, Op, Type,
)
from vmlab.vsock.router import FaultInjector, Router


class FakeBuf:
    def __init__(self, cap: int) -> None:
        self.mem = bytearray(cap)
        self.capacity = cap
        self.payload = [memoryview(self.mem)[:cap // 2], memoryview(self.mem)[cap // 2:]]


class FakeDevice:
    """The VsockDevice surface the router uses, with a list of guest rx buffers."""

    seqpacket = True
    broken = None

    def __init__(self, name: str, cid: int, nbufs: int = 64, cap: int = 4096) -> None:
        self.name, self.cid, self.cap = name, cid, cap
        self.free = [FakeBuf(cap) for _ in range(nbufs)]
        self.got: list[tuple[Header, bytes]] = []
        self.flushes = 0

    def rx_pop(self):
        return self.free.pop(0) if self.free else None

    def rx_push(self, buf, header: bytes, n: int) -> None:
        assert n <= buf.capacity
        self.got.append((Header.unpack_from(header), bytes(buf.mem[:n])))

    def rx_cancel(self, buf) -> None:
        self.free.insert(0, buf)

    def flush(self) -> None:
        self.flushes += 1

    def give(self, n: int, router: Router) -> None:
        self.free += [FakeBuf(self.cap) for _ in range(n)]
        router.on_rx_ready(self)

    def take(self) -> list[tuple[Header, bytes]]:
        got, self.got = self.got, []
        return got


@pytest.fixture
def lab(tmp_path: Path):
    loop = asyncio.new_event_loop()
    router = Router(loop)
    hybrid = Hybrid(loop, router, close_timeout=0.2, connect_timeout=2)
    router.hybrid = hybrid
    a, b, c = FakeDevice("a", 3), FakeDevice("b", 4), FakeDevice("c", 5)
    for dev, group in ((a, "g"), (b, "g"), (c, "other")):
        router.add_device(dev, group)
        hybrid.add_vm(dev.name, dev.cid, str(tmp_path / f"{dev.name}.vsock"))
    yield loop, router, a, b, c, tmp_path
    hybrid.close()
    loop.close()
    left = [p.name for p in tmp_path.iterdir() if not p.name[-1].isdigit()]
    assert left == []                   # every listener the backend made is unlinked


def spin(loop, cond=lambda: False, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        loop.run_until_complete(asyncio.sleep(0.005))
        if cond():
            return


def tx(router, dev, op, src_port, dst_cid, dst_port, data=b"", typ=Type.STREAM, flags=0,
       buf_alloc=65536, fwd_cnt=0, src_cid=None):
    h = Header(dev.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port, len(data),
               typ, op, flags, buf_alloc, fwd_cnt)
    router.on_tx_packet(dev, h.pack(), [memoryview(bytearray(data))] if data else [])


def test_spoofed_packet_is_dropped_and_counted(lab) -> None:
    loop, router, a, b, c, _ = lab
    tx(router, a, Op.REQUEST, 1000, 4, 80, src_cid=4)      # a pretends to be b
    tx(router, a, Op.REQUEST, 1000, 2, 80, src_cid=99)
    assert router.stats["spoofed"] == 2
    assert a.got == [] and b.got == []
    assert router.stats["tx_packets"] == 0


def test_request_to_host_port_nobody_listens_on_gets_rst(lab) -> None:
    loop, router, a, *_ = lab
    tx(router, a, Op.REQUEST, 1000, 2, 7777)
    (h, _), = a.take()
    assert (h.op, h.src_cid, h.src_port, h.dst_cid, h.dst_port) == (Op.RST, 2, 7777, 3, 1000)


def test_unknown_cid_and_other_group_get_rst_but_rst_gets_nothing(lab) -> None:
    loop, router, a, b, c, _ = lab
    tx(router, a, Op.REQUEST, 1000, 42, 80)
    tx(router, a, Op.REQUEST, 1001, 5, 80)                 # c is in another group
    tx(router, a, Op.RST, 1002, 42, 80)
    got = a.take()
    assert [(h.op, h.src_cid, h.dst_port) for h, _ in got] == [(Op.RST, 42, 1000), (Op.RST, 5, 1001)]
    assert c.got == [] and router.stats["unroutable"] == 3


def test_liar_length_is_dropped(lab) -> None:
    loop, router, a, b, *_ = lab
    h = Header(3, 4, 1, 2, 100, Type.STREAM, Op.RW)
    router.on_tx_packet(a, h.pack(), [memoryview(b"short")])
    assert router.stats["malformed"] == 1 and b.got == []


def test_vm_to_vm_relay_splits_to_rx_buffers_and_keeps_eom(lab) -> None:
    loop, router, a, b, *_ = lab
    tx(router, a, Op.REQUEST, 1000, 4, 80, typ=Type.SEQPACKET)
    data = bytes(i % 251 for i in range(10000))
    tx(router, a, Op.RW, 1000, 4, 80, data, typ=Type.SEQPACKET, flags=SEQ_EOM | SEQ_EOR)
    got = b.take()
    assert got[0][0].op == Op.REQUEST and got[0][0].src_cid == 3
    pieces = got[1:]
    assert [h.len for h, _ in pieces] == [4096, 4096, 1808]
    assert [h.flags for h, _ in pieces] == [0, 0, SEQ_EOM | SEQ_EOR]
    assert b"".join(d for _, d in pieces) == data
    assert router.stats["relayed"] == 2


def test_relay_fills_the_buffers_there_are_and_queues_the_rest_in_order(lab) -> None:
    """Direct relay (tx views -> rx buffers) runs out of rx buffers mid-packet: the rest of
    that packet and the packets after it wait in the queue and arrive in order, EOM last."""
    loop, router, a, b, *_ = lab
    tx(router, a, Op.REQUEST, 1000, 4, 80, typ=Type.SEQPACKET)
    b.take()
    b.free = b.free[:2]
    data = bytes(i % 251 for i in range(10000))
    tx(router, a, Op.RW, 1000, 4, 80, data, typ=Type.SEQPACKET, flags=SEQ_EOM)
    tx(router, a, Op.RW, 1000, 4, 80, b"next", typ=Type.SEQPACKET, flags=SEQ_EOM)
    first = b.take()
    assert [(h.len, h.flags) for h, _ in first] == [(4096, 0), (4096, 0)]
    empty = FakeBuf(0)                  # a header-only buffer: nothing can go in it
    b.free.append(empty)
    router.on_rx_ready(b)
    assert b.take() == [] and router.stats["rx_buffer_too_small"] == 1
    b.free.clear()
    b.give(4, router)
    rest = b.take()
    assert [(h.len, h.flags) for h, _ in rest] == [(1808, SEQ_EOM), (4, SEQ_EOM)]
    assert b"".join(d for _, d in first + rest[:1]) == data and rest[1][1] == b"next"
    assert router.stats["split"] == 2


class FillDevice(FakeDevice):
    """FakeDevice with VsockDevice.rx_fill's contract (VM->VM: copied from `src`): the router
    must fill many rx buffers per call, straight from the sender and from its queue."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fills = 0

    def rx_fill(self, want, hdr_last, hdr_mid, fd=-1, src=None, flush_soon=True):
        if not self.free or not self.free[0].capacity:
            return None                         # empty ring or another shape: rx_pop's way
        data = b"".join(bytes(v) for v in src)[:want]
        self.fills += 1
        k = got = 0
        while self.free and got < want and self.free[0].capacity:
            buf = self.free.pop(0)
            n = min(buf.capacity, want - got)
            h = Header.unpack_from(hdr_last if got + n == want else hdr_mid)
            h.len = n
            self.got.append((h, data[got:got + n]))
            got += n
            k += 1
        return k, got, 0, want


@pytest.mark.parametrize("typ,flags", [(Type.STREAM, 0), (Type.SEQPACKET, SEQ_EOM | SEQ_EOR)])
def test_queued_relay_data_goes_out_with_one_rx_fill(lab, typ, flags) -> None:
    """The rest of a relayed packet that did not fit waits in the queue; when buffers come it
    goes out with one rx_fill (many buffers per call), in order, EOM/EOR on the last piece."""
    loop, router, a, _, _, tmp = lab
    d = FillDevice("d", 6)
    router.add_device(d, "g")
    tx(router, a, Op.REQUEST, 1000, 6, 80, typ=typ)
    d.take()
    d.free = d.free[:2]
    data = bytes(i % 251 for i in range(40000))
    tx(router, a, Op.RW, 1000, 6, 80, data, typ=typ, flags=flags)
    tx(router, a, Op.RW, 1000, 6, 80, b"next", typ=typ, flags=flags)
    first = d.take()
    assert [h.len for h, _ in first] == [4096, 4096] and d.fills == 1
    d.give(12, router)
    rest = d.take()
    assert d.fills == 3                     # the queued rest in one call, then "next"
    pieces = first + rest
    assert [h.len for h, _ in pieces] == [4096] * 9 + [40000 - 9 * 4096, 4]
    assert [h.flags for h, _ in pieces] == [0] * 9 + [flags, flags]
    assert b"".join(x for _, x in pieces[:10]) == data and pieces[10][1] == b"next"
    assert router.devs["d"].queue == deque() and router.devs["d"].queued_bytes == 0


class ControlDevice(FillDevice):
    """FillDevice with VsockDevice.rx_control's contract: a header-only packet into the next
    buffer, False (nothing done) when there is none."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.controls = 0

    def rx_control(self, header: bytes) -> bool:
        if not self.free:
            return False
        self.free.pop(0)
        self.controls += 1
        self.got.append((Header.unpack_from(header), b""))
        return True


def _stream_exchange(router, a, d) -> list[tuple[tuple, bytes]]:
    """Connect a -> d, data both ways split over rx buffers, credit updates both ways."""
    data = bytes(i % 251 for i in range(40000))
    tx(router, a, Op.REQUEST, 1000, 6, 80)
    tx(router, d, Op.RESPONSE, 80, 3, 1000)
    tx(router, a, Op.RW, 1000, 6, 80, data, fwd_cnt=7)
    tx(router, d, Op.CREDIT_UPDATE, 80, 3, 1000, fwd_cnt=40000)
    tx(router, d, Op.RW, 80, 3, 1000, b"reply", fwd_cnt=40000)
    tx(router, a, Op.CREDIT_REQUEST, 1000, 6, 80)
    h = Header(3, 6, 1000, 80, 100, Type.STREAM, Op.RW)     # liar length: never relayed
    router.on_tx_packet(a, h.pack(), [memoryview(b"short")])
    tx(router, a, Op.RW, 1000, 6, 80, b"spoof", src_cid=4)   # spoofed data: dropped
    return [(dataclasses.astuple(h), x) for h, x in a.take() + d.take()]


def test_vm_to_vm_stream_fast_path_writes_what_the_general_path_writes(lab) -> None:
    """STREAM data and credit updates between two guests take the one-step relay (rx_fill,
    rx_control) when nothing is hooked in; with capture on they take the general path. Both
    put the same headers and bytes into the guests' buffers and count the same."""
    loop, router, *_ = lab
    results = []
    for capture in (False, True):
        r = Router(loop)
        a, d = ControlDevice("a", 3), ControlDevice("d", 6)
        r.add_device(a)
        r.add_device(d)
        seen: list = []
        if capture:
            r.capture = lambda hdr, payload: seen.append(hdr.op)
        got = _stream_exchange(r, a, d)
        stats = {k: r.stats[k] for k in ("tx_packets", "tx_bytes", "relayed", "rx_packets",
                                           "rx_bytes", "split", "spoofed", "malformed")}
        results.append((got, stats, dict(r.flows)))
        fast = (a.controls + d.controls, a.fills + d.fills)
        # credit update/request by the one-step relay, REQUEST/RESPONSE by _enqueue (nothing
        # queued before them); queued data goes by rx_fill too
        assert fast == ((0, 2) if capture else (4, 2))
        assert r.stats["control_fast"] == (0 if capture else 2)
    assert results[0] == results[1]
    got, stats, flows = results[0]
    assert stats["spoofed"] == 1 and stats["malformed"] == 1 and stats["relayed"] == 6
    assert flows == {(3, 1000, 6, 80): Type.STREAM}
    assert [h[6] for h, _ in got] == [Op.RESPONSE, Op.CREDIT_UPDATE, Op.RW, Op.REQUEST] + \
        [Op.RW] * 10 + [Op.CREDIT_REQUEST]


def test_a_control_packet_goes_straight_in_only_when_nothing_waits_before_it(lab) -> None:
    """Router._enqueue puts a control packet into the next rx buffer at once (rx_control)
    when the guest has nothing queued and no capture is on; behind queued packets it waits
    its turn, and with capture on it goes the queued way (captured once)."""
    loop, router, a, _, _, tmp = lab
    d = ControlDevice("d", 6)
    router.add_device(d, "g")
    st = router.devs["d"]
    ctl = Header(3, 6, 1000, 80, 0, Type.STREAM, Op.CREDIT_REQUEST)
    router.send_to_vm("d", ctl)
    assert d.controls == 1 and router.stats["control_fast"] == 1 and not st.queue
    st.queue.append((Header(3, 6, 1000, 80, 4, Type.STREAM, Op.RW), b"data"))
    st.queued_bytes += 4                                  # as if no buffer had been free
    router.send_to_vm("d", ctl.copy(op=Op.SHUTDOWN))    # queued behind it, then pumped
    assert d.controls == 1 and not st.queue and st.queued_ctrl == 0
    assert [(h.op, x) for h, x in d.take()] == [
        (Op.CREDIT_REQUEST, b""), (Op.RW, b"data"), (Op.SHUTDOWN, b"")]
    seen: list = []
    router.capture = lambda hdr, payload: seen.append(hdr.op)
    router.send_to_vm("d", ctl)
    assert d.controls == 1 and seen == [Op.CREDIT_REQUEST] and d.take()[0][0].op == ctl.op
    assert router.stats["control_fast"] == 1 and st.queued_ctrl == 0 and not st.queue


def test_relay_waits_for_rx_buffers_then_delivers_in_order(lab) -> None:
    loop, router, a, b, *_ = lab
    b.free.clear()
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    tx(router, a, Op.RW, 1000, 4, 80, b"one")
    tx(router, a, Op.RW, 1000, 4, 80, b"two")
    assert b.got == []
    b.give(2, router)
    assert [h.op for h, _ in b.take()] == [Op.REQUEST, Op.RW]
    b.give(5, router)
    assert [d for _, d in b.take()] == [b"two"]


def test_reset_vm_rsts_its_vm_peers(lab) -> None:
    loop, router, a, b, *_ = lab
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    tx(router, b, Op.RESPONSE, 80, 3, 1000)
    b.take(); a.take()
    router.on_device_reset(a, "test")
    (h, _), = b.take()
    assert (h.op, h.src_cid, h.src_port, h.dst_port) == (Op.RST, 3, 1000, 80)
    assert router.flows == {}


def test_guest_to_host_stream_with_credit(lab) -> None:
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_9999"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 2, 9999, buf_alloc=10000)
    (h, _), = a.take()
    assert h.op == Op.RESPONSE and h.buf_alloc > 0
    host, _ = srv.accept()
    tx(router, a, Op.RW, 1025, 2, 9999, b"Hello, world!", buf_alloc=10000)
    assert host.recv(100) == b"Hello, world!"
    host.sendall(b"x" * 30000)
    spin(loop, lambda: any(h.op == Op.CREDIT_REQUEST for h, _ in a.got))
    got = a.take()
    rw = [h for h, _ in got if h.op == Op.RW]
    assert sum(h.len for h in rw) == 10000                # exactly the guest's credit
    assert all(h.len <= a.cap for h in rw)
    assert got[-1][0].op == Op.CREDIT_REQUEST             # asked for more (after a delay)
    tx(router, a, Op.CREDIT_UPDATE, 1025, 2, 9999, buf_alloc=10000, fwd_cnt=10000)
    spin(loop, lambda: sum(h.len for h, _ in a.got) >= 10000)
    assert sum(h.len for h, _ in a.take() if h.op == Op.RW) == 10000
    host.close()
    tx(router, a, Op.CREDIT_UPDATE, 1025, 2, 9999, buf_alloc=1 << 20, fwd_cnt=20000)
    spin(loop, lambda: any(h.op == Op.SHUTDOWN for h, _ in a.got))
    got = a.take()
    assert sum(h.len for h, _ in got if h.op == Op.RW) == 10000
    assert got[-1][0].op == Op.SHUTDOWN and got[-1][0].flags == SHUTDOWN_BOTH
    tx(router, a, Op.RST, 1025, 2, 9999)
    assert router.hybrid.conns == {}
    srv.close()


def test_guest_stalls_without_rx_buffers_and_host_data_waits(lab) -> None:
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_5"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 2, 5)
    host, _ = srv.accept()
    a.take()
    a.free.clear()
    host.sendall(bytes(range(256)) * 100)
    spin(loop, timeout=0.2)
    assert a.got == []
    for _ in range(20):
        a.give(2, router)
        spin(loop, timeout=0.02)
    assert b"".join(d for _, d in a.take()) == bytes(range(256)) * 100
    host.close(); srv.close()


def test_host_connect_handshake_and_refusal(lab) -> None:
    loop, router, a, b, c, tmp = lab
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.connect(str(tmp / "a.vsock"))
    h.sendall(b"CONNECT 5000\nearly data")
    spin(loop, lambda: bool(a.got))
    (req, _), = a.take()
    assert (req.op, req.src_cid, req.dst_cid, req.dst_port) == (Op.REQUEST, 2, 3, 5000)
    tx(router, a, Op.RESPONSE, 5000, 2, req.src_port)
    h.settimeout(3)
    assert h.recv(100) == f"OK {req.src_port}\n".encode()
    spin(loop, lambda: any(x.op == Op.RW for x, _ in a.got))
    assert [d for x, d in a.take() if x.op == Op.RW] == [b"early data"]
    h.close()

    r = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r.connect(str(tmp / "a.vsock"))
    r.sendall(b"CONNECT 6000\n")
    spin(loop, lambda: bool(a.got))
    (req, _), = [x for x in a.take() if x[0].op == Op.REQUEST]
    tx(router, a, Op.RST, 6000, 2, req.src_port)
    r.settimeout(3)
    assert r.recv(100) == b""                            # closed without OK
    r.close()

    for bad in (b"HELLO\n", b"CONNECT x\n", b"C" * 100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp / "a.vsock"))
        s.sendall(bad)
        s.settimeout(3)
        spin(loop, timeout=0.05)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:       # closed with our bytes unread: also a refusal
            pass
        s.close()
    assert router.stats["handshake_rejected"] == 3


def _fill_until_full(sock: socket.socket) -> int:
    """Bytes a host stream socket takes before it would block (the backend reads none)."""
    sock.setblocking(False)
    pushed, block = 0, b"x" * 65536
    try:
        while True:
            pushed += sock.send(block)
    except BlockingIOError:
        return pushed


def test_host_stream_sockets_hold_a_whole_credit_window(lab) -> None:
    """The backend reads a host socket only into guest rx buffers, as far as the guest's credit
    goes. A whole window (256 KiB, Linux's default) must be waiting in the host's socket: with
    the default 208 KiB each credit update cost the backend two reads and two wakeups."""
    loop, router, a, b, c, tmp = lab
    ep = HostEndpoint("vhost-user", "a", a.cid, str(tmp / "a.vsock"))
    window = 256 * 1024
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(
        seq=host_connect(3, 5001, endpoint=ep, type="seqpacket")))
    t.start()                                   # SEQPACKET keeps the default: it caps messages
    spin(loop, lambda: any(h.op == Op.REQUEST for h, _ in a.got))
    req = next(h for h, _ in a.take() if h.op == Op.REQUEST)
    tx(router, a, Op.RESPONSE, 5001, 2, req.src_port, typ=Type.SEQPACKET, buf_alloc=window)
    spin(loop, lambda: not t.is_alive())
    t.join()
    with got["seq"] as conn, socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as fresh:
        assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == \
            fresh.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    t = threading.Thread(target=lambda: got.update(conn=host_connect(3, 5000, endpoint=ep)))
    t.start()
    spin(loop, lambda: any(h.op == Op.REQUEST for h, _ in a.got))
    req = next(h for h, _ in a.take() if h.op == Op.REQUEST)
    tx(router, a, Op.RESPONSE, 5000, 2, req.src_port, buf_alloc=window)
    spin(loop, lambda: not t.is_alive())
    t.join()
    with got["conn"] as conn:
        a.free.clear()                          # and the loop does not run: nothing is read
        assert _fill_until_full(conn.sock) >= window
    a.give(8, router)

    with host_listen(6000, vms=[ep]) as listener:    # a guest's connect, accepted by the host
        tx(router, a, Op.REQUEST, 1030, 2, 6000, buf_alloc=window)
        spin(loop, lambda: any(h.op == Op.RESPONSE for h, _ in a.got))
        with listener.accept(timeout=3) as conn:
            assert _fill_until_full(conn.sock) >= window
    plain, peer = socket.socketpair()           # what the default holds: less than a window
    with plain, peer:
        assert _fill_until_full(plain) < window


def test_fault_drop_and_transport_reset(lab) -> None:
    loop, router, a, b, *_ = lab
    router.faults.rules.append(FaultInjector.parse({"kind": "drop", "vm": "a", "direction": "tx",
                                                    "count": 1}))
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    assert b.got == [] and router.stats["fault_drop"] == 1
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    assert [h.op for h, _ in b.take()] == [Op.REQUEST]
    router.reset_vm("a", notify_guest=True)
    assert [h.op for h, _ in b.take()] == [Op.RST]
    assert [h.op for h, _ in a.take()] == [Op.RST]


def test_capture_hook_sees_both_directions(lab) -> None:
    loop, router, a, *_ = lab
    seen = []
    router.capture = lambda h, p: seen.append((h.op, h.src_cid))
    tx(router, a, Op.REQUEST, 1000, 2, 7777)
    assert seen == [(Op.REQUEST, 3), (Op.RST, 2)]


def test_a_thousand_concurrent_guest_connections(lab) -> None:
    loop, router, a, b, c, tmp = lab
    a.free = [FakeBuf(4096) for _ in range(5000)]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_2000"))
    srv.listen(16)                       # small backlog: the backend must retry, not refuse
    srv.setblocking(False)
    n = 1000
    hosts: list[socket.socket] = []
    for i in range(n):
        tx(router, a, Op.REQUEST, 10000 + i, 2, 2000)
        while True:
            try:
                s, _ = srv.accept()
                hosts.append(s)
            except BlockingIOError:
                break
    while len(hosts) < n:
        spin(loop, timeout=0.01)
        while True:
            try:
                s, _ = srv.accept()
                hosts.append(s)
            except BlockingIOError:
                break
    spin(loop, lambda: sum(1 for h, _ in a.got if h.op == Op.RESPONSE) == n)
    assert sum(1 for h, _ in a.take() if h.op == Op.RESPONSE) == n
    assert len(router.hybrid.conns) == n and router.stats["refused"] == 0
    for s in hosts:
        s.sendall(b"0123456789")
    spin(loop, lambda: sum(h.len for h, _ in a.got if h.op == Op.RW) == 10 * n)
    got = a.take()
    assert sorted({h.dst_port for h, _ in got if h.op == Op.RW}) == list(range(10000, 10000 + n))
    for i in range(n):
        tx(router, a, Op.SHUTDOWN, 10000 + i, 2, 2000, flags=SHUTDOWN_BOTH)
    assert router.hybrid.conns == {}
    assert sum(1 for h, _ in a.take() if h.op == Op.RST) == n
    for s in hosts:
        s.settimeout(2)
        assert s.recv(10) == b""
        s.close()
    srv.close()


def test_host_close_sends_shutdown_then_rst_after_the_close_timeout(lab) -> None:
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_6"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 2, 6)
    host, _ = srv.accept()
    a.take()
    host.close()
    spin(loop, lambda: any(h.op == Op.RST for h, _ in a.got))   # close_timeout is 0.2 s here
    got = [(h.op, h.flags) for h, _ in a.take()]
    assert got == [(Op.SHUTDOWN, SHUTDOWN_BOTH), (Op.RST, 0)]
    assert router.hybrid.conns == {}
    srv.close()


def test_delay_and_rst_faults(lab) -> None:
    loop, router, a, b, *_ = lab
    router.faults.rules.append(FaultInjector.parse({"kind": "delay", "delay_ms": 50,
                                                    "op": "REQUEST", "count": 1}))
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    assert b.got == []
    spin(loop, lambda: bool(b.got))
    assert [h.op for h, _ in b.take()] == [Op.REQUEST]
    tx(router, b, Op.RESPONSE, 80, 3, 1000)
    a.take()
    router.faults.rules[:] = [FaultInjector.parse({"kind": "rst", "vm": "a", "direction": "tx",
                                                   "port": 80})]
    tx(router, a, Op.RW, 1000, 4, 80, b"lost")
    assert [(h.op, h.src_cid, h.dst_cid) for h, _ in b.take()] == [(Op.RST, 3, 4)]
    assert [(h.op, h.src_cid, h.dst_cid) for h, _ in a.take()] == [(Op.RST, 4, 3)]
    assert router.stats["fault_rst"] == 1 and router.flows == {}


def test_faults_on_host_data_read_into_guest_buffers(lab) -> None:
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_7"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 2, 7)
    host, _ = srv.accept()
    a.take()
    router.faults.rules.append(FaultInjector.parse({"kind": "drop", "vm": "a", "direction": "rx",
                                                    "op": "RW", "count": 1}))
    host.sendall(b"first")
    spin(loop, lambda: router.stats["fault_drop"] == 1)
    host.sendall(b"second")
    spin(loop, lambda: bool(a.got))
    assert [d for h, d in a.take() if h.op == Op.RW] == [b"second"]
    router.faults.rules[:] = [FaultInjector.parse({"kind": "rst", "vm": "a", "op": "RW"})]
    host.sendall(b"third")
    spin(loop, lambda: bool(a.got))
    assert [h.op for h, _ in a.take()] == [Op.RST]
    host.settimeout(3)
    assert host.recv(10) == b""
    assert router.hybrid.conns == {}
    host.close(); srv.close()


class CountingSock:
    """A connection's host socket, counting the reads that move data towards the guest."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self.reads = sock, []

    def recvmsg_into(self, views, *args):
        r = self._sock.recvmsg_into(views, *args)
        self.reads.append((len(views), r[0]))
        return r

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_host_stream_data_fills_several_rx_buffers_with_one_read(lab) -> None:
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_7000"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 2, 7000, buf_alloc=20000)
    a.take()
    host, _ = srv.accept()
    conn, = router.hybrid.conns.values()
    conn.sock = counting = CountingSock(conn.sock)
    data = bytes(range(256)) * 200                        # 51200 bytes, guest credit 20000
    host.sendall(data)
    spin(loop, lambda: any(h.op == Op.CREDIT_REQUEST for h, _ in a.got))
    got = a.take()
    rw = [(h, d) for h, d in got if h.op == Op.RW]
    assert counting.reads == [(10, 20000)]               # 5 buffers (2 views each), one read
    assert [h.len for h, _ in rw] == [4096] * 4 + [20000 - 4 * 4096]   # credit respected
    assert b"".join(d for _, d in rw) == data[:20000]
    for h, d in rw:
        assert len(d) == h.len
        assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (2, 3, 7000, 1025)
        assert (h.type, h.op, h.flags) == (Type.STREAM, Op.RW, 0)
        assert (h.buf_alloc, h.fwd_cnt) == (conn.credit.buf_alloc, conn.credit.fwd_cnt)
    assert a.free and all(len(buf.payload) == 2 for buf in a.free)   # unused ones given back
    assert router.stats["rx_packets"] >= 5 and router.stats["rx_bytes"] == 20000
    # more credit: the rest, never more than the free rx buffers hold per read
    a.free = a.free[:3]
    tx(router, a, Op.CREDIT_UPDATE, 1025, 2, 7000, buf_alloc=1 << 20, fwd_cnt=20000)
    spin(loop, lambda: sum(h.len for h, _ in a.got if h.op == Op.RW) >= 3 * 4096)
    assert [h.len for h, _ in a.take() if h.op == Op.RW] == [4096] * 3
    assert counting.reads[1] == (6, 3 * 4096)
    a.give(64, router)
    left = len(data) - 20000 - 3 * 4096
    spin(loop, lambda: sum(h.len for h, _ in a.got if h.op == Op.RW) >= left)
    rest = b"".join(d for h, d in a.take() if h.op == Op.RW)
    assert data[:20000 + 3 * 4096] + rest == data
    host.close(); srv.close()


@pytest.mark.parametrize("path", ["fast", "general"])
def test_guest_credit_update_to_a_host_connection_either_path(lab, path) -> None:
    """Router._host_credit (no capture, no faults) and the general path (a capture hook on)
    give the connection the same credit and the host's data the same way; a spoofed update
    changes nothing, one of the wrong type resets the connection, on either path."""
    loop, router, a, b, c, tmp = lab
    seen: list = []
    router.capture = (lambda hdr, payload: seen.append(hdr)) if path == "general" else None
    data = bytes(range(256)) * 80                         # 20480 bytes, guest credit 8192
    conns = {}
    for port in (7002, 7003):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(tmp / f"a.vsock_{port}"))
        srv.listen()
        srv.settimeout(3)
        tx(router, a, Op.REQUEST, port - 6000, 2, port, buf_alloc=8192)
        host, _ = srv.accept()
        srv.close()
        conns[port] = (host, router.hybrid.conns[(2, port, 3, port - 6000)])
        host.sendall(data)
    spin(loop, lambda: sum(h.len for h, _ in a.got if h.op == Op.RW) >= 2 * 8192)
    got = a.take()
    before = dict(router.stats)
    _, odd = conns[7002]
    tx(router, a, Op.CREDIT_UPDATE, 1002, 2, 7002, buf_alloc=1 << 20, fwd_cnt=4096, src_cid=9)
    assert (odd.credit.peer_buf_alloc, odd.credit.peer_fwd_cnt) == (8192, 0)
    assert router.stats["spoofed"] == before.get("spoofed", 0) + 1
    tx(router, a, Op.CREDIT_UPDATE, 1002, 2, 7002, buf_alloc=1 << 20, fwd_cnt=4096,
       typ=Type.SEQPACKET)
    assert odd.state is State.CLOSED
    host, conn = conns[7003]
    before = dict(router.stats)
    tx(router, a, Op.CREDIT_UPDATE, 1003, 2, 7003, buf_alloc=1 << 20, fwd_cnt=8192)
    assert (conn.credit.peer_buf_alloc, conn.credit.peer_fwd_cnt) == (1 << 20, 8192)
    mine = lambda pkts: [(h, d) for h, d in pkts if h.op == Op.RW and h.src_port == 7003]  # noqa: E731
    spin(loop, lambda: sum(h.len for h, _ in mine(got + a.got)) >= len(data))
    assert b"".join(d for _, d in mine(got + a.take())) == data
    assert router.stats["tx_packets"] == before["tx_packets"] + 1
    assert router.stats["host_credit"] - before.get("host_credit", 0) == (path == "fast")
    assert bool(seen) == (path == "general")
    for host, _ in conns.values():
        host.close()


def test_host_seqpacket_messages_are_never_merged_into_one_packet(lab) -> None:
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(tmp / "a.vsock_7001"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1026, 2, 7001, typ=Type.SEQPACKET, buf_alloc=1 << 20)
    a.take()
    host, _ = srv.accept()
    msgs = [b"a" * 3000, b"b" * 10, b"c" * 5000, b"d"]
    for m in msgs:
        host.sendmsg([m], [], socket.MSG_EOR)
    spin(loop, lambda: sum(h.len for h, _ in a.got if h.op == Op.RW) >= sum(map(len, msgs)))
    rw = [(h, d) for h, d in a.take() if h.op == Op.RW]
    assert [(h.len, h.flags & SEQ_EOM) for h, _ in rw] == [
        (3000, SEQ_EOM), (10, SEQ_EOM), (4096, 0), (904, SEQ_EOM), (1, SEQ_EOM)]
    assert [d for _, d in rw] == [msgs[0], msgs[1], msgs[2][:4096], msgs[2][4096:], msgs[3]]
    host.close(); srv.close()


def _host_connect(loop, a, router, tmp, line: bytes, typ=Type.STREAM, buf_alloc=65536):
    """A host client through the CONNECT handshake; returns (socket, REQUEST header)."""
    kind = socket.SOCK_SEQPACKET if typ == Type.SEQPACKET else socket.SOCK_STREAM
    h = socket.socket(socket.AF_UNIX, kind)
    h.connect(str(tmp / ("a.vsock_seqpacket" if typ == Type.SEQPACKET else "a.vsock")))
    h.send(line)
    spin(loop, lambda: bool(a.got))
    (req, _), = a.take()
    tx(router, a, Op.RESPONSE, req.dst_port, 2, req.src_port, typ=typ, buf_alloc=buf_alloc)
    h.settimeout(3)
    assert h.recv(100) == f"OK {req.src_port}\n".encode()
    return h, req


def _ctl(loop, tmp, line: bytes) -> bytes:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(tmp / "a.vsock"))
    c.sendall(line)
    spin(loop, timeout=0.1)
    c.settimeout(3)
    try:
        return c.recv(10)
    finally:
        c.close()


def test_connect_options_frame_and_buf(lab) -> None:
    loop, router, a, b, c, tmp = lab
    h, req = _host_connect(loop, a, router, tmp, b"CONNECT 5000 frame buf=1048576\n", Type.SEQPACKET)
    assert req.buf_alloc == 1048576                      # SO_VM_SOCKETS_BUFFER_SIZE advertised
    tx(router, a, Op.RW, 5000, 2, req.src_port, b"rec", typ=Type.SEQPACKET, flags=SEQ_EOM | SEQ_EOR)
    tx(router, a, Op.RW, 5000, 2, req.src_port, b"msg", typ=Type.SEQPACKET, flags=SEQ_EOM)
    spin(loop, timeout=0.1)
    assert [h.recv(100), h.recv(100)] == [b"\x01rec", b"\x00msg"]
    h.send(b"\x01abc")
    h.send(b"\x00de")
    spin(loop, lambda: len([x for x, _ in a.got if x.op == Op.RW]) >= 2)
    assert [(x.flags, d) for x, d in a.take() if x.op == Op.RW] == [
        (SEQ_EOM | SEQ_EOR, b"abc"), (SEQ_EOM, b"de")]
    h.close()
    for bad in (b"CONNECT 5000 frame frame\n", b"CONNECT 5000 buf=4294967296\n", b"CONNECT 5000 eor\n"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp / "a.vsock"))
        s.sendall(bad)
        s.settimeout(3)
        spin(loop, timeout=0.05)
        assert s.recv(10) == b"", bad
        s.close()
    assert not [x for x, _ in a.take() if x.op == Op.REQUEST]


def test_ctl_shut_rd_tells_the_guest_and_ctl_buf_resizes_the_window(lab) -> None:
    loop, router, a, b, c, tmp = lab
    h, req = _host_connect(loop, a, router, tmp, b"CONNECT 5000\n")
    assert req.buf_alloc == 256 * 1024
    hp = req.src_port
    assert _ctl(loop, tmp, f"CTL {hp} 5000 buf=4194304\n".encode()) == b"OK\n"
    spin(loop, lambda: bool(a.got))
    (up, _), = a.take()
    assert (up.op, up.buf_alloc) == (Op.CREDIT_UPDATE, 4194304)
    # the guest may now have 4 MiB in flight with nothing read (no overrun reset)
    for i in range(64):
        tx(router, a, Op.RW, 5000, 2, hp, bytes(65536), fwd_cnt=0)
    assert hybrid_conn(router, hp).state.value == "established"
    # shrinking is no overrun for what the guest sent under the old window
    assert _ctl(loop, tmp, f"CTL {hp} 5000 buf=65536\n".encode()) == b"OK\n"
    tx(router, a, Op.RW, 5000, 2, hp, bytes(1000))
    assert hybrid_conn(router, hp).state.value == "established"
    a.take()
    assert _ctl(loop, tmp, f"CTL {hp} 5000 shut_rd\n".encode()) == b"OK\n"
    spin(loop, lambda: bool(a.got))
    (sh, _), = a.take()
    assert (sh.op, sh.flags) == (Op.SHUTDOWN, SHUTDOWN_RCV)
    tx(router, a, Op.RW, 5000, 2, hp, b"dropped")         # in flight: dropped, not a reset
    assert hybrid_conn(router, hp).state.value == "established"
    assert _ctl(loop, tmp, f"CTL {hp} 5001 shut_rd\n".encode()) == b""     # no such connection
    assert _ctl(loop, tmp, b"CTL 1 2 nonsense\n") == b""
    h.close()


def hybrid_conn(router, host_port: int):
    (conn,) = [x for k, x in router.hybrid.conns.items() if k[1] == host_port]
    return conn
