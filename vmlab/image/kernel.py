"""Find the kernel to boot and the modules that belong to it.

Resolution order: explicit argument, $VMLAB_KERNEL, the distribution's kernel
package (downloaded with apt-get into the cache, never installed), the host's
running kernel from /boot.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cache import atomic_write, locked
from .modules import ModuleError, run_depmod


class ImageError(RuntimeError):
    """Something the image needs is missing; the message says what to do."""


class NeedsDownload(ImageError):
    """resolve_kernel(download=False) would have to fetch this package first."""

    def __init__(self, plan: "PackagePlan") -> None:
        super().__init__(f"would download {' '.join(plan.packages)} (not cached yet)")
        self.plan = plan


@dataclass(frozen=True)
class KernelSource:
    """A bootable kernel image plus its modules directory (None: assume all built in)."""

    vmlinuz: Path
    version: str
    modules_dir: Path | None
    origin: str  # "argument", "env", "package:<name>", "host"


def kernel_version(vmlinuz: Path) -> str:
    """Read the release string from an x86 bzImage header (like `file` does)."""
    with open(vmlinuz, "rb") as f:
        head = f.read(0x4000)
        if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
            raise ImageError(f"{vmlinuz} is not an x86 bzImage (no HdrS header)")
        ptr = int.from_bytes(head[0x20E:0x210], "little")
        if ptr == 0:
            raise ImageError(f"{vmlinuz} has no kernel_version string")
        f.seek(ptr + 0x200)
        raw = f.read(256)
    text = raw.split(b"\0", 1)[0].decode(errors="replace")
    if not text.strip():
        raise ImageError(f"{vmlinuz} has an empty kernel_version string")
    return text.split()[0]


def module_free(vmlinuz: Path) -> bool:
    """Whether the kernel's own .config (a `config` or `.config` file beside it, as a vmlab build
    and a build tree have) says it was built without module support."""
    for name in ("config", ".config"):
        cfg = vmlinuz.parent / name
        if cfg.is_file():
            try:
                text = cfg.read_text(errors="replace")
            except OSError:
                return False
            return "\nCONFIG_MODULES=y\n" not in "\n" + text
    return False


def _modules_for(vmlinuz: Path, version: str) -> Path | None:
    """Sibling package tree (<root>/boot/vmlinuz + <root>/lib/modules/<ver>) or the host's.

    None for a module-free kernel: a /lib/modules/<ver> of the same version (a nested lab's outer
    guest makes one for itself) belongs to another kernel."""
    if module_free(vmlinuz):
        return None
    candidates = []
    if vmlinuz.parent.name == "boot":
        root = vmlinuz.parent.parent
        candidates += [root / "lib/modules" / version, root / "usr/lib/modules" / version]
    candidates += [vmlinuz.parent / "lib/modules" / version,
                   Path("/lib/modules") / version, Path("/usr/lib/modules") / version]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _tree_root(modules_dir: Path) -> Path:
    """<root>/lib/modules/<ver> or <root>/usr/lib/modules/<ver> -> <root> (for depmod -b)."""
    root = modules_dir.parent.parent.parent
    return root.parent if root.name == "usr" else root


def _ensure_depmod(modules_dir: Path, version: str) -> None:
    if (modules_dir / "modules.dep").is_file():
        return
    root = _tree_root(modules_dir)
    if not os.access(modules_dir, os.W_OK):
        raise ImageError(f"{modules_dir}/modules.dep is missing and the directory is read-only; "
                         f"run: depmod -b {root} {version}")
    try:
        run_depmod(root, version)
    except ModuleError as e:
        raise ImageError(str(e)) from e


def from_path(path: Path, origin: str) -> KernelSource:
    """A kernel given as a vmlinuz file or as an unpacked package root."""
    path = path.expanduser()
    if path.is_dir():
        found = sorted(path.glob("boot/vmlinuz-*")) or sorted(path.glob("vmlinuz*"))
        if not found:
            raise ImageError(f"{path} contains no boot/vmlinuz-* kernel")
        path = found[-1]
    if not path.is_file():
        raise ImageError(f"kernel {path} does not exist ({origin})")
    if not os.access(path, os.R_OK):
        raise ImageError(f"kernel {path} is not readable (try: sudo chmod a+r {path})")
    version = kernel_version(path)
    mods = _modules_for(path, version)
    if mods is not None:
        _ensure_depmod(mods, version)
    return KernelSource(path, version, mods, origin)


# ---------------------------------------------------------------- distro packages

def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "LC_ALL": "C"})


def _dpkg_arch() -> str:
    if shutil.which("dpkg"):
        r = _run(["dpkg", "--print-architecture"])
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _depends(pkg: str) -> list[str]:
    r = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", pkg])
    if r.returncode != 0:
        return []
    return [l.split(":", 1)[1].strip().strip("<>") for l in r.stdout.splitlines()
            if l.strip().lstrip("|").startswith("Depends:")]


_IMAGE_RE = re.compile(r"^linux-image-(?:unsigned-)?(\d+\.\d+\S*)$")


@dataclass(frozen=True)
class PackagePlan:
    """Which .debs hold the kernel (and, on Ubuntu, the separate modules package)."""

    meta: str
    image_pkg: str
    packages: tuple[str, ...]


_APT_STAMP_PATHS = ("/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin", "/etc/apt/sources.list.d")


def _apt_stamp() -> str:
    parts = []
    for p in _APT_STAMP_PATHS:
        try:
            parts.append(str(os.stat(p).st_mtime_ns))
        except OSError:
            parts.append("-")
    return ":".join(parts)


def package_plan(cache: Path | None = None) -> PackagePlan | None:
    """Which versioned kernel package the distro ships (asks apt-cache; no download).

    apt-cache takes ~0.5 s per call, so the answer is remembered in the cache until
    the apt lists change.
    """
    if not shutil.which("apt-cache") or not shutil.which("apt-get"):
        return None
    memo = cache / "kernels" / "apt-plan.json" if cache is not None else None
    stamp = _apt_stamp()
    if memo is not None and memo.is_file():
        try:
            d = json.loads(memo.read_text())
            if d.get("stamp") == stamp:
                p = d.get("plan")
                return PackagePlan(p["meta"], p["image_pkg"], tuple(p["packages"])) if p else None
        except (ValueError, KeyError, TypeError):
            pass
    plan = _ask_apt()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, json.dumps({"stamp": stamp, "plan": plan and {
            "meta": plan.meta, "image_pkg": plan.image_pkg,
            "packages": list(plan.packages)}}).encode())
    return plan


def _ask_apt() -> PackagePlan | None:
    arch = _dpkg_arch()
    for meta in (f"linux-image-{arch}", "linux-image-virtual", "linux-image-generic"):
        queue, seen = [meta], set()
        while queue:
            pkg = queue.pop(0)
            if pkg in seen:
                continue
            seen.add(pkg)
            deps = _depends(pkg)
            for d in deps:
                m = _IMAGE_RE.match(d)
                if m and not d.endswith(("-dbg", "-dbgsym")):
                    ver = m.group(1)
                    pkgs = [d]
                    mods = f"linux-modules-{ver}"
                    if _run(["apt-cache", "show", mods]).returncode == 0:
                        pkgs.append(mods)  # Ubuntu: modules live in their own package
                    return PackagePlan(meta, d, tuple(pkgs))
                if d.startswith("linux-image-") and len(seen) < 6:
                    queue.append(d)  # Ubuntu: linux-image-virtual -> linux-image-<ver>-generic
    return None


def package_dir(cache: Path, plan: PackagePlan) -> Path:
    return cache / "kernels" / plan.image_pkg


def fetch_package(cache: Path, plan: PackagePlan,
                  step: Callable[[str], None] = lambda s: None) -> Path:
    """apt-get download + dpkg-deb -x into the cache (atomically); returns the unpacked root."""
    dest = package_dir(cache, plan)
    if (dest / ".complete").exists():
        return dest
    with locked(cache, f"kernel-{plan.image_pkg}"):
        if (dest / ".complete").exists():
            return dest
        return _fetch_unlocked(dest, plan, step)


def _fetch_unlocked(dest: Path, plan: PackagePlan, step: Callable[[str], None]) -> Path:
    for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if not shutil.which(tool):
            raise ImageError(f"{tool} not found (apt-get install {pkg})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmpd = Path(tmp)
        debs = tmpd / "debs"
        root = tmpd / "root"
        debs.mkdir()
        for pkg in plan.packages:
            step(f"downloading {pkg}")
            r = _run(["apt-get", "download", pkg], cwd=debs)
            if r.returncode != 0:
                raise ImageError(f"apt-get download {pkg} failed: {r.stderr.strip()[-400:]}\n"
                                 "(no network or stale lists? try: apt-get update; or pass a kernel "
                                 "with --kernel / VMLAB_KERNEL)")
        for deb in sorted(debs.glob("*.deb")):
            step(f"unpacking {deb.name}")
            r = _run(["dpkg-deb", "-x", str(deb), str(root)])
            if r.returncode != 0:
                raise ImageError(f"dpkg-deb -x {deb.name} failed: {r.stderr.strip()}")
        kernels = sorted(root.glob("boot/vmlinuz-*"))
        if not kernels:
            raise ImageError(f"{plan.image_pkg} contains no /boot/vmlinuz-*")
        for k in kernels:
            k.chmod(0o644)  # Ubuntu ships vmlinuz 0600
        version = kernel_version(kernels[-1])
        mods = _modules_for(kernels[-1], version)
        if mods is not None and not (mods / "modules.dep").is_file():
            step("running depmod")
            try:
                run_depmod(_tree_root(mods), version)
            except ModuleError as e:
                raise ImageError(str(e)) from e
        (root / ".complete").write_text(" ".join(plan.packages) + "\n")
        if dest.exists():  # a stale, incomplete unpack from a killed run
            shutil.rmtree(dest)
        os.rename(root, dest)
    return dest


def cached_packages(cache: Path) -> list[Path]:
    """Previously unpacked kernel packages (fallback when apt cannot download)."""
    d = cache / "kernels"
    return sorted((p for p in d.glob("linux-image-*") if (p / ".complete").exists()),
                  key=lambda p: p.stat().st_mtime) if d.is_dir() else []


def host_kernel() -> Path:
    return Path("/boot") / f"vmlinuz-{platform.release()}"


# ---------------------------------------------------------------- resolution

def resolve_kernel(kernel: str | Path | None, cache: Path, download: bool = True,
                   step: Callable[[str], None] = lambda s: None) -> KernelSource:
    """Pick the kernel as documented above. ``download=False`` never touches the network
    (used by image_status); it raises NeedsDownload if a download would be needed."""
    if kernel is not None and str(kernel) != "":
        return from_path(Path(kernel), "argument")
    env = os.environ.get("VMLAB_KERNEL")
    if env:
        return from_path(Path(env), "env VMLAB_KERNEL")
    problems: list[str] = []
    plan = package_plan(cache)
    if plan is not None:
        dest = package_dir(cache, plan)
        if (dest / ".complete").exists():
            return from_path(dest, f"package:{plan.image_pkg}")
        if download:
            try:
                return from_path(fetch_package(cache, plan, step), f"package:{plan.image_pkg}")
            except ImageError as e:
                problems.append(str(e))
        else:
            raise NeedsDownload(plan)
        older = cached_packages(cache)
        if older:
            return from_path(older[-1], f"package:{older[-1].name} (cached)")
    else:
        problems.append("no distribution kernel package found via apt-cache "
                        "(not Debian/Ubuntu, or run: apt-get update)")
    host = host_kernel()
    if host.is_file() and os.access(host, os.R_OK):
        return from_path(host, "host")
    problems.append(f"host kernel {host} is missing or unreadable")
    raise ImageError("no kernel found:\n  - " + "\n  - ".join(problems) +
                     "\nPass one explicitly: ensure_image(kernel=PATH) / VMLAB_KERNEL=/path/to/vmlinuz")
