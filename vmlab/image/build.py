"""Build (or find in the cache) the guest initramfs for a kernel.

The base archive (busybox, /init, modules, vmlab-guest) is keyed by a hash of
every input and rebuilt only when one changes. User files go into a second
archive appended after the base; the kernel unpacks concatenated archives.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .busybox import applets, find_busybox
from .cache import atomic_write, cache_root, file_sha256, locked
from .cpio import Entry, with_parents, write_cpio
from .helper import build_guest_helper, helper_key, images_dir
from .kernel import ImageError, KernelSource, NeedsDownload, resolve_kernel
from .modules import (ModuleError, ModuleIndex, ModulePlan, dep_text, plain_name,
                      plan_modules, read_module)
from .progress import Reporter

# Bump when the archive layout changes so old cache entries are not reused. The
# builder's own source is hashed into the key as well, so a forgotten bump is harmless.
BUILDER_VERSION = "1"
_BUILDER_SOURCES = ("build.py", "cpio.py", "modules.py", "busybox.py")
HELPER_GUEST_PATH = "/bin/vmlab-guest"


@dataclass(frozen=True)
class GuestImage:
    """What QEMU needs: -kernel KERNEL -initrd INITRD."""

    kernel: Path
    initrd: Path
    kernel_version: str
    helper: str = HELPER_GUEST_PATH
    modules_dir: Path | None = None  # the kernel's full module tree on the host (rootfs: host guests use it)


@dataclass(frozen=True)
class _Inputs:
    """Everything the base archive is made of, resolved but not yet read in full."""

    ksrc: KernelSource
    index: ModuleIndex | None
    plan: ModulePlan
    init: Path
    busybox: Path
    key: str


def _init_script() -> Path:
    p = images_dir() / "init"
    if not p.is_file():
        raise ImageError(f"guest init script {p} is missing (broken checkout?)")
    return p


def _collect(ksrc: KernelSource) -> _Inputs:
    index = None
    plan = ModulePlan({"core": [], "share": []}, [])
    if ksrc.modules_dir is not None:
        try:
            index = ModuleIndex.load(ksrc.modules_dir)
            plan = plan_modules(index)
        except ModuleError as e:
            raise ImageError(f"kernel {ksrc.vmlinuz} ({ksrc.version}): {e}") from e
    init = _init_script()
    busybox = find_busybox()
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in _BUILDER_SOURCES)).hexdigest()
    for part in (f"builder={BUILDER_VERSION}:{code}", f"version={ksrc.version}",
                 f"kernel={file_sha256(ksrc.vmlinuz)}", f"init={file_sha256(init)}",
                 f"busybox={file_sha256(busybox)}", f"helper={helper_key()}",
                 f"groups={json.dumps(plan.groups, sort_keys=True)}"):
        h.update(part.encode() + b"\n")
    for mod in plan.files:
        assert ksrc.modules_dir is not None
        h.update(f"mod={mod}={file_sha256(ksrc.modules_dir / mod)}\n".encode())
    return _Inputs(ksrc, index, plan, init, busybox, h.hexdigest())


# Directories every base image has; user archives never re-create (chmod) them.
BASE_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp",
             "run", "root", "mnt", "mnt/host", "lib", "lib/modules")


def _base_entries(inp: _Inputs, helper: Path) -> list[Entry]:
    ver = inp.ksrc.version
    mroot = f"lib/modules/{ver}"
    entries = [Entry.dir(d) for d in BASE_DIRS + (mroot,)]
    entries[entries.index(Entry.dir("tmp"))] = Entry.dir("tmp", 0o1777)
    entries += [Entry.chardev("dev/console", 5, 1), Entry.chardev("dev/null", 1, 3, 0o666),
                Entry.chardev("dev/ttyS0", 4, 64)]
    entries.append(Entry.file("init", inp.init.read_bytes(), 0o755))
    entries.append(Entry.file("bin/busybox", inp.busybox.read_bytes(), 0o755))
    for applet in applets(inp.busybox):
        if applet not in ("bin/busybox", "init", "linuxrc"):
            entries.append(Entry.symlink(applet, "/bin/busybox"))
    entries.append(Entry.file(HELPER_GUEST_PATH.lstrip("/"), helper.read_bytes(), 0o755))
    entries.append(Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(Entry.file("etc/group", b"root:x:0:\n"))
    if inp.index is not None and inp.ksrc.modules_dir is not None:
        for mod in inp.plan.files:
            data = read_module(inp.ksrc.modules_dir / mod)
            entries.append(Entry.file(f"{mroot}/{plain_name(mod)}", data))
        entries.append(Entry.file(f"{mroot}/modules.dep",
                                  dep_text(inp.index, inp.plan.files).encode()))
    for group, mods in inp.plan.groups.items():
        text = "".join(plain_name(m) + "\n" for m in mods)
        entries.append(Entry.file(f"{mroot}/vmlab.{group}", text.encode()))
    manifest = {"builder": BUILDER_VERSION, "key": inp.key, "kernel_version": ver,
                "kernel_origin": inp.ksrc.origin, "modules": inp.plan.groups}
    entries.append(Entry.file("etc/vmlab/image.json",
                              json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"))
    return with_parents(entries)


def gzip_bytes(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name, so the output is reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0, filename="") as f:
        f.write(data)
    out = buf.getvalue()
    return out + b"\0" * (-len(out) % 4)  # the next appended archive must start 4-aligned


def _base_path(root: Path, key: str) -> Path:
    return root / "images" / key[:24] / "initrd.img"


def _cached_base_problem(out: Path, key: str) -> str | None:
    """Why a cached base archive must not be used (None: it is intact). The manifest records
    the archive's sha256; an entry without one (older vmlab) is checked as gzip instead."""
    if not out.is_file():
        return "missing"
    try:
        manifest = json.loads(out.with_name("manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return "manifest is for another key"
    want = manifest.get("sha256")
    if want is None:
        try:
            gzip.decompress(out.read_bytes())
        except (OSError, EOFError, ValueError) as exc:
            return f"not a complete gzip archive ({exc})"
        return None
    if file_sha256(out) != want:
        return "sha256 does not match its manifest (truncated or modified)"
    return None


def _build_base(inp: _Inputs, root: Path, rep: Reporter, force: bool = False) -> Path:
    """Build under the key's lock; files are replaced by rename, never deleted first, so a
    QEMU about to open the previous initrd (force=True) still finds a complete file. A cached
    entry is used only if it is intact; a corrupt one is rebuilt."""
    out = _base_path(root, inp.key)
    with locked(root, f"image-{inp.key[:24]}"):
        if not force:
            problem = _cached_base_problem(out, inp.key)
            if problem is None:
                return out
            if problem != "missing":
                rep.note(f"cached image {out} is corrupt: {problem}; rebuilding", style="yellow")
        with rep.step("compiling vmlab-guest"):
            helper = build_guest_helper(root)
        with rep.step(f"building initramfs for {inp.ksrc.version}"):
            blob = gzip_bytes(write_cpio(_base_entries(inp, helper)))
            atomic_write(out, blob)
            atomic_write(out.with_name("manifest.json"), json.dumps({
                "key": inp.key, "kernel": str(inp.ksrc.vmlinuz), "kernel_version": inp.ksrc.version,
                "origin": inp.ksrc.origin, "modules": inp.plan.groups,
                "busybox": str(inp.busybox), "sha256": hashlib.sha256(blob).hexdigest()},
                indent=1).encode() + b"\n")
    return out


# ------------------------------------------------------------------ user files

def _walk(guest: str, host: Path) -> list[Entry]:
    """Entries for a host file or directory tree. Only regular files and directories: a FIFO
    or device would block or never end. A file that vanishes meanwhile is an ImageError."""
    host = Path(host)
    try:
        st = host.stat()
        if stat.S_ISDIR(st.st_mode):
            out = [Entry.dir(guest, stat.S_IMODE(st.st_mode))]
            for child in sorted(host.iterdir()):
                out += _walk(f"{guest.rstrip('/')}/{child.name}", child)
            return out
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"extra file {host} (for {guest}) is not a regular file or "
                             "directory")
        with open(host, "rb") as f:
            return [Entry.file(guest, f.read(), stat.S_IMODE(st.st_mode))]
    except FileNotFoundError:
        raise ImageError(f"extra file {host} (for {guest}) does not exist (any more)") from None
    except OSError as exc:
        raise ImageError(f"extra file {host} (for {guest}) cannot be read: "
                         f"{exc.strerror or exc}") from None


def extra_archive(extra_files: Mapping[str, Path | str]) -> tuple[str, bytes]:
    """(content key, uncompressed cpio) for guest path -> host path; modes are kept."""
    entries: list[Entry] = []
    for guest, host in sorted(extra_files.items()):
        if not str(guest).startswith("/"):
            raise ImageError(f"extra file guest path must be absolute: {guest!r}")
        entries += _walk(str(guest), Path(host))
    # Parent dirs the user did not list get 0755; base dirs (e.g. /tmp 1777) are left alone.
    blob = write_cpio(with_parents(entries, existing=BASE_DIRS))
    return hashlib.sha256(blob).hexdigest(), blob


def _with_extras(base: Path, key: str, extra_files: Mapping[str, Path | str], root: Path,
                 force: bool = False) -> Path:
    ekey, blob = extra_archive(extra_files)
    out = base.with_name(f"initrd-{ekey[:16]}.img")

    def intact() -> bool:           # exactly the current base followed by this archive
        try:
            size = out.stat().st_size
            if size != base.stat().st_size + len(blob):
                return False
            with open(out, "rb") as f:
                f.seek(size - len(blob))
                return f.read() == blob
        except OSError:
            return False
    if not force and intact():
        return out
    with locked(root, f"extra-{key[:16]}-{ekey[:16]}"):
        if force or not intact():
            atomic_write(out, base.read_bytes() + blob)
    return out


# ------------------------------------------------------------------ public API

def ensure_image(kernel: str | Path | None = None,
                 extra_files: Mapping[str, Path] | None = None,
                 progress: bool = False, force: bool = False) -> GuestImage:
    """Kernel + initramfs satisfying the guest contract, built once and cached.

    ``kernel``: a vmlinuz path (or unpacked package root); default is resolved as in
    docs/image.md. ``extra_files``: guest path -> host file/dir, appended as a second
    archive. ``force`` rebuilds the base image even if cached. Raises ImageError.
    """
    rep = Reporter(progress)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with rep.step("resolving kernel"):
        ksrc = resolve_kernel(kernel, root, download=True, step=rep.note)
    rep.note(f"kernel {ksrc.version} from {ksrc.origin}: {ksrc.vmlinuz}")
    inp = _collect(ksrc)
    if inp.plan.missing:
        rep.note(f"missing modules, no 9p share in the guest: {', '.join(inp.plan.missing)}",
                 style="yellow")
    base = _build_base(inp, root, rep, force)
    initrd = _with_extras(base, inp.key, extra_files, root, force) if extra_files else base
    return GuestImage(kernel=ksrc.vmlinuz, initrd=initrd, kernel_version=ksrc.version,
                      modules_dir=ksrc.modules_dir)


def image_status(kernel: str | Path | None = None) -> dict:
    """What ensure_image would use, without downloading or building (for `vmlab check`)."""
    root = cache_root()
    st: dict = {"cache_dir": str(root), "kernel": None, "kernel_version": None,
                "kernel_origin": None, "modules_dir": None, "initrd": None,
                "up_to_date": False, "busybox": None, "compiler": None, "modules": None,
                "problems": []}
    st["compiler"] = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not st["compiler"]:
        st["problems"].append("no C compiler for the guest helper (apt-get install gcc libc6-dev)")
    try:
        st["busybox"] = str(find_busybox())
    except ImageError as e:
        st["problems"].append(str(e))
    try:
        ksrc = resolve_kernel(kernel, root, download=False)
    except NeedsDownload as e:
        st.update(kernel_origin=f"package:{e.plan.image_pkg}", download=list(e.plan.packages),
                  detail=f"kernel package {e.plan.image_pkg} not downloaded yet "
                         "(fetched on first use, or now with `vmlab image build`)")
        return st
    except ImageError as e:
        st["problems"].append(str(e))
        return st
    st.update(kernel=str(ksrc.vmlinuz), kernel_version=ksrc.version, kernel_origin=ksrc.origin,
              modules_dir=str(ksrc.modules_dir) if ksrc.modules_dir else None)
    if ksrc.modules_dir is None:
        st["problems"].append(f"no modules directory for {ksrc.version}: virtio/vsock must be built in")
    if st["busybox"] is None:
        return st
    try:
        inp = _collect(ksrc)
    except ImageError as e:
        st["problems"].append(str(e))
        return st
    base = _base_path(root, inp.key)
    st.update(initrd=str(base), up_to_date=base.is_file(), modules=inp.plan.groups, key=inp.key)
    if inp.plan.missing:
        st["warnings"] = [f"optional modules not found (9p share or power button may not work): {', '.join(inp.plan.missing)}"]
    return st
