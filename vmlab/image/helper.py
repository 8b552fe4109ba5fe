"""Compile the static C guest helper (images/guest/vmlab-guest.c) into the cache."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import paths
from .cache import cache_root, locked
from .kernel import ImageError
from .paths import images_dir  # noqa: F401  (build.py finds the init script through it)


def helper_source() -> Path:
    src = paths.helper_source()
    if not src.is_file():
        raise ImageError(f"guest helper source {src} is missing (broken checkout or install?)")
    return src


CFLAGS = ("-O2", "-static", "-s", "-Wall", "-Wextra", "-std=gnu11")


def helper_key(src: Path | None = None) -> str:
    src = src or helper_source()
    h = hashlib.sha256(src.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()


def build_guest_helper(cache: Path | None = None, src: Path | None = None) -> Path:
    """Return a static vmlab-guest binary, compiling it once per source version."""
    src = src or helper_source()
    cache = cache or cache_root()
    key = helper_key(src)
    out = cache / "helper" / key[:24] / "vmlab-guest"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise ImageError("no C compiler to build the guest helper; install one: "
                         "apt-get install gcc libc6-dev")
    with locked(cache, f"helper-{key[:24]}"):
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".vmlab-guest.")
        os.close(fd)
        try:
            r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(src)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                hint = ""
                if "cannot find -lc" in r.stdout or "crt1.o" in r.stdout:
                    hint = "\n(static libc missing: apt-get install libc6-dev)"
                raise ImageError(f"compiling {src.name} failed:\n{r.stdout.strip()}{hint}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out
