"""Honest host readiness: can this host boot vmlab guests, and how?

`vmlab check` renders a `HostReport`; the lab uses `choose_accel()` and
`resolve_transport()` to pick KVM/TCG and vhost/vhost-user. A device node being
present is never taken as proof that it works: /dev/kvm is opened and asked to
create a VM, /dev/vhost-vsock is opened and asked for its features.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from vmlab.cids import default_lock_dir

from vmlab.kernelioctl import (
    KVM_API_VERSION,
    KVM_CAP_IRQCHIP,
    KVM_CAP_USER_MEMORY,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_DEV,
    KVM_GET_API_VERSION,
    VHOST_VSOCK_DEV,
    VIRTIO_VSOCK_F_SEQPACKET,
    open_vhost_vsock,
    vhost_vsock_features,
)

TRANSPORTS = ("vhost", "vhost-user")
CAP_NET_BIND_SERVICE = 10


class TransportUnavailable(RuntimeError):
    """The requested vsock transport cannot work on this host."""


class AccelUnavailable(RuntimeError):
    """KVM was requested explicitly but is not usable."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    optional: bool = False  # a failed optional check is a WARN (vmlab can go on), not a FAIL

    @property
    def status(self) -> str:
        return "OK" if self.ok else ("WARN" if self.optional else "FAIL")


@dataclass
class HostReport:
    qemu_path: Optional[str]
    qemu_version: Optional[str]
    kvm: Check
    vhost_vsock: Check
    vhost_user_vsock_device: Check
    transports: list[str]
    accel: str
    checks: list[Check]
    accel_notice: Optional[str] = None
    transport: Optional[str] = None  # what "auto" resolves to, None if nothing works
    transport_notice: Optional[str] = None
    image: Optional[dict] = None

    @property
    def ok(self) -> bool:
        """True when vmlab can boot a guest with at least one transport."""
        return bool(self.transports) and all(c.ok or c.optional for c in self.checks)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HostReport":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("kvm", "vhost_vsock", "vhost_user_vsock_device"):
            kw[key] = Check(**kw[key])
        kw["checks"] = [Check(**c) for c in kw["checks"]]
        return cls(**kw)


# --- qemu ---------------------------------------------------------------------


def find_qemu(name: str = "qemu-system-x86_64") -> Optional[str]:
    """Absolute path of qemu (VMLAB_QEMU overrides the name), or None."""
    return shutil.which(os.environ.get("VMLAB_QEMU", name))


QEMU_PROBE_TIMEOUT = float(os.environ.get("VMLAB_QEMU_PROBE_TIMEOUT", "120"))
"""`qemu -version` / `-device help` take 0.1 s on a host but a minute in a TCG guest that loads
qemu's libraries over 9p (the nested lab): a slow answer is waited for, and no answer is
"unknown", never "qemu lacks the device"."""


def qemu_version(path: str) -> Optional[str]:
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True,
                             timeout=QEMU_PROBE_TIMEOUT, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None


_DEVICES: dict[str, frozenset[str]] = {}


