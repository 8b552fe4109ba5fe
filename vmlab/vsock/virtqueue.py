"""Split virtqueue (virtio 1.x, section 2.7) over untrusted guest memory.

Everything read from the rings is guest-controlled: each field is read once with
struct.unpack_from and checked before use; any violation raises `VirtqueueError` and the
device stops using the queue. Used-ring updates are buffered: `flush()` writes the entries,
then the index, then decides about one interrupt for the whole batch.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

from .memory import GuestMemory, GuestMemoryError

log = logging.getLogger("vmlab.vsock.virtqueue")

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DEFAULT_MAX_CHAIN_BYTES = 64 << 20

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_U32 = struct.Struct("<I")
_IND2 = struct.Struct("<QIHHQIHH")        # a 2-entry indirect table in one read
_RX_HDR_FLAGS = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT
_ONE = (1).to_bytes(8, "little")
VSOCK_HDR_LEN = 44                        # fill_rx(): virtio_vsock_hdr, le32 len at offset 24
_VSOCK_LEN_OFF = 24
_NOTHING_RELAYED: tuple = (0, 0, 0, 0, 0, 0, ())   # relay_stream() that took no chain
_NOTHING_SENT: tuple = (0, 0, 0, 0, None, 0, 0, 0)  # send_stream() that took no chain

_fence_lock = threading.Lock()
# Ring fields the driver may read at any moment (used idx, avail_event, used flags) are stored
# with one 16-bit store through a native 'H' view: struct.pack_into zeroes its target first,
# and a driver reading used idx in that window sees 0 (seen as "used idx jumped").
_LE = sys.byteorder == "little"


def memory_barrier() -> None:
    """Full barrier (store->load), as smp_mb(): an uncontended lock is a LOCKed instruction.

    Needed between publishing the used idx / avail_event and reading used_event / avail idx,
    otherwise the device and the driver can both decide the other one will notify.
    """
    _fence_lock.acquire()
    _fence_lock.release()


class VirtqueueError(Exception):
    """The guest broke the virtqueue rules; the device must stop using this queue."""


@dataclass(slots=True)
class DescChain:
    """One popped descriptor chain: device-readable views first, then device-writable."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0

    def release(self) -> None:
        """Invalidate the views (they must not outlive the chain's use)."""
        for view in self.readable:
            view.release()
        for view in self.writable:
            view.release()


