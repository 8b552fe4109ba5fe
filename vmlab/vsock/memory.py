"""Guest memory shared by a vhost-user frontend (SET_MEM_TABLE), with strict bounds checks.

QEMU hands over one memfd per RAM region; every address the guest gives us (descriptor
addresses are guest-physical, vring addresses are QEMU user addresses) is untrusted and is
only ever turned into a memoryview through `GuestMemory`, which refuses anything that does not
lie wholly inside mapped regions.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field

log = logging.getLogger("vmlab.vsock.memory")

U64_MAX = (1 << 64) - 1
MAX_REGIONS = 8                         # VHOST_MEMORY_BASELINE_NREGIONS
DEFAULT_MAX_LEN = 64 << 20              # longest single range we ever translate


class GuestMemoryError(Exception):
    """An address range the guest (or frontend) gave us is not inside guest memory."""


@dataclass(frozen=True)
class RegionSpec:
    """One vhost-user memory region as described by SET_MEM_TABLE."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass
class MappedRegion:
    """A region mapped into this process; `view` covers exactly `memory_size` bytes."""

    spec: RegionSpec
    mm: mmap.mmap
    view: memoryview
    gpa_end: int = field(init=False)
    uva_end: int = field(init=False)
    gpa_start: int = field(init=False)      # copies of spec fields for the hot path
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.gpa_end = self.spec.guest_phys_addr + self.spec.memory_size
        self.uva_end = self.spec.userspace_addr + self.spec.memory_size
        self.gpa_start = self.spec.guest_phys_addr
        self.size = self.spec.memory_size


def _check_spec(spec: RegionSpec) -> None:
    for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
        value = getattr(spec, name)
        if not 0 <= value <= U64_MAX:
            raise GuestMemoryError(f"region {name} out of range: {value:#x}")
    if spec.memory_size == 0:
        raise GuestMemoryError("empty memory region")
    for start, what in ((spec.guest_phys_addr, "gpa"), (spec.userspace_addr, "uva"),
                        (spec.mmap_offset, "mmap offset")):
        if start + spec.memory_size > U64_MAX + 1:
            raise GuestMemoryError(f"region {what} end overflows u64")


