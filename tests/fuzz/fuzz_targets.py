"""Fuzz targets for the guest-facing parsers, shared by tests/fuzz/test_fuzz.py (CI: bounded,
fixed seed) and benchmarks/fuzz.py (>= 100,000 cases, prints count and time).

Each target is a plain function taking hypothesis-drawn data; it raises AssertionError (or any
unexpected exception) when a property breaks:

* virtqueue: a chain is popped exactly when a reference walker of the virtio rules accepts it,
  and then its views hold exactly the bytes at the guest-physical ranges the descriptors name
  (so nothing outside the mapped regions is ever reached); everything else is VirtqueueError;
  flush/re-arm (in Python or, in half the cases, the C accelerator) write only the used area.
* vhost_user: no exception but ProtocolError handling escapes the session, whatever the
  frontend sends (any request, flags, size, fd count, memory table); no fd is leaked.
* device: a real VsockDevice with a correct setup gets garbage rings and kicks; nothing escapes,
  a broken device is marked broken and the router told, the other VM's device goes on.
* rx_fill: Virtqueue.fill_rx (the vsock rx fill: Linux-shaped chains, indirect header +
  payload or one descriptor, one readv or a copy)
  on mutated rings gives the same result, last_avail and guest memory byte for byte in pure
  Python and in the C accelerator (vsock/_accel.c), and what it wrote is exactly the data in
  the payloads of the chains the reference walker names, headers from the templates.
* relay: Virtqueue.relay_stream (the C accelerator's batched VM->VM STREAM relay) on two
  guests' mutated rings and headers takes the same chains, gives the same counts and leaves
  both guests' memory byte for byte as the Python model of its contract does
  (tests/unit/test_relay_stream.py), within the rings' bounds; and on EVENT_IDX rings
  relay_publish leaves what relay_stream and both queues' flush() leave (rings, memory,
  used idx, interrupts, eventfd signals).
* router: arbitrary packets (every op/type/flag, spoofed CIDs, len vs buffer, unknown ports)
  leave the router without errors, and its accounting (queued bytes, control queue, credit)
  never goes negative or past its limits.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import os
import random
import socket
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass

from hypothesis import strategies as st

from vmlab.vsock import accel as vsock_accel
from vmlab.vsock import vhost_user as vu
from vmlab.vsock.device import VsockDevice
from vmlab.vsock.hybrid import Hybrid
from vmlab.vsock.memory import GuestMemory, RegionSpec
from vmlab.vsock.packet import HEADER, Header, Op, Type
from vmlab.vsock.router import MAX_CONTROL_QUEUE, MAX_RELAY_BYTES, Router
from vmlab.vsock.virtqueue import (DEFAULT_MAX_CHAIN_BYTES, VRING_DESC_F_INDIRECT,
                                   VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, DescChain, Virtqueue,
                                   VirtqueueError)

KiB = 1 << 10
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


# --- errors logged by the backend count as escaped exceptions ----------------------------
class ErrorLog(logging.Handler):
    """Collects ERROR records of vmlab.vsock: a log.exception() is an exception we caught."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            r = self.records[0]
            raise AssertionError(f"backend logged an error: {r.getMessage()}\n"
                                 f"{logging.Formatter().formatException(r.exc_info) if r.exc_info else ''}")


ERRORS = ErrorLog()
OUTCOMES: Counter[str] = Counter()          # what the cases reached (printed by benchmarks/fuzz.py)
logging.getLogger("vmlab.vsock").addHandler(ERRORS)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def check_loop_exceptions(loop: asyncio.AbstractEventLoop) -> list:
    seen: list = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    return seen


