"""Kernel module selection: modules.dep parsing, dependency order, decompression.

The guest's busybox ``insmod`` loads plain ``.ko`` files only, so compressed
modules are unpacked here on the host and the guest gets an ordered list.
"""
from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

# Module groups the guest /init loads. "core" and "power" always, "share" with vmlab.share=1,
# "share" + "hostroot" with vmlab.rootfs=host (the host's / over 9p, overlays on it).
# "power" (ACPI button + evdev) lets busybox acpid turn QMP system_powerdown into a poweroff.
REQUIRED_GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("virtio_pci", "vsock", "vmw_vsock_virtio_transport"),
    "power": ("button", "evdev"),
    "share": ("9p", "9pnet_virtio"),
    "hostroot": ("overlay",),
}
# Groups whose modules may be missing (e.g. Ubuntu keeps 9p in linux-modules-extra):
# the image still builds, only that feature is unavailable in the guest.
OPTIONAL_GROUPS: frozenset[str] = frozenset({"share", "power", "hostroot"})
# Shipped in the image but only loaded on request (vmlab.modules=a,b or modprobe).
OPTIONAL_MODULES: tuple[str, ...] = (
    "virtio_console", "vsock_loopback", "vsock_diag", "vsockmon", "virtio_net", "virtio_blk",
    "vhost_vsock",
)


class ModuleError(RuntimeError):
    """A required module is neither a loadable module nor built into the kernel."""


def module_name(path: str) -> str:
    """'kernel/net/vmw_vsock/vsock.ko.xz' -> 'vsock' (dashes normalized to underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suf in _KO_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse modules.dep text: {module path: [dependency paths]} (deps as listed)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def parse_builtin(text: str) -> set[str]:
    """Names of modules compiled into the kernel (modules.builtin)."""
    return {module_name(l.strip()) for l in text.splitlines() if l.strip()}


@dataclass
class ModuleIndex:
    """modules.dep + modules.builtin of one kernel, looked up by module name."""

    deps: dict[str, list[str]]
    builtin: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_name: dict[str, str] = {module_name(p): p for p in self.deps}

    @classmethod
    def load(cls, modules_dir: Path) -> "ModuleIndex":
        dep = modules_dir / "modules.dep"
        if not dep.is_file():
            raise ModuleError(f"{dep} is missing; run: depmod -b <root> <version>")
        builtin_file = modules_dir / "modules.builtin"
        builtin = parse_builtin(builtin_file.read_text()) if builtin_file.is_file() else set()
        return cls(parse_modules_dep(dep.read_text()), builtin)

    def path_of(self, name: str) -> str | None:
        return self.by_name.get(name.replace("-", "_"))

    def load_order(self, names: Iterable[str], optional: bool = False,
                   skip: Iterable[str] = ()) -> list[str]:
        """Module paths for ``names`` and their dependencies, dependencies first.

        Builtin modules need no loading and are left out; ``skip`` holds paths already
        loaded by an earlier group. Missing required modules raise ModuleError.
        """
        done: set[str] = set(skip)
        order: list[str] = []

        def visit(path: str, stack: tuple[str, ...]) -> None:
            if path in done:
                return
            if path in stack:
                raise ModuleError(f"dependency cycle: {' -> '.join(stack + (path,))}")
            for dep in self.deps.get(path, []):
                visit(dep, stack + (path,))
            done.add(path)
            order.append(path)

        for name in names:
            path = self.path_of(name)
            if path is None:
                if name.replace("-", "_") in self.builtin or optional:
                    continue
                raise ModuleError(
                    f"kernel module {name!r} is neither in modules.dep nor built in; "
                    "this kernel lacks virtio/vsock support (CONFIG_VIRTIO_PCI, CONFIG_VSOCKETS, "
                    "CONFIG_VIRTIO_VSOCKETS)")
            visit(path, ())
        return order


@dataclass(frozen=True)
class ModulePlan:
    """What goes into the image: per-group load lists and every file to ship."""

    groups: dict[str, list[str]]  # group -> ordered module paths (relative to modules dir)
    files: list[str]  # every module path shipped (groups + optional + their deps)
    missing: list[str] = field(default_factory=list)  # modules of optional groups not found


def plan_modules(index: ModuleIndex,
                 groups: Mapping[str, Iterable[str]] = REQUIRED_GROUPS,
                 optional: Iterable[str] = OPTIONAL_MODULES) -> ModulePlan:
    """Order each group after the ones before it, so no module is inserted twice."""
    loaded: list[str] = []
    out: dict[str, list[str]] = {}
    missing: list[str] = []
    for group, names in groups.items():
        soft = group in OPTIONAL_GROUPS
        if soft:
            names = list(names)
            missing += [n for n in names
                        if index.path_of(n) is None and n.replace("-", "_") not in index.builtin]
        order = index.load_order(names, optional=soft, skip=loaded)
        out[group] = order
        loaded += order
    extra = index.load_order(optional, optional=True, skip=loaded)
    return ModulePlan(out, loaded + extra, missing)


def dep_text(index: ModuleIndex, files: Iterable[str]) -> str:
    """A modules.dep for the shipped subset, with plain .ko names (for guest modprobe)."""
    keep = set(files)
    lines = []
    for path in sorted(keep):
        deps = [plain_name(d) for d in index.deps.get(path, []) if d in keep]
        lines.append(f"{plain_name(path)}: {' '.join(deps)}".rstrip())
    return "\n".join(lines) + "\n"


def plain_name(path: str) -> str:
    """Path of the decompressed module inside the image ('x.ko.zst' -> 'x.ko')."""
    for suf in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suf):
            return path[: -len(suf)]
    return path


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: .ko, .ko.xz (lzma), .ko.gz, .ko.zst (zstd tool)."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        import gzip
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ModuleError(f"{path} is zstd-compressed; install zstd (apt-get install zstd)")
        return subprocess.run([zstd, "-d", "-c", "-q", str(path)], check=True,
                              stdout=subprocess.PIPE).stdout
    raise ModuleError(f"unknown module format: {path}")


def run_depmod(root: Path, version: str) -> None:
    """Create modules.dep for an unpacked kernel tree (the Debian .deb ships none)."""
    depmod = shutil.which("depmod") or next(
        (p for p in ("/sbin/depmod", "/usr/sbin/depmod") if os.path.exists(p)), None)
    if depmod is None:
        raise ModuleError("depmod not found; install kmod (apt-get install kmod)")
    res = subprocess.run([depmod, "-b", str(root), version], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        raise ModuleError(f"depmod -b {root} {version} failed: {res.stdout.strip()}")
