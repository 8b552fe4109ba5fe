"""ensure_image on a fake kernel tree: cache hits, reproducibility, appended user files."""
import json
import stat
import zlib
from pathlib import Path

import pytest

from vmlab.image import GuestImage, ensure_image, image_status
from vmlab.image.cpio import read_cpio

from test_image_kernel import fake_bzimage

VER = "6.9.0-vmlabtest"
MODS = {
    "kernel/drivers/virtio/virtio_ring.ko": [],
    "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
    "kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio.ko",
                                            "kernel/drivers/virtio/virtio_ring.ko"],
    "kernel/net/vmw_vsock/vsock.ko": [],
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": ["kernel/net/vmw_vsock/vsock.ko",
                                                           "kernel/drivers/virtio/virtio.ko"],
    "kernel/net/9p/9pnet.ko": [],
    "kernel/net/9p/9pnet_virtio.ko": ["kernel/net/9p/9pnet.ko"],
    "kernel/fs/9p/9p.ko": ["kernel/net/9p/9pnet.ko"],
}


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "pkg"
    fake_bzimage(root / "boot" / f"vmlinuz-{VER}", VER)
    mdir = root / "lib" / "modules" / VER
    for path in MODS:
        (mdir / path).parent.mkdir(parents=True, exist_ok=True)
        (mdir / path).write_bytes(b"\x7fELF" + path.encode())
    (mdir / "modules.dep").write_text("".join(f"{p}: {' '.join(d)}\n" for p, d in MODS.items()))
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path / "cache"))
    return root


def split_archives(blob: bytes) -> list[list]:
    """Decode a gzip base archive followed by optional uncompressed archives."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    base = d.decompress(blob)
    rest = d.unused_data.lstrip(b"\0")
    out = [list(read_cpio(base))]
    if rest:
        out.append(list(read_cpio(rest)))
    return out


def test_build_contents(tree):
    img = ensure_image(tree)
    assert isinstance(img, GuestImage)
    assert img.kernel_version == VER and img.helper == "/bin/vmlab-guest"
    (base,) = split_archives(img.initrd.read_bytes())
    files = {e.name: e for e in base}
    assert files["init"].mode == stat.S_IFREG | 0o755
    assert files["bin/busybox"].data[:4] == b"\x7fELF"
    assert files["bin/sh"].data == b"/bin/busybox"
    assert files["bin/vmlab-guest"].mode & 0o111
    assert stat.S_ISCHR(files["dev/console"].mode)
    core = files[f"lib/modules/{VER}/vmlab.core"].data.decode().split()
    assert core.index("kernel/drivers/virtio/virtio_ring.ko") < core.index("kernel/drivers/virtio/virtio.ko")
    assert core[-1] == "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"
    assert f"lib/modules/{VER}/kernel/fs/9p/9p.ko" in files
    manifest = json.loads(files["etc/vmlab/image.json"].data)
    assert manifest["kernel_version"] == VER


def test_cache_hit_and_reproducible_rebuild(tree):
    first = ensure_image(tree)
    blob = first.initrd.read_bytes()
    mtime = first.initrd.stat().st_mtime_ns
    again = ensure_image(tree)
    assert again.initrd == first.initrd and again.initrd.stat().st_mtime_ns == mtime
    forced = ensure_image(tree, force=True)
    assert forced.initrd.read_bytes() == blob  # byte-for-byte identical


def test_changed_input_changes_the_key(tree):
    a = ensure_image(tree).initrd
    mod = tree / "lib" / "modules" / VER / "kernel/net/vmw_vsock/vsock.ko"
    mod.write_bytes(b"\x7fELF changed")
    b = ensure_image(tree).initrd
    assert a != b and a.is_file() and b.is_file()


def test_extra_files_are_a_second_archive_with_modes(tree, tmp_path):
    script = tmp_path / "repro.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "blob.bin").write_bytes(bytes(range(256)))
    base = ensure_image(tree)
    img = ensure_image(tree, extra_files={"/root/repro.sh": script, "/opt/data": data})
    assert img.initrd != base.initrd
    assert img.initrd.read_bytes().startswith(base.initrd.read_bytes())
    archives = split_archives(img.initrd.read_bytes())
    assert len(archives) == 2
    extra = {e.name: e for e in archives[1]}
    assert extra["root/repro.sh"].mode == stat.S_IFREG | 0o750
    assert extra["opt/data/sub/blob.bin"].data == bytes(range(256))
    assert "root" not in extra  # base dirs are not re-created (that would chmod them)
    assert stat.S_ISDIR(extra["opt"].mode) and stat.S_IMODE(extra["opt"].mode) == 0o755
    # same inputs -> same cached file
    assert ensure_image(tree, extra_files={"/opt/data": data, "/root/repro.sh": script}).initrd == img.initrd


def test_extra_files_errors(tree, tmp_path):
    from vmlab.image import ImageError
    with pytest.raises(ImageError, match="does not exist"):
        ensure_image(tree, extra_files={"/x": tmp_path / "missing"})
    with pytest.raises(ImageError, match="absolute"):
        ensure_image(tree, extra_files={"x": tmp_path})


def test_missing_required_module_is_a_clear_error(tree):
    from vmlab.image import ImageError
    dep = tree / "lib" / "modules" / VER / "modules.dep"
    dep.write_text("".join(l + "\n" for l in dep.read_text().splitlines() if "vsock" not in l))
    with pytest.raises(ImageError, match="vsock"):
        ensure_image(tree)


def test_image_status_reports_up_to_date(tree):
    st = image_status(tree)
    assert st["kernel_version"] == VER and st["up_to_date"] is False and not st["problems"]
    img = ensure_image(tree)
    st = image_status(tree)
    assert st["up_to_date"] is True and st["initrd"] == str(img.initrd)
    assert "vmlab-guest" not in json.dumps(st["modules"])


def test_image_status_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path / "cache"))
    st = image_status(tmp_path / "no-such-kernel")
    assert st["up_to_date"] is False and any("does not exist" in p for p in st["problems"])


def test_image_status_for_a_package_not_downloaded_yet(tmp_path, monkeypatch):
    from vmlab.image import kernel as kmod
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMLAB_KERNEL", raising=False)
    plan = kmod.PackagePlan("linux-image-amd64", "linux-image-9.9.9-amd64", ("linux-image-9.9.9-amd64",))
    monkeypatch.setattr(kmod, "package_plan", lambda cache=None: plan)
    st = image_status()
    assert st["kernel_origin"] == "package:linux-image-9.9.9-amd64"
    assert st["download"] == ["linux-image-9.9.9-amd64"] and st["up_to_date"] is False
    assert "not downloaded yet" in st["detail"]