# --- hypothesis draws bytes; a provider turns them into structure -------------------------
class P:
    """Decodes a case from bytes (as atheris' FuzzedDataProvider). Hypothesis draws a short head
    (the first, most structural decisions: it mutates and shrinks those) and a seed; the rest
    comes from a PRNG with that seed. Per-byte hypothesis draws would cost ~20 ms a case."""

    def __init__(self, head: bytes, seed: int = 0) -> None:
        self.data = head
        self.pos = 0
        self.rng = random.Random(seed)

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        if len(out) < n:
            out += self.rng.randbytes(n - len(out))
        return out

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        return lo + int.from_bytes(self.raw((span.bit_length() + 7) // 8), "little") % (span + 1)

    def bool(self) -> bool:
        return bool(self.raw(1)[0] & 1)

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def mix(self, edges, lo: int, hi: int) -> int:
        """An interesting value half of the time, else anything in [lo, hi]."""
        return self.pick(edges) if self.raw(1)[0] < 128 else self.int(lo, hi)

    def bytes(self, max_len: int) -> bytes:
        return self.raw(self.int(0, max_len))

    def list(self, max_len: int, fn, min_len: int = 0) -> list:
        return [fn() for _ in range(self.int(min_len, max_len))]


def cases(gen) -> st.SearchStrategy[dict]:
    return st.tuples(st.binary(max_size=48), st.integers(0, U32_MAX)).map(
        lambda t: gen(P(t[0], t[1])))


# ==========================================================================================
# 1. split virtqueue walker against the in-memory guest memory model
# ==========================================================================================
RAM = 128 * KiB
GPA0 = 0x100000
UVA0 = 0x7F0000000000
DESC, AVAIL, USED, DATA = 0x0, 0x2000, 0x4000, 0x8000   # offsets in region 0 (rings fit 512)


@dataclass
class Layout:
    """Two 128 KiB regions of one memfd: adjacent in guest-physical space or with a gap."""

    gap: int

    @property
    def gpa1(self) -> int:
        return GPA0 + RAM + self.gap

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec(GPA0, RAM, UVA0, 0), RegionSpec(self.gpa1, RAM, UVA0 + RAM, RAM)]

    def raw_off(self, gpa: int) -> int | None:
        """Offset in the memfd of guest-physical gpa, None outside both regions."""
        if GPA0 <= gpa < GPA0 + RAM:
            return gpa - GPA0
        if self.gpa1 <= gpa < self.gpa1 + RAM:
            return RAM + gpa - self.gpa1
        return None

    def inside(self, gpa: int, length: int, split_ok: bool) -> bool:
        """[gpa, gpa+length) is guest memory (crossing into an adjacent region if split_ok)."""
        if length == 0:
            return True
        for start, end in ((GPA0, GPA0 + RAM), (self.gpa1, self.gpa1 + RAM)):
            if start <= gpa and gpa + length <= end:
                return True
        if split_ok and self.gap == 0:
            return GPA0 <= gpa and gpa + length <= self.gpa1 + RAM
        return False


def _addr(p: P, gap: int) -> int:
    gpa1 = GPA0 + RAM + gap
    edges = [0, GPA0 - 1, GPA0, GPA0 + DATA, GPA0 + RAM - 44, GPA0 + RAM - 1, GPA0 + RAM,
             gpa1 - 16, gpa1, gpa1 + RAM - 64, gpa1 + RAM - 1, gpa1 + RAM, U64_MAX, U64_MAX - 15,
             1 << 63]
    k = p.int(0, 3)
    if k == 0:
        return p.pick(edges)
    if k == 1:
        return p.int(GPA0 + DATA, GPA0 + RAM - 1)
    if k == 2:
        return p.int(gpa1, gpa1 + RAM - 1)
    return p.int(0, U64_MAX)


_LEN_EDGES = [0, 1, 15, 16, 32, 44, 48, 64, 4096, 4140, RAM, RAM + 1, U32_MAX, 16 * 129]


def _length(p: P) -> int:
    return p.mix(_LEN_EDGES, 0, 2 * RAM) if p.bool() else p.int(0, U32_MAX)


def _flags(p: P) -> int:
    return p.mix([0, 1, 2, 3, 4, 5, 6, 7], 0, 0xFFFF)


def virtqueue_case(p: P) -> dict:
    gap = p.pick([0, 0, 0x10000, 1 << 32])
    size = p.pick([1, 2, 4, 8, 16, 128, 256])
    # descriptors as a pool of likely-valid and random ones; tables may point at each other
    ndesc = p.int(1, min(size, 24))
    plausible = p.raw(1)[0] < 160           # most cases: chains a driver could write
    descs = []
    for i in range(ndesc):
        if plausible and p.raw(1)[0] < 220:
            descs.append((GPA0 + DATA + p.int(0, 0x4000), p.pick([0, 1, 16, 44, 100, 4096]),
                          p.pick([0, 1, 2, 3, 3, 1, 4]), (i + 1) % size if p.bool()
                          else p.int(0, size)))
        else:
            descs.append((_addr(p, gap), _length(p), _flags(p),
                          p.int(0, size + 1) if p.bool() else p.int(0, 0xFFFF)))
    # one indirect table (in region 0 after DATA) the descriptors may point to
    ind = p.list(18, lambda: (_addr(p, gap), _length(p), _flags(p), p.int(0, 20)))
    if plausible and p.bool():              # what Linux posts on tx: header, then payload
        for i in range(ndesc):              # header-only, or header -> payload in the ring
            if p.bool():
                descs[i] = (GPA0 + DATA + p.int(0, 0x4000), p.pick([44, 44, 43, 45]),
                            p.pick([0, 1, 1, 3]), (i + 1) % size if p.raw(1)[0] < 240 else i)
            else:
                descs[i] = (GPA0 + DATA + p.int(0, 0x4000), p.pick([1, 100, 4096, 0]),
                            p.pick([0, 0, 0, 1, 2, 4]), 0)
        if p.bool():                        # ... or in a 2-entry indirect table
            descs[0] = (0, 32, VRING_DESC_F_INDIRECT, 0)
        ind = [(GPA0 + DATA + p.int(0, 0x4000), 44, VRING_DESC_F_NEXT, p.pick([1, 1, 0, 2])),
               (GPA0 + DATA + p.int(0, 0x4000), p.pick([1, 100, 4096, 0]),
                p.pick([0, 0, 0, 1, 2]), 0)]
    heads = p.list(min(size, 16), lambda: p.int(0, ndesc) if p.raw(1)[0] < 220
                   else p.int(0, 0xFFFF))
    start = p.mix([0, 0xFFFF, 0xFFFE, 0xFFF0, 0x8000], 0, 0xFFFF)
    # avail idx: usually start+len(heads), sometimes a jump past the queue size
    avail_idx = (start + len(heads)) & 0xFFFF if p.raw(1)[0] < 200 else p.int(0, 0xFFFF)
    return dict(gap=gap, size=size, descs=descs, ind=ind, heads=heads, start=start,
                avail_idx=avail_idx, event_idx=p.bool(), indirect=p.bool(),
                notify_on_empty=p.bool(), used_event=p.int(0, 0xFFFF),
                avail_flags=p.int(0, 0xFFFF), used_idx=p.mix([0], 0, 0xFFFF),
                written=p.list(4, lambda: p.int(0, U32_MAX)), tx_fast=p.bool(),
                accel=p.bool(),
                ind_at=p.pick([GPA0 + DATA + 0x800, GPA0 + RAM - 64, GPA0 + RAM - 8]))


def ref_walk(layout: Layout, raw: bytes, size: int, indirect: bool, head: int):
    """The virtio rules, written independently of virtqueue.py: a list of (gpa, len, writable)
    or the string 'error'."""
    if head >= size:
        return "error"

    def desc_at(table_off: int, i: int):
        return struct.unpack_from("<QIHH", raw, table_off + 16 * i)

    table_off, limit, i, count, nested, seen_w = DESC, size, head, 0, False, False
    total, out = 0, []
    while True:
        count += 1
        if count > limit:
            return "error"
        addr, length, flags, nxt = desc_at(table_off, i)
        if flags & VRING_DESC_F_INDIRECT:
            if not indirect or nested or flags & VRING_DESC_F_NEXT:
                return "error"
            if length == 0 or length % 16 or length // 16 > size:
                return "error"
            if not layout.inside(addr, length, split_ok=False):
                return "error"
            table_off, limit, i, count, nested = layout.raw_off(addr), length // 16, 0, 0, True
            continue
        writable = bool(flags & VRING_DESC_F_WRITE)
        if not writable and seen_w:
            return "error"
        seen_w = seen_w or writable
        if length:
            if length > 64 << 20 or not layout.inside(addr, length, split_ok=True):
                return "error"
            out.append((addr, length, writable))
            total += length
        if total > DEFAULT_MAX_CHAIN_BYTES:
            return "error"
        if not flags & VRING_DESC_F_NEXT:
            return out
        i = nxt
        if i >= limit:
            return "error"


def _bytes_at(layout: Layout, raw: bytes, gpa: int, length: int) -> bytes:
    out = b""
    while length:
        off = layout.raw_off(gpa)
        region_end = RAM if off < RAM else 2 * RAM
        k = min(length, region_end - off)
        out += raw[off:off + k]
        gpa += k
        length -= k
    return out


class VqGuest:
    """One memfd with two regions and a Virtqueue over it."""

    def __init__(self, gap: int) -> None:
        self.layout = Layout(gap)
        self.fd = os.memfd_create("fuzz-vq")
        os.ftruncate(self.fd, 2 * RAM)
        self.raw = mmap.mmap(self.fd, 2 * RAM)
        self.mem = GuestMemory()
        self.mem.map(self.layout.regions(), [os.dup(self.fd), os.dup(self.fd)])

    def close(self) -> None:
        self.mem.close()
        self.raw.close()
        os.close(self.fd)


def _pop_tx_fast(vq: Virtqueue) -> DescChain | None:
    """The device's tx fast path (pop_tx_linux, one chain) as a DescChain, None when it
    leaves the chain to pop()."""
    fast = vq.pop_tx_linux(1, 44)
    if not fast:
        return None
    OUTCOMES["virtqueue: tx fast path"] += 1
    (head, header, pview, plen), = fast
    return DescChain(head, [memoryview(header)] + ([pview] if pview is not None else []), [],
                     len(header) + plen, 0)


def fuzz_virtqueue(case: dict) -> None:
    g = VqGuest(case["gap"])
    call = os.eventfd(0, os.EFD_NONBLOCK)
    vq = None
    try:
        size, raw, layout = case["size"], g.raw, g.layout
        for i, (a, ln, fl, nx) in enumerate(case["descs"]):
            struct.pack_into("<QIHH", raw, DESC + 16 * i, a, ln, fl, nx)
        ind_off = layout.raw_off(case["ind_at"])
        for i, (a, ln, fl, nx) in enumerate(case["ind"]):
            if ind_off + 16 * (i + 1) <= RAM:
                struct.pack_into("<QIHH", raw, ind_off + 16 * i, a, ln, fl, nx)
        # make the first descriptor, if indirect, point at the table (often a valid one)
        if case["descs"] and case["descs"][0][2] & VRING_DESC_F_INDIRECT:
            n = max(1, len(case["ind"]))
            struct.pack_into("<QIHH", raw, DESC, case["ind_at"], 16 * n,
                             case["descs"][0][2] & 0xFFFF, 0)
        start = case["start"]
        for k, head in enumerate(case["heads"]):
            struct.pack_into("<H", raw, AVAIL + 4 + 2 * ((start + k) % size), head)
        struct.pack_into("<HH", raw, AVAIL, case["avail_flags"], case["avail_idx"])
        struct.pack_into("<H", raw, AVAIL + 4 + 2 * size, case["used_event"])
        struct.pack_into("<H", raw, USED + 2, case["used_idx"])
        vq = Virtqueue(g.mem, size, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED,
                       event_idx=case["event_idx"], indirect=case["indirect"],
                       notify_on_empty=case["notify_on_empty"], next_avail=start, call_fd=call)
        if case["accel"]:                       # flush/re-arm by the C accelerator (EVENT_IDX)
            vq.accel = vsock_accel.load()
        snapshot = bytes(raw)
        jump = ((case["avail_idx"] - start) & 0xFFFF) > size
        popped = 0
        for k in range(len(case["heads"]) + 1):
            slot_head = struct.unpack_from("<H", snapshot, AVAIL + 4 + 2 * ((start + k) % size))[0]
            expect_more = not jump and k < ((case["avail_idx"] - start) & 0xFFFF)
            try:
                chain = _pop_tx_fast(vq) if case["tx_fast"] else None
                if chain is None:
                    chain = vq.pop()
            except VirtqueueError:
                OUTCOMES["virtqueue: refused"] += 1
                assert jump or ref_walk(layout, snapshot, size, case["indirect"], slot_head) \
                    == "error", "walker refused a chain the virtio rules allow"
                break
            if chain is None:
                assert not expect_more, "no chain although the avail idx says there is one"
                break
            assert not jump, "avail idx jump past the queue size not refused"
            assert expect_more, "chain popped beyond the avail idx"
            ref = ref_walk(layout, snapshot, size, case["indirect"], slot_head)
            assert ref != "error", f"walker accepted a chain the rules forbid (head {slot_head})"
            # contents as memory is now: a guest buffer may overlap the used ring we wrote
            mem_now = bytes(raw)
            want_r = b"".join(_bytes_at(layout, mem_now, a, n) for a, n, w in ref if not w)
            want_w = b"".join(_bytes_at(layout, mem_now, a, n) for a, n, w in ref if w)
            assert chain.read_len == len(want_r) and chain.write_len == len(want_w)
            assert b"".join(bytes(v) for v in chain.readable) == want_r
            assert b"".join(bytes(v) for v in chain.writable) == want_w
            OUTCOMES["virtqueue: chain popped"] += 1
            vq.push(chain.head, case["written"][k % len(case["written"])]
                    if case["written"] else 0)
            chain.release()
            popped += 1
            if k % 3 == 2:
                try:
                    vq.flush()
                except VirtqueueError:
                    assert case["notify_on_empty"] and not case["event_idx"]
        try:                     # both may read a (bad) avail idx: VirtqueueError is fine
            vq.enable_notification()
        except VirtqueueError:
            pass
        try:
            vq.flush()
        except VirtqueueError:
            pass
        used_idx = struct.unpack_from("<H", raw, USED + 2)[0]
        assert used_idx == (case["used_idx"] + popped) & 0xFFFF
        # the device wrote nothing outside the used ring (flags, idx, ring, avail_event)
        used_end = USED + 4 + 8 * size + 2
        now = bytes(raw)
        assert now[:USED] == snapshot[:USED] and now[used_end:] == snapshot[used_end:]
    finally:
        if vq is not None:
            vq.release()
        os.close(call)
        g.close()


# ==========================================================================================
# 1b. the vsock rx fill (pure Python and C) against the reference walker
# ==========================================================================================
RX_IND = DATA + 0x6000          # indirect tables (region 0), 32 bytes per slot
RX_HDRS = DATA + 0x7000         # headers, 64 bytes per slot
RX_PAY = RAM                    # payloads in region 1, 0x400 bytes per slot


def rx_fill_case(p: P) -> dict:
    gap = p.pick([0, 0, 0x10000, 1 << 32])
    size = p.pick([2, 4, 8, 16])
    gpa1 = GPA0 + RAM + gap
    slots = []
    for i in range(size):
        ring = [GPA0 + RX_IND + 32 * i, 32, VRING_DESC_F_INDIRECT, 0]
        hdr = [GPA0 + RX_HDRS + 64 * i, 44, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1]
        pay = [gpa1 + 0x400 * i, p.pick([0x400, 0x400, 100, 1, 0x3FF]), VRING_DESC_F_WRITE, 0]
        if p.raw(1)[0] < 90:        # Linux >= 6.2: one descriptor, header + payload
            ring = [gpa1 + 0x400 * i, p.pick([0x400, 0x400, 45, 44, 0x3FF]),
                    VRING_DESC_F_WRITE, 0]
        for _ in range(p.pick([0, 0, 0, 1, 2])):
            victim = p.pick([ring, hdr, pay])
            f = p.int(0, 3)
            victim[f] = p.pick([0, 1, 16, 31, 33, 44, 45, 0x3FF, 0x400, 0x401,
                                VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                                GPA0 + RAM - 40, gpa1 + RAM - 100, gpa1 + RAM - 1, gpa1 - 8,
                                U32_MAX, U64_MAX, p.int(0, U64_MAX)])
            victim[f] &= (U64_MAX, U32_MAX, 0xFFFF, 0xFFFF)[f]
        slots.append((ring, hdr, pay))
    heads = p.list(size, lambda: p.int(0, size - 1) if p.raw(1)[0] < 240 else p.int(0, 0xFFFF))
    start = p.mix([0, 0xFFFF, 0xFFFE, 0x8000], 0, 0xFFFF)
    avail_idx = (start + len(heads)) & 0xFFFF if p.raw(1)[0] < 230 else p.int(0, 0xFFFF)
    return dict(gap=gap, size=size, slots=slots, heads=heads, start=start, avail_idx=avail_idx,
                used_idx=p.mix([0, 0xFFFF], 0, 0xFFFF), pushed=p.int(0, 2), fd=p.bool(),
                indirect=p.raw(1)[0] < 220,
                want=p.mix([1, 100, 0x400, 0x401, 0x800, 1 << 20], 1, 0x4000),
                data=p.int(0, 0x5000), pieces=p.int(1, 5), max_n=p.pick([1, 3, 64]),
                hdr=p.raw(44), mid=p.raw(44) if p.bool() else None)


def _rx_fill_once(case: dict, mod) -> tuple:
    """Build the ring in a fresh guest, fill_rx once (mod None: pure Python), flush."""
    g = VqGuest(case["gap"])
    size, raw = case["size"], g.raw
    sock = peer = None
    vq = None
    try:
        for i, (ring, hdr, pay) in enumerate(case["slots"]):
            struct.pack_into("<QIHH", raw, DESC + 16 * i, *ring)
            struct.pack_into("<QIHH", raw, RX_IND + 32 * i, *hdr)
            struct.pack_into("<QIHH", raw, RX_IND + 32 * i + 16, *pay)
        start = case["start"]
        for k, head in enumerate(case["heads"]):
            struct.pack_into("<H", raw, AVAIL + 4 + 2 * ((start + k) % size), head)
        struct.pack_into("<HH", raw, AVAIL, 0, case["avail_idx"])
        struct.pack_into("<H", raw, USED + 2, case["used_idx"])
        data = bytes((i * 7 + 3) & 0xFF for i in range(case["data"]))
        vq = Virtqueue(g.mem, size, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED,
                       indirect=case["indirect"], next_avail=start)
        for j in range(case["pushed"]):
            vq.push(j % size, 44 + j)           # used elements queued before the fill
        snapshot = bytes(raw)
        src = None
        fd = -1
        if case["fd"]:
            sock, peer = socket.socketpair()
            sock.setblocking(False)
            if data:
                peer.sendall(data)
            else:
                peer.shutdown(socket.SHUT_WR)   # EOF
            fd = sock.fileno()
        else:
            step = max(1, len(data) // case["pieces"])
            src = [memoryview(data)[i:i + step] for i in range(0, len(data), step)]
        mid = case["mid"] if case["mid"] is not None else case["hdr"]
        try:
            res = vq.fill_rx(case["max_n"], case["want"], case["hdr"], mid, fd, src, mod)
        except VirtqueueError:
            res = "error"
        last_avail = vq.last_avail
        vq.flush()
        return res, last_avail, bytes(raw), snapshot, data
    finally:
        if vq is not None:
            vq.release()
        for s_ in (sock, peer):
            if s_ is not None:
                s_.close()
        g.close()


def fuzz_rx_fill(case: dict) -> None:
    mod = vsock_accel.load()
    py = _rx_fill_once(case, None)
    res, last_avail, now, snapshot, data = py
    if mod is not None:
        c = _rx_fill_once(case, mod)
        assert c[:3] == py[:3], f"C and Python differ: {c[:2]} vs {py[:2]}"
        OUTCOMES["rx_fill: C == Python"] += 1
    if res == "error":
        OUTCOMES["rx_fill: avail idx refused"] += 1
        return
    k, got, err, asked = res
    assert err == 0 and 0 <= got <= min(asked, case["want"]) and 0 <= k <= case["max_n"]
    assert last_avail == (case["start"] + k) & 0xFFFF
    OUTCOMES["rx_fill: filled" if k else "rx_fill: nothing filled"] += 1
    layout = Layout(case["gap"])
    size = case["size"]
    used_idx = struct.unpack_from("<H", now, USED + 2)[0]
    assert used_idx == (case["used_idx"] + case["pushed"] + k) & 0xFFFF
    moved = b""
    mid = case["mid"] if case["mid"] is not None else case["hdr"]
    for i in range(k):
        pos = (case["used_idx"] + case["pushed"] + i) % size
        head, written = struct.unpack_from("<II", now, USED + 4 + 8 * pos)
        assert head == struct.unpack_from("<H", snapshot,
                                          AVAIL + 4 + 2 * ((case["start"] + i) % size))[0]
        chain = ref_walk(layout, snapshot, size, case["indirect"], head)
        assert chain != "error", chain
        if len(chain) == 1:                   # one descriptor: header, then the payload
            assert chain[0][1] > 44, chain
            pay = (chain[0][0] + 44, chain[0][1] - 44)
        else:
            assert len(chain) == 2 and chain[0][1] == 44, chain
            pay = chain[1][:2]
        n = written - 44
        assert 0 < n <= pay[1]
        moved += _bytes_at(layout, now, pay[0], n)
        want_hdr = case["hdr"] if i == k - 1 and got == case["want"] else mid
        want_hdr = want_hdr[:24] + struct.pack("<I", n) + want_hdr[28:]
        if not _overlaps(chain, i, case, layout, snapshot, k):
            assert _bytes_at(layout, now, chain[0][0], 44) == want_hdr
    if not any(_overlaps(ref_walk(layout, snapshot, size, case["indirect"], struct.unpack_from(
            "<H", snapshot, AVAIL + 4 + 2 * ((case["start"] + i) % size))[0]), i, case, layout,
            snapshot, k) for i in range(k)):
        assert moved == data[:got], "payload bytes are not the data stream"
        OUTCOMES["rx_fill: payload bytes checked"] += 1
    assert got == len(moved) or k == 0


def _overlaps(chain, i: int, case: dict, layout: Layout, snapshot: bytes, k: int) -> bool:
    """A mutated chain whose header/payload overlaps another filled buffer or the rings:
    its bytes may be overwritten later in the same fill (allowed; not compared)."""
    spans = []
    for j in range(k):
        head = struct.unpack_from("<H", snapshot, AVAIL + 4 + 2 * ((case["start"] + j)
                                                                  % case["size"]))[0]
        c = ref_walk(layout, snapshot, case["size"], case["indirect"], head)
        if c == "error":
            return True
        spans += [(a, a + n) for a, n, _ in c]
    spans += [(GPA0, GPA0 + DATA + 0x8000)]      # rings and tables
    mine = [(a, a + n) for a, n, _ in chain]
    for a, b in mine:
        hits = sum(1 for x, y in spans if x < b and a < y)
        if hits > 1 + (GPA0 <= a < GPA0 + DATA + 0x8000):
            return True
    return False


# ==========================================================================================
# 2. vhost-user messages against a real session + VsockDevice
# ==========================================================================================
GUEST_RAM = 64 * KiB
FUZZ_UVA = 0x7F1200000000
REQUESTS = sorted(vu.REQUEST_NAMES)


class _NullHandler:
    def on_tx_packet(self, dev, header, payload) -> None: ...
    def on_rx_ready(self, dev) -> None: ...
    def on_device_reset(self, dev, reason) -> None: ...


def _u64(p: P) -> int:
    return p.mix([0, 1, 2, 3, 0xFF, 0x100, 0x101, 0x102, 0x103, vu.DEVICE_FEATURES, 1 << 63,
                  U64_MAX], 0, U64_MAX)


def _u32(p: P) -> int:
    return p.mix([0, 1, 2, 3, 128, 256, 32768, 65535, 65536, U32_MAX], 0, U32_MAX)


def _uva(p: P) -> int:
    return p.mix([FUZZ_UVA, FUZZ_UVA + 0x1000, FUZZ_UVA + 1, FUZZ_UVA + GUEST_RAM,
                  FUZZ_UVA + GUEST_RAM - 16, 0, U64_MAX], 0, U64_MAX)


def _region(p: P) -> tuple:
    return (p.mix([0, 0x1000, GUEST_RAM, GUEST_RAM // 2, U64_MAX - 0xFFF], 0, U64_MAX),
            p.mix([0, 1, 0x1000, GUEST_RAM, GUEST_RAM * 2, U64_MAX], 0, U64_MAX),
            _uva(p), p.mix([0, 1, 0x1000, GUEST_RAM, U64_MAX], 0, U64_MAX))


FD_KINDS = ["eventfd", "memfd", "small-memfd", "devnull", "pipe"]


def vhost_message(p: P) -> tuple:
    req = p.pick(REQUESTS) if p.raw(1)[0] < 200 else _u32(p)
    flags = (p.pick([vu.VERSION, vu.VERSION | vu.FLAG_NEED_REPLY]) if p.raw(1)[0] < 230
             else _u32(p))
    kind = p.pick(["u64", "state", "addr", "mem", "config", "raw", "empty"])
    if kind == "u64":
        payload = struct.pack("<Q", _u64(p))
    elif kind == "state":
        payload = struct.pack("<II", p.int(0, 4) if p.bool() else _u32(p), _u32(p))
    elif kind == "addr":
        payload = vu.VRING_ADDR.pack(p.int(0, 4) if p.bool() else _u32(p), _u32(p), _uva(p),
                                     _uva(p), _uva(p), _u64(p))
    elif kind == "mem":
        regions = p.list(9, lambda: _region(p))
        count = len(regions) if p.bool() else _u32(p)
        payload = struct.pack("<II", count, 0) + b"".join(vu.MEM_REGION.pack(*r) for r in regions)
    elif kind == "config":
        payload = vu.CONFIG_HDR.pack(_u32(p), _u32(p), _u32(p)) + p.bytes(300)
    elif kind == "raw":
        payload = p.bytes(300)
    else:
        payload = b""
    if p.int(0, 31) == 0:
        payload = payload[:p.int(0, len(payload))]                 # truncated payload
    size = len(payload) if p.raw(1)[0] < 245 else p.int(0, 5000)
    fds = p.list(10, lambda: p.pick(FD_KINDS)) if p.raw(1)[0] < 64 else []
    return req, flags, size, payload, fds


def _valid_setup() -> list:
    """A correct frontend sequence (rings in GUEST_RAM) the fuzzed messages are spliced into."""
    f = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 1)
    out = [(vu.GET_FEATURES, b"", []), (vu.SET_PROTOCOL_FEATURES,
                                        struct.pack("<Q", 1 << vu.PROTOCOL_F_REPLY_ACK), []),
           (vu.SET_OWNER, b"", []), (vu.SET_FEATURES, struct.pack("<Q", f), []),
           (vu.SET_MEM_TABLE, vu.encode_mem_table([RegionSpec(0, GUEST_RAM, FUZZ_UVA, 0)]),
            ["memfd"])]
    for q, base in ((0, 0), (1, 0x4000)):
        out += [(vu.SET_VRING_NUM, struct.pack("<II", q, 16), []),
                (vu.SET_VRING_BASE, struct.pack("<II", q, 0), []),
                (vu.SET_VRING_ADDR, vu.VRING_ADDR.pack(q, 0, FUZZ_UVA + base,
                                                       FUZZ_UVA + base + 0x2000,
                                                       FUZZ_UVA + base + 0x1000, 0), []),
                (vu.SET_VRING_KICK, struct.pack("<Q", q), ["eventfd"]),
                (vu.SET_VRING_CALL, struct.pack("<Q", q), ["eventfd"]),
                (vu.SET_VRING_ENABLE, struct.pack("<II", q, 1), [])]
    return out


SETUP = _valid_setup()


def vhost_session_case(p: P) -> dict:
    prefix = p.int(0, len(SETUP))
    return dict(prefix=prefix, msgs=p.list(8, lambda: vhost_message(p), min_len=1),
                close=p.bool(), kick=p.bool(),
                garbage=p.bytes(64) if p.raw(1)[0] < 64 else b"")


class _Fds:
    """fds made for one case; the sender's copies are closed after sendmsg."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("fuzz-guest")
        os.ftruncate(self.memfd, GUEST_RAM)

    def make(self, kind: str) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK)
        if kind == "memfd":
            return os.dup(self.memfd)
        if kind == "small-memfd":
            fd = os.memfd_create("fuzz-small")
            os.ftruncate(fd, 100)
            return fd
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDWR)
        r, w = os.pipe()
        os.close(w)
        return r

    def close(self) -> None:
        os.close(self.memfd)


def _send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    try:
        sock.sendmsg([data], anc)
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if not data:
            return


def fuzz_vhost_user(case: dict) -> None:
    before = open_fds()
    loop = asyncio.new_event_loop()
    seen = check_loop_exceptions(loop)
    ERRORS.records.clear()
    tmp = tempfile.mkdtemp(prefix="vmlab-fuzz-")
    dev = VsockDevice("f", 3, os.path.join(tmp, "f.sock"), loop, _NullHandler())
    front, back = socket.socketpair()
    front.setblocking(False)
    fds = _Fds()
    session = vu.VhostUserSession(back, dev, name="f")
    dev._session = session              # what _on_accept does for the one frontend
    loop.add_reader(back.fileno(), dev._on_frontend)
    alive = True
    try:
        plan = [(r, vu.VERSION, None, p, k) for r, p, k in SETUP[:case["prefix"]]]
        plan += case["msgs"]
        for req, flags, size, payload, kinds in plan:
            if not alive:
                break
            size = len(payload) if size is None else size
            data = struct.pack("<III", req & U32_MAX, flags & U32_MAX, size & U32_MAX) + payload
            if not _send_raw(front, data, [fds.make(k) for k in kinds]):
                break
            alive = session.on_readable()        # must never raise: that is the property
            _drain(front)
        if alive and case["garbage"]:
            _send_raw(front, case["garbage"], [])
            alive = session.on_readable()
        if alive and case["kick"]:
            for v in session.vrings:
                if v.kick_fd is not None:
                    try:
                        os.write(v.kick_fd, struct.pack("<Q", 1))
                    except OSError:
                        pass
            for _ in range(3):
                loop.run_until_complete(asyncio.sleep(0))
        if alive and case["close"]:
            front.close()
            alive = session.on_readable()
            assert alive is False
        OUTCOMES["vhost-user: rings running" if any(q is not None for q in dev._queues)
                 else "vhost-user: rings not running"] += 1
        OUTCOMES["vhost-user: session alive" if alive else "vhost-user: frontend dropped"] += 1
        if not alive and dev._session is session:
            dev._drop_frontend("fuzz: frontend dropped")
        loop.run_until_complete(asyncio.sleep(0))
        assert not seen, f"exception in the event loop: {seen[0]}"
        ERRORS.check()
    finally:
        if dev._session is not None:
            dev._drop_frontend("fuzz done")
        dev.close()
        front.close()
        fds.close()
        loop.close()
        os.rmdir(tmp)
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


# ==========================================================================================
# 3. the data path: correctly set-up devices, then garbage rings and kicks
# ==========================================================================================
DEV_RAM = 256 * KiB
QS = 16
RINGS = {0: (0x0000, 0x1000, 0x2000), 1: (0x4000, 0x5000, 0x6000)}
RXD, TXD = 0x10000, 0x20000
RX_TABLES = 0x38000


class Frontend:
    """A synchronous fake QEMU for one VsockDevice (the test drives the device's loop)."""

    def __init__(self, dev: VsockDevice, loop: asyncio.AbstractEventLoop) -> None:
        self.dev, self.loop = dev, loop
        self.sock, back = socket.socketpair()
        dev._session = vu.VhostUserSession(back, dev, name=dev.name)
        dev._reset_seen = True
        loop.add_reader(back.fileno(), dev._on_frontend)
        self.fd = os.memfd_create("fuzz-dev")
        os.ftruncate(self.fd, DEV_RAM)
        self.raw = mmap.mmap(self.fd, DEV_RAM)
        self.kick = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.avail = {0: 0, 1: 0}
        self.nd = {0: 0, 1: 0}

    def send(self, req: int, payload: bytes = b"", fds=(), reply: bool = False):
        vu.send_message(self.sock, vu.Message(req, vu.VERSION, payload, list(fds)))
        self.dev._on_frontend()
        if reply:
            self.sock.settimeout(2)
            return vu.recv_message(self.sock)
        return None

    def setup(self) -> None:
        f = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 1)
        self.send(vu.SET_FEATURES, vu.encode_u64(f))
        self.send(vu.SET_MEM_TABLE, vu.encode_mem_table([RegionSpec(0, DEV_RAM, FUZZ_UVA, 0)]),
                  [self.fd])
        for q, (d, a, u) in RINGS.items():
            self.send(vu.SET_VRING_NUM, vu.encode_vring_state(vu.VringState(q, QS)))
            self.send(vu.SET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, 0)))
            self.send(vu.SET_VRING_ADDR, vu.encode_vring_addr(
                vu.VringAddr(q, 0, FUZZ_UVA + d, FUZZ_UVA + u, FUZZ_UVA + a, 0)))
            self.send(vu.SET_VRING_KICK, vu.encode_u64(q), [self.kick[q]])
            self.send(vu.SET_VRING_CALL, vu.encode_u64(q), [self.call[q]])
            self.send(vu.SET_VRING_ENABLE, vu.encode_vring_state(vu.VringState(q, 1)))

    def desc(self, q: int, addr: int, length: int, flags: int, nxt: int = 0) -> int:
        i = self.nd[q]
        self.nd[q] = (i + 1) % QS
        struct.pack_into("<QIHH", self.raw, RINGS[q][0] + 16 * i, addr, length, flags, nxt)
        return i

    def publish(self, q: int, head: int) -> None:
        a = RINGS[q][1]
        struct.pack_into("<H", self.raw, a + 4 + 2 * (self.avail[q] % QS), head)
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.raw, a + 2, self.avail[q])
        os.write(self.kick[q], struct.pack("<Q", 1))

    def rx_buffer(self, slot: int, length: int = 44 + 4096) -> None:
        self.publish(0, self.desc(0, RXD + slot * 0x1100, length, VRING_DESC_F_WRITE))

    def rx_linux(self, slot: int) -> None:
        """An rx buffer as Linux posts it: indirect table of header + 4 KiB payload (the shape
        Device.rx_fill takes), header at the same place as rx_buffer's."""
        table = RX_TABLES + 32 * slot
        base = RXD + slot * 0x1100
        struct.pack_into("<QIHHQIHH", self.raw, table, base, 44,
                         VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1, base + 44, 4096,
                         VRING_DESC_F_WRITE, 0)
        self.publish(0, self.desc(0, table, 32, VRING_DESC_F_INDIRECT))

    def packet(self, hdr: bytes, payload: bytes = b"", slot: int = 0) -> None:
        base = TXD + slot * 0x1100
        self.raw[base:base + len(hdr) + len(payload)] = hdr + payload
        self.publish(1, self.desc(1, base, len(hdr) + len(payload), 0))

    def used(self, q: int) -> int:
        return struct.unpack_from("<H", self.raw, RINGS[q][2] + 2)[0]

    def close(self) -> None:
        self.sock.close()
        self.raw.close()
        for fd in [self.fd, *self.kick.values(), *self.call.values()]:
            os.close(fd)


