"""rootfs: host without booting: qemu argv, kernel cmdline, scenario rules, the env handed over."""

from __future__ import annotations

import shlex
import textwrap
from pathlib import Path

import pytest

from vmlab import hostroot
from vmlab.image.modules import REQUIRED_GROUPS, ModuleIndex, plan_modules
from vmlab.qemu.argv import ROOT_MOUNT_TAG, VmConfig, build_argv, kernel_cmdline
from vmlab.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parents[2]


def config(**kw) -> VmConfig:
    base = dict(name="a", kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"), qmp_socket=Path("/r/a.qmp"),
                serial_socket=Path("/r/a.serial"), console_log=Path("/r/a.console.log"), cid=3,
                transport="vhost-user", vhost_user_socket=Path("/r/a.vu"), lab_id="lab-x")
    base.update(kw)
    return VmConfig(**base)


def virtfs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-virtfs"]


def test_host_rootfs_exports_slash_readonly_in_qemu():
    cfg = config(rootfs="host", host_modules=Path("/c/k/lib/modules/6.1.0"),
                 overlays=[Path("/home/u/.cache/vmlab")], host_paths=[Path("/tmp/clone")])
    (fs,) = virtfs(build_argv(cfg))
    opts = fs.split(",")
    assert opts[0] == "local" and "path=/" in opts and f"mount_tag={ROOT_MOUNT_TAG}" in opts
    assert "readonly=on" in opts  # QEMU refuses writes, whatever the guest mounts
    cmdline = kernel_cmdline(cfg)
    assert "vmlab.rootfs=host" in cmdline.split()
    assert "vmlab.hostmods=/c/k/lib/modules/6.1.0" in cmdline.split()
    assert "vmlab.overlay=/home/u/.cache/vmlab" in cmdline.split()
    assert "vmlab.hostpath=/tmp/clone" in cmdline.split()


def test_a_checkout_or_pythonpath_under_a_guest_tmpfs_is_shown_to_the_guest(tmp_path):
    from vmlab import hostroot

    inside = (tmp_path / "src").resolve()
    inside.mkdir()
    got = hostroot.masked_host_paths({"PYTHONPATH": f"{inside}:/usr/lib/python3/dist-packages"})
    if str(inside).startswith(("/tmp/", "/var/tmp/", "/run/")):
        assert inside in got
    assert Path("/usr/lib/python3/dist-packages") not in got   # visible anyway
    repo = Path(hostroot.__file__).resolve().parents[1]
    assert (repo in got) == any(str(repo).startswith(d + "/") for d in hostroot.TMPFS_DIRS)


def test_image_rootfs_has_no_root_export_and_paths_with_blanks_stay_off_the_cmdline():
    assert virtfs(build_argv(config())) == []
    assert "vmlab.rootfs" not in kernel_cmdline(config())
    cmdline = kernel_cmdline(config(rootfs="host", host_modules=Path("/my dir/m"), overlays=[Path("/a,b")]))
    assert "hostmods" not in cmdline and "vmlab.overlay" not in cmdline


def test_unknown_rootfs_is_refused_by_the_config():
    with pytest.raises(ValueError, match="rootfs"):
        config(rootfs="nfs")


def test_overlay_module_group_is_planned():
    index = ModuleIndex({"kernel/fs/overlayfs/overlay.ko": [], "kernel/net/9p/9pnet.ko": [],
                         "kernel/fs/9p/9p.ko": ["kernel/net/9p/9pnet.ko"],
                         "kernel/net/9p/9pnet_virtio.ko": ["kernel/net/9p/9pnet.ko"],
                         "kernel/drivers/vhost/vhost_vsock.ko": []},
                        builtin={"virtio_pci", "vsock", "vmw_vsock_virtio_transport", "button", "evdev"})
    plan = plan_modules(index)
    assert "hostroot" in REQUIRED_GROUPS
    assert plan.groups["hostroot"] == ["kernel/fs/overlayfs/overlay.ko"]
    assert "kernel/drivers/vhost/vhost_vsock.ko" in plan.files  # shipped for the nested lab


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_scenario_rootfs_key_and_default(tmp_path: Path):
    path = write(tmp_path, """\
        defaults: {rootfs: host}
        vms:
          - {name: a, files: {/root/x: s.yaml}}
          - {name: b, rootfs: image}
          - {name: c}
    """)
    a, b, c = load_scenario(path).vms
    assert (a.rootfs, b.rootfs, c.rootfs) == ("host", "image", "host")
    assert load_scenario(write(tmp_path, "vms: [{name: a}]")).vms[0].rootfs is None


