"""Compile one C source into the cache, once per content: the guest helper and the host shim.

vmlab ships C as source, never as binaries; each is built on first use with the machine's own
compiler and kept under `<cache>/<kind>/<key>/<name>`, the key being the source's sha256 and the
flags. A lock makes parallel labs (pytest-xdist) compile it once; the result appears atomically.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from .cache import cache_root, locked


class CompileError(RuntimeError):
    """No compiler, or the compiler failed; `output` is what it printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def content_key(src: Path, flags: Sequence[str]) -> str:
    h = hashlib.sha256(src.read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()


def compile_cached(src: Path, kind: str, name: str, cflags: Sequence[str], libs: Sequence[str] = (),
                   cache: Path | None = None) -> Path:
    """The compiled `src` (executable bits set), building it only when its key is new."""
    cache = cache or cache_root()
    key = content_key(src, [*cflags, *libs])
    out = cache / kind / key[:24] / name
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise CompileError(f"no C compiler to build {name}; install one: apt-get install gcc libc6-dev")
    with locked(cache, f"{kind}-{key[:24]}"):
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{name}.")
        os.close(fd)
        try:
            r = subprocess.run([cc, *cflags, "-o", tmp, str(src), *libs], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                raise CompileError(f"compiling {src.name} failed:\n{r.stdout.strip()}", r.stdout)
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out