_AREAS = [RINGS[0][0], RINGS[0][1], RINGS[0][2], RINGS[1][0], RINGS[1][1], RINGS[1][2], TXD, RXD]


def device_case(p: P) -> dict:
    # writes into ring areas / data of the victim, then kicks
    writes = p.list(12, lambda: (p.pick(_AREAS), p.int(0, 0x200), p.raw(p.int(1, 64))))
    descs = p.list(12, lambda: (p.int(0, 1), p.int(0, QS - 1),
                                p.int(0, DEV_RAM + 0x100) if p.bool() else p.int(0, U64_MAX),
                                _length(p), _flags(p), p.int(0, QS + 2)))
    hdrs = p.list(6, lambda: packet_header(p, 3))
    avail = p.list(3, lambda: (p.int(0, 1), p.int(0, 0xFFFF)))
    return dict(writes=writes, descs=descs, hdrs=hdrs, avail=avail, rx_bufs=p.int(0, 4),
                other_rx=p.int(0, 4))


def _spin(loop: asyncio.AbstractEventLoop, n: int = 4) -> None:
    for _ in range(n):
        loop.run_until_complete(asyncio.sleep(0))


class _RecordingRouter(Router):
    def __init__(self, loop) -> None:
        super().__init__(loop)
        self.resets: list[tuple[str, str]] = []

    def on_device_reset(self, dev, reason: str) -> None:
        self.resets.append((dev.name, reason))
        super().on_device_reset(dev, reason)


