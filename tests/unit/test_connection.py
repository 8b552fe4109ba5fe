"""Credit arithmetic (with u32 wraparound) and one Connection driven over a real socketpair."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import pytest

from vmlab.vsock.connection import CREDIT_REQUEST_DELAY, Connection, Credit, State
from vmlab.vsock.packet import SHUTDOWN_BOTH, SHUTDOWN_SEND, Header, Op, Type

M = 2**32


def test_peer_credit_basic() -> None:
    c = Credit(peer_buf_alloc=1000)
    assert c.peer_credit() == 1000
    c.sent(600)
    assert c.peer_credit() == 400
    c.update_peer(1000, 600)
    assert c.peer_credit() == 1000


def test_peer_credit_wraparound() -> None:
    c = Credit(peer_buf_alloc=4096, tx_cnt=M - 100, peer_fwd_cnt=M - 100)
    c.sent(300)                       # tx_cnt wraps to 200
    assert c.tx_cnt == 200
    assert c.peer_credit() == 4096 - 300
    c.update_peer(4096, (M - 100 + 300) % M)
    assert c.peer_credit() == 4096


def test_peer_shrinking_buffer_gives_zero_not_negative() -> None:
    c = Credit(peer_buf_alloc=1000)
    c.sent(900)
    c.update_peer(500, 0)
    assert c.peer_credit() == 0


def test_receive_bounded_by_buf_alloc_with_wraparound() -> None:
    c = Credit(buf_alloc=1000, rx_cnt=M - 10, fwd_cnt=M - 10, last_fwd_cnt=M - 10)
    assert c.receive(600)
    assert c.rx_cnt == 590 and c.buffered() == 600
    assert not c.receive(401)         # would overrun what we advertised
    assert c.receive(400)
    c.forwarded(1000)
    assert c.buffered() == 0


def test_resize_grows_the_window_and_a_shrink_is_no_overrun_for_what_was_allowed() -> None:
    c = Credit(buf_alloc=1000)
    c.resize(4000)                              # SO_VM_SOCKETS_BUFFER_SIZE grew
    assert c.receive(3500) and not c.receive(501)
    c.resize(100)                               # shrunk with 3500 bytes buffered
    assert c.receive(500)                       # sent under the 4000 window: taken
    assert not c.receive(1)                     # beyond anything we ever advertised
    c.forwarded(4000)
    assert c.receive(100) and c.buf_alloc == 100


def test_update_needed_only_when_peer_thinks_we_are_low_and_we_freed() -> None:
    c = Credit(buf_alloc=256 * 1024)
    assert c.receive(100 * 1024)
    c.forwarded(100 * 1024)
    assert not c.update_needed()      # peer still sees 156 KiB free
    assert c.receive(100 * 1024)
    assert c.update_needed()          # peer sees 56 KiB free, we have freed 100 KiB
    h = c.stamp(Header())
    assert (h.buf_alloc, h.fwd_cnt) == (256 * 1024, 100 * 1024)
    assert not c.update_needed()      # peer now sees 156 KiB
    assert c.receive(150 * 1024)
    assert not c.update_needed()      # low, but nothing freed since: an update says nothing new
    c.forwarded(10)
    assert c.update_needed()


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    sent: list = field(default_factory=list)
    wants: int = 0
    released: bool = False

    def send_packet(self, conn: Connection, hdr: Header) -> None:
        self.sent.append(hdr)

    def want_rx(self, conn: Connection) -> None:
        self.wants += 1

    def release(self, conn: Connection) -> None:
        self.released = True


class Buf:
    def __init__(self, cap: int) -> None:
        self.mem = bytearray(cap)
        self.capacity = cap
        self.payload = [memoryview(self.mem)]


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _conn(loop, typ=Type.STREAM):
    a, b = socket.socketpair(socket.AF_UNIX,
                             socket.SOCK_STREAM if typ == Type.STREAM else socket.SOCK_SEQPACKET)
    a.setblocking(False)
    env = Env(loop)
    c = Connection(env=env, key=(2, 9999, 3, 1025), vm="a", type=typ, sock=a)
    c.credit.update_peer(8192, 0)
    c.accept()
    return c, env, b


def _rw(n: int, flags: int = 0, typ=Type.STREAM, fwd=0) -> Header:
    return Header(3, 2, 1025, 9999, n, typ, Op.RW, flags, 8192, fwd)


def test_fill_respects_credit_and_zero_read_is_not_eof(loop) -> None:
    c, env, host = _conn(loop)
    assert env.sent[0].op == Op.RESPONSE and c.state is State.ESTABLISHED
    assert c.fill(Buf(4096)) is None          # nothing to read: EAGAIN, not EOF
    assert c.state is State.ESTABLISHED and c.reading
    host.sendall(b"x" * 20000)
    got = 0
    while True:
        h = c.fill(Buf(4096))
        if h is None:
            break
        got += h.len
    assert got == 8192                        # exactly the guest's credit
    ops = lambda: [h.op for h in env.sent]   # noqa: E731
    assert Op.CREDIT_REQUEST not in ops()     # not at once: a Linux peer sends its own update
    loop.run_until_complete(asyncio.sleep(CREDIT_REQUEST_DELAY / 2))
    assert Op.CREDIT_REQUEST not in ops()
    loop.run_until_complete(asyncio.sleep(CREDIT_REQUEST_DELAY))
    assert env.sent[-1].op == Op.CREDIT_REQUEST     # still none: ask, once
    assert c.fill(Buf(4096)) is None
    loop.run_until_complete(asyncio.sleep(2 * CREDIT_REQUEST_DELAY))
    assert ops().count(Op.CREDIT_REQUEST) == 1
    c.on_packet(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.CREDIT_UPDATE, 0, 8192, 8192), [])
    h = c.fill(Buf(4096))
    assert h is not None and h.len == 4096
    c.reset("test")
    host.close()


def test_credit_update_in_time_means_no_credit_request(loop) -> None:
    """The guest's own CREDIT_UPDATE arriving within CREDIT_REQUEST_DELAY cancels the request."""
    c, env, host = _conn(loop)
    host.sendall(b"x" * 20000)
    while c.fill(Buf(4096)) is not None:
        pass
    c.on_packet(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.CREDIT_UPDATE, 0, 8192, 8192), [])
    loop.run_until_complete(asyncio.sleep(3 * CREDIT_REQUEST_DELAY))
    assert Op.CREDIT_REQUEST not in [h.op for h in env.sent]
    c.reset("test")
    host.close()


