"""`vmlab kernel build`: a bootable, module-free guest kernel from a Linux source tree.

Recipe: `make O=<work> tinyconfig`, append vmlab's required options and the user's fragment,
`make olddefconfig`, check that every required option is =y, `make -jN bzImage`. The source
tree is never written to (out-of-tree build in <cache>/kernels/work/, one work dir per source
path, so the next build of the same tree - e.g. the next bisect step - is incremental).

The result lands in the store (vmlab.kernel.store) under a key made of the source identity
and the config inputs, so building the same tree + fragment again returns at once.
A pluggable build command (``build_cmd``, for bisecting with your own recipe or for tests)
runs in the source tree with $VMLAB_KERNEL_OUT set to a directory it must fill with a
`bzImage`/`vmlinuz*` file or a package-like root (boot/vmlinuz-*, lib/modules/<ver>/).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path


from vmlab.image.cache import cache_root, locked
from vmlab.image.kernel import ImageError, from_path, kernel_version
from vmlab.image.progress import Reporter

from . import store
from .config import (ConfigError, Fragment, check_config, config_hash, config_inputs_hash, merged_fragment,
                     turned_off)
from .source import SourceError, SourceTree, distro_source, identify, unpacked_distro_source

BUILDER_VERSION = "1"
_ERROR_LINE = re.compile(r"(error:|Error \d|\*\*\*|undefined reference|No rule to make|fatal:|not clean)", re.I)


class BuildError(RuntimeError):
    """The build failed; ``log`` is the kept build log, the message shows the failing lines."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class BuildRequest:
    src: Path | None = None          # None: the distribution's linux-source package
    fragment: Path | None = None
    jobs: int | None = None
    force: bool = False
    name: str | None = None
    build_cmd: str | None = None     # None: vmlab's tinyconfig + make recipe


def build_key(tree: SourceTree, frag: Fragment, build_cmd: str | None) -> str:
    h = hashlib.sha256()
    for part in (f"builder={BUILDER_VERSION}", f"source={tree.identity}",
                 f"config={config_inputs_hash(frag)}", f"cmd={build_cmd or 'make'}"):
        h.update(part.encode() + b"\n")
    return h.hexdigest()


def _default_name(tree: SourceTree, key: str) -> str:
    label = tree.path.name.split("_", 1)[0] if tree.kind == "package" else tree.path.name
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label) or "linux"
    if tree.kind == "git" and tree.commit:
        return f"{label}-{tree.commit[:10]}{'-dirty' if tree.dirty else ''}-{key[:6]}"
    return f"{label}-{key[:8]}"


class _Progress:
    """rich status line while make runs: objects compiled, the last one, elapsed time."""

    def __init__(self, enabled: bool, title: str) -> None:
        self.title = title
        self.count = 0
        self.last = ""
        self.start = time.monotonic()
        self._printed = self.start
        self._status = None
        self._console = None
        if enabled:
            from rich.console import Console
            self._console = Console(stderr=True)
            self._status = self._console.status(title)
            self._status.start()

    def line(self, text: str) -> None:
        stripped = text.strip()
        if stripped.startswith(("CC ", "AS ", "LD ", "AR ", "HOSTCC ", "GEN ", "OBJCOPY ")):
            self.count += 1
            self.last = stripped
            if self._status is not None and self.count % 5 == 0:
                self._status.update(f"{self.title}: {self.count} steps, {time.monotonic() - self.start:.0f}s "
                                    f"[dim]{self.last[:60]}[/dim]")
            now = time.monotonic()
            if self._console is not None and not self._console.is_terminal and now - self._printed > 30:
                self._printed = now  # CI logs: a plain line every 30 s instead of a spinner
                self._console.print(f"  {self.title}: {self.count} steps, {now - self.start:.0f}s", markup=False,
                                    highlight=False)

    def done(self, ok: bool) -> None:
        if self._status is not None:
            self._status.stop()
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            self._console.print(f"{mark} {self.title} ({time.monotonic() - self.start:.0f}s, {self.count} steps)")