def _qemu_devices(path: str) -> Optional[frozenset[str]]:
    """qemu's device names, or None when qemu could not be asked (failures are not cached)."""
    if path in _DEVICES:
        return _DEVICES[path]
    try:
        proc = subprocess.run([path, "-device", "help"], capture_output=True, text=True,
                              timeout=QEMU_PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    names = frozenset(re.findall(r'^name "([^"]+)"', proc.stdout, re.M))
    if not names:
        return None
    _DEVICES[path] = names
    return names


def qemu_has_device(path: str, device: str) -> Optional[bool]:
    """Whether this qemu binary was built with `device` (cached per path); None: qemu did not
    answer (timed out, crashed), so nothing is known either way."""
    names = _qemu_devices(path)
    return None if names is None else device in names


# --- KVM ----------------------------------------------------------------------


def cpu_virt_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The hardware virtualisation flags ({'vmx'} / {'svm'}) the CPU advertises."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) & {"vmx", "svm"} if m else set()


def _loaded_modules(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if Path("/sys/module", n).exists()]


def qemu_kvm_probe(path: str, timeout: Optional[float] = None, name: str = "vmlab-kvm-probe") -> tuple[bool, str]:
    """(ok, reason): start qemu with `-accel kvm -M none` and ask QMP `query-kvm`.

    Catches qemu builds without KVM and hosts where qemu's KVM init fails or
    hangs; qemu is killed on timeout (default QEMU_PROBE_TIMEOUT: qemu itself may take a
    minute to start in a TCG guest)."""
    timeout = QEMU_PROBE_TIMEOUT if timeout is None else timeout
    qmp = ('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n'
           '{"execute":"quit"}\n')
    argv = [path, "-name", name, "-accel", "kvm", "-machine", "none", "-nodefaults",
            "-display", "none", "-S", "-qmp", "stdio"]
    try:
        proc = subprocess.run(argv, input=qmp, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"qemu -accel kvm probe hung for {timeout:g}s"
    except OSError as e:
        return False, f"qemu -accel kvm probe could not start: {e.strerror}"
    if '"enabled": true' in proc.stdout:
        return True, "qemu -accel kvm probe ok"
    err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return False, f"qemu -accel kvm probe failed: {err}"


def kvm_usable(qemu_path: Optional[str] = None, probe_qemu: bool = True,
               probe_timeout: Optional[float] = None) -> Check:
    """Can qemu run guests with KVM here? Each step must pass, in order."""
    name, hint_perm = "kvm", ("add yourself to the 'kvm' group or install the udev rule "
                              'KERNEL=="kvm", GROUP="kvm", MODE="0666"')
    try:
        fd = os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Check(name, False, f"{KVM_DEV} missing (no kvm module or no hardware virtualisation)",
                         "load kvm_intel/kvm_amd, or enable nested virtualisation for this VM")
        if e.errno == errno.EACCES:
            return Check(name, False, f"{KVM_DEV}: permission denied", hint_perm)
        return Check(name, False, f"{KVM_DEV}: {e.strerror}")
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if api != KVM_API_VERSION:
            return Check(name, False, f"KVM_GET_API_VERSION returned {api}, expected {KVM_API_VERSION}")
        flags = cpu_virt_flags()
        vendor = _loaded_modules(("kvm_intel", "kvm_amd"))
        if not flags and not vendor:  # checked before any VM is created: nothing to hang on
            other = _loaded_modules(("kvm_pvm",))
            via = f"; KVM is provided by {other[0]}, which cannot run ordinary guest kernels" if other else ""
            return Check(name, False,
                         f"CPU advertises neither vmx nor svm and kvm_intel/kvm_amd is not loaded{via}",
                         "enable (nested) hardware virtualisation, or run under TCG (slower)")
        caps = {c: fcntl.ioctl(fd, KVM_CHECK_EXTENSION, c) for c in (KVM_CAP_IRQCHIP, KVM_CAP_USER_MEMORY)}
        if not all(v > 0 for v in caps.values()):
            return Check(name, False, "KVM lacks basic capabilities (IRQCHIP/USER_MEMORY)")
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as e:
        return Check(name, False, f"{KVM_DEV} opens but KVM ioctls fail: {e.strerror}",
                     "check dmesg; another hypervisor may own VMX/SVM")
    finally:
        os.close(fd)
    if probe_qemu:
        qemu_path = qemu_path or find_qemu()
        if qemu_path:
            ok, why = qemu_kvm_probe(qemu_path, probe_timeout)
            if not ok:
                return Check(name, False, why)
    return Check(name, True, f"{KVM_DEV} usable (API {api}, {'/'.join(sorted(flags)) or '+'.join(vendor)})")


def choose_accel(requested: str = "auto", qemu_path: Optional[str] = None) -> tuple[str, Optional[str]]:
    """("kvm"|"tcg", notice or None). An explicit "kvm" that cannot work raises."""
    if requested == "tcg":
        return "tcg", None
    if requested not in ("auto", "kvm"):
        raise ValueError(f"unknown accel {requested!r}: use auto, kvm or tcg")
    kvm = kvm_usable(qemu_path)
    if kvm.ok:
        return "kvm", None
    if requested == "kvm":
        raise AccelUnavailable(f"KVM not usable: {kvm.detail}" + (f" (hint: {kvm.hint})" if kvm.hint else ""))
    return "tcg", f"KVM not usable: {kvm.detail}; falling back to TCG"


# --- vsock transports ---------------------------------------------------------


def vhost_vsock_usable() -> Check:
    """Open /dev/vhost-vsock read-write and ask for its features."""
    name = "vhost_vsock"
    try:
        fd = open_vhost_vsock()
    except OSError as e:
        if e.errno == errno.ENOENT:
            loaded = Path("/sys/module/vhost_vsock").exists()
            what = "module loaded but no device node" if loaded else "module vhost_vsock not loaded"
            return Check(name, False, f"{VHOST_VSOCK_DEV} missing ({what})",
                         "sudo modprobe vhost_vsock", optional=True)
        if e.errno == errno.EACCES:
            return Check(name, False, f"{VHOST_VSOCK_DEV}: permission denied",
                         f"sudo chmod 0666 {VHOST_VSOCK_DEV} (or a udev rule)", optional=True)
        return Check(name, False, f"{VHOST_VSOCK_DEV}: {e.strerror}", optional=True)
    try:
        feats = vhost_vsock_features(fd)
    except OSError as e:
        return Check(name, False, f"VHOST_GET_FEATURES failed: {e.strerror}", optional=True)
    finally:
        os.close(fd)
    seq = "seqpacket" if feats & (1 << VIRTIO_VSOCK_F_SEQPACKET) else "no seqpacket"
    return Check(name, True, f"{VHOST_VSOCK_DEV} usable (features {feats:#x}, {seq})", optional=True)


def vhost_user_usable(qemu_path: Optional[str] = None) -> Check:
    """vhost-user needs qemu's vhost-user-vsock-pci and memfd-shared guest memory."""
    name = "vhost_user_vsock_device"
    if not hasattr(os, "memfd_create"):
        return Check(name, False, "os.memfd_create unavailable (guest memory cannot be shared)")
    qemu_path = qemu_path or find_qemu()
    if not qemu_path:
        return Check(name, False, "qemu not found", "apt-get install qemu-system-x86")
    has = qemu_has_device(qemu_path, "vhost-user-vsock-pci")
    if has is False:
        return Check(name, False, f"{qemu_path} has no vhost-user-vsock-pci device",
                     "install qemu >= 5.1 built with vhost-user")
    if has is None:
        return Check(name, True, f"{qemu_path} did not list its devices within "
                     f"{QEMU_PROBE_TIMEOUT:g}s; assuming vhost-user-vsock-pci; memfd available")
    return Check(name, True, "qemu has vhost-user-vsock-pci; memfd available")


def resolve_transport(requested: str, qemu_path: Optional[str] = None) -> tuple[str, Optional[str]]:
    """("vhost"|"vhost-user", notice or None). An explicit choice that cannot work raises.

    qemu's device list is only checked when `qemu_path` is given."""
    if requested not in ("auto",) + TRANSPORTS:
        raise ValueError(f"unknown transport {requested!r}: use auto, vhost or vhost-user")
    if requested in ("auto", "vhost"):
        vh = vhost_vsock_usable()
        if vh.ok and qemu_path and qemu_has_device(qemu_path, "vhost-vsock-pci") is False:
            vh = Check(vh.name, False, f"{qemu_path} has no vhost-vsock-pci device")
        if vh.ok:
            return "vhost", None
        if requested == "vhost":
            raise TransportUnavailable(
                f"transport 'vhost' unavailable: {vh.detail}"
                + (f"; hint: {vh.hint}" if vh.hint else "")
                + "; or use --vmlab-transport vhost-user / transport: vhost-user")
        notice = f"vhost transport not usable ({vh.detail}); using vhost-user"
    else:
        notice = None
    vu = vhost_user_usable(qemu_path) if qemu_path else Check("vhost_user_vsock_device", True, "")
    if not vu.ok:
        raise TransportUnavailable(f"transport 'vhost-user' unavailable: {vu.detail}"
                                   + (f"; hint: {vu.hint}" if vu.hint else ""))
    return "vhost-user", notice


# --- the rest of the host ------------------------------------------------------


def _elf_is_static(path: str) -> Optional[bool]:
    """True when the ELF file has no PT_INTERP (no dynamic loader), None if not ELF."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
                return None
            end = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(end + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    types = [struct.unpack_from(end + "I", table, i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


def _tool_check(name: str, hint: str, optional: bool = False, why: str = "") -> Check:
    path = shutil.which(name)
    if path:
        return Check(name, True, path, optional=optional)
    return Check(name, False, f"{name} not found{why}", hint, optional=optional)


def check_busybox() -> Check:
    path = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else None)
    if not path:
        return Check("busybox-static", False, "busybox not found", "apt-get install busybox-static")
    if _elf_is_static(path) is False:
        return Check("busybox-static", False, f"{path} is dynamically linked (the guest has no libc)",
                     "apt-get install busybox-static")
    return Check("busybox-static", True, f"{path} (static)")


def check_gcc() -> Check:
    """The guest helper is compiled with `gcc -static`, which also needs libc.a."""
    c = _tool_check("gcc", "apt-get install gcc libc6-dev", why=" (builds the guest helper)")
    if not c.ok:
        return c
    try:
        libc = subprocess.run([c.detail, "-print-file-name=libc.a"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        libc = ""
    if not os.path.isabs(libc):
        return Check("gcc", False, f"{c.detail} found but libc.a missing (static linking fails)",
                     "apt-get install libc6-dev")
    return c


def default_runtime_base() -> Path:
    """Where vmlab.runtime puts lab dirs (architecture.md): $XDG_RUNTIME_DIR or /tmp."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) if xdg and os.path.isdir(xdg) else Path(tempfile.gettempdir())


def check_runtime_dir(base: Optional[Path] = None) -> Check:
    base = base or default_runtime_base()
    if base.is_dir() and os.access(base, os.W_OK | os.X_OK):
        return Check("runtime_dir", True, f"{base} writable")
    return Check("runtime_dir", False, f"{base} is not a writable directory",
                 "set XDG_RUNTIME_DIR to a writable directory")


def has_cap_net_bind_service() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_NET_BIND_SERVICE))
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def check_privileges() -> Check:
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    if has_cap_net_bind_service():
        return Check("privileges", True, f"{who}, may bind host vsock ports < 1024", optional=True)
    return Check("privileges", False, f"{who} without CAP_NET_BIND_SERVICE: host vsock ports < 1024 "
                 "cannot be bound on the vhost transport", "use ports >= 1024 or run as root",
                 optional=True)


