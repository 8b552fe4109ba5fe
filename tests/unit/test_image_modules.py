"""Module selection: modules.dep parsing, dependency order, groups, decompression."""
import lzma

import pytest

from vmlab.image.modules import (ModuleError, ModuleIndex, dep_text, module_name,
                                 parse_modules_dep, plain_name, plan_modules, read_module)

DEP = """\
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/net/vmw_vsock/vsock_loopback.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
"""


def index(builtin=()) -> ModuleIndex:
    return ModuleIndex(parse_modules_dep(DEP), set(builtin))


def names(paths):
    return [module_name(p) for p in paths]


def assert_deps_first(idx: ModuleIndex, order):
    for i, p in enumerate(order):
        for d in idx.deps[p]:
            assert d in order[:i], f"{d} must load before {p}"


def test_parse_and_names():
    deps = parse_modules_dep(DEP)
    assert deps["kernel/net/vmw_vsock/vsock.ko.xz"] == []
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.zst") == "virtio_rng"
    assert plain_name("a/b.ko.zst") == "a/b.ko" and plain_name("a/b.ko") == "a/b.ko"


def test_load_order_puts_dependencies_first_without_duplicates():
    idx = index()
    order = idx.load_order(["virtio_pci", "vsock", "vmw_vsock_virtio_transport"])
    assert_deps_first(idx, order)
    assert len(order) == len(set(order))
    assert names(order)[-1] == "vmw_vsock_virtio_transport"
    assert set(names(order)) == {"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci",
                                 "vsock", "vmw_vsock_virtio_transport_common",
                                 "vmw_vsock_virtio_transport"}


def test_groups_do_not_reload_modules_and_optional_are_shipped():
    idx = index()
    plan = plan_modules(idx)
    assert "kernel/drivers/virtio/virtio.ko.xz" in plan.groups["core"]
    assert names(plan.groups["share"]) == ["9pnet", "9p", "9pnet_virtio"]
    assert_deps_first(idx, plan.groups["core"] + plan.groups["share"])
    assert "kernel/net/vmw_vsock/vsock_loopback.ko.xz" in plan.files
    assert "kernel/drivers/char/virtio_console.ko.xz" in plan.files
    assert len(plan.files) == len(set(plan.files))


def test_builtin_modules_are_skipped():
    deps = {k: v for k, v in parse_modules_dep(DEP).items() if "virtio_pci" not in k}
    idx = ModuleIndex(deps, {"virtio_pci"})
    assert "virtio_pci" not in names(idx.load_order(["virtio_pci", "vsock"]))


def test_missing_required_module_raises_and_optional_is_ignored():
    with pytest.raises(ModuleError, match="vsock_nonexistent"):
        index().load_order(["vsock_nonexistent"])
    assert index().load_order(["vsock_nonexistent"], optional=True) == []


def test_cycle_is_reported():
    idx = ModuleIndex({"a.ko": ["b.ko"], "b.ko": ["a.ko"]})
    with pytest.raises(ModuleError, match="cycle"):
        idx.load_order(["a"])


def test_dep_text_uses_plain_names_and_only_shipped_modules():
    idx = index()
    plan = plan_modules(idx)
    text = dep_text(idx, plan.files)
    assert "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko\n" in text
    assert ".xz" not in text


def test_read_module_decompresses_xz_and_plain(tmp_path):
    raw = b"\x7fELF fake module" * 100
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ))
    (tmp_path / "p.ko").write_bytes(raw)
    assert read_module(tmp_path / "m.ko.xz") == raw
    assert read_module(tmp_path / "p.ko") == raw
    with pytest.raises(ModuleError):
        (tmp_path / "x.bin").write_bytes(b"")
        read_module(tmp_path / "x.bin")


def test_missing_share_modules_do_not_break_the_image():
    deps = {k: v for k, v in parse_modules_dep(DEP).items() if "9p" not in k}
    plan = plan_modules(ModuleIndex(deps))
    assert plan.groups["share"] == [] and {"9p", "9pnet_virtio"} <= set(plan.missing)
    assert "kernel/net/vmw_vsock/vsock.ko.xz" in plan.groups["core"]


def test_missing_power_button_modules_do_not_break_the_image():
    plan = plan_modules(ModuleIndex(parse_modules_dep(DEP)))   # DEP has no button/evdev
    assert plan.groups["power"] == [] and {"button", "evdev"} <= set(plan.missing)


def test_read_module_decompresses_zstd(tmp_path):
    import shutil
    import subprocess
    if not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    raw = b"\x7fELF zstd module" * 50
    (tmp_path / "z.ko").write_bytes(raw)
    subprocess.run(["zstd", "-q", str(tmp_path / "z.ko"), "-o", str(tmp_path / "z.ko.zst")], check=True)
    assert read_module(tmp_path / "z.ko.zst") == raw
