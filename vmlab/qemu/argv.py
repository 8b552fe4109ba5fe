"""Build the qemu-system-x86_64 command line for one VM.

Pure functions only: everything about a VM's command line is decided here so that it can be
unit-tested without starting QEMU, and so that both vsock transports differ in one place.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

VSOCK_DEVICE_ID = "vsock0"
"""QEMU device id of the single vsock device (used by QMP device_del)."""

SHARE_MOUNT_TAG = "vmlab"
"""virtio-9p mount tag the guest init mounts at /mnt/host."""

ROOT_MOUNT_TAG = "vmlabroot"
"""virtio-9p mount tag of the host's / for `rootfs: host` guests (exported readonly=on)."""

ROOTFS_KINDS = ("image", "host")
"""image: vmlab's busybox initramfs is the root; host: the host's / read-only over 9p."""

TRANSPORTS = ("vhost", "vhost-user")
"""Resolved transports; `auto` is resolved before argv is built (see vmlab.hostcheck)."""

BASE_CMDLINE = "console=ttyS0 loglevel=5 panic=0 tsc=reliable no_timer_check"
"""loglevel=5 keeps warnings, oopses and panics on the console (vmlab watches for them) while
hiding boot chatter; panic=0 halts on panic instead of rebooting into a loop."""


@dataclass
class VmConfig:
    """Everything needed to start one guest; produced by the lab from a scenario VmSpec."""

    name: str
    kernel: Path
    initrd: Path
    qmp_socket: Path
    serial_socket: Path
    console_log: Path
    cid: int | None = None
    transport: str | None = "vhost-user"
    vhost_user_socket: Path | None = None
    memory_mib: int = 256
    cpus: int = 1
    accel: str = "tcg"
    cmdline: str = ""
    share_dir: Path | None = None
    rootfs: str = "image"
    host_modules: Path | None = None     # rootfs host: the guest kernel's module tree on the host
    overlays: list[Path] = field(default_factory=list)  # rootfs host: more dirs made writable (tmpfs overlay)
    host_paths: list[Path] = field(default_factory=list)  # rootfs host: host dirs under a guest tmpfs, bound ro
    no_reboot: bool = False
    machine: str = "pc"
    extra_args: list[str] = field(default_factory=list)
    lab_id: str = ""

    def __post_init__(self) -> None:
        if self.transport is not None and self.transport not in TRANSPORTS:
            raise ValueError(f"VM {self.name!r}: unknown transport {self.transport!r}; expected one of {TRANSPORTS}")
        if self.transport is not None and self.cid is None:
            raise ValueError(f"VM {self.name!r}: a vsock device needs a guest CID")
        if self.transport == "vhost-user" and self.vhost_user_socket is None:
            raise ValueError(f"VM {self.name!r}: the vhost-user transport needs the backend's socket path")
        if self.rootfs not in ROOTFS_KINDS:
            raise ValueError(f"VM {self.name!r}: rootfs must be one of {ROOTFS_KINDS}, not {self.rootfs!r}")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"VM {self.name!r}: accel must be 'tcg' or 'kvm', not {self.accel!r}")


def kernel_cmdline(cfg: VmConfig) -> str:
    """The guest kernel command line: vmlab's base, the VM's identity, then the user's additions."""
    parts = [BASE_CMDLINE, f"vmlab.name={cfg.name}"]
    if cfg.share_dir is not None:
        parts.append("vmlab.share=1")
    if cfg.rootfs == "host":
        parts.append("vmlab.rootfs=host")
        if cfg.host_modules is not None and _cmdline_safe(str(cfg.host_modules)):
            parts.append(f"vmlab.hostmods={cfg.host_modules}")
        overlays = [str(p) for p in cfg.overlays if _cmdline_safe(str(p))]
        if overlays:
            parts.append("vmlab.overlay=" + ",".join(overlays))
        host_paths = [str(p) for p in cfg.host_paths if _cmdline_safe(str(p))]
        if host_paths:
            parts.append("vmlab.hostpath=" + ",".join(host_paths))
    if cfg.cmdline:
        parts.append(cfg.cmdline)
    return " ".join(parts)


def _cmdline_safe(path: str) -> bool:
    """A path the guest init can take from the kernel command line (no blanks, commas, quotes)."""
    return path.startswith("/") and not any(c in path for c in " \t\n,\"'")


def vsock_args(cfg: VmConfig) -> list[str]:
    """Exactly one vsock device, for the VM's transport (none when the VM has no vsock)."""
    if cfg.transport is None:
        return []
    if cfg.transport == "vhost":
        return ["-device", f"vhost-vsock-pci,id={VSOCK_DEVICE_ID},guest-cid={cfg.cid}"]
    return [
        "-chardev", f"socket,id=vsockchr,path={cfg.vhost_user_socket}",
        "-device", f"vhost-user-vsock-pci,id={VSOCK_DEVICE_ID},chardev=vsockchr",
    ]


def memory_args(cfg: VmConfig) -> list[str]:
    """Guest RAM as a shared memfd: vhost-user backends must map it, and it costs nothing otherwise."""
    return [
        "-m", f"{cfg.memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={cfg.memory_mib}M,share=on",
        "-machine", f"{cfg.machine},memory-backend=mem",
    ]


def rootfs_args(cfg: VmConfig) -> list[str]:
    """rootfs host: the host's / as a 9p export QEMU itself refuses to write (readonly=on), so
    the host is safe even from a guest that remounts it rw. multidevs=remap keeps inode numbers
    unique across the host's mounts."""
    if cfg.rootfs != "host":
        return []
    return ["-virtfs", f"local,path=/,mount_tag={ROOT_MOUNT_TAG},security_model=none,readonly=on,"
                       "multidevs=remap,id=root0"]


def accel_args(cfg: VmConfig) -> list[str]:
    if cfg.accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg"]


def build_argv(cfg: VmConfig, qemu: str = "qemu-system-x86_64") -> list[str]:
    """The full argv. The serial console waits for vmlab to connect, so no boot output is lost."""
    argv = [
        qemu,
        "-name", f"vmlab-{cfg.lab_id}-{cfg.name}" if cfg.lab_id else f"vmlab-{cfg.name}",
        "-nodefaults", "-no-user-config", "-display", "none",
        *accel_args(cfg),
        *memory_args(cfg),
        "-smp", str(cfg.cpus),
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", kernel_cmdline(cfg),
        "-chardev", f"socket,id=con0,path={cfg.serial_socket},server=on,wait=on,logfile={cfg.console_log}",
        "-serial", "chardev:con0",
        "-chardev", f"socket,id=qmp0,path={cfg.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        *vsock_args(cfg),
    ]
    if cfg.share_dir is not None:
        argv += ["-virtfs", f"local,path={cfg.share_dir},mount_tag={SHARE_MOUNT_TAG},security_model=none,id=share0"]
    argv += rootfs_args(cfg)
    if cfg.no_reboot:
        argv.append("-no-reboot")
    argv += cfg.extra_args
    return argv


def format_argv(argv: list[str]) -> str:
    """A copy-pasteable shell line, for logs and `--keep` instructions."""
    return shlex.join(argv)
