"""The C accelerator's batched paths. VM->VM (Virtqueue.relay_stream, accel.relay_stream)
against a Python model of its contract built from the pure-Python fast paths (pop_tx_linux,
pop_rx_linux): same chains taken, same counts, same bytes in both guests' memory, on hand-made
and on random (partly broken) rings. Guest->host (Virtqueue.send_stream) against a real
socket: what it takes, where it stops, what the socket did not take, a failed send."""
from __future__ import annotations

import errno
import os
import random
import socket
import struct

import pytest

from tests.unit.test_virtqueue import (DATA, GPA, INDIRECT, UVA, AVAIL, DESC, USED, Guest, I,
                                       N, R, W)
from vmlab.vsock.packet import HEADER, MAX_PKT_PAYLOAD, Op, Type
from vmlab.vsock.virtqueue import Virtqueue

SRC, DST = 3, 4
RW, UPDATE, REQUEST = int(Op.RW), int(Op.CREDIT_UPDATE), int(Op.CREDIT_REQUEST)
STREAM = int(Type.STREAM)
TX_PAY = DATA + 0x1000                  # tx payloads: slot i at TX_PAY + 0x100 * i (overlapping)


def hdr(op: int = RW, length: int = 0, src: int = SRC, dst: int = DST, sport: int = 1000,
        dport: int = 2000, type_: int = STREAM) -> bytes:
    return HEADER.pack(src, dst, sport, dport, length, type_, op, 0, 262144, 77)


def tx_indirect(g: Guest, i: int, header: bytes, plen: int) -> None:
    """Slot i: ring descriptor -> 2-entry table (header, payload), as Linux posts data."""
    table = INDIRECT + 32 * i
    g.write(DATA + 64 * i, header)
    g.desc(0, GPA + DATA + 64 * i, 44, N, 1, table=table)
    g.desc(1, GPA + TX_PAY + 0x100 * i, plen, R, 0, table=table)
    g.desc(i, GPA + table, 32, I)


def tx_header(g: Guest, i: int, header: bytes) -> None:
    """Slot i: one readable 44-byte descriptor, as Linux posts a control packet."""
    g.write(DATA + 64 * i, header)
    g.desc(i, GPA + DATA + 64 * i, 44, R)


def rx_buffer(g: Guest, i: int, payload: int = 4096) -> None:
    """Slot i: ring descriptor -> table (44-byte header, payload at DATA + 0x1000 * (i + 1))."""
    table = INDIRECT + 32 * i
    g.desc(0, GPA + DATA + 64 * i, 44, W | N, 1, table=table)
    g.desc(1, GPA + DATA + 0x1000 * (i + 1), payload, W, 0, table=table)
    g.desc(i, GPA + table, 32, I)


def queues(tx: Guest, rx: Guest, tx_start: int, rx_start: int, max_chain: int,
           event_idx: bool = False):
    """Fresh Virtqueues on both guests' rings (so a run can be repeated from the same state)."""
    return (Virtqueue(tx.mem, tx.size, UVA + DESC, UVA + AVAIL, UVA + USED, indirect=True,
                      next_avail=tx_start, max_chain_bytes=max_chain, event_idx=event_idx),
            Virtqueue(rx.mem, rx.size, UVA + DESC, UVA + AVAIL, UVA + USED, indirect=True,
                      next_avail=rx_start, max_chain_bytes=max_chain, event_idx=event_idx))


