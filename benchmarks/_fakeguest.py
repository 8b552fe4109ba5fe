"""A fake guest for the raw backend benchmark: plays QEMU (vhost-user frontend, memfd guest RAM)
and the Linux virtio-vsock driver (rings, credit) against the real backend process.

Not part of vmlab's API. It lays buffers out as Linux 6.1 does with INDIRECT_DESC and EVENT_IDX
negotiated: every rx buffer is one ring descriptor pointing at a 2-entry indirect table (44-byte
header, 4 KiB payload), every tx packet with data one indirect table (header, up to 64 KiB
payload), every header-only tx packet one plain descriptor (Linux uses a table for 2+ buffers).
Interrupts and kicks follow EVENT_IDX (used_event / avail_event), so the backend sees the
notification pattern a real guest produces. Everything the backend writes is read back and
checked (used ids, lengths, header fields) so a broken data path fails loudly instead of
looking fast.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import select
import socket
import struct
import threading

from vmlab.vsock import vhost_user as vu
from vmlab.vsock.memory import RegionSpec

MiB = 1 << 20
QSIZE = 128                         # QEMU 7.2's vhost-user-vsock queue size
MEM = 16 * MiB
RINGS = {0: (0x0000, 0x1000, 0x2000), 1: (0x4000, 0x5000, 0x6000)}   # desc, avail, used
INDIRECT = {0: 0x8000, 1: 0xA000}   # 32-byte (2-entry) table per descriptor slot
RX_BUFS, RX_STRIDE, RX_PAYLOAD = 0x100000, 0x2000, 4096
TX_BUFS, TX_STRIDE, TX_PAYLOAD = 0x400000, 0x11000, 64 * 1024
HDR_OFF = 64                        # payload starts this far into a buffer slot

HDR = struct.Struct("<QQIIIHHIII")
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = (
    1, 2, 3, 4, 5, 6, 7)
STREAM = 1
BUF_ALLOC = 256 * 1024              # what Linux advertises by default
CREDIT_LOW = 64 * 1024
FEATURES = ((1 << vu.VIRTIO_F_VERSION_1) | (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << vu.VIRTIO_RING_F_EVENT_IDX) | (1 << vu.VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << vu.VIRTIO_VSOCK_F_SEQPACKET))
PF = (1 << vu.PROTOCOL_F_REPLY_ACK) | (1 << vu.PROTOCOL_F_CONFIG) | (1 << vu.PROTOCOL_F_MQ)
_fence = threading.Lock()


def need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def barrier() -> None:
    _fence.acquire()
    _fence.release()


class GuestError(RuntimeError):
    """The backend did something a Linux guest would not accept."""


class Flow:
    """One vsock stream connection as the guest's driver sees it (credit both ways)."""

    def __init__(self, local: tuple[int, int], peer: tuple[int, int]) -> None:
        self.local, self.peer = local, peer
        self.fwd_cnt = 0            # bytes our "application" consumed
        self.last_fwd_sent = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.rx_bytes = 0
        self.established = False
        self.closed = False
        self.digest = None

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))

    def need_update(self) -> bool:
        return BUF_ALLOC - ((self.fwd_cnt - self.last_fwd_sent) & 0xFFFFFFFF) < CREDIT_LOW