@pytest.mark.parametrize("vm, message", [
    ("{name: a, rootfs: hostt}", "rootfs: unknown rootfs 'hostt'; expected one of image, host"),
    ("{name: a, rootfs: host, files: {/usr/bin/x: s.yaml}}", "files: /usr/bin/x is on the host's read-only root"),
    ("{name: a, rootfs: host, share: .}", "share: not available with rootfs: host"),
    ("{name: a, rootfs: host, initrd: s.yaml}", "initrd: cannot be combined with rootfs: host"),
])
def test_scenario_rootfs_errors_say_what_and_where(tmp_path: Path, vm: str, message: str):
    path = write(tmp_path, f"vms:\n  - {vm}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert any(message in str(p) and str(p).startswith(f"{path}:2:") for p in info.value.problems), \
        info.value.problems


def test_host_env_puts_vmlabs_interpreter_first_and_the_cache(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path))
    text = hostroot.host_env({"PATH": "/shims:/usr/bin", "PYTHONPATH": "/src/vmlab", "SECRET": "x"},
                             executable="/opt/py/bin/python3")
    env = dict(line[len("export "):].split("=", 1) for line in text.splitlines())
    assert shlex.split(env["PATH"]) == ["/opt/py/bin:/shims:/usr/bin"]
    assert shlex.split(env["PYTHONPATH"]) == ["/src/vmlab"]
    assert shlex.split(env["VMLAB_CACHE_DIR"]) == [str(tmp_path.resolve())]
    assert "SECRET" not in env  # only the listed variables travel


def test_guest_files_go_under_the_prefix_and_the_cache_is_overlaid(monkeypatch, tmp_path: Path):
    files = hostroot.guest_files({"/root/client.py": Path("c.py")}, Path("/r/env"))
    assert files == {hostroot.HOST_ENV_GUEST_PATH: Path("/r/env"),
                     hostroot.FILES_PREFIX + "/root/client.py": Path("c.py")}
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path))
    assert hostroot.overlay_dirs() == ([] if hostroot.writable(str(tmp_path.resolve())) else [tmp_path.resolve()])
    assert hostroot.writable("/root/.cache/vmlab") and not hostroot.writable("/usr/lib")


def test_the_notes_programs_are_shipped_unchanged():
    notes = REPO / "scenarios" / "repro" / "notes"
    client = (notes / "client.py").read_text()
    assert client.startswith("#!/usr/bin/env python3\nimport socket\n")
    assert 's.sendall(b"Hello, world!")\ns.close()\n' in client
    assert "\tlisten(s, 0); ----------------------liesten\n" in (notes / "server.c").read_text()


def test_rootfs_host_applied_at_run_time_refuses_what_it_cannot_do():
    from vmlab.scenario import VmSpec

    assert hostroot.unsupported(VmSpec(name="a", files={"/root/x": Path("x")})) is None
    assert "read-only root" in hostroot.unsupported(VmSpec(name="a", files={"/usr/local/bin/p": Path("p")}))
    assert "share" in hostroot.unsupported(VmSpec(name="a", share=Path("/tmp")))
    assert "initrd" in hostroot.unsupported(VmSpec(name="a", initrd=Path("/tmp/i")))