def fuzz_device(case: dict) -> None:
    before = open_fds()
    loop = asyncio.new_event_loop()
    seen = check_loop_exceptions(loop)
    ERRORS.records.clear()
    tmp = tempfile.mkdtemp(prefix="vmlab-fuzz-")
    router = _RecordingRouter(loop)
    hybrid = Hybrid(loop, router, close_timeout=0.05, connect_timeout=0.2)
    router.hybrid = hybrid
    devs = {}
    fronts = {}
    try:
        for name, cid in (("victim", 3), ("other", 4)):
            dev = VsockDevice(name, cid, os.path.join(tmp, f"{name}.sock"), loop, router)
            router.add_device(dev, "g")
            hybrid.add_vm(name, cid, os.path.join(tmp, f"{name}.vsock"))
            devs[name] = dev
            fronts[name] = Frontend(dev, loop)
            fronts[name].setup()
        _spin(loop)
        v = fronts["victim"]
        o = fronts["other"]
        for i in range(case["other_rx"]):      # relayed data goes straight into these
            o.rx_linux(i)
        for i in range(case["rx_bufs"]):
            v.rx_buffer(i)
        for i, h in enumerate(case["hdrs"]):
            v.packet(h[0], h[1], slot=i)
        for off, delta, data in case["writes"]:
            v.raw[off + delta:off + delta + len(data)] = data
        for q, i, addr, ln, fl, nx in case["descs"]:
            struct.pack_into("<QIHH", v.raw, RINGS[q][0] + 16 * i, addr, ln, fl, nx)
        for q, idx in case["avail"]:
            struct.pack_into("<H", v.raw, RINGS[q][1] + 2, idx)
        for q in (0, 1):
            os.write(v.kick[q], struct.pack("<Q", 1))
        _spin(loop, 8)
        victim = devs["victim"]
        OUTCOMES["device: broken" if victim.broken else "device: still running"] += 1
        OUTCOMES["device: tx packets"] += victim.stats["tx_packets"]
        if victim.broken:
            assert ("victim", f"device broken: {victim.broken}") in router.resets, \
                "device broken without telling the router"
        for stt in router.devs.values():
            assert 0 <= stt.queued_bytes <= MAX_RELAY_BYTES
            assert 0 <= stt.queued_ctrl <= MAX_CONTROL_QUEUE
        # the other VM goes on: its REQUEST to a host port nobody listens on gets an RST
        # (packets the victim relayed to it may come first: give it buffers until the RST)
        o.packet(HEADER.pack(4, 2, 1000, 4444, 0, Type.STREAM, Op.REQUEST, 0, 65536, 0))
        got = []
        for slot in range(case["other_rx"], QS):
            o.rx_buffer(slot)
            _spin(loop, 3)
            got = [Header.unpack_from(o.raw, RXD + i * 0x1100) for i in range(o.used(0))]
            if any(h.op == Op.RST and h.src_cid == 2 and h.src_port == 4444 for h in got):
                break
        else:
            raise AssertionError(f"the other VM got no RST: {[h.describe() for h in got]}")
        assert devs["other"].broken is None
        assert not seen, f"exception in the event loop: {seen[0]}"
        ERRORS.check()
    finally:
        for name, dev in devs.items():
            dev.close()
        hybrid.close()
        _spin(loop, 1)
        for f in fronts.values():
            f.close()
        loop.close()
        for p in os.listdir(tmp):
            os.unlink(os.path.join(tmp, p))
        os.rmdir(tmp)
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


