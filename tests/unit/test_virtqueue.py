"""Split virtqueue against an in-memory guest: chains, used ring, EVENT_IDX, malformed rings."""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from vmlab.vsock.memory import GuestMemory, RegionSpec
from vmlab.vsock.virtqueue import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
                                   VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                                   Virtqueue, VirtqueueError, need_event)

MiB = 1 << 20
GPA = 0x100000          # guest RAM starts here in the model
UVA = 0x7F0000000000    # where the "frontend" has it mapped
DESC, AVAIL, USED, INDIRECT, DATA = 0x0, 0x1000, 0x2000, 0x3000, 0x10000
R, W, N, I = 0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT, VRING_DESC_F_INDIRECT


class Guest:
    """A driver's view of one queue: writes rings into a memfd the backend maps too."""

    def __init__(self, size: int = 8, *, event_idx: bool = False, indirect: bool = False,
                 notify_on_empty: bool = False) -> None:
        self.size = size
        self.fd = os.memfd_create("vq-test")
        os.ftruncate(self.fd, MiB)
        self.raw = mmap.mmap(self.fd, MiB)
        self.mem = GuestMemory()
        self.mem.map([RegionSpec(GPA, MiB, UVA, 0)], [os.dup(self.fd)])
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.vq = Virtqueue(self.mem, size, UVA + DESC, UVA + AVAIL, UVA + USED,
                            event_idx=event_idx, indirect=indirect,
                            notify_on_empty=notify_on_empty, call_fd=self.call)

    def close(self) -> None:
        self.vq.release()
        self.mem.close()
        self.raw.close()
        os.close(self.fd)
        os.close(self.call)

    def write(self, off: int, data: bytes) -> None:
        self.raw[off:off + len(data)] = data

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC) -> None:
        self.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.write(AVAIL + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.write(AVAIL + 2, struct.pack("<H", idx))

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack_from("<H", self.raw, USED + 2)[0]
        elems = [struct.unpack_from("<II", self.raw, USED + 4 + 8 * (i % self.size))
                 for i in range(idx)]
        return idx, elems

    def interrupts(self) -> int:
        try:
            return int.from_bytes(os.read(self.call, 8), "little")
        except BlockingIOError:
            return 0


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


def make(**kw):
    return Guest(**kw)


def test_empty_ring_pops_nothing(guest):
    assert guest.vq.pop() is None


def test_readable_then_writable_chain(guest):
    guest.write(DATA, b"H" * 44 + b"payload")
    guest.desc(0, GPA + DATA, 44, N, 1)
    guest.desc(1, GPA + DATA + 44, 7, N, 2)
    guest.desc(2, GPA + DATA + 0x100, 64, W)
    guest.publish(0)
    chain = guest.vq.pop()
    assert chain.head == 0
    assert [bytes(v) for v in chain.readable] == [b"H" * 44, b"payload"]
    assert chain.read_len == 51 and chain.write_len == 64
    chain.writable[0][:3] = b"abc"
    assert guest.raw[DATA + 0x100:DATA + 0x103] == b"abc"
    assert guest.vq.pop() is None


def test_indirect_chain():
    g = make(indirect=True)
    try:
        g.write(DATA, b"x" * 44 + b"y" * 10)
        g.desc(0, GPA + DATA, 44, N, 1, table=INDIRECT)
        g.desc(1, GPA + DATA + 44, 10, 0, 0, table=INDIRECT)
        g.desc(5, GPA + INDIRECT, 32, I)
        g.publish(5)
        chain = g.vq.pop()
        assert chain.head == 5
        assert [bytes(v) for v in chain.readable] == [b"x" * 44, b"y" * 10]
    finally:
        g.close()


def test_used_ring_batch_and_one_interrupt(guest):
    for i in range(3):
        guest.desc(i, GPA + DATA + 0x100 * i, 0x100, W)
    guest.publish(0, 1, 2)
    chains = [guest.vq.pop() for _ in range(3)]
    for chain, n in zip(chains, (10, 20, 30)):
        guest.vq.push(chain.head, n)
    assert guest.used() == (0, [])                # nothing visible before flush
    assert guest.vq.flush() is True
    assert guest.used() == (3, [(0, 10), (1, 20), (2, 30)])
    assert guest.interrupts() == 1
    assert guest.vq.flush() is False              # nothing pending: no interrupt


def test_no_interrupt_flag_without_event_idx(guest):
    guest.desc(0, GPA + DATA, 16, W)
    guest.publish(0)
    guest.write(AVAIL, struct.pack("<H", VRING_AVAIL_F_NO_INTERRUPT))
    guest.vq.push(guest.vq.pop().head, 0)
    assert guest.vq.flush() is False
    assert guest.used()[0] == 1
    assert guest.interrupts() == 0


def test_notify_on_empty_overrides_no_interrupt():
    g = make(notify_on_empty=True)
    try:
        g.desc(0, GPA + DATA, 16, W)
        g.publish(0)
        g.write(AVAIL, struct.pack("<H", VRING_AVAIL_F_NO_INTERRUPT))
        g.vq.push(g.vq.pop().head, 0)
        assert g.vq.flush() is True
    finally:
        g.close()


def test_event_idx_suppresses_and_fires_interrupts(rx_accel):
    """Also with the C accelerator's publish() (Virtqueue.accel set, as the device does)."""
    g = make(event_idx=True)
    g.vq.accel = rx_accel
    used_event = AVAIL + 4 + 2 * g.size
    try:
        for i in range(4):
            g.desc(i, GPA + DATA + 0x100 * i, 0x100, W)
        g.publish(0, 1, 2, 3)
        g.write(used_event, struct.pack("<H", 0x8000))  # would suppress a later signal, but
        g.vq.push(g.vq.pop().head, 1)
        assert g.vq.flush() is True               # the first flush after start always signals
        g.write(used_event, struct.pack("<H", 2))  # "interrupt me when used idx passes 2"
        g.vq.push(g.vq.pop().head, 1)             # used idx 1 -> 2: no
        assert g.vq.flush() is False
        g.vq.push(g.vq.pop().head, 1)             # used idx 2 -> 3: crosses 2
        assert g.vq.flush() is True
        assert g.interrupts() == 2
        # avail_event tells the driver where to kick next
        avail_event = struct.unpack_from("<H", g.raw, USED + 4 + 8 * g.size)[0]
        assert avail_event == g.vq.last_avail == 3
    finally:
        g.close()


def test_event_idx_flush_and_rearm_agree_in_python_and_c(relay_accel):
    """A random driver (used_event, avail idx, buffers posted) against two queues in step, one
    pure Python and one with the C publish()/arm(): the same interrupt decisions, eventfd
    writes, return values and bytes in the used area, step by step."""
    import random
    rng = random.Random(5)
    gs = [make(size=8, event_idx=True), make(size=8, event_idx=True)]
    gs[1].vq.accel = relay_accel
    try:
        for g in gs:
            for i in range(8):
                g.desc(i, GPA + DATA + 0x100 * i, 0x100, W)
        for _ in range(3000):
            event = rng.choice([None, rng.getrandbits(16)] + [
                (gs[0].vq.used_idx + d) & 0xFFFF for d in (0, 0, 0, 1, 2, -1)])
            n_post = rng.choice([0, 0, 1, 2])
            n_pop = rng.choice([0, 1, 1, 2, 3])
            kick_ahead = rng.choice([0, 0, 3])
            step = []
            for g in gs:
                vq = g.vq
                if event is not None:
                    g.write(AVAIL + 4 + 2 * g.size, struct.pack("<H", event))
                room = g.size - ((g.avail_idx - vq.last_avail) & 0xFFFF)
                g.publish(*range(min(n_post, room)))
                for _ in range(n_pop):
                    chain = vq.pop()
                    if chain is None:
                        break
                    vq.push(chain.head, 0x100)
                    chain.release()
                vq.kick_ahead = kick_ahead
                step.append((vq.flush(), vq.enable_notification(), g.interrupts(),
                             bytes(g.raw[USED:USED + 6 + 8 * g.size]), vq.used_idx))
            assert step[0] == step[1]
    finally:
        for g in gs:
            g.close()


def test_need_event_wraps():
    assert need_event(0xFFFF, 0x0001, 0xFFFE)
    assert not need_event(5, 3, 1)
    assert need_event(1, 3, 1)


def test_enable_notification_reports_late_arrivals(guest):
    guest.desc(0, GPA + DATA, 16, W)
    guest.vq.disable_notification()
    assert struct.unpack_from("<H", guest.raw, USED)[0] & VRING_USED_F_NO_NOTIFY
    assert guest.vq.enable_notification() is False
    assert not struct.unpack_from("<H", guest.raw, USED)[0] & VRING_USED_F_NO_NOTIFY
    guest.publish(0)
    assert guest.vq.enable_notification() is True


def test_unpop_gives_the_chain_back(guest):
    guest.desc(0, GPA + DATA, 16, W)
    guest.publish(0)
    assert guest.vq.pop().head == 0
    guest.vq.unpop()
    assert guest.vq.pop().head == 0


def test_wraparound_of_indexes():
    g = make()
    try:
        g.vq.last_avail = g.vq._avail_seen = 0xFFFE
        g.avail_idx = 0xFFFE
        g.desc(0, GPA + DATA, 16, W)
        g.publish(0, 0, 0)
        assert [g.vq.pop().head for _ in range(3)] == [0, 0, 0]
        assert g.vq.last_avail == 1
    finally:
        g.close()


def test_descriptor_split_across_regions():
    fd = os.memfd_create("split")
    os.ftruncate(fd, 2 * MiB)
    raw = mmap.mmap(fd, 2 * MiB)
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, UVA, 0), RegionSpec(MiB, MiB, UVA + MiB, MiB)],
            [os.dup(fd), os.dup(fd)])
    raw[MiB - 2:MiB + 2] = b"abcd"
    raw[0:16] = struct.pack("<QIHH", MiB - 2, 4, 0, 0)
    raw[0x1002:0x1006] = struct.pack("<HH", 1, 0)       # avail idx 1, ring[0] = 0
    vq = Virtqueue(mem, 8, UVA, UVA + 0x1000, UVA + 0x2000)
    chain = vq.pop()
    assert [bytes(v) for v in chain.readable] == [b"ab", b"cd"]
    chain.release()
    vq.release()
    mem.close()
    raw.close()
    os.close(fd)


