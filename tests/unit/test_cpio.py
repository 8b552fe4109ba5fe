"""The newc writer: parse back what we write, and byte-for-byte reproducibility."""
import stat

import pytest

from vmlab.image.cpio import Entry, read_cpio, with_parents, write_cpio


def sample() -> list[Entry]:
    return [
        Entry.file("bin/busybox", b"\x7fELF" + bytes(range(256)), 0o755),
        Entry.symlink("bin/sh", "/bin/busybox"),
        Entry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
        Entry.chardev("dev/console", 5, 1),
        Entry.file("etc/empty", b""),
        Entry.dir("tmp", 0o1777),
    ]


def test_roundtrip_keeps_names_modes_and_data():
    parsed = {e.name: e for e in read_cpio(write_cpio(with_parents(sample())))}
    assert parsed["bin/busybox"].data == b"\x7fELF" + bytes(range(256))
    assert parsed["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert parsed["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert parsed["bin/sh"].data == b"/bin/busybox"
    assert parsed["dev/console"].mode == stat.S_IFCHR | 0o600
    assert (parsed["dev/console"].rdev_major, parsed["dev/console"].rdev_minor) == (5, 1)
    assert parsed["etc/empty"].data == b""
    assert parsed["tmp"].mode == stat.S_IFDIR | 0o1777
    # parents were added for bin/, dev/, etc/
    for d in ("bin", "dev", "etc"):
        assert stat.S_ISDIR(parsed[d].mode)


def test_metadata_is_normalized():
    for e in read_cpio(write_cpio(with_parents(sample()))):
        assert (e.uid, e.gid, e.mtime) == (0, 0, 0)


def test_order_is_sorted_with_parents_first_and_inodes_unique():
    entries = list(read_cpio(write_cpio(with_parents(sample()))))
    names = [e.name for e in entries]
    assert names.index("bin") < names.index("bin/busybox") < names.index("bin/sh")
    assert names.index("dev") < names.index("dev/console")
    assert len({e.ino for e in entries}) == len(entries)


def test_reproducible_regardless_of_input_order():
    a = write_cpio(with_parents(sample()))
    b = write_cpio(with_parents(list(reversed(sample()))))
    assert a == b


def test_alignment_and_trailer():
    blob = write_cpio([Entry.file("a", b"x")])
    assert len(blob) % 4 == 0
    assert b"TRAILER!!!\0" in blob
    assert blob.startswith(b"070701")


def test_rejects_duplicates_and_escaping_paths():
    with pytest.raises(ValueError):
        write_cpio([Entry.file("a", b"1"), Entry.file("/a", b"2")])
    with pytest.raises(ValueError):
        write_cpio([Entry.file("../etc/passwd", b"")])


def test_leading_slash_and_dot_segments_are_normalized():
    names = [e.name for e in read_cpio(write_cpio(with_parents([Entry.file("/root/./x", b"1")])))]
    assert names == ["root", "root/x"]


def test_existing_parents_are_not_recreated():
    names = [e.name for e in read_cpio(write_cpio(with_parents(
        [Entry.file("tmp/x/y", b"1")], existing=["/tmp"])))]
    assert names == ["tmp/x", "tmp/x/y"]