def check_cid_locks() -> Check:
    try:
        return Check("cid_locks", True, f"{default_lock_dir()} (host-wide CID leases)")
    except OSError as e:
        return Check("cid_locks", False, f"no usable CID lock dir: {e}", "set VMLAB_CID_LOCK_DIR")


def _image_check(image_status: Callable[[], dict]) -> tuple[Check, Optional[dict]]:
    """Turn vmlab.image.image_status()'s dict ("problems", "kernel_version", ...) into a Check."""
    try:
        status = dict(image_status())
    except Exception as e:  # someone else's module: report it, never crash `vmlab check`
        return Check("image", False, f"image status failed: {type(e).__name__}: {e}"), None
    problems = [" ".join(str(p).split()) for p in status.get("problems") or []]  # one line
    ok = bool(status.get("ok", not problems))
    if status.get("detail"):
        detail = str(status["detail"])
    elif problems:
        detail = "; ".join(problems)
    else:
        built = "cached" if status.get("up_to_date") else "not built yet (built on first use)"
        detail = f"kernel {status.get('kernel_version')} ({status.get('kernel_origin')}), initramfs {built}"
    hint = status.get("hint") or ("" if ok else "see docs/image.md; `vmlab image build` shows progress")
    return Check("image", ok, detail, hint), status