# ==========================================================================================
# 4. router: every op/type/flag, spoofed CIDs, len vs buffer, unknown ports
# ==========================================================================================
LISTEN_PORT = 1234


def packet_header(p: P, own_cid: int) -> tuple[bytes, bytes]:
    if p.bool():                              # a packet a Linux guest could send
        op = p.pick([Op.REQUEST, Op.REQUEST, Op.RW, Op.RW, Op.RW, Op.RESPONSE, Op.RST,
                     Op.SHUTDOWN, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST])
        payload = p.bytes(300) if op == Op.RW else b""
        return HEADER.pack(own_cid, p.pick([2, 2, 4, 5]), p.pick([1000, 1001]),
                           p.pick([LISTEN_PORT, LISTEN_PORT, 4444]), len(payload),
                           p.pick([1, 1, 2]), op, p.pick([0, 1, 2, 3]),
                           p.pick([0, 4096, 65536, 262144]), p.pick([0, 100, 4096])), payload
    k = p.int(0, 3)
    src = own_cid if k < 2 else (p.pick([0, 1, 2, 4, 5, U32_MAX]) if k == 2 else p.int(0, U64_MAX))
    dst = p.mix([2, 2, 4, 5, own_cid, 0, 1, 99, U32_MAX], 0, U64_MAX)
    sport = p.mix([1000, 1001, 80, 0, U32_MAX], 0, U32_MAX)
    dport = p.mix([LISTEN_PORT, LISTEN_PORT, 1000, 4444, 0, U32_MAX], 0, U32_MAX)
    op = p.mix(list(Op) + list(Op), 0, 0xFFFF)
    typ = p.mix([1, 1, 2], 0, 0xFFFF)
    flags = p.mix([0, 1, 2, 3], 0, U32_MAX)
    k = p.int(0, 3)
    payload = b"" if k == 0 else p.bytes(256) if k < 3 else b"z" * p.int(0, 70000)
    k = p.int(0, 3)
    length = len(payload) if k < 2 else p.int(0, len(payload) + 2) if k == 2 else _u32(p)
    buf_alloc = p.mix([0, 1, 4096, 65536, 262144, U32_MAX], 0, U32_MAX)
    fwd_cnt = p.mix([0, U32_MAX], 0, U32_MAX)
    return HEADER.pack(src, dst, sport, dport, length, typ, op, flags, buf_alloc, fwd_cnt), payload


