"""Built kernels in the cache: <cache>/kernels/builds/<key>/ with the kernel, its .config,
the build log and meta.json (name, version, source, commit, config hash, build time).

A build is found again by its cache key (source content + config inputs), by its name
(`build:<name>`) or by a key prefix.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmlab.image.cache import atomic_write, cache_root


class StoreError(RuntimeError):
    """No such build, or an ambiguous name."""


@dataclass
class BuildMeta:
    key: str
    name: str
    version: str
    kernel: str                   # path relative to the build dir: a bzImage or a package-like root
    source: str                   # source tree path
    source_kind: str              # git / package / tree / command
    source_identity: str
    commit: str | None = None
    dirty: bool = False
    package: str | None = None
    config_hash: str | None = None
    fragment: str | None = None   # user fragment path ("" for none)
    build_cmd: str | None = None  # None: vmlab's make
    seconds: float = 0.0
    jobs: int = 0
    built: float = field(default_factory=time.time)

    def describe(self) -> str:
        """One line naming the kernel exactly, for run reports and junit."""
        parts = [self.version, f"build:{self.name}"]
        if self.source_kind == "git" and self.commit:
            parts.append(f"commit {self.commit[:12]}{' +dirty' if self.dirty else ''}")
        elif self.package:
            parts.append(f"source {self.package}")
        else:
            parts.append(f"source {self.source}")
        if self.config_hash:
            parts.append(f"config {self.config_hash[:12]}")
        return " ".join(parts)


def builds_dir(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "kernels" / "builds"


@dataclass(frozen=True)
class StoredBuild:
    path: Path
    meta: BuildMeta
    reused: bool = False   # found in the cache rather than built just now

    @property
    def kernel(self) -> Path:
        return self.path / self.meta.kernel

    @property
    def log(self) -> Path:
        return self.path / "build.log"

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())


def load(path: Path) -> StoredBuild | None:
    try:
        meta = BuildMeta(**json.loads((path / "meta.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return StoredBuild(path, meta) if (path / meta.kernel).exists() else None


def save(path: Path, meta: BuildMeta) -> None:
    atomic_write(path / "meta.json", json.dumps(asdict(meta), indent=1).encode() + b"\n")


def all_builds(cache: Path | None = None) -> list[StoredBuild]:
    d = builds_dir(cache)
    found = [b for b in (load(p) for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith("."))
             if b is not None] if d.is_dir() else []
    return sorted(found, key=lambda b: b.meta.built)


def by_key(key: str, cache: Path | None = None) -> StoredBuild | None:
    return load(builds_dir(cache) / key)


def find(ref: str, cache: Path | None = None) -> StoredBuild:
    """A build by name (newest first) or by key prefix; StoreError lists what exists."""
    builds = all_builds(cache)
    named = [b for b in builds if b.meta.name == ref]
    if named:
        return named[-1]
    prefixed = [b for b in builds if b.meta.key.startswith(ref)] if len(ref) >= 4 else []
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise StoreError(f"build:{ref} is ambiguous: " + ", ".join(b.meta.name for b in prefixed))
    have = ", ".join(b.meta.name for b in builds) or "none (build one with `vmlab kernel build`)"
    raise StoreError(f"no kernel build named {ref!r} in {builds_dir(cache)}; builds: {have}")


def remove(build: StoredBuild) -> None:
    shutil.rmtree(build.path)