# -- malformed rings ------------------------------------------------------------------
def _loop(g):
    g.desc(0, GPA + DATA, 8, N, 1)
    g.desc(1, GPA + DATA, 8, N, 0)
    g.publish(0)


def _next_out_of_range(g):
    g.desc(0, GPA + DATA, 8, N, g.size)
    g.publish(0)


def _head_out_of_range(g):
    g.publish(g.size + 3)


def _outside_memory(g):
    g.desc(0, 0x10, 8)
    g.publish(0)


def _past_the_end(g):
    g.desc(0, GPA + MiB - 4, 8)
    g.publish(0)


def _overflow(g):
    g.desc(0, (1 << 64) - 8, 16)
    g.publish(0)


def _huge(g):
    g.desc(0, GPA, 0xFFFFFFFF)
    g.publish(0)


def _indirect_not_negotiated(g):
    g.desc(0, GPA + INDIRECT, 16, I)
    g.publish(0)


def _writable_before_readable(g):
    g.desc(0, GPA + DATA, 8, W | N, 1)
    g.desc(1, GPA + DATA + 8, 8, 0)
    g.publish(0)


def _avail_jump(g):
    g.set_avail_idx(g.size + 1)


def _self_loop(g):
    g.desc(0, GPA + DATA, 8, W | N, 0)
    g.publish(0)


