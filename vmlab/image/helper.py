"""Compile the static C guest helper (images/guest/vmlab-guest.c) into the cache."""
from __future__ import annotations

from pathlib import Path

from . import paths
from .ccompile import CompileError, compile_cached, content_key
from .kernel import ImageError
from .paths import images_dir  # noqa: F401  (build.py finds the init script through it)


def helper_source() -> Path:
    src = paths.helper_source()
    if not src.is_file():
        raise ImageError(f"guest helper source {src} is missing (broken checkout or install?)")
    return src


CFLAGS = ("-O2", "-static", "-s", "-Wall", "-Wextra", "-std=gnu11")


def helper_key(src: Path | None = None) -> str:
    return content_key(src or helper_source(), CFLAGS)


def build_guest_helper(cache: Path | None = None, src: Path | None = None) -> Path:
    """Return a static vmlab-guest binary, compiling it once per source version."""
    try:
        return compile_cached(src or helper_source(), "helper", "vmlab-guest", CFLAGS, cache=cache)
    except CompileError as exc:
        hint = ""
        if "cannot find -lc" in exc.output or "crt1.o" in exc.output:
            hint = "\n(static libc missing: apt-get install libc6-dev)"
        raise ImageError(f"{exc}{hint}") from None
