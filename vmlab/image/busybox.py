"""Locate a static busybox on the host and list the applets to link in the guest."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .kernel import ImageError

_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox")


def is_static_elf(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header (no dynamic loader needed)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        order = "little" if ident[5] == 1 else "big"
        u = lambda b: int.from_bytes(b, order)  # noqa: E731
        if is64:
            phoff, phentsize, phnum = u(ident[32:40]), u(ident[54:56]), u(ident[56:58])
        else:
            phoff, phentsize, phnum = u(ident[28:32]), u(ident[42:44]), u(ident[44:46])
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if u(table[i * phentsize: i * phentsize + 4]) == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path:
    """$VMLAB_BUSYBOX, else the usual paths; it must be statically linked."""
    env = os.environ.get("VMLAB_BUSYBOX")
    cands = [env] if env else [shutil.which("busybox") or "", *_CANDIDATES]
    for c in cands:
        if c and os.path.isfile(c):
            p = Path(c).resolve()
            if is_static_elf(p):
                return p
            if env:
                raise ImageError(f"VMLAB_BUSYBOX={env} is dynamically linked; it needs a static busybox")
    raise ImageError("no static busybox found; install it: apt-get install busybox-static "
                     "(or set VMLAB_BUSYBOX=/path/to/static/busybox)")


def applets(busybox: Path) -> list[str]:
    """Install paths of every applet ('bin/sh', 'sbin/insmod', ...)."""
    r = subprocess.run([str(busybox), "--list-full"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    names = [l.strip().lstrip("/") for l in r.stdout.splitlines() if l.strip()]
    if r.returncode != 0 or not names:
        raise ImageError(f"{busybox} --list-full failed; is it a busybox binary?")
    return sorted(set(names))