class FakeBuf:
    def __init__(self, cap: int) -> None:
        self.mem = bytearray(max(cap, 0))
        self.capacity = cap
        half = cap // 2
        self.payload = [memoryview(self.mem)[:half], memoryview(self.mem)[half:]] if cap else []


class FakeDevice:
    """The VsockDevice surface the router uses; rx buffers of fuzzed capacities."""

    broken = None

    def __init__(self, name: str, cid: int, caps: list[int], seqpacket: bool) -> None:
        self.name, self.cid, self.seqpacket = name, cid, seqpacket
        self.free = [FakeBuf(c) for c in caps]
        self.got: list[tuple[Header, int]] = []

    def rx_pop(self):
        return self.free.pop(0) if self.free else None

    def rx_push(self, buf, header: bytes, n: int) -> None:
        assert len(header) == 44 and 0 <= n <= buf.capacity, (len(header), n, buf.capacity)
        self.got.append((Header.unpack_from(header), n))

    def rx_cancel(self, buf) -> None:
        self.free.insert(0, buf)

    def flush(self) -> None:
        pass


class FillFakeDevice(FakeDevice):
    """FakeDevice with VsockDevice.rx_fill's and rx_control's contracts, so the router's
    one-step relay and its rx_fill paths run: leading buffers with room are filled (one
    readv from fd, or a copy from src), a zero-capacity one ends the batch (another shape)."""

    def rx_fill(self, want, hdr_last, hdr_mid, fd=-1, src=None, flush_soon=True):
        assert len(hdr_last) == 44 and len(hdr_mid) == 44 and want > 0, (want, fd)
        views, asked = [], 0
        for buf in self.free:
            if buf.capacity <= 0 or asked >= want:
                break
            views.append(memoryview(bytearray(min(buf.capacity, want - asked))))
            asked += len(views[-1])
        if not views:
            return None
        if fd >= 0:
            try:
                got = os.readv(fd, views)
            except OSError as exc:
                return 0, 0, exc.errno or 5, asked
        else:
            got = min(asked, sum(len(v) for v in src or []))
        k, left = 0, got
        while left > 0:
            n = min(len(views[k]), left)
            left -= n
            self.free.pop(0)
            hdr = Header.unpack_from(hdr_last if left == 0 and got == want else hdr_mid)
            self.got.append((hdr, n))
            k += 1
        return k, got, 0, asked

    def rx_control(self, header: bytes) -> bool:
        assert len(header) == 44
        if not self.free:
            return False
        self.free.pop(0)
        self.got.append((Header.unpack_from(header), 0))
        return True


