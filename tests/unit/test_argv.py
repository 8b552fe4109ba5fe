"""The qemu command line for both transports, checked without starting QEMU."""

from pathlib import Path

import pytest

from vmlab.qemu.argv import VmConfig, build_argv, kernel_cmdline


def config(**kw) -> VmConfig:
    base = dict(name="a", kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"), qmp_socket=Path("/r/a.qmp"),
                serial_socket=Path("/r/a.serial"), console_log=Path("/r/a.console.log"), cid=3,
                transport="vhost-user", vhost_user_socket=Path("/r/a.vu"), lab_id="lab-x")
    base.update(kw)
    return VmConfig(**base)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def test_vhost_user_argv_has_one_vhost_user_device_and_shared_memory():
    argv = build_argv(config())
    devices = option_values(argv, "-device")
    assert devices == ["vhost-user-vsock-pci,id=vsock0,chardev=vsockchr"]
    assert "socket,id=vsockchr,path=/r/a.vu" in option_values(argv, "-chardev")
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in option_values(argv, "-object")
    assert "pc,memory-backend=mem" in option_values(argv, "-machine")


def test_vhost_argv_uses_kernel_vhost_vsock_with_guest_cid():
    argv = build_argv(config(transport="vhost", vhost_user_socket=None, cid=1234))
    assert option_values(argv, "-device") == ["vhost-vsock-pci,id=vsock0,guest-cid=1234"]
    assert not any("vhost-user" in a for a in argv)


def test_no_vsock_device_when_transport_is_none():
    argv = build_argv(config(transport=None, cid=None, vhost_user_socket=None))
    assert not any("vsock" in a for a in option_values(argv, "-device"))


def test_console_qmp_accel_and_identity():
    argv = build_argv(config(memory_mib=512, cpus=2, cmdline="foo=1"))
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-m") == ["512M"] and option_values(argv, "-smp") == ["2"]
    assert "socket,id=con0,path=/r/a.serial,server=on,wait=on,logfile=/r/a.console.log" in option_values(argv, "-chardev")
    assert option_values(argv, "-serial") == ["chardev:con0"]
    assert "socket,id=qmp0,path=/r/a.qmp,server=on,wait=off" in option_values(argv, "-chardev")
    assert option_values(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert "-nodefaults" in argv
    assert option_values(argv, "-name") == ["vmlab-lab-x-a"]
    cmdline = option_values(argv, "-append")[0]
    assert cmdline.startswith("console=ttyS0") and "vmlab.name=a" in cmdline and cmdline.endswith("foo=1")


def test_kvm_accel_uses_host_cpu():
    argv = build_argv(config(accel="kvm"))
    assert option_values(argv, "-accel") == ["kvm"] and option_values(argv, "-cpu") == ["host"]


def test_share_dir_adds_virtfs_and_cmdline_flag():
    cfg = config(share_dir=Path("/data"))
    argv = build_argv(cfg)
    assert option_values(argv, "-virtfs") == ["local,path=/data,mount_tag=vmlab,security_model=none,id=share0"]
    assert "vmlab.share=1" in kernel_cmdline(cfg)


def test_no_reboot_is_opt_in_because_it_turns_system_reset_into_quit():
    assert "-no-reboot" not in build_argv(config())
    assert "-no-reboot" in build_argv(config(no_reboot=True))


@pytest.mark.parametrize("bad, message", [
    (dict(transport="virtio"), "unknown transport"),
    (dict(cid=None), "needs a guest CID"),
    (dict(vhost_user_socket=None), "backend's socket"),
    (dict(accel="hvf"), "accel must be"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        config(**bad)