class GuestMemory:
    """The current memory table of one frontend.

    `map()` replaces the table (unmapping the old one), `close()` unmaps everything. The
    translate functions return views into the mapping; callers must `release()` views they
    keep for long, otherwise an old mapping stays alive until they are garbage collected.
    """

    def __init__(self, max_len: int = DEFAULT_MAX_LEN) -> None:
        self.max_len = max_len
        self.regions: list[MappedRegion] = []
        self._last: MappedRegion | None = None
        self._last_gpa: MappedRegion | None = None     # gpa_one()'s cache
        self.accel_regions: tuple[tuple[int, memoryview], ...] = ()   # (gpa, view) for C

    # -- table management -------------------------------------------------------------
    def map(self, specs: list[RegionSpec], fds: list[int]) -> None:
        """Map a new table; takes ownership of `fds` (all closed before returning)."""
        try:
            if len(specs) != len(fds):
                raise GuestMemoryError(f"{len(specs)} regions but {len(fds)} fds")
            if len(specs) > MAX_REGIONS:
                raise GuestMemoryError(f"too many regions: {len(specs)}")
            for spec in specs:
                _check_spec(spec)
            self._check_overlap(specs)
            new: list[MappedRegion] = []
            try:
                for spec, fd in zip(specs, fds):
                    new.append(_map_region(spec, fd))
            except BaseException:
                for region in new:
                    _unmap(region)
                raise
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.close()
        self.regions = new
        self.accel_regions = tuple((r.gpa_start, r.view) for r in new)
        log.debug("mapped %d regions: %s", len(new),
                  ", ".join(f"gpa {r.spec.guest_phys_addr:#x}+{r.spec.memory_size:#x}"
                            for r in new))

    @staticmethod
    def _check_overlap(specs: list[RegionSpec]) -> None:
        """Guest-physical ranges must not overlap (user addresses may: aliases of one RAM)."""
        ordered = sorted(specs, key=lambda s: s.guest_phys_addr)
        for a, b in zip(ordered, ordered[1:]):
            if a.guest_phys_addr + a.memory_size > b.guest_phys_addr:
                raise GuestMemoryError("overlapping guest-physical regions")

    def close(self) -> None:
        """Unmap all regions (views handed out earlier keep their mapping alive)."""
        old, self.regions, self._last, self._last_gpa = self.regions, [], None, None
        self.accel_regions = ()
        for region in old:
            _unmap(region)

    @property
    def mapped(self) -> bool:
        return bool(self.regions)

    # -- translation ------------------------------------------------------------------
    def _find(self, addr: int, uva: bool) -> MappedRegion:
        last = self._last
        if last is not None:
            start = last.spec.userspace_addr if uva else last.spec.guest_phys_addr
            if start <= addr < (last.uva_end if uva else last.gpa_end):
                return last
        for region in self.regions:
            start = region.spec.userspace_addr if uva else region.spec.guest_phys_addr
            if start <= addr < (region.uva_end if uva else region.gpa_end):
                self._last = region
                return region
        raise GuestMemoryError(f"{'uva' if uva else 'gpa'} {addr:#x} not in guest memory")

    def _check(self, addr: int, length: int) -> None:
        if length < 0 or length > self.max_len:
            raise GuestMemoryError(f"bad length {length:#x} at {addr:#x}")
        if addr < 0 or addr + length > U64_MAX + 1:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} overflows")

    def _view(self, addr: int, length: int, uva: bool) -> memoryview:
        self._check(addr, length)
        region = self._find(addr, uva)
        off = addr - (region.spec.userspace_addr if uva else region.spec.guest_phys_addr)
        if off + length > region.spec.memory_size:
            raise GuestMemoryError(
                f"{'uva' if uva else 'gpa'} range {addr:#x}+{length:#x} crosses a region end")
        return region.view[off:off + length]

    def gpa(self, addr: int, length: int) -> memoryview:
        """One contiguous view of guest-physical [addr, addr+length) inside one region."""
        return self._view(addr, length, False)

    def uva(self, addr: int, length: int) -> memoryview:
        """One contiguous view of frontend user address range (vring addresses)."""
        return self._view(addr, length, True)

    def gpa_one(self, addr: int, length: int) -> memoryview | None:
        """Hot path: a view of guest-physical [addr, addr+length) if 0 < length <= max_len and
        the range lies wholly inside one region; None otherwise (the caller then takes the
        generic, raising path). Never raises for any addr/length."""
        if length <= 0 or length > self.max_len:
            return None
        region = self._last_gpa
        if region is not None:
            off = addr - region.gpa_start
            if 0 <= off and off + length <= region.size:
                return region.view[off:off + length]
        for region in self.regions:
            off = addr - region.gpa_start
            if 0 <= off and off + length <= region.size:
                self._last_gpa = region
                return region.view[off:off + length]
        return None

    def locate(self, addr: int, length: int) -> tuple[memoryview, int] | None:
        """Hot path: (region view, offset) for guest-physical [addr, addr+length) if
        0 < length <= max_len and the range lies wholly inside one region; None otherwise.
        Never raises. The region view is ours: slice it, never release it."""
        if length <= 0 or length > self.max_len:
            return None
        region = self._last_gpa
        if region is not None:
            off = addr - region.gpa_start
            if 0 <= off and off + length <= region.size:
                return region.view, off
        for region in self.regions:
            off = addr - region.gpa_start
            if 0 <= off and off + length <= region.size:
                self._last_gpa = region
                return region.view, off
        return None

    def gpa_split(self, addr: int, length: int) -> list[memoryview]:
        """Views covering [addr, addr+length), split where it crosses adjacent regions."""
        self._check(addr, length)
        if length == 0:
            return []
        region = self._find(addr, False)
        off = addr - region.spec.guest_phys_addr
        if off + length <= region.spec.memory_size:          # the common case
            return [region.view[off:off + length]]
        views: list[memoryview] = []
        while length:
            region = self._find(addr, False)
            off = addr - region.spec.guest_phys_addr
            chunk = min(length, region.spec.memory_size - off)
            views.append(region.view[off:off + chunk])
            addr += chunk
            length -= chunk
        return views


def _map_region(spec: RegionSpec, fd: int) -> MappedRegion:
    page = mmap.ALLOCATIONGRANULARITY
    base = spec.mmap_offset - spec.mmap_offset % page
    skew = spec.mmap_offset - base
    try:
        mm = mmap.mmap(fd, spec.memory_size + skew, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(f"cannot map region gpa {spec.guest_phys_addr:#x}: {exc}") from exc
    whole = memoryview(mm)
    view = whole[skew:skew + spec.memory_size]
    whole.release()
    return MappedRegion(spec, mm, view)


def _unmap(region: MappedRegion) -> None:
    region.view.release()
    try:
        region.mm.close()
    except BufferError:
        # Somebody still holds a view (e.g. an rx buffer in flight); the mapping goes away
        # when the last view is garbage collected. Writes through it still hit the memfd.
        log.debug("region gpa %#x still referenced; unmapped lazily", region.spec.guest_phys_addr)