def _second_outside_memory(g):
    g.desc(0, GPA + DATA, 44, W | N, 1)
    g.desc(1, 0x10, 4096, W)
    g.publish(0)


def _second_past_the_end(g):
    g.desc(0, GPA + DATA, 44, W | N, 1)
    g.desc(1, GPA + MiB - 8, 4096, W)
    g.publish(0)


def _second_huge(g):
    g.desc(0, GPA + DATA, 44, W | N, 1)
    g.desc(1, GPA, 0xFFFFFFFF, W)
    g.publish(0)


def _second_overflows(g):
    g.desc(0, GPA + DATA, 44, W | N, 1)
    g.desc(1, (1 << 64) - 8, 4096, W)
    g.publish(0)


def _second_indirect_not_negotiated(g):
    g.desc(0, GPA + DATA, 44, W | N, 1)
    g.desc(1, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_32_not_negotiated(g):
    g.desc(0, GPA + DATA, 44, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _three_with_loop(g):
    g.desc(0, GPA + DATA, 8, W | N, 1)
    g.desc(1, GPA + DATA, 8, W | N, 2)
    g.desc(2, GPA + DATA, 8, W | N, 0)
    g.publish(0)


@pytest.mark.parametrize("build", [_loop, _next_out_of_range, _head_out_of_range, _outside_memory,
                                   _past_the_end, _overflow, _huge, _indirect_not_negotiated,
                                   _writable_before_readable, _avail_jump, _self_loop,
                                   _second_outside_memory, _second_past_the_end, _second_huge,
                                   _second_overflows, _second_indirect_not_negotiated,
                                   _indirect_32_not_negotiated, _three_with_loop])
def test_malformed_direct(guest, build):
    build(guest)
    with pytest.raises(VirtqueueError):
        guest.vq.pop()


def _nested_indirect(g):
    g.desc(0, GPA + INDIRECT + 0x100, 16, I, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 16, I)
    g.publish(0)


def _indirect_bad_len(g):
    g.desc(0, GPA + INDIRECT, 24, I)
    g.publish(0)


def _indirect_with_next(g):
    g.desc(0, GPA + INDIRECT, 16, I | N, 1)
    g.publish(0)


def _indirect_loop(g):
    g.desc(0, GPA + DATA, 8, N, 1, table=INDIRECT)
    g.desc(1, GPA + DATA, 8, N, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_table_too_long(g):
    g.desc(0, GPA + INDIRECT, 16 * (g.size + 1), I)
    g.publish(0)


def _indirect_self_loop(g):
    g.desc(0, GPA + DATA, 8, W | N, 0, table=INDIRECT)
    g.desc(1, GPA + DATA, 8, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_next_out_of_range(g):
    g.desc(0, GPA + DATA, 44, W | N, 2, table=INDIRECT)
    g.desc(1, GPA + DATA + 44, 8, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_one_entry_with_next(g):
    g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
    g.desc(1, GPA + DATA + 44, 8, W, 0, table=INDIRECT)     # outside the 1-entry table
    g.desc(0, GPA + INDIRECT, 16, I)
    g.publish(0)


def _indirect_second_outside_memory(g):
    g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
    g.desc(1, 0x10, 4096, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_second_past_the_end(g):
    g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
    g.desc(1, GPA + MiB - 8, 4096, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_first_overflows(g):
    g.desc(0, (1 << 64) - 8, 44, W | N, 1, table=INDIRECT)
    g.desc(1, GPA + DATA, 8, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_huge(g):
    g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
    g.desc(1, GPA, 0xFFFFFFFF, W, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_writable_before_readable(g):
    g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
    g.desc(1, GPA + DATA + 44, 8, R, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_second_nested(g):
    g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
    g.desc(1, GPA + INDIRECT, 16, I, 0, table=INDIRECT)
    g.desc(0, GPA + INDIRECT, 32, I)
    g.publish(0)


def _indirect_table_outside_memory(g):
    g.desc(0, 0x100, 32, I)
    g.publish(0)


def _indirect_table_past_the_end(g):
    g.desc(0, GPA + MiB - 16, 32, I)
    g.publish(0)


def _indirect_table_overflows(g):
    g.desc(0, (1 << 64) - 16, 32, I)
    g.publish(0)


def _indirect_head_out_of_range_with_table(g):
    g.desc(0, GPA + DATA, 44, W, 0, table=INDIRECT)
    g.desc(g.size - 1, GPA + INDIRECT, 16, I)
    g.publish(g.size)


@pytest.mark.parametrize("build", [_nested_indirect, _indirect_bad_len, _indirect_with_next,
                                   _indirect_loop, _indirect_table_too_long, _indirect_self_loop,
                                   _indirect_next_out_of_range, _indirect_one_entry_with_next,
                                   _indirect_second_outside_memory, _indirect_second_past_the_end,
                                   _indirect_first_overflows, _indirect_huge,
                                   _indirect_writable_before_readable, _indirect_second_nested,
                                   _indirect_table_outside_memory, _indirect_table_past_the_end,
                                   _indirect_table_overflows,
                                   _indirect_head_out_of_range_with_table])
def test_malformed_indirect(build):
    g = make(indirect=True)
    try:
        build(g)
        with pytest.raises(VirtqueueError):
            g.vq.pop()
    finally:
        g.close()


def test_chain_byte_cap(guest):
    guest.vq.max_chain_bytes = 1000
    guest.desc(0, GPA + DATA, 600, N, 1)
    guest.desc(1, GPA + DATA, 600, 0)
    guest.publish(0)
    with pytest.raises(VirtqueueError):
        guest.vq.pop()


@pytest.mark.parametrize("size,desc", [(0, DESC), (3, DESC), (65536, DESC), (8, DESC + 8)])
def test_bad_queue_geometry(guest, size, desc):
    with pytest.raises(VirtqueueError):
        Virtqueue(guest.mem, size, UVA + desc, UVA + AVAIL, UVA + USED)


def test_ring_outside_memory(guest):
    with pytest.raises(VirtqueueError):
        Virtqueue(guest.mem, 8, UVA + MiB - 16, UVA + AVAIL, UVA + USED)


@pytest.mark.parametrize("event_idx,indirect", [(False, False), (True, True)])
def test_random_rings_only_ever_raise_virtqueue_error(event_idx, indirect):
    """Garbage in the descriptor table and avail ring: chains or VirtqueueError, nothing else."""
    import random
    rng = random.Random(1234)
    g = make(size=8, event_idx=event_idx, indirect=indirect)
    try:
        for _ in range(300):
            for i in range(g.size):
                addr = rng.choice([GPA + rng.randrange(MiB), rng.getrandbits(64), GPA + INDIRECT])
                length = rng.choice([0, 16, 32, rng.randrange(4096), rng.getrandbits(32)])
                g.desc(i, addr, length, rng.getrandbits(3), rng.randrange(12))
            for i in range(4):
                g.desc(i, GPA + DATA, rng.randrange(64), rng.getrandbits(3), rng.randrange(10),
                       table=INDIRECT)
            g.vq.last_avail = g.vq._avail_seen = g.avail_idx = rng.getrandbits(16)
            g.publish(*(rng.randrange(10) for _ in range(rng.randrange(1, 4))))
            try:
                while (chain := g.vq.pop()) is not None:
                    assert chain.read_len + chain.write_len <= g.vq.max_chain_bytes
                    g.vq.push(chain.head, 0)
                    chain.release()
                g.vq.flush()
            except VirtqueueError:
                pass
    finally:
        g.close()


# -- the short-chain fast path agrees with the generic walk ------------------------------
def _shape(chain):
    return (chain.head, chain.read_len, chain.write_len,
            [bytes(v) for v in chain.readable], [bytes(v) for v in chain.writable])


@pytest.mark.parametrize("indirect", [False, True])
def test_fast_path_matches_generic_walk_on_random_short_chains(indirect):
    """Random 1-2 entry chains (direct and in 16/32-byte indirect tables, mostly plausible,
    sometimes garbage): pop() returns what the generic walk returns, or both raise."""
    import random
    rng = random.Random(99)
    g = make(size=8, indirect=indirect)
    g.write(DATA, bytes(range(256)) * 16)
    g.vq.max_chain_bytes = 8192
    try:
        for _ in range(2000):
            def entry():
                addr = rng.choice([GPA + DATA + rng.randrange(4096), GPA + MiB - rng.randrange(64),
                                   rng.getrandbits(64), 0x10, GPA + INDIRECT])
                length = rng.choice([0, 8, 44, 4096, rng.randrange(8192), rng.getrandbits(32)])
                flags = rng.choice([W, W | N, R, R | N, W | N, W, I, rng.getrandbits(3)])
                return addr, length, flags, rng.randrange(4)
            for i in range(2):
                g.desc(i, *entry())
                g.desc(i, *entry(), table=INDIRECT)
            if indirect and rng.random() < 0.5:
                g.desc(0, GPA + INDIRECT, rng.choice([16, 32, 48, 24]), I | rng.choice([0, 0, N]))
            head = rng.choice([0, 0, 0, 1])
            try:
                want = _shape(g.vq._walk_generic(head))
            except VirtqueueError:
                want = None
            try:
                got = _shape(g.vq._walk(head))
            except VirtqueueError:
                got = None
            assert got == want
    finally:
        g.close()


def test_short_chain_crossing_a_region_falls_back_to_split_views():
    fd = os.memfd_create("split2")
    os.ftruncate(fd, 2 * MiB)
    raw = mmap.mmap(fd, 2 * MiB)
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, UVA, 0), RegionSpec(MiB, MiB, UVA + MiB, MiB)],
            [os.dup(fd), os.dup(fd)])
    raw[0x8000:0x8000 + 44] = b"h" * 44
    raw[MiB - 2:MiB + 2] = b"abcd"
    raw[0:32] = (struct.pack("<QIHH", 0x8000, 44, W | N, 1)
                 + struct.pack("<QIHH", MiB - 2, 4, W, 0))
    raw[0x1002:0x1006] = struct.pack("<HH", 1, 0)
    vq = Virtqueue(mem, 8, UVA, UVA + 0x1000, UVA + 0x2000)
    chain = vq.pop()
    assert [bytes(v) for v in chain.writable] == [b"h" * 44, b"ab", b"cd"]
    assert chain.write_len == 48 and chain.readable == []
    chain.release()
    vq.release()
    mem.close()
    raw.close()
    os.close(fd)


def test_common_rx_shapes_take_the_fast_path(monkeypatch):
    """Linux rx buffers (44 + 4096 writable, direct or in a 2-entry indirect table) never
    reach the generic loop."""
    g = make(indirect=True)
    try:
        monkeypatch.setattr(g.vq, "_walk_generic", None)       # would fail if called
        g.desc(0, GPA + DATA, 44, W | N, 1, table=INDIRECT)
        g.desc(1, GPA + DATA + 0x100, 4096, W, 0, table=INDIRECT)
        g.desc(3, GPA + INDIRECT, 32, I)
        g.desc(4, GPA + DATA, 44, W | N, 5)
        g.desc(5, GPA + DATA + 0x100, 4096, W)
        g.desc(6, GPA + DATA, 4140, W)
        g.publish(3, 4, 6)
        for head in (3, 4, 6):
            chain = g.vq.pop()
            assert chain.head == head and chain.write_len == 4140 and not chain.readable
            chain.release()
    finally:
        g.close()


# -- the Linux rx batch fast path (pop_rx_linux) agrees with the generic walk ---------------
def _rx_fast(vq, n: int) -> list:
    """pop_rx_linux's chains as _shape()s."""
    return [(head, 0, len(hview) + len(pview), [], [bytes(hview), bytes(pview)])
            for head, hview, pview in vq.pop_rx_linux(n, 1 << 30, 44)]


def _tx_fast(vq, n: int) -> list:
    """pop_tx_linux's chains as _shape()s."""
    out = []
    for head, header, pview, plen in vq.pop_tx_linux(n, 44):
        assert plen == (len(pview) if pview is not None else 0)
        out.append((head, 44 + plen, 0, [header] + ([bytes(pview)] if pview is not None else []),
                    []))
    return out


def _pop_all(vq, fast: bool, n: int = 3, batch=_rx_fast):
    """Pop until empty or an error; each chain as _shape(). fast: batch() (a fast path) first,
    pop() only for what it leaves."""
    out = []
    try:
        while True:
            if fast:
                got = batch(vq, n)
                if got:
                    out += got
                    continue
            chain = vq.pop()
            if chain is None:
                return out, vq.last_avail, None
            out.append(_shape(chain))
            chain.release()
    except VirtqueueError:
        return out, vq.last_avail, "error"


@pytest.mark.parametrize("size", [8, 1])
def test_linux_rx_fast_path_matches_generic_walk_on_random_rings(size):
    """Rings of mostly Linux-shaped rx buffers (indirect 44 + payload), some mutated in every
    field the fast path reads: the fast path yields the same chains, in the same order, up to
    the same error (or end) as the generic walk, and leaves last_avail at the same place."""
    import random
    rng = random.Random(7)
    g = make(size=size, indirect=True)
    g.write(DATA, bytes(range(256)) * 64)
    try:
        for _ in range(1500):
            for i in range(g.size):
                table = INDIRECT + 32 * i
                hdr = [GPA + DATA + 64 * i, 44, W | N, 1]
                pay = [GPA + DATA + 0x1000 + 0x100 * i, rng.choice([4096, 100, 1]), W, 0]
                ring = [GPA + table, 32, I, 0]
                if rng.random() < 0.3:
                    victim = rng.choice([hdr, pay, ring])
                    field = rng.randrange(4)
                    victim[field] = rng.choice([0, 1, 16, 43, 48, 0xFFFF, rng.getrandbits(16),
                                                GPA + MiB - 8, rng.getrandbits(64),
                                                I | N, W, W | N | I])
                    if field == 2:
                        victim[field] &= 0xFFFF
                    elif field == 1:
                        victim[field] &= 0xFFFFFFFF
                    elif field == 3:
                        victim[field] &= 0xFFFF
                g.desc(0, *hdr, table=table)
                g.desc(1, *pay, table=table)
                g.desc(i, *ring)
            g.vq.last_avail = g.vq._avail_seen = g.avail_idx = rng.getrandbits(16)
            heads = [rng.randrange(g.size) if rng.random() > 0.05 else rng.randrange(0x10000)
                     for _ in range(rng.randrange(1, 2 * g.size))]
            g.publish(*heads[:g.size])
            start = g.vq.last_avail
            generic = Virtqueue(g.mem, g.size, UVA + DESC, UVA + AVAIL, UVA + USED,
                                indirect=True, next_avail=start)
            try:
                assert _pop_all(g.vq, fast=True, n=rng.randrange(1, 4)) == _pop_all(generic, fast=False)
            finally:
                generic.release()
    finally:
        g.close()


def test_linux_rx_fast_path_stops_at_room_and_max_n_and_needs_indirect():
    g = make(indirect=True)
    try:
        for i in range(4):
            g.desc(0, GPA + DATA + 64 * i, 44, W | N, 1, table=INDIRECT + 32 * i)
            g.desc(1, GPA + DATA + 0x1000 * (i + 1), 4096, W, 0, table=INDIRECT + 32 * i)
            g.desc(i, GPA + INDIRECT + 32 * i, 32, I)
        g.publish(0, 1, 2, 3)
        assert [h for h, _, _ in g.vq.pop_rx_linux(8, 4097, 44)] == [0, 1]    # room covered
        assert [h for h, _, _ in g.vq.pop_rx_linux(1, 1 << 20, 44)] == [2]    # max_n
        assert g.vq.pop_rx_linux(8, 1 << 20, 40) == []                       # other header size
        g.vq.indirect = False
        assert g.vq.pop_rx_linux(8, 1 << 20, 44) == []
        with pytest.raises(VirtqueueError):
            g.vq.pop()                          # ... and the generic walk refuses the chain
    finally:
        g.close()


def test_linux_rx_fast_path_across_two_regions():
    """Table, header and payload in different regions: still the fast path; a payload that
    crosses from one region into the next: the fast batch stops and the generic walk splits."""
    fd = os.memfd_create("split3")
    os.ftruncate(fd, 2 * MiB)
    raw = mmap.mmap(fd, 2 * MiB)
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, UVA, 0), RegionSpec(MiB, MiB, UVA + MiB, MiB)],
            [os.dup(fd), os.dup(fd)])
    try:
        raw[MiB + 0x100:MiB + 0x100 + 44] = b"H" * 44
        raw[0x9000:0x9000 + 8] = b"payload!"
        raw[MiB - 4:MiB + 4] = b"crossing"
        raw[0x8000:0x8020] = (struct.pack("<QIHH", MiB + 0x100, 44, W | N, 1)
                              + struct.pack("<QIHH", 0x9000, 8, W, 0))
        raw[0x8020:0x8040] = (struct.pack("<QIHH", MiB + 0x100, 44, W | N, 1)
                              + struct.pack("<QIHH", MiB - 4, 8, W, 0))
        raw[0:16] = struct.pack("<QIHH", 0x8000, 32, I, 0)
        raw[16:32] = struct.pack("<QIHH", 0x8020, 32, I, 0)
        raw[0x1000:0x1008] = struct.pack("<HHHH", 0, 2, 0, 1)
        vq = Virtqueue(mem, 8, UVA, UVA + 0x1000, UVA + 0x2000, indirect=True)
        mem.locate(MiB + 0x100, 44)            # the cache points at the other region
        (head, hview, pview), = vq.pop_rx_linux(8, 1 << 20, 44)
        assert (head, bytes(hview), bytes(pview)) == (0, b"H" * 44, b"payload!")
        assert vq.pop_rx_linux(8, 1 << 20, 44) == []
        chain = vq.pop()
        assert [bytes(v) for v in chain.writable] == [b"H" * 44, b"cros", b"sing"]
        chain.release()
        for v in (hview, pview):
            v.release()
        vq.release()
    finally:
        mem.close()
        raw.close()
        os.close(fd)


# -- the Linux tx batch fast path (pop_tx_linux) agrees with the generic walk ---------------
@pytest.mark.parametrize("size", [8, 1])
def test_linux_tx_fast_path_matches_generic_walk_on_random_rings(size):
    """Rings of mostly Linux-shaped tx chains (a 44-byte header then the payload, readable,
    in a 2-entry indirect table or chained in the ring; header-only packets as one
    descriptor), some mutated in every field the fast path reads: the fast path yields the
    same chains, in the same order, up to the same error (or end) as the generic walk, and
    leaves last_avail at the same place."""
    import random
    rng = random.Random(11)
    g = make(size=size, indirect=True)
    g.write(DATA, bytes(range(256)) * 64)
    g.vq.max_chain_bytes = 8192
    try:
        for _ in range(1500):
            chained = []
            for i in range(g.size):
                table = INDIRECT + 32 * i
                shape = rng.choice(["indirect", "indirect", "chained", "header"])
                hdr = [GPA + DATA + 64 * i, 44, N, 1]
                pay = [GPA + DATA + 0x1000 + 0x100 * i, rng.choice([4096, 100, 1, 8148]), R, 0]
                ring = [GPA + table, 32, I, 0]
                if shape == "header":
                    ring = [GPA + DATA + 64 * i, 44, R, 0]
                victim = None
                if rng.random() < 0.3:
                    victim = rng.choice([hdr, pay, ring])
                    field = rng.randrange(4)
                    victim[field] = rng.choice([0, 1, 16, 43, 44, 48, 0xFFFF, rng.getrandbits(16),
                                                GPA + MiB - 8, rng.getrandbits(64), 8149,
                                                I | N, W, N, R, I])
                    victim[field] &= (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF, 0xFFFF, 0xFFFF)[field]
                if shape == "chained":
                    chained.append((i, hdr, pay))
                else:
                    g.desc(0, *hdr, table=table)
                    g.desc(1, *pay, table=table)
                    g.desc(i, *ring)
            for i, hdr, pay in chained:              # ring entry i -> entry i+1 (or garbage)
                nxt = (i + 1) % g.size if hdr[3] == 1 else hdr[3]
                g.desc(i, hdr[0], hdr[1], hdr[2], nxt)
                if nxt != i and rng.random() < 0.5:
                    g.desc(nxt, *pay)
            g.vq.last_avail = g.vq._avail_seen = g.avail_idx = rng.getrandbits(16)
            heads = [rng.randrange(g.size) if rng.random() > 0.05 else rng.randrange(0x10000)
                     for _ in range(rng.randrange(1, 2 * g.size))]
            g.publish(*heads[:g.size])
            start = g.vq.last_avail
            generic = Virtqueue(g.mem, g.size, UVA + DESC, UVA + AVAIL, UVA + USED,
                                indirect=True, next_avail=start, max_chain_bytes=8192)
            try:
                assert _pop_all(g.vq, fast=True, n=rng.randrange(1, 4), batch=_tx_fast) == \
                    _pop_all(generic, fast=False)
            finally:
                generic.release()
    finally:
        g.close()


def test_linux_tx_fast_path_takes_the_three_linux_shapes_and_stops_at_others():
    g = make(indirect=True)
    try:
        g.write(DATA, b"H" * 44 + b"payload")
        g.desc(0, GPA + DATA, 44, N, 1, table=INDIRECT)
        g.desc(1, GPA + DATA + 44, 7, R, 0, table=INDIRECT)
        g.desc(0, GPA + INDIRECT, 32, I)                     # indirect header + payload
        g.desc(1, GPA + DATA, 44, N, 2)                      # chained header + payload
        g.desc(2, GPA + DATA + 44, 7, R)
        g.desc(3, GPA + DATA, 44, R)                         # header only (control)
        g.desc(4, GPA + DATA, 51, R)                         # header and payload in one: generic
        g.publish(0, 1, 3, 4)
        got = g.vq.pop_tx_linux(8, 44)
        assert [(h, hdr, bytes(p) if p is not None else None, n) for h, hdr, p, n in got] == [
            (0, b"H" * 44, b"payload", 7), (1, b"H" * 44, b"payload", 7), (3, b"H" * 44, None, 0)]
        assert g.vq.pop_tx_linux(8, 44) == []
        chain = g.vq.pop()
        assert chain.head == 4 and chain.read_len == 51
        chain.release()
        for _, _, p, _ in got:
            if p is not None:
                p.release()
    finally:
        g.close()


# -- fill_rx: the vsock rx fill, pure Python and the C accelerator ----------------------------
def _linux_rx(g: Guest, slots, payload: int = 4096) -> None:
    """Linux-shaped rx buffers: ring descriptor -> 32-byte table (44-byte header, payload)."""
    for i in slots:
        table = INDIRECT + 32 * i
        g.desc(0, GPA + DATA + 64 * i, 44, W | N, 1, table=table)
        g.desc(1, GPA + DATA + 0x1000 * (i + 1), payload, W, 0, table=table)
        g.desc(i, GPA + table, 32, I)
    g.publish(*slots)


HDR_LAST = bytes(range(1, 45))
HDR_MID = bytes(range(101, 145))


def _hdr(template: bytes, n: int) -> bytes:
    return template[:24] + struct.pack("<I", n) + template[28:]


def test_fill_rx_copies_writes_headers_and_keeps_unfilled_chains(rx_accel):
    g = make(indirect=True)
    try:
        _linux_rx(g, range(4))
        g.vq.push(7, 3)                               # queued before: published first
        data = bytes(range(256)) * 20                 # 5120 bytes: 1 full buffer + 1024
        src = [memoryview(data)[:1000], memoryview(data)[1000:]]
        res = g.vq.fill_rx(8, len(data), HDR_LAST, HDR_MID, -1, src, rx_accel)
        assert res == (2, 5120, 0, 5120)              # offered: trimmed to want
        assert g.vq.last_avail == 2                   # chains 2 and 3 stay available
        assert g.vq.flush()
        assert g.used() == (3, [(7, 3), (0, 44 + 4096), (1, 44 + 1024)])
        assert bytes(g.raw[DATA:DATA + 44]) == _hdr(HDR_MID, 4096)
        assert bytes(g.raw[DATA + 64:DATA + 108]) == _hdr(HDR_LAST, 1024)
        assert bytes(g.raw[DATA + 0x1000:DATA + 0x2000]) + bytes(
            g.raw[DATA + 0x2000:DATA + 0x2400]) == data
        # less data than wanted: every header is a mid one (the packet goes on)
        res = g.vq.fill_rx(8, 9000, HDR_LAST, HDR_MID, -1, [memoryview(b"x" * 10)], rx_accel)
        assert res == (1, 10, 0, 8192) and g.vq.last_avail == 3
        assert bytes(g.raw[DATA + 128:DATA + 172]) == _hdr(HDR_MID, 10)
        assert g.vq.fill_rx(8, 0, HDR_LAST, HDR_MID, -1, [], rx_accel) == (0, 0, 0, 0)
    finally:
        g.close()


def test_fill_rx_sees_buffers_posted_since_the_last_look(rx_accel):
    """A guest refills its rx ring while the backend fills it: buffers made available after
    the avail idx was last read are taken by the next fill, not left for a later one (a
    stale count used to end fills early and split relayed packets)."""
    g = make(indirect=True)
    try:
        _linux_rx(g, range(2))
        data = bytes(range(256)) * 64                 # 16 KiB: four 4 KiB buffers
        assert g.vq.fill_rx(8, 4096, HDR_LAST, HDR_MID, -1, [memoryview(data)],
                            rx_accel)[:2] == (1, 4096)
        _linux_rx(g, range(2, 5))                     # posted after that look
        res = g.vq.fill_rx(8, 4 * 4096, HDR_LAST, HDR_MID, -1, [memoryview(data)], rx_accel)
        assert res == (4, 4 * 4096, 0, 4 * 4096) and g.vq.last_avail == 5
    finally:
        g.close()


def test_fill_rx_from_a_socket_eagain_and_eof(rx_accel):
    import socket
    g = make(indirect=True)
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        _linux_rx(g, range(4))
        b.sendall(b"y" * 5000)
        assert g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, a.fileno(), None,
                            rx_accel) == (2, 5000, 0, 4 * 4096)
        assert g.vq.last_avail == 2
        import errno
        k, got, err, asked = g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, a.fileno(), None,
                                          rx_accel)
        assert (k, got, err in (errno.EAGAIN, errno.EWOULDBLOCK)) == (0, 0, True) and asked
        assert g.vq.last_avail == 2                   # nothing consumed
        b.close()
        assert g.vq.fill_rx(8, 100, HDR_LAST, HDR_LAST, a.fileno(), None,
                            rx_accel) == (0, 0, 0, 100)   # EOF
        g.vq.flush()
        assert g.used() == (2, [(0, 44 + 4096), (1, 44 + 904)])
        assert bytes(g.raw[DATA + 0x2000:DATA + 0x2000 + 904]) == b"y" * 904
    finally:
        a.close()
        b.close()
        g.close()


def test_fill_rx_stops_at_another_shape_and_needs_indirect(rx_accel):
    g = make(indirect=True)
    try:
        _linux_rx(g, range(3))
        g.desc(1, GPA + DATA + 0x5000, 44, W | N, 5)  # chain 1: two direct descriptors
        g.desc(5, GPA + DATA + 0x6000, 4096, W)
        res = g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, -1, [memoryview(b"z" * 9000)],
                           rx_accel)
        assert res == (1, 4096, 0, 4096) and g.vq.last_avail == 1
        assert g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, -1, [memoryview(b"z")],
                            rx_accel) == (0, 0, 0, 0)
        chain = g.vq.pop()                            # the generic walk takes it
        assert chain.head == 1 and chain.write_len == 4140 and len(chain.writable) == 2
        chain.release()
        g.vq.indirect = False
        assert g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, -1, [memoryview(b"z")],
                            rx_accel) == (0, 0, 0, 0)
        g.vq.indirect = True
        assert g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, -1, [memoryview(b"z")],
                            rx_accel) == (1, 1, 0, 4096)  # chain 2: the ring is empty now
        g.set_avail_idx(g.vq.last_avail + 9)          # past the queue size
        with pytest.raises(VirtqueueError):
            g.vq.fill_rx(8, 1, HDR_LAST, HDR_LAST, -1, [memoryview(b"z")], rx_accel)
    finally:
        g.close()


