"""The optional C accelerator (_accel.c): built on first use, the pure-Python path otherwise.

vmlab ships the C source, never a binary: the first backend that wants it compiles it with the
system `gcc` and this Python's headers into the cache (vmlab/image/ccompile.py, keyed by source
and flags, so a new Python or a changed source builds anew). No compiler, no headers, or
VMLAB_NO_ACCEL=1: `load()` returns None and every caller takes its pure-Python path, which
stays complete and tested (docs/benchmarks.md "C accelerator").
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType

from vmlab.image.ccompile import CompileError, compile_cached

log = logging.getLogger(__name__)

ENV_OFF = "VMLAB_NO_ACCEL"
MODULE = "_vmlab_accel"
SOURCE = Path(__file__).with_name("_accel.c")
_loaded: list[ModuleType | None] = []      # [] = not tried yet; [None] = tried, unavailable


def disabled() -> bool:
    """VMLAB_NO_ACCEL set to anything but "" or "0"."""
    return os.environ.get(ENV_OFF, "") not in ("", "0")


def buildable() -> bool:
    """A C compiler and this Python's headers are here (then load() must not return None)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    return bool(cc) and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def load() -> ModuleType | None:
    """The compiled module, or None (disabled, or it cannot be built here: logged once)."""
    if disabled():
        return None
    if not _loaded:
        _loaded.append(_build())
    return _loaded[0]


def _build() -> ModuleType | None:
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    if not (Path(include) / "Python.h").is_file():
        log.info("no Python.h under %s: vsock accelerator off (pure Python)", include)
        return None
    flags = ["-O2", "-shared", "-fPIC", "-Wall", f"-I{include}"]
    try:
        path = compile_cached(SOURCE, "accel", MODULE + suffix, flags)
        spec = importlib.util.spec_from_file_location(MODULE, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except (CompileError, OSError, ImportError) as exc:
        log.warning("vsock accelerator unavailable, using pure Python: %s", exc)
        return None
    return mod