def model(txq: Virtqueue, rxq: Virtqueue, have: int, rx_have: int):
    """relay_stream's contract in Python: Router._relay_stream's checks per packet, RW only
    whole, at most 8 flows, stop at the first packet not taken."""
    chains = tx_bytes = data_pkts = data_bytes = rx_data = control = 0
    flows: list[tuple[int, int]] = []
    rx_left = rx_have
    while chains < have:
        got = txq.pop_tx_linux(1, 44)
        if not got:
            break
        head, header, pview, plen = got[0]
        src, dst, sport, dport, length, type_, op = HEADER.unpack(header)[:7]
        ok = src == SRC and dst == DST and type_ == STREAM and (
            (sport, dport) in flows or len(flows) < 8)
        bufs = []
        if ok and op == RW and 0 < length <= min(MAX_PKT_PAYLOAD, plen):
            bufs = rxq.pop_rx_linux(rx_left, length, 44, direct=True) if rx_left else []
            if sum(len(p) for _, _, p in bufs) < length:
                ok = False
            else:
                left, src_view = length, pview
                for rhead, hview, p in bufs:
                    n = min(len(p), left)
                    p[:n] = src_view[length - left:length - left + n]
                    hview[:] = header[:24] + struct.pack("<I", n) + header[28:]
                    rxq.push(rhead, 44 + n)
                    left -= n
                rx_left -= len(bufs)
                rx_data += len(bufs)
                data_pkts += 1
                data_bytes += length
        elif ok and op in (UPDATE, REQUEST) and length == 0:
            bufs = rxq.pop_rx_linux(1, 1, 44, direct=True) if rx_left else []
            if not bufs:
                ok = False
            else:
                rhead, hview, _ = bufs[0]
                hview[:] = header
                rxq.push(rhead, 44)
                rx_left -= 1
                control += 1
        else:
            ok = False
        if not ok:
            rxq.last_avail = (rxq.last_avail - len(bufs)) & 0xFFFF
        for _, hview, p in bufs:
            hview.release()
            p.release()
        if pview is not None:
            pview.release()
        if not ok:
            txq.unpop()
            break
        if (sport, dport) not in flows:
            flows.append((sport, dport))
        txq.push(head, 0)
        chains += 1
        tx_bytes += plen
    return chains, tx_bytes, data_pkts, data_bytes, rx_data, control, tuple(flows)


def used(g: Guest) -> tuple[int, list[tuple[int, int]]]:
    """used idx and the ring's elements."""
    idx = struct.unpack_from("<H", g.raw, USED + 2)[0]
    return idx, [struct.unpack_from("<II", g.raw, USED + 4 + 8 * i) for i in range(g.size)]