def _gather(src: list[memoryview], dst: list[memoryview]) -> int:
    """Copy the views `src` one after another into the views `dst`; returns bytes copied."""
    done = si = soff = 0
    for d in dst:
        doff = 0
        while doff < len(d) and si < len(src):
            s = src[si]
            k = min(len(d) - doff, len(s) - soff)
            d[doff:doff + k] = s[soff:soff + k]
            doff += k
            soff += k
            if soff == len(s):
                si += 1
                soff = 0
        done += doff
        if si == len(src):
            break
    return done


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event(): did [old, new) cross the index the other side asked about?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class Virtqueue:
    """One split virtqueue. Addresses are frontend user addresses (vhost-user vring addr)."""

    def __init__(self, mem: GuestMemory, size: int, desc_uva: int, avail_uva: int,
                 used_uva: int, *, event_idx: bool = False, indirect: bool = False,
                 notify_on_empty: bool = False, next_avail: int = 0, call_fd: int | None = None,
                 max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES, name: str = "vq") -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"{name}: bad queue size {size}")
        if desc_uva % 16 or avail_uva % 2 or used_uva % 4:
            raise VirtqueueError(f"{name}: misaligned ring addresses")
        self.name = name
        self.size = size
        self.mem = mem
        self.addrs = (desc_uva, avail_uva, used_uva)
        self.event_idx = event_idx
        self.indirect = indirect
        self.notify_on_empty = notify_on_empty
        self.call_fd = call_fd
        self.max_chain_bytes = max_chain_bytes
        self.last_avail = next_avail & 0xFFFF
        self._avail_seen = self.last_avail      # last avail idx read from the guest
        self._pending: list[tuple[int, int]] = []
        self._staged = 0                        # used elements written to the ring, idx not yet
        self._signalled_valid = False
        # EVENT_IDX: ask for the next kick only after this many more chains than the first
        # one (the device's bulk mode; it polls the ring itself meanwhile). 0: every chain.
        self.kick_ahead = 0
        self.interrupts = 0
        self.on_interrupt: Callable[[], None] | None = None
        # the C accelerator (vsock/accel.py): EVENT_IDX flush/re-arm in one call each
        self.accel: ModuleType | None = None
        self.desc = self.avail = self.used = memoryview(b"")
        self._used16: memoryview | None = None
        self.remap(mem)
        self.used_idx = _U16.unpack_from(self.used, 2)[0]

    # -- memory -----------------------------------------------------------------------
    def remap(self, mem: GuestMemory) -> None:
        """(Re)translate the ring areas, e.g. after a new SET_MEM_TABLE."""
        self.release()
        desc_uva, avail_uva, used_uva = self.addrs
        extra = 2 if self.event_idx else 0
        try:
            self.desc = mem.uva(desc_uva, 16 * self.size)
            self.avail = mem.uva(avail_uva, 4 + 2 * self.size + extra)
            self.used = mem.uva(used_uva, 4 + 8 * self.size + extra)
            self._used16 = self.used.cast("H") if _LE else None
        except GuestMemoryError as exc:
            self.release()
            raise VirtqueueError(f"{self.name}: ring not in guest memory: {exc}") from exc
        self.mem = mem

    def release(self) -> None:
        if self._used16 is not None:
            self._used16.release()
            self._used16 = None
        for view in (self.desc, self.avail, self.used):
            view.release()
        self.desc = self.avail = self.used = memoryview(b"")

    def _store16(self, off: int, value: int) -> None:
        """One atomic little-endian u16 store into the used area (see _LE)."""
        if self._used16 is not None:
            self._used16[off >> 1] = value
        else:
            _U16.pack_into(self.used, off, value)

    # -- avail side -------------------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self.avail, 2)[0]

    def has_avail(self) -> bool:
        if self._avail_seen != self.last_avail:
            return True
        self._avail_seen = self._read_avail_idx()
        return self._avail_seen != self.last_avail

    def _read_avail_idx(self) -> int:
        idx = _U16.unpack_from(self.avail, 2)[0]
        if ((idx - self.last_avail) & 0xFFFF) > self.size:
            raise VirtqueueError(
                f"{self.name}: avail idx jumped from {self.last_avail} to {idx} (size {self.size})")
        return idx

    def _available(self, max_n: int) -> int:
        """Chains the driver has made available, at most max_n. The avail idx is re-read
        whenever fewer than max_n were seen: a guest refills its rx ring while the backend
        fills it, and a stale count would end a fill (or split a relayed packet) early."""
        have = (self._avail_seen - self.last_avail) & 0xFFFF
        if have < max_n:
            self._avail_seen = self._read_avail_idx()
            have = (self._avail_seen - self.last_avail) & 0xFFFF
        return have if have < max_n else max_n

    def pop(self) -> DescChain | None:
        """Next available chain, or None when the driver has not made more available."""
        if self._avail_seen == self.last_avail:
            self._avail_seen = self._read_avail_idx()
            if self._avail_seen == self.last_avail:
                return None
        slot = self.last_avail & (self.size - 1)
        head = _U16.unpack_from(self.avail, 4 + 2 * slot)[0]
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def pop_rx_linux(self, max_n: int, room: int, hdr_len: int, direct: bool = False,
                     ) -> list[tuple[int, memoryview, memoryview]]:
        """Batch fast path for rx buffers laid out the way Linux lays them out with
        INDIRECT_DESC: one ring descriptor pointing at a 32-byte indirect table of two
        device-writable entries, `hdr_len` header bytes then the payload, each inside one memory
        region. Pops up to max_n leading chains of exactly that shape (fewer once their payload
        covers `room` bytes) and returns (head, header view, payload view) for each; it stops
        at the first chain of any other shape, leaving it for pop(), whose generic walk checks
        every rule (and raises if the chain is broken). Every guest-written field is checked
        here too before use; anything unexpected only ends the fast batch. direct: also take
        what Linux >= 6.2 posts (one device-writable descriptor, flags exactly WRITE, longer
        than the header, inside one region), split into header and payload views."""
        out: list[tuple[int, memoryview, memoryview]] = []
        size = self.size
        indirect = self.indirect
        if not (indirect or direct) or max_n <= 0 or size < 2:
            return out
        have = self._available(max_n)
        last = self.last_avail
        avail, desc, mask = self.avail, self.desc, size - 1
        mem = self.mem
        locate = mem.locate
        max_payload = self.max_chain_bytes - hdr_len
        got = 0
        for _ in range(have):
            head = _U16.unpack_from(avail, 4 + 2 * (last & mask))[0]
            if head >= size:
                break
            addr, length, flags, _nxt = _DESC.unpack_from(desc, 16 * head)
            if flags != VRING_DESC_F_INDIRECT or length != 32 or not indirect:
                if not (direct and flags == VRING_DESC_F_WRITE
                        and hdr_len < length <= self.max_chain_bytes):
                    break
                loc = locate(addr, length)
                if loc is None:
                    break
                view, off = loc
                out.append((head, view[off:off + hdr_len], view[off + hdr_len:off + length]))
                last = (last + 1) & 0xFFFF
                got += length - hdr_len
                if got >= room:
                    break
                continue
            # the usual case: table, header and payload all in the region used last
            region = mem._last_gpa
            if region is not None:
                rview, rstart, rsize = region.view, region.gpa_start, region.size
                toff = addr - rstart
                if not (0 <= toff and toff + 32 <= rsize):
                    region = None
            if region is None:
                table = locate(addr, 32)
                if table is None:
                    break
                rview, toff = table
                rstart, rsize = -1, 0               # no region known for the buffers
            a0, l0, f0, n0, a1, l1, f1, _n1 = _IND2.unpack_from(rview, toff)
            if (f0 != _RX_HDR_FLAGS or n0 != 1 or l0 != hdr_len or f1 != VRING_DESC_F_WRITE
                    or not 0 < l1 <= max_payload):
                break
            hoff = a0 - rstart
            poff = a1 - rstart
            if rstart >= 0 and 0 <= hoff and hoff + l0 <= rsize and 0 <= poff \
                    and poff + l1 <= rsize:
                out.append((head, rview[hoff:hoff + l0], rview[poff:poff + l1]))
            else:
                hloc = locate(a0, l0)
                ploc = locate(a1, l1)
                if hloc is None or ploc is None:
                    break
                hview, hoff = hloc
                pview, poff = ploc
                out.append((head, hview[hoff:hoff + l0], pview[poff:poff + l1]))
            last = (last + 1) & 0xFFFF
            got += l1
            if got >= room:
                break
        self.last_avail = last
        return out

    def pop_tx_linux(self, max_n: int, hdr_len: int,
                     ) -> list[tuple[int, bytes, memoryview | None, int]]:
        """Batch fast path for tx chains the way Linux posts them: a header-only packet as one
        readable descriptor of exactly `hdr_len` bytes (Linux 6.1's control packets), or a
        header descriptor of `hdr_len` bytes and one payload descriptor, both readable, either
        in a 2-entry indirect table (INDIRECT_DESC) or chained in the ring; every descriptor
        inside one memory region. Pops up to max_n leading chains of those shapes and returns
        (head, header bytes, payload view or None, payload length) for each, stopping at the
        first chain of any other shape: pop() takes that one with its generic walk, which
        checks every rule. Guest-written fields are checked before use here too; anything
        unexpected only ends the batch. Saves a DescChain and its walk per packet."""
        out: list[tuple[int, bytes, memoryview | None, int]] = []
        size = self.size
        if max_n <= 0:
            return out
        have = self._available(max_n)
        last = self.last_avail
        avail, desc, mask = self.avail, self.desc, size - 1
        locate = self.mem.locate
        indirect = self.indirect and size >= 2    # a 2-entry table in a 1-entry queue: generic
        max_payload = self.max_chain_bytes - hdr_len
        unpack_desc = _DESC.unpack_from
        for _ in range(have):
            head = _U16.unpack_from(avail, 4 + 2 * (last & mask))[0]
            if head >= size:
                break
            addr, length, flags, nxt = unpack_desc(desc, 16 * head)
            if flags == VRING_DESC_F_INDIRECT and length == 32 and indirect:
                table = locate(addr, 32)
                if table is None:
                    break
                a0, l0, f0, n0, a1, l1, f1, _n1 = _IND2.unpack_from(table[0], table[1])
                if f0 != VRING_DESC_F_NEXT or n0 != 1 or f1 != 0:
                    break
            elif flags == VRING_DESC_F_NEXT:
                if nxt >= size or nxt == head:
                    break
                a0, l0 = addr, length
                a1, l1, f1, _n1 = unpack_desc(desc, 16 * nxt)
                if f1 != 0:
                    break
            elif flags == 0 and length == hdr_len:
                loc = locate(addr, hdr_len)
                if loc is None:
                    break
                view, off = loc
                out.append((head, view[off:off + hdr_len].tobytes(), None, 0))
                last = (last + 1) & 0xFFFF
                continue
            else:
                break
            if l0 != hdr_len or not 0 < l1 <= max_payload:
                break
            hloc = locate(a0, l0)
            ploc = locate(a1, l1)
            if hloc is None or ploc is None:
                break
            hview, hoff = hloc
            pview, poff = ploc
            out.append((head, hview[hoff:hoff + l0].tobytes(), pview[poff:poff + l1], l1))
            last = (last + 1) & 0xFFFF
        self.last_avail = last
        return out

    def unpop(self) -> None:
        """Give the most recently popped chain back to the avail ring (it is re-read later)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def fill_rx(self, max_n: int, want: int, hdr_last: bytes, hdr_mid: bytes, fd: int,
                src: list[memoryview] | None, accel: ModuleType | None = None,
                ) -> tuple[int, int, int, int]:
        """vsock rx in one call: fill up to max_n leading Linux-shaped rx chains (the shapes
        pop_rx_linux(direct=True) takes, its checks) with up to `want` payload bytes, from one readv(fd) when
        fd >= 0, else copied from the views `src` (not consumed); write each filled buffer's
        header (hdr_mid, or hdr_last on the buffer that completes `want`, with its len field
        set) and queue its used element for flush(). Chains that got no bytes stay available.
        Returns (filled, bytes, errno of a failed readv or 0, bytes offered); offered 0: no
        chain of that shape is next, nothing was done. `accel` (vsock/accel.py) does the same
        in C without an object per buffer; the result is the same byte for byte."""
        if max_n <= 0 or want <= 0 or self.size < 2:
            return 0, 0, 0, 0
        if accel is not None:
            n = self._available(max_n)
            if n <= 0:
                return 0, 0, 0, 0
            k, got, err, asked = accel.fill_rx(*self._c_ring(n, self.indirect), want, hdr_last,
                                               hdr_mid, fd, src)
            self._taken(k)
            return k, got, err, asked
        bufs = self.pop_rx_linux(max_n, want, VSOCK_HDR_LEN, direct=True)
        if not bufs:
            return 0, 0, 0, 0
        views: list[memoryview] = []
        asked = 0
        for _head, _hview, pview in bufs:
            if len(pview) > want - asked:
                pview = pview[:want - asked]
            views.append(pview)
            asked += len(pview)
        got = err = 0
        if fd >= 0:
            try:
                got = os.readv(fd, views)
            except OSError as exc:
                err = exc.errno or errno.EIO
        else:
            got = _gather(src or [], views)
        k = 0
        left = got
        pending = self._pending
        pack_len = _U32.pack_into
        while k < len(bufs) and left > 0:
            n = len(views[k])
            if n > left:
                n = left
            left -= n
            head, hview, _ = bufs[k]
            hview[:] = hdr_last if left == 0 and got == want else hdr_mid
            pack_len(hview, _VSOCK_LEN_OFF, n)
            pending.append((head, VSOCK_HDR_LEN + n))
            k += 1
        self.last_avail = (self.last_avail - (len(bufs) - k)) & 0xFFFF   # the unfilled rest
        for (_head, hview, pview), view in zip(bufs, views):
            hview.release()
            view.release()
            pview.release()
        return k, got, err, asked

    def _c_ring(self, have: int, indirect: bool) -> tuple:
        """The ring as _accel.c's functions take it (grab_ring and the fields after it): the
        three areas, the memory regions, size, whether the indirect shape may be taken, next
        avail, chains available, where the next used element goes, the payload cap. The
        queued used elements are staged first: the C code writes its own after them."""
        if self._pending:
            self._stage()
        return (self.desc, self.avail, self.used, self.mem.accel_regions, self.size,
                int(indirect), self.last_avail, have, (self.used_idx + self._staged) & 0xFFFF,
                self.max_chain_bytes - VSOCK_HDR_LEN)

    def _taken(self, n: int) -> None:
        """The C code took the next n chains and wrote their used elements (staged)."""
        self.last_avail = (self.last_avail + n) & 0xFFFF
        self._staged += n

    def relay_stream(self, have: int, rx: "Virtqueue", rx_have: int, src_cid: int,
                     dst_cid: int, accel: ModuleType,
                     ) -> tuple[int, int, int, int, int, int, tuple[tuple[int, int], ...]]:
        """VM->VM STREAM in one C call (accel.relay_stream, its contract in _accel.c): up to
        `have` of this tx queue's leading Linux-shaped chains (the caller got `have` from
        _available()) from src_cid to dst_cid, RW taken only whole, credit updates/requests
        into one buffer each, go straight into `rx` (another guest's rx queue, `rx_have` of
        its chains seen available). Both queues' used elements are staged for their flush().
        Returns (chains, tx payload bytes, data packets, data bytes, rx data buffers, control
        packets, (src_port, dst_port) flows); chains 0: the next chain is not one of those,
        nothing was done."""
        if have <= 0 or rx_have <= 0 or rx.size < 2:
            return _NOTHING_RELAYED
        res = accel.relay_stream(*self._c_ring(have, self.indirect and self.size >= 2),
                                 *rx._c_ring(rx_have, rx.indirect), src_cid, dst_cid)
        if res[0]:
            self._taken(res[0])
            rx._taken(res[4] + res[5])
        return res

    def relay_publish(self, have: int, rx: "Virtqueue", rx_have: int, src_cid: int,
                      dst_cid: int, accel: ModuleType,
                      ) -> tuple[tuple[int, int, int, int, int, int, tuple[tuple[int, int], ...]],
                                 bool, bool]:
        """relay_stream(), then flush() of `rx` and, when it took all `have` chains, of this
        queue, in the same C call (accel.relay_publish): one call per relayed run where there
        were three. Both queues EVENT_IDX with the accelerator (their flush() would call
        accel.publish). Returns relay_stream's result and whether this queue and rx were
        signalled; a queue not published keeps its elements staged for its flush()."""
        if have <= 0 or rx_have <= 0 or rx.size < 2:
            return _NOTHING_RELAYED, False, False
        t_fd, r_fd = self.call_fd, rx.call_fd
        res = accel.relay_publish(
            *self._c_ring(have, self.indirect and self.size >= 2),
            *rx._c_ring(rx_have, rx.indirect), src_cid, dst_cid,
            self.used_idx, self.kick_ahead, self._signalled_valid, -1 if t_fd is None else t_fd,
            rx.used_idx, rx.kick_ahead, rx._signalled_valid, -1 if r_fd is None else r_fd)
        chains = res[0]
        if not chains:
            return _NOTHING_RELAYED, False, False
        self._taken(chains)
        rx._taken(res[4] + res[5])
        rx_signalled = rx._published(res[10], res[11], res[12])
        signalled = self._published(res[7], res[8], res[9]) if chains == have else False
        return res[:7], signalled, rx_signalled

    def send_stream(self, have: int, fd: int, src_cid: int, src_port: int, dst_port: int,
                    max_bytes: int, accel: ModuleType,
                    ) -> tuple[int, int, int, int, bytes | None, int, int, int]:
        """Guest->host STREAM data of one connection in one C call (accel.send_stream, its
        contract in _accel.c): up to `have` leading Linux-shaped tx chains of the flow
        src_cid:src_port -> 2:dst_port, RW, within max_bytes, in one sendmsg to `fd`; their
        used elements are staged for flush(). Returns (chains, tx payload bytes, data bytes,
        sent, the unsent rest copied or None, the last header's buf_alloc and fwd_cnt, errno
        of a failed send, which takes nothing); chains 0: nothing was done."""
        if have <= 0 or max_bytes <= 0:
            return _NOTHING_SENT
        res = accel.send_stream(*self._c_ring(have, self.indirect and self.size >= 2),
                                src_cid, src_port, dst_port, max_bytes, fd)
        self._taken(res[0])
        return res

    def _walk(self, head: int) -> DescChain:
        size = self.size
        if head >= size:
            raise VirtqueueError(f"{self.name}: head {head} >= queue size {size}")
        desc = self.desc
        addr, length, flags, nxt = _DESC.unpack_from(desc, 16 * head)
        if not flags & VRING_DESC_F_INDIRECT:
            chain = self._walk_short(desc, size, head, addr, length, flags, nxt, head)
            if chain is not None:
                return chain
        elif (self.indirect and not flags & VRING_DESC_F_NEXT and 16 <= length <= 32
              and not length % 16 and length // 16 <= size):
            # Linux puts multi-buffer chains into an indirect table when it may (rx: 2 entries)
            table = self.mem.gpa_one(addr, length)
            if table is not None:
                try:
                    first = _DESC.unpack_from(table, 0)
                    chain = self._walk_short(table, length // 16, head, *first, 0)
                finally:
                    table.release()
                if chain is not None:
                    return chain
        return self._walk_generic(head)

    def _walk_short(self, table: memoryview, limit: int, head: int, addr: int, length: int,
                    flags: int, nxt: int, idx: int) -> DescChain | None:
        """Fast path for the common chain: 1 or 2 non-empty, non-indirect descriptors in
        `table` (the ring's table, or an indirect table of `limit` entries), each inside one
        memory region. (addr, length, flags, nxt) is entry `idx` of `table`, already read.
        Returns None for anything else or anything wrong, and the caller walks the chain again
        with the generic loop, which checks every rule and raises. Nothing the guest wrote is
        trusted here either: indexes, flag combinations, lengths and addresses are checked
        before they are used."""
        if flags & VRING_DESC_F_INDIRECT:
            return None
        if flags & VRING_DESC_F_NEXT:
            if nxt >= limit or nxt == idx:
                return None
            addr2, length2, flags2, _ = _DESC.unpack_from(table, 16 * nxt)
            if flags2 & (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT):
                return None                 # longer chain, loop or indirect: generic walk
            if flags & VRING_DESC_F_WRITE and not flags2 & VRING_DESC_F_WRITE:
                return None                 # readable after writable: generic walk raises
            if length + length2 > self.max_chain_bytes:
                return None
            mem = self.mem
            first = mem.gpa_one(addr, length)
            if first is None:
                return None
            second = mem.gpa_one(addr2, length2)
            if second is None:
                first.release()
                return None
            if flags & VRING_DESC_F_WRITE:
                return DescChain(head, [], [first, second], 0, length + length2)
            if flags2 & VRING_DESC_F_WRITE:
                return DescChain(head, [first], [second], length, length2)
            return DescChain(head, [first, second], [], length + length2, 0)
        if length > self.max_chain_bytes:
            return None
        view = self.mem.gpa_one(addr, length)
        if view is None:
            return None
        if flags & VRING_DESC_F_WRITE:
            return DescChain(head, [], [view], 0, length)
        return DescChain(head, [view], [], length, 0)

    def _walk_generic(self, head: int) -> DescChain:
        size = self.size
        table = self.desc
        limit = size
        idx = head
        count = 0
        in_indirect = False
        seen_write = False
        chain = DescChain(head)
        mem = self.mem
        try:
            while True:
                count += 1
                if count > limit:
                    raise VirtqueueError(f"{self.name}: descriptor chain loop or too long (head {head})")
                addr, length, flags, nxt = _DESC.unpack_from(table, 16 * idx)
                if flags & VRING_DESC_F_INDIRECT:
                    if not self.indirect:
                        raise VirtqueueError(f"{self.name}: indirect descriptor not negotiated")
                    if in_indirect:
                        raise VirtqueueError(f"{self.name}: nested indirect descriptor")
                    if flags & VRING_DESC_F_NEXT:
                        raise VirtqueueError(f"{self.name}: indirect descriptor with NEXT")
                    if length == 0 or length % 16 or length // 16 > size:
                        raise VirtqueueError(f"{self.name}: bad indirect table length {length}")
                    table = mem.gpa(addr, length)
                    in_indirect = True
                    limit = length // 16
                    idx = 0
                    count = 0
                    continue
                if flags & VRING_DESC_F_WRITE:
                    seen_write = True
                    if length:
                        chain.write_len += length
                        chain.writable.extend(mem.gpa_split(addr, length))
                else:
                    if seen_write:
                        raise VirtqueueError(f"{self.name}: readable descriptor after writable one")
                    if length:
                        chain.read_len += length
                        chain.readable.extend(mem.gpa_split(addr, length))
                if chain.read_len + chain.write_len > self.max_chain_bytes:
                    raise VirtqueueError(f"{self.name}: chain longer than {self.max_chain_bytes} bytes")
                if not flags & VRING_DESC_F_NEXT:
                    return chain
                idx = nxt
                if idx >= limit:
                    raise VirtqueueError(f"{self.name}: next index {idx} out of range ({limit})")
        except GuestMemoryError as exc:
            chain.release()
            raise VirtqueueError(f"{self.name}: descriptor outside guest memory: {exc}") from exc
        except VirtqueueError:
            chain.release()
            raise
        finally:
            if in_indirect:
                table.release()

    # -- notifications from the driver (kicks) ----------------------------------------
    def disable_notification(self) -> None:
        """Ask the driver not to kick while we are draining the ring anyway."""
        if not self.event_idx:
            flags = _U16.unpack_from(self.used, 0)[0]
            self._store16(0, flags | VRING_USED_F_NO_NOTIFY)

    def enable_notification(self) -> bool:
        """Re-arm kicks; returns True if chains arrived meanwhile (process them, no kick comes)."""
        accel = self.accel
        if accel is not None and self.event_idx:
            idx = accel.arm(self.used, self.avail, self.size,
                            (self.last_avail + self.kick_ahead) & 0xFFFF)
            if self._avail_seen != self.last_avail:
                return True                     # seen before, not taken yet
            if ((idx - self.last_avail) & 0xFFFF) > self.size:
                idx = self._read_avail_idx()    # raises, naming the jump
            self._avail_seen = idx
            return idx != self.last_avail
        if self.event_idx:
            self._store16(4 + 8 * self.size, (self.last_avail + self.kick_ahead) & 0xFFFF)
        else:
            flags = _U16.unpack_from(self.used, 0)[0]
            self._store16(0, flags & ~VRING_USED_F_NO_NOTIFY)
        memory_barrier()
        return self.has_avail()

    # -- used side --------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Queue a used element; published by the next flush()."""
        if not 0 <= head < self.size:
            raise VirtqueueError(f"{self.name}: push of bad head {head}")
        self._pending.append((head, written))

    @property
    def pending(self) -> int:
        return len(self._pending) + self._staged

    def _stage(self) -> None:
        """Write the queued used elements into the ring after the staged ones, idx unchanged
        (the accelerator writes its elements after them, so the order stays push order)."""
        if not self._pending:
            return
        used, mask = self.used, self.size - 1
        idx = self.used_idx + self._staged
        pack = _USED_ELEM.pack_into
        for head, written in self._pending:
            pack(used, 4 + 8 * (idx & mask), head, written)
            idx += 1
        self._staged += len(self._pending)
        self._pending.clear()

    def flush(self) -> bool:
        """Publish queued used elements, then interrupt at most once. Returns True if signalled."""
        if not self._pending and not self._staged:
            return False
        accel = self.accel
        if accel is not None and self.event_idx:
            return self._flush_accel(accel)
        used = self.used
        mask = self.size - 1
        old = self.used_idx
        idx = (old + self._staged) & 0xFFFF
        self._staged = 0
        pack = _USED_ELEM.pack_into
        for head, written in self._pending:
            pack(used, 4 + 8 * (idx & mask), head, written)
            idx = (idx + 1) & 0xFFFF
        self._pending.clear()
        # Entries are stored before the index (x86 keeps store order; no compiler here).
        self._store16(2, idx)
        self.used_idx = idx
        if self.event_idx:
            self._store16(4 + 8 * self.size, (self.last_avail + self.kick_ahead) & 0xFFFF)
        memory_barrier()
        if self._should_interrupt(old, idx):
            self.interrupt()
            return True
        return False

    def _flush_accel(self, accel: ModuleType) -> bool:
        """flush() with EVENT_IDX in one C call (accel.publish: the same stores, barrier,
        vring_need_event decision and eventfd write)."""
        if self._pending:
            self._stage()
        call_fd = self.call_fd
        return self._published(*accel.publish(
            self.used, self.avail, self.size, self.used_idx, self._staged,
            (self.last_avail + self.kick_ahead) & 0xFFFF, self._signalled_valid,
            -1 if call_fd is None else call_fd))

    def _published(self, idx: int, signal: int, err: int) -> bool:
        """The C code published every staged element (used idx now idx) and maybe signalled
        (err: errno of a failed eventfd write). Returns whether it signalled."""
        self._staged = 0
        self.used_idx = idx
        if not signal:
            return False
        self._signalled_valid = True
        self.interrupts += 1
        if err:
            log.warning("%s: call eventfd write failed: %s", self.name, os.strerror(err))
        if self.on_interrupt is not None:
            self.on_interrupt()
        return True

    def _should_interrupt(self, old: int, new: int) -> bool:
        if self.event_idx:
            used_event = _U16.unpack_from(self.avail, 4 + 2 * self.size)[0]
            if not self._signalled_valid:
                self._signalled_valid = True
                return True
            return need_event(used_event, new, old)
        if self.notify_on_empty and not self.has_avail():
            return True
        flags = _U16.unpack_from(self.avail, 0)[0]
        return not flags & VRING_AVAIL_F_NO_INTERRUPT

    def interrupt(self) -> None:
        """Signal the call eventfd (the frontend turns it into a guest interrupt)."""
        self.interrupts += 1
        if self.call_fd is not None:
            try:
                os.write(self.call_fd, _ONE)
            except BlockingIOError:
                pass                            # counter saturated: an interrupt is pending anyway
            except OSError as exc:
                log.warning("%s: call eventfd write failed: %s", self.name, exc)
        if self.on_interrupt is not None:
            self.on_interrupt()