def _run_logged(argv: list[str] | str, cwd: Path, log, progress: _Progress, env: dict | None = None,
                shell: bool = False) -> int:
    """Run a command, its output appended to ``log`` and fed to ``progress`` line by line."""
    log.write(f"$ {argv if isinstance(argv, str) else ' '.join(argv)}\n".encode())
    log.flush()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "LC_ALL": "C", **(env or {})}, shell=shell,
                            start_new_session=True)
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            log.write(raw)
            progress.line(raw.decode(errors="replace"))
        return proc.wait()
    except BaseException:
        os.killpg(proc.pid, 15)
        proc.wait()
        raise
    finally:
        log.flush()


def failing_lines(log_text: str, limit: int = 25) -> list[str]:
    """The lines of a build log that say why it failed (compiler errors, make's *** lines),
    with a line of context before each; the log's tail when nothing matches."""
    lines = log_text.splitlines()
    picked: list[str] = []
    for i, line in enumerate(lines):
        if _ERROR_LINE.search(line):
            if i > 0 and lines[i - 1] not in picked[-1:] and not _ERROR_LINE.search(lines[i - 1]):
                picked.append(lines[i - 1])
            picked.append(line)
    if not picked:
        picked = list(deque(lines, maxlen=15))
    return picked[:limit]


def _jobs(jobs: int | None) -> int:
    return jobs if jobs and jobs > 0 else (os.cpu_count() or 1)


def _make(tree: SourceTree, work: Path, jobs: int, *targets: str) -> list[str]:
    return ["make", "-C", str(tree.path), f"O={work}", "ARCH=x86_64", f"-j{jobs}", *targets]


def _vmlab_recipe(tree: SourceTree, frag: Fragment, work: Path, out: Path, jobs: int, log,
                  progress: _Progress) -> tuple[str, str]:
    """tinyconfig + fragments + olddefconfig + checks + bzImage; returns (kernel file name, config text)."""
    for tool in ("make", "gcc", "flex", "bison", "bc"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} not found: kernel builds need the build packages "
                             "(scripts/install-deps --kernel-build, or apt-get install build-essential "
                             "bc bison flex libelf-dev libssl-dev)")
    work.mkdir(parents=True, exist_ok=True)
    if _run_logged(_make(tree, work, 1, "tinyconfig"), tree.path, log, progress) != 0:
        raise BuildError("make tinyconfig failed")
    cfg = work / ".config"
    with open(cfg, "a") as f:
        f.write(merged_fragment(frag))
    if _run_logged(_make(tree, work, 1, "olddefconfig"), tree.path, log, progress) != 0:
        raise BuildError("make olddefconfig failed")
    text = cfg.read_text()
    problems = check_config(text, frag)
    if problems:
        raise BuildError("the kernel config lacks what vmlab needs:\n  " + "\n  ".join(problems))
    for name, value in turned_off(frag).items():
        print(f"vmlab: note: the fragment {frag.origin} sets {name}={value}; vmlab's guests expect it "
              "built in, so what it provides is missing from this kernel", file=sys.stderr)
    if _run_logged(_make(tree, work, jobs, "bzImage"), tree.path, log, progress) != 0:
        raise BuildError("make bzImage failed")
    image = work / "arch/x86/boot/bzImage"
    if not image.is_file():
        raise BuildError(f"make succeeded but {image} is missing")
    shutil.copy2(image, out / "bzImage")
    (out / "config").write_text(text)
    return "bzImage", text


def _command_recipe(tree: SourceTree, cmd: str, out: Path, log, progress: _Progress) -> str:
    """Run the user's build command; find the kernel it put into $VMLAB_KERNEL_OUT."""
    kout = out / "kernel"
    kout.mkdir()
    rc = _run_logged(cmd, tree.path, log, progress, env={"VMLAB_KERNEL_OUT": str(kout)}, shell=True)
    if rc != 0:
        raise BuildError(f"build command exited {rc}: {cmd}")
    for candidate in ("bzImage", "vmlinuz"):
        if (kout / candidate).is_file():
            return f"kernel/{candidate}"
    if list(kout.glob("boot/vmlinuz-*")):
        return "kernel"
    found = sorted(kout.glob("vmlinuz*"))
    if found:
        return f"kernel/{found[-1].name}"
    raise BuildError(f"build command left no kernel in $VMLAB_KERNEL_OUT ({kout}): expected bzImage, "
                     "vmlinuz* or boot/vmlinuz-*")