def _router_step(p: P) -> tuple:
    k = p.int(0, 5)
    if k == 5:          # a's credit update on each of its host connections (Router._host_credit)
        return ("credit", p.mix([0, 4096, 8192, 262144, U32_MAX], 0, U32_MAX),
                p.mix([0, 100, 8192, U32_MAX], 0, U32_MAX), p.pick([1, 1, 1, 2]))
    if k == 0:
        return ("tx", p.pick(["a", "b"]), packet_header(p, 3))
    if k == 1:
        return ("rx", p.pick(["a", "b"]), p.list(8, lambda: p.pick([0, 1, 44, 100, 4096, 65536])))
    if k == 2:
        return ("host", p.int(0, 3), p.bytes(5000))
    if k == 3:
        return ("spin", p.int(1, 3), None)
    return ("reset", p.pick(["a", "b"]), p.bool())


def router_case(p: P) -> dict:
    return dict(steps=p.list(25, lambda: _router_step(p), min_len=1), seq_a=p.bool(),
                fill_b=p.bool(),
                caps=p.list(8, lambda: p.pick([0, 1, 44, 4096, 65536])))


def fuzz_router(case: dict) -> None:
    before = open_fds()
    loop = asyncio.new_event_loop()
    seen = check_loop_exceptions(loop)
    ERRORS.records.clear()
    tmp = tempfile.mkdtemp(prefix="vmlab-fuzz-")
    router = Router(loop)
    hybrid = Hybrid(loop, router, close_timeout=0.01, connect_timeout=0.05, buf_alloc=8192)
    router.hybrid = hybrid
    a = FakeDevice("a", 3, case["caps"], case["seq_a"])
    b = (FillFakeDevice if case["fill_b"] else FakeDevice)("b", 4, [4096] * 4, True)
    c = FakeDevice("c", 5, [4096] * 4, True)
    listeners, accepted = [], []
    try:
        for dev, group in ((a, "g"), (b, "g"), (c, "other")):
            router.add_device(dev, group)
            hybrid.add_vm(dev.name, dev.cid, os.path.join(tmp, f"{dev.name}.vsock"))
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        ls.bind(os.path.join(tmp, f"a.vsock_{LISTEN_PORT}"))
        ls.listen(16)
        listeners.append(ls)
        for step in case["steps"]:
            what = step[0]
            if what == "tx":
                dev = a if step[1] == "a" else b
                hdr, payload = step[2]
                if dev is b and len(hdr) == 44:          # b sends as itself (cid 4)
                    hdr = struct.pack("<Q", 4) + hdr[8:]
                views = [memoryview(bytearray(payload))] if payload else []
                router.on_tx_packet(dev, hdr, views)
            elif what == "rx":
                dev = a if step[1] == "a" else b
                dev.free += [FakeBuf(cap) for cap in step[2]]
                router.on_rx_ready(dev)
            elif what == "host":
                while True:
                    try:
                        s, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    s.setblocking(False)
                    accepted.append(s)
                if accepted and step[2]:
                    try:
                        accepted[step[1] % len(accepted)].send(step[2])
                    except OSError:
                        pass
                for s in accepted:
                    try:
                        while s.recv(65536):
                            pass
                    except OSError:
                        pass
            elif what == "spin":
                _spin(loop, step[1])
            elif what == "reset":
                router.reset_vm(step[1], step[2])
            elif what == "credit":
                for (_, host_port, cid, guest_port) in list(hybrid.conns):
                    if cid == a.cid:
                        router.on_tx_packet(a, HEADER.pack(
                            a.cid, 2, guest_port, host_port, 0, step[3], Op.CREDIT_UPDATE, 0,
                            step[1], step[2]), [])
            _check_router(router, hybrid)
        _spin(loop, 2)
        _check_router(router, hybrid)
        for k in ("spoofed", "malformed", "bad_type", "unroutable", "relayed", "relayed_fast",
                  "guest_connects", "refused", "rx_packets", "host_credit", "control_fast"):
            OUTCOMES[f"router: {k}"] += router.stats[k]
        assert router.stats["errors"] == 0
        assert not seen, f"exception in the event loop: {seen[0]}"
        ERRORS.check()
    finally:
        hybrid.close()
        for s in listeners + accepted:
            s.close()
        _spin(loop, 1)
        loop.close()
        for p in os.listdir(tmp):
            os.unlink(os.path.join(tmp, p))
        os.rmdir(tmp)
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


def _check_router(router: Router, hybrid: Hybrid) -> None:
    for s in router.devs.values():
        data = [d for _, d in s.queue if d is not None]
        ctrl = sum(1 for _, d in s.queue if d is None)
        assert s.queued_bytes == sum(len(d) for d in data) >= 0, (s.name, s.queued_bytes)
        assert s.queued_bytes <= MAX_RELAY_BYTES
        assert s.queued_ctrl == ctrl and 0 <= ctrl <= MAX_CONTROL_QUEUE, (s.name, s.queued_ctrl)
    for conn in list(hybrid.conns.values()) + list(hybrid.lingering):
        cr = conn.credit
        assert 0 <= cr.buffered() <= cr.buf_alloc, (conn, cr)
        assert cr.peer_credit() >= 0
        assert 0 <= conn.out_bytes <= cr.buf_alloc, (conn, conn.out_bytes)
        assert conn.out_bytes == sum(len(m) for m, _ in conn.out), conn


# --- relay: the C accelerator's batched VM->VM relay against its Python model ---------------
TX_IND = DATA + 0x4000          # tx indirect tables (region 0), 32 bytes per slot
TX_HDRS = DATA + 0x5000         # tx headers, 64 bytes per slot
TX_PAY = RAM                    # tx payloads in region 1, 0x400 bytes per slot (may overlap)


def _relay_header(p: P, plen: int) -> bytes:
    if p.raw(1)[0] < 210:                   # mostly what a relay takes: data or a credit packet
        op = p.pick([5, 5, 5, 6, 7])
        return HEADER.pack(3, 4, p.int(0, 11), 2000, p.pick([plen, max(plen - 1, 1)])
                           if op == 5 else 0, 1, op, 0, p.int(0, U32_MAX), p.int(0, U32_MAX))
    op = p.pick([5, 5, 5, 6, 7, 4, 1, p.int(0, 0xFFFF)])
    length = p.pick([plen, plen, max(plen - 1, 0), 0, 1, plen + 1, 0x10000, 0x10001,
                     p.int(0, U32_MAX)]) if op == 5 else p.pick([0, 0, 0, 1, p.int(0, U32_MAX)])
    return HEADER.pack(p.pick([3, 3, 3, 3, 4, 2, p.int(0, U64_MAX)]),
                       p.pick([4, 4, 4, 4, 3, 5, p.int(0, U64_MAX)]),
                       p.int(0, 11), p.pick([2000, 2000, 2001]), length & U32_MAX,
                       p.pick([1, 1, 1, 1, 2, p.int(0, 0xFFFF)]), op, p.int(0, 3),
                       p.int(0, U32_MAX), p.int(0, U32_MAX))


def _mutate(p: P, slot: list[list[int]], gpa1: int) -> None:
    for _ in range(p.pick([0] * 12 + [1, 2])):
        victim = p.pick(slot)
        f = p.int(0, 3)
        victim[f] = p.pick([0, 1, 16, 31, 32, 33, 44, 45, 0x3FF, 0x400, 0x401,
                            VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                            GPA0 + RAM - 40, gpa1 + RAM - 100, gpa1 + RAM - 1, gpa1 - 8,
                            U32_MAX, U64_MAX, p.int(0, U64_MAX)])
        victim[f] &= (U64_MAX, U32_MAX, 0xFFFF, 0xFFFF)[f]