def test_fill_rx_refuses_chains_outside_memory(rx_accel):
    """Table, header or payload not wholly inside guest memory, or a payload longer than the
    chain cap: the batch ends before that chain, nothing is written for it."""
    for victim, field, value in (("ring", 0, GPA + MiB - 16), ("hdr", 0, GPA + MiB - 40),
                                 ("pay", 0, GPA + MiB - 100), ("pay", 1, 64 << 20),
                                 ("pay", 0, (1 << 64) - 8), ("hdr", 1, 43), ("pay", 2, W | N)):
        g = make(indirect=True)
        try:
            _linux_rx(g, range(2))
            entry = {"ring": [GPA + INDIRECT + 32, 32, I, 0],
                     "hdr": [GPA + DATA + 64, 44, W | N, 1],
                     "pay": [GPA + DATA + 0x2000, 4096, W, 0]}
            entry[victim][field] = value
            g.desc(1, *entry["ring"])
            g.desc(0, *entry["hdr"], table=INDIRECT + 32)
            g.desc(1, *entry["pay"], table=INDIRECT + 32)
            before = bytes(g.raw)
            res = g.vq.fill_rx(8, 1 << 20, HDR_LAST, HDR_LAST, -1,
                               [memoryview(b"q" * 8192)], rx_accel)
            assert res == (1, 4096, 0, 4096), (victim, field, value)
            after = bytes(g.raw)
            assert after[DATA + 64:DATA + 108] == before[DATA + 64:DATA + 108]
            assert after[DATA + 0x2000:] == before[DATA + 0x2000:]
        finally:
            g.close()


