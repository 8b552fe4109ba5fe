"""GuestMemory: SET_MEM_TABLE regions over real memfds, translation and bounds checks."""
from __future__ import annotations

import mmap
import os

import pytest

from vmlab.vsock.memory import GuestMemory, GuestMemoryError, RegionSpec

MiB = 1 << 20


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("test-guest")
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def two_regions():
    """Guest RAM [0x0, 1M) and [1M, 3M) from one memfd, like QEMU splitting low memory."""
    fd = memfd(3 * MiB)
    mem = GuestMemory()
    specs = [RegionSpec(0x0, MiB, 0x7F0000000000, 0),
             RegionSpec(MiB, 2 * MiB, 0x7F0000100000, MiB)]
    mem.map(specs, [os.dup(fd), os.dup(fd)])
    raw = mmap.mmap(fd, 3 * MiB)
    yield mem, raw
    mem.close()
    raw.close()
    os.close(fd)


def test_gpa_and_uva_translate_to_the_same_bytes(two_regions):
    mem, raw = two_regions
    raw[MiB + 0x10:MiB + 0x15] = b"hello"
    assert bytes(mem.gpa(MiB + 0x10, 5)) == b"hello"
    assert bytes(mem.uva(0x7F0000100000 + 0x10, 5)) == b"hello"
    mem.gpa(0x20, 3)[:] = b"abc"
    assert raw[0x20:0x23] == b"abc"


def test_mmap_offset_is_honoured(two_regions):
    mem, raw = two_regions
    raw[MiB:MiB + 4] = b"\x01\x02\x03\x04"        # file offset 1M is gpa 1M (mmap_offset 1M)
    assert bytes(mem.gpa(MiB, 4)) == b"\x01\x02\x03\x04"


def test_range_crossing_a_region_end_is_refused_for_contiguous_views(two_regions):
    mem, _ = two_regions
    with pytest.raises(GuestMemoryError):
        mem.gpa(MiB - 4, 8)


def test_split_across_adjacent_regions(two_regions):
    mem, raw = two_regions
    raw[MiB - 4:MiB + 4] = b"ABCDEFGH"
    views = mem.gpa_split(MiB - 4, 8)
    assert [bytes(v) for v in views] == [b"ABCD", b"EFGH"]


@pytest.mark.parametrize("addr,length", [
    (3 * MiB, 1),                    # just past the end
    (3 * MiB - 4, 8),                # runs off the end
    ((1 << 64) - 8, 16),             # wraps around u64
    (-1, 4),                         # nonsense
    (0, -1),
    (0, 1 << 40),                    # longer than max_len
])
def test_out_of_range(two_regions, addr, length):
    mem, _ = two_regions
    with pytest.raises(GuestMemoryError):
        mem.gpa_split(addr, length)
    with pytest.raises(GuestMemoryError):
        mem.gpa(addr, length)


def test_gap_between_regions_is_not_memory():
    fd = memfd(2 * MiB)
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, 0x1000000, 0), RegionSpec(2 * MiB, MiB, 0x3000000, MiB)],
            [os.dup(fd), os.dup(fd)])
    os.close(fd)
    with pytest.raises(GuestMemoryError):
        mem.gpa_split(MiB - 4, 8)
    with pytest.raises(GuestMemoryError):
        mem.uva(0x2000000, 4)
    assert len(mem.gpa(2 * MiB, 16)) == 16
    mem.close()


def test_map_takes_ownership_of_fds():
    fd = memfd(MiB)
    mine = os.dup(fd)
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, 0x10000, 0)], [mine])
    with pytest.raises(OSError):
        os.fstat(mine)
    mem.close()
    os.close(fd)


def test_bad_tables_are_refused_and_fds_closed():
    fd = memfd(MiB)
    cases = [
        ([RegionSpec(0, MiB, 0x10000, 0), RegionSpec(MiB // 2, MiB, 0x9000000, 0)], 2),  # overlap
        ([RegionSpec(0, 0, 0x10000, 0)], 1),                                             # empty
        ([RegionSpec((1 << 64) - 4096, MiB, 0x10000, 0)], 1),                            # wraps
        ([RegionSpec(0, MiB, 0x10000, 0)], 2),                                           # fd count
    ]
    for specs, nfds in cases:
        fds = [os.dup(fd) for _ in range(nfds)]
        mem = GuestMemory()
        with pytest.raises(GuestMemoryError):
            mem.map(specs, fds)
        for f in fds:
            with pytest.raises(OSError):
                os.fstat(f)
        assert not mem.mapped
    os.close(fd)


def test_new_table_unmaps_the_old_one():
    fd = memfd(MiB, b"old")
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, 0x10000, 0)], [os.dup(fd)])
    old = mem.regions[0]
    fd2 = memfd(MiB, b"new")
    mem.map([RegionSpec(0, MiB, 0x10000, 0)], [os.dup(fd2)])
    assert old.mm.closed
    assert bytes(mem.gpa(0, 3)) == b"new"
    mem.close()
    assert not mem.mapped
    with pytest.raises(GuestMemoryError):
        mem.gpa(0, 3)
    os.close(fd)
    os.close(fd2)


def test_close_with_an_outstanding_view_unmaps_lazily():
    fd = memfd(MiB, b"keep")
    mem = GuestMemory()
    mem.map([RegionSpec(0, MiB, 0x10000, 0)], [os.dup(fd)])
    view = mem.gpa(0, 4)
    mem.close()                      # must not raise although a view is alive
    assert bytes(view) == b"keep"   # and the view still points at the memfd
    view.release()
    os.close(fd)


# -- gpa_one: the descriptor fast path's translation (None instead of raising) -------------
@pytest.mark.parametrize("addr,length", [
    (0x10, 0), (0x10, -1), (-16, 8), (3 * MiB, 1), (3 * MiB - 4, 8), (MiB - 4, 8),
    ((1 << 64) - 8, 16), (0x0, (64 << 20) + 1), (0x0, 0xFFFFFFFF), (1 << 70, 8)])
def test_gpa_one_refuses_what_gpa_split_would_not_give_as_one_view(two_regions, addr, length):
    mem, _ = two_regions
    assert mem.gpa_one(addr, length) is None


def test_gpa_one_translates_in_both_regions_and_switches_cache(two_regions):
    mem, raw = two_regions
    raw[0x100:0x104] = b"low!"
    raw[2 * MiB:2 * MiB + 4] = b"high"
    for _ in range(2):
        assert bytes(mem.gpa_one(0x100, 4)) == b"low!"
        assert bytes(mem.gpa_one(2 * MiB, 4)) == b"high"
    assert bytes(mem.gpa_one(MiB - 4, 4)) == bytes(mem.gpa(MiB - 4, 4))
    assert len(mem.gpa_one(MiB, 2 * MiB)) == 2 * MiB       # a whole region
    mem.close()
    assert mem.gpa_one(0x100, 4) is None                   # cache dropped with the table
