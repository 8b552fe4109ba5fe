"""Kernel references: what a scenario's `kernel:` and `vmlab run --kernel` accept.

- a path (vmlinuz/bzImage file or an unpacked package root),
- `build:<name>`: a kernel in the build store (`vmlab kernel ls`),
- `source:<dir>` or `{source: <dir>, config: <fragment>}`: a Linux tree, built on demand
  (and cached like `vmlab kernel build`),
- `package:<name>` or `{package: linux-image-6.1.0-57-amd64}`: that distribution kernel package,
  downloaded with apt-get into the cache (never installed),
- `minimal`: vmlab's minimal kernel from the distribution's source (what a bare
  `vmlab kernel build` makes; built on demand, then reused from the cache). A file called
  `minimal` is `./minimal`. `minimal:VARIANT` adds a fragment vmlab ships
  (vmlab/kernel/fragments/VARIANT.config, e.g. `vhost-host`), `minimal:FILE` one of yours.

Every resolved kernel has a description naming it exactly (version, source commit or package,
config hash), used by the run report and the JUnit XML.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

KINDS = ("path", "build", "source", "package")
MINIMAL = "minimal"


class KernelRefError(ValueError):
    """A kernel reference that does not parse; the message says which forms exist."""


@dataclass(frozen=True)
class KernelRef:
    kind: str
    value: str
    config: str | None = None   # fragment for kind == "source" or "minimal"

    def __str__(self) -> str:
        if self.kind == MINIMAL:
            if self.config is None:
                return MINIMAL
            p = Path(self.config)
            return f"{MINIMAL}:{p.stem if p.parent == FRAGMENTS_DIR else self.config}"
        text = self.value if self.kind == "path" else f"{self.kind}:{self.value}"
        return text + (f" (config {self.config})" if self.config else "")


FRAGMENTS_DIR = Path(__file__).resolve().parent / "fragments"


def minimal_fragment(variant: str, base: Path | None = None) -> str:
    """`minimal:NAME` -> vmlab's fragments/NAME.config; anything else is a fragment file path."""
    shipped = FRAGMENTS_DIR / f"{variant}.config"
    if "/" not in variant and shipped.is_file():
        return str(shipped)
    if "/" not in variant and not variant.endswith(".config"):
        names = ", ".join(sorted(p.stem for p in FRAGMENTS_DIR.glob("*.config")))
        raise KernelRefError(f"kernel: minimal:{variant}: no such variant (vmlab ships: {names}; "
                             "or give a fragment file path)")
    return _rel(variant, base)


def _rel(value: str, base: Path | None) -> str:
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() or base is None else (base / p))


def parse_ref(value: Any, base: Path | None = None) -> KernelRef:
    """A string or a one-key mapping -> KernelRef; relative paths are taken from ``base``."""
    if isinstance(value, KernelRef):
        return value
    if isinstance(value, Path):
        return KernelRef("path", str(value))
    if isinstance(value, str):
        if not value.strip():
            raise KernelRefError("kernel: empty value")
        if value == MINIMAL:
            return KernelRef(MINIMAL, MINIMAL)
        if value.startswith(MINIMAL + ":"):
            variant = value[len(MINIMAL) + 1:]
            if not variant:
                raise KernelRefError("kernel: 'minimal:' names no variant or fragment")
            return KernelRef(MINIMAL, MINIMAL, minimal_fragment(variant, base))
        kind, sep, rest = value.partition(":")
        if sep and kind in ("build", "source", "package", "path"):
            if not rest:
                raise KernelRefError(f"kernel: {value!r} names no {kind}")
            return KernelRef(kind, _rel(rest, base) if kind in ("source", "path") else rest)
        return KernelRef("path", _rel(value, base))
    if isinstance(value, Mapping):
        keys = [k for k in value if k in KINDS]
        extra = [k for k in value if k not in KINDS and k != "config"]
        if len(keys) != 1 or extra:
            raise KernelRefError("kernel: a mapping needs exactly one of source, package, build, path "
                                 f"(plus config for source); got {', '.join(map(str, value)) or 'nothing'}")
        kind = keys[0]
        raw = value[kind]
        if not isinstance(raw, str) or not raw:
            raise KernelRefError(f"kernel: {kind} must be a non-empty string")
        config = value.get("config")
        if config is not None and kind != "source":
            raise KernelRefError("kernel: config is only for source (a tree vmlab builds)")
        if config is not None and not isinstance(config, str):
            raise KernelRefError("kernel: config must be a path to a config fragment")
        return KernelRef(kind, _rel(raw, base) if kind in ("source", "path") else raw,
                         _rel(config, base) if config else None)
    raise KernelRefError(f"kernel: expected a path, build:<name>, source:<dir>, package:<name> or a "
                         f"mapping, not {type(value).__name__}")


@dataclass(frozen=True)
class ResolvedKernel:
    path: Path          # what vmlab.image.ensure_image(kernel=...) takes
    description: str


def resolve(ref: KernelRef | str, progress: bool = False) -> ResolvedKernel:
    """Find (building or downloading on demand) the kernel a reference names."""
    from vmlab.image.cache import cache_root
    from vmlab.image.kernel import PackagePlan, fetch_package

    from . import store
    from .build import BuildRequest, build_kernel

    ref = parse_ref(ref)
    if ref.kind == MINIMAL:
        b = build_kernel(BuildRequest(fragment=Path(ref.config) if ref.config else None), progress=progress)
        return ResolvedKernel(b.kernel, b.meta.describe())
    if ref.kind == "build":
        b = store.find(ref.value)
        return ResolvedKernel(b.kernel, b.meta.describe())
    if ref.kind == "source":
        b = build_kernel(BuildRequest(src=Path(ref.value), fragment=Path(ref.config) if ref.config else None),
                         progress=progress)
        return ResolvedKernel(b.kernel, b.meta.describe())
    if ref.kind == "package":
        root = fetch_package(cache_root(), PackagePlan(ref.value, ref.value, (ref.value,)))
        return ResolvedKernel(root, describe_path(root, f"package {ref.value}"))
    return ResolvedKernel(Path(ref.value), describe_path(Path(ref.value)))


def describe_path(path: Path, origin: str | None = None) -> str:
    """`<version> <origin or file> sha256 <12 hex>` for a kernel that is not a vmlab build."""
    from vmlab.image.kernel import from_path

    from . import store

    path = Path(path)
    for parent in (path.parent, path.parent.parent):
        b = store.load(parent)
        if b is not None and b.kernel.resolve() == path.resolve():
            return b.meta.describe()
    try:
        ksrc = from_path(path, "describe")
    except Exception as exc:  # noqa: BLE001 - a description must not fail the run
        return f"{path} ({exc})"
    if origin is None:  # a distribution package unpacked in the cache names itself
        pkg = next((p for p in ksrc.vmlinuz.parents if p.name.startswith("linux-image-")
                    and (p / ".complete").exists()), None)
        origin = f"package {pkg.name}" if pkg is not None else str(ksrc.vmlinuz)
    st = ksrc.vmlinuz.stat()
    return f"{ksrc.version} {origin} sha256 {_digest(str(ksrc.vmlinuz), st.st_mtime_ns, st.st_size)}"


@functools.lru_cache(maxsize=32)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """sha256 prefix of a kernel file, once per (path, mtime, size) in a process."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