def test_credit_request_waits_from_the_latest_run_out(loop, monkeypatch) -> None:
    """Credit runs out, comes back, runs out again: the request timer set the first time is
    not cancelled (a bulk transfer does this thousands of times a second) but the request
    still goes out only CREDIT_REQUEST_DELAY after the latest run-out, once."""
    from vmlab.vsock import connection
    delay = 0.2
    monkeypatch.setattr(connection, "CREDIT_REQUEST_DELAY", delay)
    c, env, host = _conn(loop)
    host.sendall(b"x" * 40000)
    ops = lambda: [h.op for h in env.sent]   # noqa: E731

    def run_out() -> None:
        while c.fill(Buf(4096)) is not None:
            pass
        assert c.waiting_credit
    run_out()
    first = c.credit_timer
    loop.run_until_complete(asyncio.sleep(delay / 2))
    c.on_packet(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.CREDIT_UPDATE, 0, 8192, 8192), [])
    assert not c.waiting_credit and c.credit_timer is first      # left to lapse
    run_out()                                                    # again, half a delay later
    assert c.credit_timer is first
    loop.run_until_complete(asyncio.sleep(delay * 0.75))         # the first timer has fired
    assert Op.CREDIT_REQUEST not in ops() and c.credit_timer is not None
    loop.run_until_complete(asyncio.sleep(delay * 0.75))
    assert ops().count(Op.CREDIT_REQUEST) == 1
    c.reset("test")
    host.close()


@pytest.mark.parametrize("pieces", [1, 3])   # payload in several views: partial writes mid-view
def test_stalled_host_reader_buffers_within_credit_and_loses_nothing(loop, pieces) -> None:
    c, env, host = _conn(loop)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = bytearray()
    chunk = bytes(range(256)) * 16
    i = 0
    while c.credit.peer_view_free() >= len(chunk):    # a Linux guest stops at zero credit
        data = chunk[i % 7:] + chunk[:i % 7]
        cuts = [0] + sorted((i * 977 * k) % len(data) for k in range(1, pieces)) + [len(data)]
        c.on_packet(_rw(len(data)), [memoryview(data)[a:b] for a, b in zip(cuts, cuts[1:])])
        sent += data
        i += 1
    assert c.out_bytes <= c.credit.buf_alloc and c.out_bytes > 0
    assert c.state is State.ESTABLISHED
    c.on_packet(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.SHUTDOWN, SHUTDOWN_BOTH, 8192, 0), [])
    assert not any(h.op == Op.RST for h in env.sent)   # not before the data is out
    host.setblocking(False)
    got = bytearray()
    for _ in range(10000):
        try:
            d = host.recv(65536)
        except BlockingIOError:
            loop.run_until_complete(asyncio.sleep(0.001))
            continue
        if not d:
            break
        got += d
    assert got == sent
    assert env.sent[-1].op == Op.RST and c.state is State.CLOSED
    host.close()


