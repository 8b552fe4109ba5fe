"""Which Linux source tree to build, and what identifies its content (for the build cache).

- A git checkout is identified by its HEAD commit plus a hash of `git diff HEAD` and of the
  untracked (not ignored) files, so a patch under test gets its own build.
- The distribution's source (`linux-source-X.Y`, fetched with apt-get download and unpacked
  into the cache, never installed) is identified by its package version.
- Any other tree by a hash over every file's path, size and mtime (cheap; a touched file counts
  as a change, which only costs a rebuild).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmlab.image.cache import locked

MARKER = ".vmlab-source"
"""File written into a source tree vmlab unpacked: `<package> <version>`."""


class SourceError(RuntimeError):
    """The source tree is missing or not a Linux tree; the message says what to do."""


@dataclass(frozen=True)
class SourceTree:
    path: Path
    kind: str            # "git", "package", "tree"
    identity: str        # content identity (commit+diff hash, package version, tree hash)
    commit: str | None = None
    dirty: bool = False
    package: str | None = None   # "linux-source-6.1 6.1.192-3"

    def describe(self) -> str:
        if self.kind == "git":
            return f"git {self.commit[:12] if self.commit else '?'}{' +dirty' if self.dirty else ''}"
        if self.kind == "package":
            return f"package {self.package}"
        return f"tree {self.identity[:12]}"


def _git(src: Path, *args: str, binary: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(src), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=not binary)


def check_linux_tree(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise SourceError(f"kernel source {path} is not a directory")
    missing = [f for f in ("Makefile", "Kconfig", "arch/x86/Kconfig") if not (path / f).exists()]
    if missing:
        raise SourceError(f"{path} is not a Linux source tree (missing {', '.join(missing)})")
    return path


def identify(path: Path, linux: bool = True) -> SourceTree:
    """Identity of the tree at ``path`` (see the module docstring). ``linux=False`` accepts any
    directory (a user's own build command decides what it builds)."""
    if linux:
        path = check_linux_tree(path)
    else:
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise SourceError(f"source {path} is not a directory")
    marker = path / MARKER
    if marker.is_file():
        package = marker.read_text().strip()
        return SourceTree(path, "package", "package:" + package, package=package)
    if shutil.which("git"):
        top = _git(path, "rev-parse", "--show-toplevel")
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == path:
            return _git_identity(path)
    return SourceTree(path, "tree", "tree:" + tree_hash(path))


def _git_identity(path: Path) -> SourceTree:
    head = _git(path, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise SourceError(f"{path}: git rev-parse HEAD failed: {head.stderr.strip()}")
    commit = head.stdout.strip()
    h = hashlib.sha256()
    diff = _git(path, "diff", "HEAD", "--binary", binary=True)
    h.update(diff.stdout)
    untracked = _git(path, "ls-files", "--others", "--exclude-standard", "-z", binary=True)
    for name in sorted(n for n in untracked.stdout.split(b"\0") if n):
        h.update(name + b"\0")
        try:
            h.update(hashlib.sha256((path / name.decode(errors="surrogateescape")).read_bytes()).digest())
        except OSError:
            pass
    dirty = bool(diff.stdout) or bool(untracked.stdout)
    ident = f"git:{commit}" + (f"+{h.hexdigest()[:16]}" if dirty else "")
    return SourceTree(path, "git", ident, commit=commit, dirty=dirty)


def tree_hash(path: Path) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file, in sorted order."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------ distribution source

def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "LC_ALL": "C"})


def distro_source_package() -> tuple[str, str]:
    """(package, version) of the distribution's kernel source, e.g. ('linux-source-6.1', '6.1.192-3')."""
    if not shutil.which("apt-cache"):
        raise SourceError("no SRC given and apt-cache is missing: pass a Linux source tree")
    r = _run(["apt-cache", "depends", "linux-source"])
    names = [l.split(":", 1)[1].strip() for l in r.stdout.splitlines() if l.strip().startswith("Depends:")]
    names = [n for n in names if n.startswith("linux-source-")]
    if not names:
        raise SourceError("apt knows no linux-source package (run: apt-get update), or pass a source tree")
    pkg = names[0]
    r = _run(["apt-cache", "policy", pkg])
    version = ""
    for line in r.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
    if not version or version == "(none)":
        raise SourceError(f"apt has no candidate version of {pkg} (run: apt-get update)")
    return pkg, version


def _installed_tarball(pkg: str, version: str) -> Path | None:
    """/usr/src/<pkg>.tar.xz when that exact version of the package is installed."""
    r = _run(["dpkg-query", "-W", "-f=${Version}", pkg]) if shutil.which("dpkg-query") else None
    tar = Path("/usr/src") / f"{pkg}.tar.xz"
    if r is not None and r.returncode == 0 and r.stdout.strip() == version and tar.is_file():
        return tar
    return None


def _extract(tar: Path, dest: Path) -> None:
    """tar(1) when present (several times faster than tarfile on 80 000 files), else tarfile."""
    if shutil.which("tar"):
        r = _run(["tar", "-xf", str(tar), "-C", str(dest)])
        if r.returncode != 0:
            raise SourceError(f"tar -xf {tar} failed: {r.stderr.strip()[-400:]}")
        return
    with tarfile.open(tar) as tf:
        tf.extractall(dest, filter="tar")


def unpacked_distro_source(cache: Path) -> Path | None:
    """The distribution's source if it is already unpacked in the cache (never downloads)."""
    try:
        pkg, version = distro_source_package()
    except SourceError:
        return None
    dest = cache / "kernels" / "src" / f"{pkg}_{version}"
    return dest if (dest / MARKER).is_file() else None


def distro_source(cache: Path, step: Callable[[str], None] = lambda s: None) -> Path:
    """The distribution's kernel source unpacked under <cache>/kernels/src/<pkg>_<version>."""
    pkg, version = distro_source_package()
    dest = cache / "kernels" / "src" / f"{pkg}_{version}"
    if (dest / MARKER).is_file():
        return dest
    with locked(cache, f"source-{pkg}_{version}"):
        if (dest / MARKER).is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as tmp:
            tmpd = Path(tmp)
            tar = _installed_tarball(pkg, version)
            if tar is None:
                step(f"downloading {pkg} {version}")
                r = _run(["apt-get", "download", f"{pkg}={version}"], cwd=tmpd)
                if r.returncode != 0:
                    raise SourceError(f"apt-get download {pkg}={version} failed: {r.stderr.strip()[-400:]}"
                                      " (no network or stale lists? try: apt-get update)")
                debs = list(tmpd.glob("*.deb"))
                if not debs:
                    raise SourceError(f"apt-get download {pkg}={version} left no .deb in {tmpd}")
                step(f"unpacking {debs[0].name}")
                r = _run(["dpkg-deb", "-x", str(debs[0]), str(tmpd / "deb")])
                if r.returncode != 0:
                    raise SourceError(f"dpkg-deb -x {debs[0].name} failed: {r.stderr.strip()}")
                found = sorted((tmpd / "deb/usr/src").glob("linux-source-*.tar.*"))
                if not found:
                    raise SourceError(f"{pkg} contains no /usr/src/linux-source-*.tar.*")
                tar = found[0]
            step(f"extracting {tar.name} (1.5 GB)")
            (tmpd / "tree").mkdir()
            _extract(tar, tmpd / "tree")
            tops = [p for p in (tmpd / "tree").iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise SourceError(f"{tar.name}: expected one top-level directory, found {len(tops)}")
            check_linux_tree(tops[0])
            (tops[0] / MARKER).write_text(f"{pkg} {version}\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tops[0], dest)
    return dest