def cached_minimal(cache: Path | None = None) -> store.StoredBuild | None:
    """vmlab's minimal kernel (what `vmlab kernel build` makes with no arguments) if it is already
    built for the current config; never downloads, unpacks or builds anything."""
    cache = cache or cache_root()
    src = unpacked_distro_source(cache)
    if src is None:
        return None
    return store.by_key(build_key(identify(src), Fragment("", ""), None), cache)


def build_kernel(req: BuildRequest, progress: bool = False,
                 cache: Path | None = None) -> store.StoredBuild:
    """Build (or find in the store) the kernel for ``req``. Raises BuildError / SourceError / ConfigError."""
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    rep = Reporter(progress)
    src = req.src if req.src is not None else distro_source(cache, step=rep.note)
    tree = identify(Path(src), linux=req.build_cmd is None)
    frag = Fragment.load(req.fragment)
    key = build_key(tree, frag, req.build_cmd)
    found = store.by_key(key, cache)
    if found is not None and not req.force:
        return replace(found, reused=True)
    with locked(cache, f"kbuild-{key[:16]}"):
        found = store.by_key(key, cache)
        if found is not None and not req.force:
            return replace(found, reused=True)
        return _build_locked(req, tree, frag, key, cache, progress)


def _build_locked(req: BuildRequest, tree: SourceTree, frag: Fragment, key: str, cache: Path,
                  progress: bool) -> store.StoredBuild:
    jobs = _jobs(req.jobs)
    bdir = store.builds_dir(cache)
    bdir.mkdir(parents=True, exist_ok=True)
    work = cache / "kernels" / "work" / hashlib.sha256(str(tree.path).encode()).hexdigest()[:16]
    what = f"building {tree.path.name} ({tree.describe()})" + (f" with {req.build_cmd!r}" if req.build_cmd else f" -j{jobs}")
    prog = _Progress(progress, what)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=bdir, prefix=f".{key[:12]}-"))
    log_path = tmp / "build.log"
    ok = False
    try:
        # one build at a time per work dir (two configs of one tree share it)
        with open(log_path, "wb") as log, locked(cache, f"kwork-{work.name}"):
            try:
                if req.build_cmd:
                    kernel_rel = _command_recipe(tree, req.build_cmd, tmp, log, prog)
                    cfg_hash = None
                else:
                    kernel_rel, text = _vmlab_recipe(tree, frag, work, tmp, jobs, log, prog)
                    cfg_hash = config_hash(text)
            except BuildError as exc:
                log.flush()
                kept = _keep_log(cache, key, log_path)
                lines = failing_lines(kept.read_text(errors="replace"))
                raise BuildError(f"{exc}\n--- failing lines (full log: {kept}):\n" + "\n".join(lines), kept) from None
        try:
            ksrc = from_path(tmp / kernel_rel, "build")
        except ImageError as exc:
            kept = _keep_log(cache, key, log_path)
            raise BuildError(f"the build produced no bootable kernel: {exc} (log: {kept})", kept) from None
        meta = store.BuildMeta(
            key=key, name=req.name or _default_name(tree, key), version=ksrc.version, kernel=kernel_rel,
            source=str(tree.path), source_kind=tree.kind, source_identity=tree.identity,
            commit=tree.commit, dirty=tree.dirty, package=tree.package, config_hash=cfg_hash,
            fragment=str(req.fragment) if req.fragment else "", build_cmd=req.build_cmd,
            seconds=round(time.monotonic() - started, 1), jobs=jobs)
        store.save(tmp, meta)
        final = bdir / key
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        ok = True
        return store.StoredBuild(final, meta)
    finally:
        prog.done(ok)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _keep_log(cache: Path, key: str, log: Path) -> Path:
    dest = cache / "kernels" / "logs" / f"{key[:16]}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(log, dest)
    return dest


__all__ = ["BuildError", "BuildRequest", "build_kernel", "build_key", "failing_lines",
           "ConfigError", "SourceError", "kernel_version"]