def test_host_eof_half_close_sends_shutdown_send(loop) -> None:
    c, env, host = _conn(loop)
    host.shutdown(socket.SHUT_WR)
    assert c.fill(Buf(4096)) is None
    assert env.sent[-1].op == Op.SHUTDOWN and env.sent[-1].flags == SHUTDOWN_SEND
    c.on_packet(_rw(5), [memoryview(b"hello")])      # the host can still read
    assert host.recv(10) == b"hello"
    c.on_packet(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.RST, 0, 8192, 0), [])
    assert c.state is State.CLOSED and env.released
    host.close()


def test_seqpacket_keeps_boundaries_both_ways(loop) -> None:
    c, env, host = _conn(loop, Type.SEQPACKET)
    from vmlab.vsock.packet import SEQ_EOM, SEQ_EOR
    c.on_packet(_rw(3, 0, Type.SEQPACKET), [memoryview(b"abc")])
    c.on_packet(_rw(3, SEQ_EOM, Type.SEQPACKET), [memoryview(b"def")])
    c.on_packet(_rw(2, SEQ_EOM | SEQ_EOR, Type.SEQPACKET), [memoryview(b"gh")])
    assert host.recv(100) == b"abcdef"
    assert host.recv(100) == b"gh"
    host.send(b"z" * 5000)
    h1 = c.fill(Buf(4096))
    h2 = c.fill(Buf(4096))
    assert (h1.len, h1.flags, h2.len, h2.flags) == (4096, 0, 904, SEQ_EOM)
    c.reset("test")
    host.close()


def test_a_batch_is_booked_as_its_packets_would_be(loop) -> None:
    """took_batch() after one sendmsg of several packets' data books them as on_packet() per
    packet does: the guest's credit fields, received = forwarded + waiting for the host, the
    host gets every byte in order, and a credit update tells the guest the latest fwd_cnt
    once it needs one."""
    one, env1, host1 = _conn(loop)
    many, env2, host2 = _conn(loop)
    for c in (one, many):
        c.credit.buf_alloc = 64 * 1024
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # partial writes
    packets = [bytes([i]) * 7000 for i in range(8)]           # 56000 of 65536: nearly full
    for i, data in enumerate(packets):
        one.on_packet(_rw(len(data), fwd=i), [memoryview(data)])
    assert many.batch_room() == 64 * 1024
    total = sum(map(len, packets))
    try:
        sent = many.sock.sendmsg(packets)
    except BlockingIOError:
        sent = 0
    rest = b"".join(packets)[sent:]
    many.took_batch(total, sent, rest or None, 8192, len(packets) - 1)
    for field_ in ("rx_cnt", "peer_buf_alloc", "peer_fwd_cnt"):
        assert getattr(many.credit, field_) == getattr(one.credit, field_), field_
    for c in (one, many):      # what went out + what waits = what came (one send took more)
        assert c.credit.fwd_cnt + c.out_bytes == c.credit.rx_cnt == total and c.out_bytes > 0
    assert many.credit.fwd_cnt == sent and many.batch_room() == 0            # data waits
    for c, env in ((one, env1), (many, env2)):
        updates = [h for h in env.sent if h.op == Op.CREDIT_UPDATE]
        assert not c.credit.update_needed()
        if updates:
            assert updates[-1].fwd_cnt == c.credit.last_fwd_cnt
    for c, host in ((one, host1), (many, host2)):
        host.setblocking(False)
        got = bytearray()
        for _ in range(2000):
            try:
                got += host.recv(65536)
            except BlockingIOError:
                if not c.out:
                    break
                loop.run_until_complete(asyncio.sleep(0.001))
        assert bytes(got) == b"".join(packets)
        host.close()


def test_no_batch_room_unless_established_stream_with_nothing_waiting(loop) -> None:
    c, _env, host = _conn(loop)
    assert c.batch_room() == c.credit.buf_alloc
    c.on_packet(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.SHUTDOWN, SHUTDOWN_SEND, 8192, 0),
                [])
    assert c.batch_room() == 0                  # the guest shut its sending side
    s, _env2, host2 = _conn(loop, Type.SEQPACKET)
    assert s.batch_room() == 0                  # message boundaries: packet by packet
    host.close()
    host2.close()