@pytest.mark.parametrize("indirect", [True, False])
def test_fill_rx_takes_one_descriptor_buffers(rx_accel, indirect):
    """Linux >= 6.2 posts one device-writable descriptor (header + payload): filled the same
    way, also without INDIRECT_DESC; flags other than exactly WRITE, or no room for payload,
    end the batch (the generic walk handles them)."""
    g = make(indirect=indirect)
    try:
        for i in range(4):
            g.desc(i, GPA + DATA + 0x2000 * i, 44 + 4096, W)
        g.desc(2, GPA + DATA + 0x4000, 44, W)                  # header only
        g.desc(3, GPA + DATA + 0x6000, 44 + 4096, W | 0x80)    # an unknown flag bit
        g.publish(0, 1, 2, 3)
        data = bytes(range(256)) * 20
        res = g.vq.fill_rx(8, len(data), HDR_LAST, HDR_MID, -1, [memoryview(data)], rx_accel)
        assert res == (2, len(data), 0, len(data)) and g.vq.last_avail == 2
        g.vq.flush()
        assert g.used() == (2, [(0, 44 + 4096), (1, 44 + 1024)])
        assert bytes(g.raw[DATA:DATA + 44]) == _hdr(HDR_MID, 4096)
        assert bytes(g.raw[DATA + 0x2000:DATA + 0x2000 + 44]) == _hdr(HDR_LAST, 1024)
        assert bytes(g.raw[DATA + 44:DATA + 44 + 4096]) + bytes(
            g.raw[DATA + 0x2000 + 44:DATA + 0x2000 + 44 + 1024]) == data
        assert g.vq.fill_rx(8, 10, HDR_LAST, HDR_MID, -1, [memoryview(data)],
                            rx_accel) == (0, 0, 0, 0)
        chain = g.vq.pop()
        assert chain.head == 2 and chain.write_len == 44
        chain.release()
        assert g.vq.fill_rx(8, 10, HDR_LAST, HDR_MID, -1, [memoryview(data)],
                            rx_accel) == (0, 0, 0, 0)
    finally:
        g.close()