def relay_case(p: P) -> dict:
    tx_gap, rx_gap = p.pick([0, 0, 0x10000, 1 << 32]), p.pick([0, 0, 0x10000, 1 << 32])
    tx_size, rx_size = p.pick([1, 2, 4, 8, 8, 16, 16]), p.pick([1, 2, 4, 8, 8, 16, 16])
    tx1, rx1 = GPA0 + RAM + tx_gap, GPA0 + RAM + rx_gap
    tx_slots = []
    for i in range(tx_size):
        plen = p.pick([0x400, 0x400, 100, 1, 0x3FF, 0x401])
        shape = p.pick(["indirect", "indirect", "header", "chained"])
        hdr = [GPA0 + TX_HDRS + 64 * i, 44, VRING_DESC_F_NEXT, 1]
        pay = [tx1 + 0x400 * i, plen, 0, 0]
        ring = [GPA0 + TX_IND + 32 * i, 32, VRING_DESC_F_INDIRECT, 0]
        if shape == "header":
            ring = [GPA0 + TX_HDRS + 64 * i, 44, 0, 0]
        elif shape == "chained":
            ring = [GPA0 + TX_HDRS + 64 * i, 44, VRING_DESC_F_NEXT, (i + 1) % tx_size]
        _mutate(p, [ring, hdr, pay], tx1)
        tx_slots.append((shape, ring, hdr, pay, _relay_header(p, plen)))
    rx_slots = []
    for i in range(rx_size):
        ring = [GPA0 + RX_IND + 32 * i, 32, VRING_DESC_F_INDIRECT, 0]
        hdr = [GPA0 + RX_HDRS + 64 * i, 44, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1]
        pay = [rx1 + 0x400 * i, p.pick([0x400, 0x400, 100, 1, 0x3FF]), VRING_DESC_F_WRITE, 0]
        if p.raw(1)[0] < 60:        # Linux >= 6.2: one descriptor, header + payload
            ring = [rx1 + 0x400 * i, p.pick([0x400, 0x400, 45, 44]), VRING_DESC_F_WRITE, 0]
        _mutate(p, [ring, hdr, pay], rx1)
        rx_slots.append((ring, hdr, pay))
    return dict(tx_gap=tx_gap, rx_gap=rx_gap, tx_size=tx_size, rx_size=rx_size,
                tx_slots=tx_slots, rx_slots=rx_slots,
                tx_heads=p.list(tx_size, lambda: p.int(0, tx_size - 1) if p.raw(1)[0] < 245
                                else p.int(0, 0xFFFF), min_len=int(p.raw(1)[0] < 230)),
                rx_heads=p.list(rx_size, lambda: p.int(0, rx_size - 1) if p.raw(1)[0] < 245
                                else p.int(0, 0xFFFF), min_len=int(p.raw(1)[0] < 230)),
                tx_start=p.mix([0, 0xFFFF, 0x8000], 0, 0xFFFF),
                rx_start=p.mix([0, 0xFFFF, 0x8000], 0, 0xFFFF),
                tx_indirect=p.raw(1)[0] < 230, rx_indirect=p.raw(1)[0] < 230,
                max_chain=p.pick([DEFAULT_MAX_CHAIN_BYTES] * 4 + [44 + 0x400, 44 + 100]),
                max_n=p.pick([256, 256, 1, 2]),
                # EVENT_IDX state for relay_publish: used_event, signalled before, kick_ahead
                events=(p.int(0, 0xFFFF), p.int(0, 0xFFFF)), valid=(p.bool(), p.bool()),
                ahead=(p.pick([0, 0, 3]), p.pick([0, 0, 5])))


def _relay_once(case: dict, mod, published: bool | None = None) -> tuple:
    """Both guests built fresh from the case, one relay (mod None: the Python model), both
    queues flushed: (result, tx last_avail, rx last_avail, tx memory, rx memory). published
    not None: EVENT_IDX rings with the case's state flushed by mod's publish, relay_stream
    (False) or relay_publish (True); the result then also holds used idx, interrupts and the
    call fds' counts."""
    from tests.unit.test_relay_stream import eventfd_count, model
    tx, rx = VqGuest(case["tx_gap"]), VqGuest(case["rx_gap"])
    txq = rxq = None
    fds: list[int] = []
    try:
        for i, (shape, ring, hdr, pay, header) in enumerate(case["tx_slots"]):
            raw = tx.raw
            struct.pack_into("<QIHH", raw, DESC + 16 * i, *ring)
            struct.pack_into("<QIHH", raw, TX_IND + 32 * i, *hdr)
            struct.pack_into("<QIHH", raw, TX_IND + 32 * i + 16, *pay)
            if shape == "chained":                  # the ring's next entry is the payload
                nxt = ring[3] % case["tx_size"]
                if nxt != i:
                    struct.pack_into("<QIHH", raw, DESC + 16 * nxt, *pay)
            raw[TX_HDRS + 64 * i:TX_HDRS + 64 * i + 44] = header
            raw[TX_PAY + 0x400 * i:TX_PAY + 0x400 * (i + 1)] = bytes([i * 17 & 0xFF]) * 0x400
        for i, (ring, hdr, pay) in enumerate(case["rx_slots"]):
            struct.pack_into("<QIHH", rx.raw, DESC + 16 * i, *ring)
            struct.pack_into("<QIHH", rx.raw, RX_IND + 32 * i, *hdr)
            struct.pack_into("<QIHH", rx.raw, RX_IND + 32 * i + 16, *pay)
        for g, heads, start, size in ((tx, case["tx_heads"], case["tx_start"], case["tx_size"]),
                                      (rx, case["rx_heads"], case["rx_start"], case["rx_size"])):
            for k, head in enumerate(heads):
                struct.pack_into("<H", g.raw, AVAIL + 4 + 2 * ((start + k) % size), head)
            struct.pack_into("<HH", g.raw, AVAIL, 0, (start + len(heads)) & 0xFFFF)
        event_idx = published is not None
        txq = Virtqueue(tx.mem, case["tx_size"], UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED,
                        indirect=case["tx_indirect"], next_avail=case["tx_start"],
                        max_chain_bytes=case["max_chain"], event_idx=event_idx)
        rxq = Virtqueue(rx.mem, case["rx_size"], UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED,
                        indirect=case["rx_indirect"], next_avail=case["rx_start"],
                        max_chain_bytes=case["max_chain"], event_idx=event_idx)
        if event_idx:
            for k, (g, q) in enumerate(((tx, txq), (rx, rxq))):
                struct.pack_into("<H", g.raw, AVAIL + 4 + 2 * q.size, case["events"][k])
                fds.append(os.eventfd(0, os.EFD_NONBLOCK))
                q.accel, q.call_fd = mod, fds[-1]
                q._signalled_valid, q.kick_ahead = case["valid"][k], case["ahead"][k]
        have, rx_have = txq._available(case["max_n"]), rxq._available(1024)
        if mod is None:
            res = model(txq, rxq, have, rx_have)
        elif published:
            res = txq.relay_publish(have, rxq, rx_have, 3, 4, mod)[0]
            assert rxq.pending == 0 and txq.pending == (0 if res[0] == have else res[0])
        else:
            res = txq.relay_stream(have, rxq, rx_have, 3, 4, mod)
        txq.flush()
        rxq.flush()
        out = (res, txq.last_avail, rxq.last_avail, bytes(tx.raw), bytes(rx.raw), have, rx_have)
        if event_idx:
            out += (txq.used_idx, rxq.used_idx, txq.interrupts, rxq.interrupts,
                    *(eventfd_count(fd) for fd in fds))
        return out
    finally:
        for q in (txq, rxq):
            if q is not None:
                q.release()
        for fd in fds:
            os.close(fd)
        tx.close()
        rx.close()



def fuzz_relay(case: dict) -> None:
    mod = vsock_accel.load()
    if mod is None:
        OUTCOMES["relay: no accelerator here"] += 1
        return
    c = _relay_once(case, mod)
    py = _relay_once(case, None)
    assert c[:3] == py[:3], f"C and the model differ: {c[:3]} vs {py[:3]}"
    assert c[3] == py[3] and c[4] == py[4], "C and the model left different guest memory"
    res, have, rx_have = c[0], c[5], c[6]
    chains, _, data_pkts, data_bytes, rx_data, control, flows = res
    assert chains <= have and rx_data + control <= rx_have and data_pkts + control == chains
    assert data_bytes <= 0x10000 * data_pkts and len(flows) <= 8
    OUTCOMES["relay: chains taken" if chains else "relay: nothing taken"] += 1
    if data_pkts:
        OUTCOMES["relay: data relayed"] += 1
    fused, plain = _relay_once(case, mod, True), _relay_once(case, mod, False)
    assert fused == plain, "relay_publish differs from relay_stream and both flushes"
    if chains and fused[-1]:
        OUTCOMES["relay: published, receiver signalled"] += 1


TARGETS = {
    "virtqueue": (cases(virtqueue_case), fuzz_virtqueue),
    "vhost_user": (cases(vhost_session_case), fuzz_vhost_user),
    "device": (cases(device_case), fuzz_device),
    "router": (cases(router_case), fuzz_router),
    "rx_fill": (cases(rx_fill_case), fuzz_rx_fill),
    "relay": (cases(relay_case), fuzz_relay),
}