class FakeGuest:
    """One VM: vhost-user frontend + virtio-vsock driver, polled by `Driver`."""

    def __init__(self, cid: int, vu_path: str) -> None:
        self.cid = cid
        self.uva = 0x7F5500000000 + (cid << 32)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(vu_path)
        self.fd = os.memfd_create(f"fake-guest-{cid}")
        os.ftruncate(self.fd, MEM)
        self.raw = mmap.mmap(self.fd, MEM)
        self.mv = memoryview(self.raw)
        self.ring16 = self.mv[:0x8000].cast("H")  # the rings, for single 16-bit stores
        self.kick = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.avail_idx = {0: 0, 1: 0}
        self.used_seen = {0: 0, 1: 0}
        self.tx_free = list(range(QSIZE - 1, -1, -1))
        self.tx_queue: list[tuple] = []      # control packets waiting for a tx slot
        self.flows: dict[tuple[int, int, int], Flow] = {}   # (peer cid, peer port, local port)
        self.listening: set[int] = set()
        self.kicks = 0
        self.rx_packets = 0
        self.verify = False

    # -- vhost-user setup ----------------------------------------------------------------
    def _send(self, request: int, payload: bytes = b"", fds=(), need_reply: bool = False):
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        vu.send_message(self.sock, vu.Message(request, flags, payload, list(fds)))
        if need_reply or request in (vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES):
            return vu.recv_message(self.sock)
        return None

    def setup(self) -> None:
        offered = vu.decode_u64(self._send(vu.GET_FEATURES).payload)
        if FEATURES & ~offered:
            raise GuestError(f"backend does not offer {FEATURES & ~offered:#x}")
        self._send(vu.SET_PROTOCOL_FEATURES, vu.encode_u64(PF))
        self._send(vu.SET_OWNER)
        self._send(vu.SET_FEATURES, vu.encode_u64(FEATURES))
        table = vu.encode_mem_table([RegionSpec(0, MEM, self.uva, 0)])
        self._send(vu.SET_MEM_TABLE, table, [self.fd], True)
        for q, (desc, avail, used) in RINGS.items():
            self._send(vu.SET_VRING_NUM, vu.encode_vring_state(vu.VringState(q, QSIZE)))
            self._send(vu.SET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, 0)))
            self._send(vu.SET_VRING_ADDR, vu.encode_vring_addr(
                vu.VringAddr(q, 0, self.uva + desc, self.uva + used, self.uva + avail, 0)))
            self._send(vu.SET_VRING_KICK, vu.encode_u64(q), [self.kick[q]])
            self._send(vu.SET_VRING_CALL, vu.encode_u64(q), [self.call[q]])
            self._send(vu.SET_VRING_ENABLE, vu.encode_vring_state(vu.VringState(q, 1)),
                       need_reply=True)
        # descriptor slot i -> indirect table i: (header, payload), fixed for the whole run
        for q, base, stride, size, flags in ((0, RX_BUFS, RX_STRIDE, RX_PAYLOAD, F_WRITE),
                                             (1, TX_BUFS, TX_STRIDE, TX_PAYLOAD, 0)):
            desc = RINGS[q][0]
            for i in range(QSIZE):
                table = INDIRECT[q] + 32 * i
                DESC.pack_into(self.raw, desc + 16 * i, table, 32, F_INDIRECT, 0)
                DESC.pack_into(self.raw, table, base + stride * i, 44, flags | F_NEXT, 1)
                DESC.pack_into(self.raw, table + 16, base + stride * i + HDR_OFF, size, flags, 0)
        self.arm(0)
        self.arm(1)
        self.post_rx(range(QSIZE))
        self.tx_payload_fill()

    def tx_payload_fill(self) -> None:
        # bytes 0..255 repeated; a packet starts at tx_cnt % 256 so the stream stays continuous
        pattern = (bytes(range(256)) * (TX_PAYLOAD // 256 + 1))
        for i in range(QSIZE):
            off = TX_BUFS + TX_STRIDE * i + HDR_OFF
            self.raw[off:off + len(pattern)] = pattern

    def close(self) -> None:
        self.sock.close()
        self.ring16.release()
        self.mv.release()
        self.raw.close()
        for fd in [self.fd, *self.kick.values(), *self.call.values()]:
            os.close(fd)

    # -- ring helpers --------------------------------------------------------------------
    def _publish(self, q: int, heads) -> None:
        avail = RINGS[q][1]
        old = idx = self.avail_idx[q]
        raw = self.raw
        for head in heads:
            U16.pack_into(raw, avail + 4 + 2 * (idx & (QSIZE - 1)), head)
            idx = (idx + 1) & 0xFFFF
        if idx == old:
            return
        self.ring16[(avail + 2) >> 1] = idx     # one 16-bit store, as Linux (see virtqueue.py)
        self.avail_idx[q] = idx
        barrier()
        event = U16.unpack_from(raw, RINGS[q][2] + 4 + 8 * QSIZE)[0]
        if need_event(event, idx, old):
            self.kicks += 1
            os.write(self.kick[q], b"\1\0\0\0\0\0\0\0")

    def post_rx(self, slots) -> None:
        self._publish(0, slots)

    def arm(self, q: int) -> bool:
        """Ask for an interrupt on the next used entry; True if entries arrived meanwhile."""
        self.ring16[(RINGS[q][1] + 4 + 2 * QSIZE) >> 1] = self.used_seen[q]
        barrier()
        return U16.unpack_from(self.raw, RINGS[q][2] + 2)[0] != self.used_seen[q]

    def _used(self, q: int) -> list[tuple[int, int]]:
        used = RINGS[q][2]
        idx = U16.unpack_from(self.raw, used + 2)[0]
        seen = self.used_seen[q]
        n = (idx - seen) & 0xFFFF
        if n > QSIZE:
            raise GuestError(f"queue {q}: used idx jumped {seen} -> {idx}")
        out = [USED.unpack_from(self.raw, used + 4 + 8 * ((seen + i) & (QSIZE - 1)))
               for i in range(n)]
        self.used_seen[q] = idx
        return out

    # -- packets -------------------------------------------------------------------------
    def send_ctrl(self, flow: Flow, op: int, flags: int = 0) -> None:
        self.tx_queue.append((flow, op, flags))

    def _tx(self, flow: Flow, op: int, length: int, flags: int = 0) -> int:
        slot = self.tx_free.pop()
        base = TX_BUFS + TX_STRIDE * slot
        skew = flow.tx_cnt & 0xFF
        HDR.pack_into(self.raw, base, self.cid, flow.peer[0], flow.local[1], flow.peer[1],
                      length, STREAM, op, flags, BUF_ALLOC, flow.fwd_cnt)
        flow.last_fwd_sent = flow.fwd_cnt
        DESC.pack_into(self.raw, INDIRECT[1] + 32 * slot + 16, base + HDR_OFF + skew, length, 0, 0)
        if not length:     # header only: one ring descriptor, as Linux posts one buffer
            DESC.pack_into(self.raw, RINGS[1][0] + 16 * slot, base, 44, 0, 0)
        else:
            DESC.pack_into(self.raw, INDIRECT[1] + 32 * slot, base, 44, F_NEXT, 1)
            DESC.pack_into(self.raw, RINGS[1][0] + 16 * slot, INDIRECT[1] + 32 * slot, 32,
                           F_INDIRECT, 0)
        return slot

    def pump_tx(self, data_flows: list[Flow], want: dict) -> None:
        """Send queued control packets, then RW packets (64 KiB max) within credit."""
        heads = []
        for flow in [f for f in self.flows.values() if f.need_update() and f.established]:
            self.tx_queue.append((flow, OP_CREDIT_UPDATE, 0))
        while self.tx_queue and self.tx_free:
            flow, op, flags = self.tx_queue.pop(0)
            heads.append(self._tx(flow, op, 0, flags))
        for flow in data_flows:
            left = want.get(flow, 0)
            while left > 0 and self.tx_free:
                n = min(TX_PAYLOAD, left, flow.credit())
                if n <= 0:
                    break
                heads.append(self._tx(flow, OP_RW, n))
                flow.tx_cnt = (flow.tx_cnt + n) & 0xFFFFFFFF
                left -= n
            want[flow] = left
        self._publish(1, heads)

    def reap_tx(self) -> None:
        for head, _ in self._used(1):
            if head >= QSIZE or head in self.tx_free:
                raise GuestError(f"tx: bad used id {head}")
            self.tx_free.append(head)

    def reap_rx(self) -> None:
        entries = self._used(0)
        raw, mv = self.raw, self.mv
        for head, length in entries:
            if head >= QSIZE or not 44 <= length <= 44 + RX_PAYLOAD:
                raise GuestError(f"rx: bad used element ({head}, {length})")
            base = RX_BUFS + RX_STRIDE * head
            (src_cid, dst_cid, src_port, dst_port, plen, typ, op, flags, buf_alloc,
             fwd_cnt) = HDR.unpack_from(raw, base)
            if dst_cid != self.cid or plen != length - 44:
                raise GuestError(f"rx: header {dst_cid=} {plen=} for used len {length}")
            self.rx_packets += 1
            key = (src_cid, src_port, dst_port)
            flow = self.flows.get(key)
            if flow is None:
                if op == OP_REQUEST and dst_port in self.listening:
                    flow = self.flows[key] = Flow((self.cid, dst_port), (src_cid, src_port))
                    flow.established = True
                    flow.peer_buf_alloc, flow.peer_fwd_cnt = buf_alloc, fwd_cnt
                    if self.verify:
                        flow.digest = hashlib.sha256()
                    self.send_ctrl(flow, OP_RESPONSE)
                elif op != OP_RST:
                    raise GuestError(f"rx: packet op {op} for unknown flow {key}")
                continue
            flow.peer_buf_alloc, flow.peer_fwd_cnt = buf_alloc, fwd_cnt
            if op == OP_RESPONSE:
                flow.established = True
            elif op == OP_RW:
                flow.rx_bytes += plen
                flow.fwd_cnt = (flow.fwd_cnt + plen) & 0xFFFFFFFF   # consumed at once
                if flow.digest is not None:
                    flow.digest.update(mv[base + HDR_OFF:base + HDR_OFF + plen])
            elif op == OP_CREDIT_REQUEST:
                self.send_ctrl(flow, OP_CREDIT_UPDATE)
            elif op in (OP_RST, OP_SHUTDOWN):
                flow.closed = True
        if entries:
            self.post_rx([head for head, _ in entries])

    def connect(self, peer_cid: int, port: int, local_port: int) -> Flow:
        flow = self.flows[(peer_cid, port, local_port)] = Flow((self.cid, local_port),
                                                                (peer_cid, port))
        self.send_ctrl(flow, OP_REQUEST)
        return flow


class Driver:
    """Runs the guests' drivers until `done()` is true: wait for interrupts, reap, refill."""

    def __init__(self, guests: list[FakeGuest]) -> None:
        self.guests = guests
        self.poll = select.poll()
        self.fd_guest = {}
        for g in guests:
            for q in (0, 1):
                self.poll.register(g.call[q], select.POLLIN)
                self.fd_guest[g.call[q]] = g
        self.want: dict[Flow, int] = {}
        self.data_flows: dict[FakeGuest, list[Flow]] = {g: [] for g in guests}
        self.waits = 0
        self.stalls = 0

    def send(self, guest: FakeGuest, flow: Flow, nbytes: int) -> None:
        self.data_flows[guest].append(flow)
        self.want[flow] = self.want.get(flow, 0) + nbytes

    def step(self, timeout_ms: int = 200, done=None) -> None:
        for g in self.guests:
            g.reap_rx()
            g.reap_tx()
            g.pump_tx(self.data_flows[g], self.want)
        if done is not None and done():
            return
        pending = False
        for g in self.guests:
            pending |= g.arm(0)
            pending |= g.arm(1)
        if pending:
            return
        self.waits += 1
        events = self.poll.poll(timeout_ms)
        if not events:
            self.stalls += 1
        for fd, _ in events:
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass

    def run(self, done, timeout: float = 120.0) -> None:
        import time
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise GuestError("timed out")
            self.step(done=done)
