"""Image cache faults: a corrupt cache entry is rebuilt (never booted), user files that are not
plain files or that vanish give a clear ImageError instead of a hang or a traceback."""
from __future__ import annotations

import json
import os
import threading

import pytest

from vmlab.image import ImageError, ensure_image

from test_image_build import split_archives, tree  # noqa: F401  (tree is a fixture)


DAMAGES = ["truncate", "flip", "garbage-manifest", "no-manifest", "legacy-truncated"]


def test_a_corrupt_cache_entry_is_rebuilt_and_never_used(tree):  # noqa: F811
    good = ensure_image(tree)
    data = good.initrd.read_bytes()
    manifest = good.initrd.with_name("manifest.json")
    for damage in DAMAGES:          # one tree for all (each fresh cache compiles the helper)
        if damage == "truncate":
            good.initrd.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            good.initrd.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
        elif damage == "garbage-manifest":
            manifest.write_text("{not json")
        elif damage == "no-manifest":
            manifest.unlink()
        else:                       # an entry written by an older vmlab (no sha256), truncated
            m = json.loads(manifest.read_text())
            del m["sha256"]
            manifest.write_text(json.dumps(m))
            good.initrd.write_bytes(data[:-50])
        again = ensure_image(tree)
        assert again.initrd == good.initrd
        assert again.initrd.read_bytes() == data, damage      # rebuilt, reproducibly
        split_archives(again.initrd.read_bytes())             # and it decodes


def test_an_intact_legacy_entry_is_used_as_is(tree):  # noqa: F811
    good = ensure_image(tree)
    manifest = good.initrd.with_name("manifest.json")
    m = json.loads(manifest.read_text())
    del m["sha256"]
    manifest.write_text(json.dumps(m))
    before = good.initrd.stat().st_mtime_ns
    assert ensure_image(tree).initrd.stat().st_mtime_ns == before


def test_a_corrupt_user_file_image_is_rebuilt(tree, tmp_path):  # noqa: F811
    src = tmp_path / "repro.sh"
    src.write_text("echo hi\n")
    img = ensure_image(tree, extra_files={"/root/repro.sh": src})
    data = img.initrd.read_bytes()
    img.initrd.write_bytes(data[:-10])
    assert ensure_image(tree, extra_files={"/root/repro.sh": src}).initrd.read_bytes() == data


def test_a_fifo_or_device_as_user_file_is_refused_not_read(tree, tmp_path):  # noqa: F811
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="fifo .*is not a regular file or directory"):
        ensure_image(tree, extra_files={"/root/x": fifo})     # would block forever if read
    with pytest.raises(ImageError, match="/dev/zero .*is not a regular file or directory"):
        ensure_image(tree, extra_files={"/root/z": "/dev/zero"})


def test_a_user_file_that_vanishes_mid_build_is_a_clear_error(tree, tmp_path):  # noqa: F811
    tree_dir = tmp_path / "data"
    tree_dir.mkdir()
    (tree_dir / "kept").write_text("x")
    os.symlink(tmp_path / "gone", tree_dir / "vanished")   # listed, but nothing behind it
    with pytest.raises(ImageError, match=r"vanished \(for /opt/data/vanished\) does not exist"):
        ensure_image(tree, extra_files={"/opt/data": tree_dir})


def test_a_directory_removed_while_the_image_is_built(tree, tmp_path):  # noqa: F811
    """Really racing: a thread deletes the files while the archive is read. Whatever moment it
    hits, the result is an image or an ImageError naming the path; never another exception."""
    src = tmp_path / "many"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:03}").write_bytes(os.urandom(2048))
    stop = threading.Event()

    def remove() -> None:
        for p in sorted(src.iterdir(), reverse=True):
            if stop.is_set():
                return
            p.unlink()
    t = threading.Thread(target=remove)
    t.start()
    try:
        ensure_image(tree, extra_files={"/opt/many": src})
    except ImageError as exc:
        assert str(src) in str(exc)
    finally:
        stop.set()
        t.join()
