"""Kernel resolution: version from the bzImage header, module dirs, clear errors."""
from pathlib import Path

import pytest

from vmlab.image import kernel as kmod
from vmlab.image.kernel import ImageError, from_path, kernel_version, resolve_kernel


def fake_bzimage(path: Path, version: str) -> Path:
    """Just enough of an x86 boot header for kernel_version()."""
    blob = bytearray(0x4000)
    blob[0x202:0x206] = b"HdrS"
    ptr = 0x1000
    blob[0x20E:0x210] = ptr.to_bytes(2, "little")
    s = f"{version} (builder@host) #1 SMP".encode() + b"\0"
    blob[ptr + 0x200: ptr + 0x200 + len(s)] = s
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(blob))
    return path


def test_version_is_read_from_header(tmp_path):
    k = fake_bzimage(tmp_path / "vmlinuz", "6.9.0-test")
    assert kernel_version(k) == "6.9.0-test"


def test_not_a_bzimage(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(0x400))
    with pytest.raises(ImageError, match="not an x86 bzImage"):
        kernel_version(tmp_path / "vmlinux")


def test_missing_kernel_names_the_path(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        from_path(tmp_path / "nope", "argument")


def test_directory_without_kernel(tmp_path):
    with pytest.raises(ImageError, match="no boot/vmlinuz"):
        from_path(tmp_path, "argument")


def test_package_tree_uses_sibling_modules_and_runs_depmod(tmp_path):
    ver = "6.9.0-test"
    fake_bzimage(tmp_path / "boot" / f"vmlinuz-{ver}", ver)
    mods = tmp_path / "lib" / "modules" / ver
    mods.mkdir(parents=True)
    src = from_path(tmp_path, "argument")  # a package root works as well as the file
    assert src.version == ver
    assert src.modules_dir == mods
    assert (mods / "modules.dep").is_file()  # created by depmod -b


def test_kernel_without_modules_dir_means_builtin(tmp_path):
    src = from_path(fake_bzimage(tmp_path / "bzImage", "0.0.0-nomods"), "argument")
    assert src.modules_dir is None


def test_env_variable_is_used(tmp_path, monkeypatch):
    k = fake_bzimage(tmp_path / "k", "6.9.1-env")
    monkeypatch.setenv("VMLAB_KERNEL", str(k))
    src = resolve_kernel(None, tmp_path / "cache", download=False)
    assert (src.vmlinuz, src.origin) == (k, "env VMLAB_KERNEL")


def test_argument_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLAB_KERNEL", str(tmp_path / "missing"))
    k = fake_bzimage(tmp_path / "k", "6.9.2-arg")
    assert resolve_kernel(k, tmp_path / "cache").version == "6.9.2-arg"


def test_nothing_found_lists_every_attempt(tmp_path, monkeypatch):
    monkeypatch.delenv("VMLAB_KERNEL", raising=False)
    monkeypatch.setattr(kmod, "package_plan", lambda cache=None: None)
    monkeypatch.setattr(kmod, "host_kernel", lambda: tmp_path / "boot" / "vmlinuz-none")
    with pytest.raises(ImageError) as e:
        resolve_kernel(None, tmp_path / "cache", download=False)
    msg = str(e.value)
    assert "apt-get update" in msg and "vmlinuz-none" in msg and "VMLAB_KERNEL" in msg


def test_no_download_mode_does_not_fetch(tmp_path, monkeypatch):
    monkeypatch.delenv("VMLAB_KERNEL", raising=False)
    plan = kmod.PackagePlan("linux-image-amd64", "linux-image-9.9.9-amd64", ("linux-image-9.9.9-amd64",))
    monkeypatch.setattr(kmod, "package_plan", lambda cache=None: plan)
    monkeypatch.setattr(kmod, "fetch_package", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setattr(kmod, "host_kernel", lambda: tmp_path / "none")
    with pytest.raises(ImageError, match="would download linux-image-9.9.9-amd64"):
        resolve_kernel(None, tmp_path / "cache", download=False)


@pytest.mark.parametrize("modules, found", [("# CONFIG_MODULES is not set\n", False), ("CONFIG_MODULES=y\n", True)])
def test_a_module_free_kernel_ignores_a_module_tree_of_its_version(tmp_path, modules, found):
    # a vmlab build keeps its .config as `config` beside the bzImage; a nested lab's outer guest
    # has a /lib/modules/<ver> of the same version that belongs to the outer kernel
    k = fake_bzimage(tmp_path / "boot" / "vmlinuz-6.1.192", "6.1.192")
    (tmp_path / "boot" / "config").write_text("CONFIG_64BIT=y\n" + modules)
    tree = tmp_path / "lib" / "modules" / "6.1.192"
    tree.mkdir(parents=True)
    (tree / "modules.dep").write_text("")
    assert from_path(k, "test").modules_dir == (tree if found else None)