def eventfd_count(fd: int) -> int:
    """What a (non-blocking) call eventfd counted since the last look."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def signals(g: Guest) -> int:
    return eventfd_count(g.call)


def run(tx: Guest, rx: Guest, mod, tx_start: int, rx_start: int, max_chain: int = 64 << 20,
        max_n: int = 256, published: bool | None = None, valid: tuple[bool, bool] = (True, True),
        kick_ahead: tuple[int, int] = (0, 0)):
    """One relay from the rings' current state: (result, tx last_avail, rx last_avail, tx used
    ring, rx used ring, rx memory) after flushing both queues. published None: plain rings,
    relay_stream (or, mod None, the model); False: EVENT_IDX rings flushed by the accelerator
    (`valid`: whether each has signalled before, `kick_ahead`: each queue's), relay_stream;
    True: the same rings, relay_publish. With EVENT_IDX the result also has each ring's used
    idx, avail_event, interrupts and the signals its call fd got."""
    txq, rxq = queues(tx, rx, tx_start, rx_start, max_chain, event_idx=published is not None)
    try:
        if published is not None:
            for q, g, ok, ahead in ((txq, tx, valid[0], kick_ahead[0]),
                                    (rxq, rx, valid[1], kick_ahead[1])):
                q.accel, q.call_fd, q._signalled_valid, q.kick_ahead = mod, g.call, ok, ahead
                signals(g)
        have, rx_have = txq._available(max_n), rxq._available(1024)
        if mod is None:
            res = model(txq, rxq, have, rx_have)
        elif published:
            res, tx_signalled, rx_signalled = txq.relay_publish(have, rxq, rx_have, SRC, DST,
                                                                 mod)
            chains, taken = res[0], res[4] + res[5]
            # published in the same call: rx whenever a chain went across, tx when it took
            # every chain it had (else staged for the drain's own flush)
            assert rxq.pending == 0 and rxq.used_idx == taken
            assert txq.pending == (0 if chains == have else chains)
            if chains:
                assert struct.unpack_from("<H", rx.raw, USED + 2)[0] == taken
            assert (tx_signalled, rx_signalled) == (txq.interrupts == 1, rxq.interrupts == 1)
        else:
            res = txq.relay_stream(have, rxq, rx_have, SRC, DST, mod)
        txq.flush()
        rxq.flush()
        out = (res, txq.last_avail, rxq.last_avail, used(tx), used(rx), bytes(rx.raw[:0x20000]))
        if published is None:
            return out
        event = [bytes(g.raw[USED + 4 + 8 * g.size:USED + 6 + 8 * g.size]) for g in (tx, rx)]
        return out + (txq.used_idx, rxq.used_idx, event, txq.interrupts, rxq.interrupts,
                      signals(tx), signals(rx))
    finally:
        txq.release()
        rxq.release()


@pytest.fixture
def pair():
    tx, rx = Guest(indirect=True), Guest(indirect=True)
    yield tx, rx
    tx.close()
    rx.close()


def test_a_run_of_data_and_credit_packets_goes_across_and_stops_at_a_spoofed_one(
        pair, relay_accel):
    tx, rx = pair
    tx.write(TX_PAY, bytes(range(256)) * 32)
    tx_indirect(tx, 0, hdr(RW, 5000), 5000)           # 5000 bytes: 4096 + 904 in two buffers
    tx_header(tx, 1, hdr(UPDATE))
    tx_indirect(tx, 2, hdr(RW, 100, sport=7), 200)    # payload longer than len: len counts
    tx_header(tx, 3, hdr(REQUEST, src=9))             # spoofed src_cid: not taken
    tx.publish(0, 1, 2, 3)
    for i in range(6):
        rx_buffer(rx, i)
    rx.publish(*range(6))
    res, tx_last, rx_last, tx_used, rx_used, mem = run(tx, rx, relay_accel, 0, 0)
    assert res == (3, 5200, 2, 5100, 3, 1, ((1000, 2000), (7, 2000)))
    assert (tx_last, rx_last) == (3, 4)
    assert tx_used[0] == 3 and tx_used[1][:3] == [(0, 0), (1, 0), (2, 0)]
    assert rx_used[0] == 4 and rx_used[1][:4] == [(0, 44 + 4096), (1, 44 + 904), (2, 44),
                                                  (3, 44 + 100)]
    h0 = hdr(RW, 5000)
    assert mem[DATA:DATA + 44] == h0[:24] + struct.pack("<I", 4096) + h0[28:]
    assert mem[DATA + 64:DATA + 108] == h0[:24] + struct.pack("<I", 904) + h0[28:]
    assert mem[DATA + 128:DATA + 172] == hdr(UPDATE)
    sent = bytes(tx.raw[TX_PAY:TX_PAY + 5000])
    assert mem[DATA + 0x1000:DATA + 0x2000] + mem[DATA + 0x2000:DATA + 0x2000 + 904] == sent
    assert mem[DATA + 0x4000:DATA + 0x4000 + 100] == bytes(tx.raw[TX_PAY + 0x200:TX_PAY + 0x264])
    assert run(tx, rx, relay_accel, 0, 0)[:3] == run(tx, rx, None, 0, 0)[:3]


def test_data_that_does_not_fit_the_receivers_ring_is_left_whole(pair, relay_accel):
    """Two rx buffers (8 KiB) and a 9000-byte packet: nothing taken, both rings untouched,
    so the router's general path can deliver part of it and queue the rest."""
    tx, rx = pair
    tx_indirect(tx, 0, hdr(RW, 9000), 9000)
    tx.publish(0)
    rx_buffer(rx, 0)
    rx_buffer(rx, 1)
    rx.publish(0, 1)
    res, tx_last, rx_last, tx_used, rx_used, _ = run(tx, rx, relay_accel, 0, 0)
    assert res == (0, 0, 0, 0, 0, 0, ())
    assert (tx_last, rx_last, tx_used[0], rx_used[0]) == (0, 0, 0, 0)


def test_a_ninth_flow_ends_the_run(relay_accel):
    tx, rx = Guest(size=16, indirect=True), Guest(size=16, indirect=True)
    try:
        for i in range(10):
            tx_header(tx, i, hdr(UPDATE, sport=100 + min(i, 8)))   # flows 100..108, 108 twice
            rx_buffer(rx, i)
        tx.publish(*range(10))
        rx.publish(*range(10))
        res, tx_last, rx_last = run(tx, rx, relay_accel, 0, 0)[:3]
        assert res == (8, 0, 0, 0, 0, 8, tuple((100 + i, 2000) for i in range(8)))
        assert (tx_last, rx_last) == (8, 8)
        assert run(tx, rx, relay_accel, 0, 0)[:3] == run(tx, rx, None, 0, 0)[:3]
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("max_n", [256, 2])
def test_relay_matches_the_python_model_on_random_rings(pair, relay_accel, max_n):
    """Random runs of mostly relayable packets (a wrong cid, type, op or len now and then,
    flows from a pool of 12) in mostly Linux-shaped chains (a descriptor field mutated now
    and then), into rx buffers of random sizes (some mutated): the C relay and the model take
    the same chains and leave both guests' rings and the receiver's memory byte-identical."""
    for got, want in random_relays(pair, relay_accel, max_n, 2024, None):
        assert got == want


@pytest.mark.parametrize("max_n", [256, 2])
def test_relay_publish_is_relay_stream_then_both_flushes(pair, relay_accel, max_n):
    """The same random rings with EVENT_IDX (random used_event, first signal or not):
    relay_publish leaves the rings, the receiver's memory, used idx, avail_event, interrupt
    counts and call-fd signals as relay_stream followed by both queues' flush() does."""
    for got, want in random_relays(pair, relay_accel, max_n, 2025, True):
        assert got == want


def random_relays(pair, mod, max_n: int, seed: int, published: bool | None):
    """Yield (got, want) for 600 random ring states: published None, mod's relay_stream
    against the model; True, relay_publish against relay_stream, both on EVENT_IDX rings."""
    tx, rx = pair
    rng = random.Random(seed)
    max_chain = 44 + 3000
    tx.write(TX_PAY, bytes(rng.getrandbits(8) for _ in range(0x1800)))
    for _ in range(600):
        for i in range(tx.size):
            op = rng.choice([RW, RW, RW, UPDATE, REQUEST])
            plen = rng.choice([1, 100, 2956, 3000])
            fields = dict(op=op, length=rng.choice([plen, plen - 1 or 1]) if op == RW else 0,
                          sport=rng.randrange(12))
            if rng.random() < 0.15:                   # one field a relay must not take
                key, value = rng.choice([("src", DST), ("src", 2), ("dst", SRC), ("dst", 5),
                                         ("type_", 2), ("op", int(Op.SHUTDOWN)),
                                         ("length", 0), ("length", plen + 1),
                                         ("length", 70000), ("op", RW), ("op", UPDATE)])
                fields[key] = value
            h = hdr(**fields)
            op = fields["op"]
            if op == RW or rng.random() < 0.2:
                tx_indirect(tx, i, h, plen)
            else:
                tx_header(tx, i, h)
            if rng.random() < 0.05:
                table = INDIRECT + 32 * i
                tx.desc(rng.randrange(2), GPA + rng.choice([DATA, 0xFFFF0, 1 << 40]),
                        rng.choice([0, 44, 43, 32, 16, 3001]), rng.choice([R, N, W, I]),
                        rng.choice([0, 1, 7]), table=rng.choice([table, DESC]))
            rx_buffer(rx, i, rng.choice([4096, 4096, 2956, 100, 1]))
            if rng.random() < 0.02:
                rx.desc(i, GPA + DATA, rng.choice([44, 45, 32]), rng.choice([W, I, W | N]))
        tx_start = tx.avail_idx = rng.getrandbits(16)
        rx_start = rx.avail_idx = rng.getrandbits(16)
        tx.publish(*(rng.randrange(tx.size) for _ in range(rng.randrange(tx.size + 1))))
        rx.publish(*(rng.randrange(rx.size) if rng.random() > 0.02 else 0x1234
                     for _ in range(rng.randrange(rx.size + 1))))
        for g in (tx, rx):                          # used_event: where each wants a signal
            g.write(AVAIL + 4 + 2 * g.size, struct.pack("<H", rng.getrandbits(16)))
        valid = (rng.random() < 0.8, rng.random() < 0.8)
        ahead = (rng.choice([0, 0, 3, 15]), rng.choice([0, 0, 5]))
        used_tx, used_rx = bytes(tx.raw[USED:USED + 0x100]), bytes(rx.raw[USED:USED + 0x100])
        rx_mem = bytes(rx.raw[:0x20000])
        got = run(tx, rx, mod, tx_start, rx_start, max_chain, max_n, published, valid, ahead)
        tx.write(USED, used_tx)
        rx.write(USED, used_rx)
        rx.write(0, rx_mem)
        if published is None:
            want = run(tx, rx, None, tx_start, rx_start, max_chain, max_n)
        else:
            want = run(tx, rx, mod, tx_start, rx_start, max_chain, max_n, False, valid, ahead)
        yield got, want
        tx.write(USED, used_tx)
        rx.write(USED, used_rx)


# -- guest -> host: send_stream ---------------------------------------------------------------
def host_hdr(length: int, sport: int = 1000, dport: int = 2000, op: int = RW,
             src: int = SRC, fwd: int = 77) -> bytes:
    return HEADER.pack(src, 2, sport, dport, length, STREAM, op, 0, 262144, fwd)


def send(tx: Guest, mod, fd: int, max_bytes: int = 1 << 20, start: int = 0):
    txq = Virtqueue(tx.mem, tx.size, UVA + DESC, UVA + AVAIL, UVA + USED, indirect=True,
                    next_avail=start)
    try:
        res = txq.send_stream(txq._available(256), fd, SRC, 1000, 2000, max_bytes, mod)
        txq.flush()
        return res, txq.last_avail, used(tx)
    finally:
        txq.release()


@pytest.fixture
def host_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_send_stream_takes_one_connections_data_and_stops_at_anything_else(
        relay_accel, host_pair):
    a, b = host_pair
    tx = Guest(indirect=True)
    try:
        data = bytes(rng_byte & 0xFF for rng_byte in range(7 * 256))
        tx.write(TX_PAY, data)
        tx_indirect(tx, 0, host_hdr(300), 300)
        tx_indirect(tx, 1, host_hdr(200, fwd=99), 250)    # payload longer than len: len counts
        tx_indirect(tx, 2, host_hdr(100, sport=1001), 100)   # another connection: stop
        tx_indirect(tx, 3, host_hdr(100), 100)
        tx.publish(0, 1, 2, 3)
        res, last, (idx, elems) = send(tx, relay_accel, a.fileno())
        assert res == (2, 550, 500, 500, None, 262144, 99, 0)
        assert last == 2 and idx == 2 and elems[:2] == [(0, 0), (1, 0)]
        assert b.recv(4096) == data[:300] + data[0x100:0x100 + 200]
        # credit: a packet that would pass max_bytes is not taken
        res, last, _ = send(tx, relay_accel, a.fileno(), max_bytes=99, start=3)
        assert res[0] == 0 and last == 3
        for op, hdr in ((UPDATE, host_hdr(0, op=UPDATE)), (RW, host_hdr(100, src=9)),
                        (RW, host_hdr(0))):
            tx_indirect(tx, 3, hdr, 100)             # not data of this guest's flow: stop
            assert send(tx, relay_accel, a.fileno(), start=3)[0][0] == 0
    finally:
        tx.close()


def test_send_stream_gives_back_what_the_socket_did_not_take(relay_accel, host_pair):
    a, b = host_pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tx = Guest(indirect=True)
    try:
        data = bytes(range(256)) * 40
        tx.write(TX_PAY, data)
        for i in range(8):
            tx_indirect(tx, i, host_hdr(3000), 3000)
        tx.publish(*range(8))
        res, last, _ = send(tx, relay_accel, a.fileno())
        chains, _, total, sent, rest = res[:5]
        assert chains == 8 and total == 24000 and 0 < sent < total and last == 8
        want = b"".join(data[0x100 * i:0x100 * i + 3000] for i in range(8))
        got = bytearray()
        while True:
            try:
                got += b.recv(65536)
            except BlockingIOError:
                break
        assert bytes(got) == want[:sent] and rest == want[sent:]
        # nothing read yet: a full socket takes nothing and everything comes back
        tx.publish(*range(8))
        while True:
            try:
                a.send(b"x" * 65536)
            except BlockingIOError:
                break
        res = send(tx, relay_accel, a.fileno(), start=8)[0]
        assert res[:4] == (8, 8 * 3000, 24000, 0) and res[4] == want
    finally:
        tx.close()


def test_send_stream_takes_nothing_when_the_send_fails(relay_accel, host_pair):
    a, b = host_pair
    b.close()
    tx = Guest(indirect=True)
    try:
        tx_indirect(tx, 0, host_hdr(10), 10)
        tx.publish(0)
        res, last, (idx, _) = send(tx, relay_accel, a.fileno())
        assert res[0] == 0 and res[7] == errno.EPIPE and last == 0 and idx == 0
    finally:
        tx.close()
