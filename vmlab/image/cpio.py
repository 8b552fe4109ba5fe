"""A tiny, reproducible writer (and reader) for the cpio "newc" format.

The kernel unpacks initramfs archives in this format. We write it ourselves so
the output depends only on the entries: sorted names, mtime 0, uid/gid 0 and
sequential inode numbers, which makes two builds byte-for-byte identical.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Iterable, Iterator

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclass(frozen=True)
class Entry:
    """One archive member. ``name`` is relative ("bin/sh"), without a leading slash."""

    name: str
    mode: int  # full st_mode: file type bits | permission bits
    data: bytes = b""  # file contents, or the link target for symlinks
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def dir(name: str, perm: int = 0o755) -> "Entry":
        return Entry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> "Entry":
        return Entry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> "Entry":
        return Entry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> "Entry":
        return Entry(name, stat.S_IFCHR | perm, b"", major, minor)


def _norm(name: str) -> str:
    name = name.strip("/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path: {name!r}")
    return "/".join(parts)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, namesize: int,
            rmaj: int = 0, rmin: int = 0) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def with_parents(entries: Iterable[Entry], perm: int = 0o755,
                 existing: Iterable[str] = ()) -> list[Entry]:
    """Add directory entries for every parent that is not listed explicitly.

    Parents named in ``existing`` are left out: an appended archive must not re-create
    (and so chmod) directories the base archive already has, such as /tmp (1777).
    """
    skip = {_norm(x) for x in existing}
    by_name = {}
    for e in entries:
        by_name[_norm(e.name)] = Entry(_norm(e.name), e.mode, e.data, e.rdev_major, e.rdev_minor)
    for name in list(by_name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in skip:
                by_name.setdefault(parent, Entry.dir(parent, perm))
    return list(by_name.values())


def write_cpio(entries: Iterable[Entry]) -> bytes:
    """Serialize entries as a newc archive, sorted by name so parents come first."""
    out = bytearray()
    seen: set[str] = set()
    for ino, e in enumerate(sorted(entries, key=lambda e: _norm(e.name).split("/")), start=1):
        name = _norm(e.name)
        if name in seen:
            raise ValueError(f"duplicate archive path: {name}")
        seen.add(name)
        bname = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        out += _header(ino, e.mode, nlink, len(e.data), len(bname), e.rdev_major, e.rdev_minor)
        out += bname + _pad4(_HEADER_LEN + len(bname))
        out += e.data + _pad4(len(e.data))
    bname = TRAILER.encode() + b"\0"
    out += _header(0, 0, 1, 0, len(bname)) + bname + _pad4(_HEADER_LEN + len(bname))
    return bytes(out)


@dataclass(frozen=True)
class ParsedEntry:
    name: str
    mode: int
    data: bytes
    ino: int
    uid: int
    gid: int
    mtime: int
    rdev_major: int
    rdev_minor: int


def read_cpio(blob: bytes) -> Iterator[ParsedEntry]:
    """Parse one newc archive (stops at the trailer). Used by tests and diagnostics."""
    pos = 0
    while True:
        hdr = blob[pos:pos + _HEADER_LEN]
        if len(hdr) < _HEADER_LEN or hdr[:6] != MAGIC:
            raise ValueError(f"bad cpio header at offset {pos}")
        f = [int(hdr[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, _nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, _chk = f
        pos += _HEADER_LEN
        name = blob[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = blob[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == TRAILER:
            return
        yield ParsedEntry(name, mode, data, ino, uid, gid, mtime, rmaj, rmin)