def check_host(image_status: Optional[Callable[[], dict]] = None,
               qemu_name: str = "qemu-system-x86_64") -> HostReport:
    """Run every check; `image_status` comes from vmlab.image (passed in, not imported)."""
    qemu = find_qemu(qemu_name)
    version = qemu_version(qemu) if qemu else None
    checks = [Check("qemu", bool(qemu), f"{qemu} (version {version})" if qemu else f"{qemu_name} not found",
                    "" if qemu else "apt-get install qemu-system-x86")]
    kvm = dataclasses.replace(kvm_usable(qemu), optional=True)
    vh = vhost_vsock_usable()
    if vh.ok and qemu and qemu_has_device(qemu, "vhost-vsock-pci") is False:
        vh = Check(vh.name, False, f"{qemu} has no vhost-vsock-pci device", optional=True)
    vu = vhost_user_usable(qemu)
    checks += [kvm, vh, vu, check_busybox(), check_gcc(),
               _tool_check("depmod", "apt-get install kmod", why=" (orders guest modules)"),
               _tool_check("cpio", "apt-get install cpio", why=" (builds the initramfs)"),
               _tool_check("socat", "apt-get install socat", optional=True),
               _tool_check("tshark", "apt-get install tshark (reads vsock pcaps)", optional=True),
               check_runtime_dir(), check_cid_locks(), check_privileges()]
    transports = [t for t, c in (("vhost", vh), ("vhost-user", vu)) if c.ok]
    if not transports:  # vhost-user is the fallback, so nothing works: make that a FAIL
        vu.optional = False
    image = None
    if image_status is not None:
        img, image = _image_check(image_status)
        checks.append(img)
    accel, accel_notice = ("kvm", None) if kvm.ok else ("tcg", f"KVM not usable: {kvm.detail}; falling back to TCG")
    transport = transports[0] if transports else None
    t_notice = (f"vhost transport not usable ({vh.detail}); using vhost-user"
                if transport == "vhost-user" else None)
    return HostReport(qemu, version, kvm, vh, vu, transports, accel, checks,
                      accel_notice, transport, t_notice, image)


def render_text(report: HostReport) -> str:
    """One line per check (OK/WARN/FAIL), hints indented below, then the verdict."""
    width = max(len(c.name) for c in report.checks)
    lines = []
    for c in report.checks:
        lines.append(f"{c.status:<4} {c.name:<{width}}  {c.detail}")
        if c.hint and not c.ok:
            lines.append(f"     {'':<{width}}  hint: {c.hint}")
    lines.append(f"accel: {report.accel}" + (f"  ({report.accel_notice})" if report.accel_notice else ""))
    lines.append(f"transports: {', '.join(report.transports) or 'none'}; auto -> {report.transport or 'none'}")
    lines.append("host ready" if report.ok else "host NOT ready")
    return "\n".join(lines) + "\n"


def to_json(report: HostReport) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=True)
