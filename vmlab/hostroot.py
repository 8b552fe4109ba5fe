"""`rootfs: host` guests: what the host hands the guest init besides the read-only 9p export.

The guest sees the host's / read-only (QEMU `readonly=on`), so it runs the host's binaries,
Python and libraries. To behave like the host it also needs the host's environment (PATH with
the interpreter vmlab runs under first, PYTHONPATH, vmlab's cache location) and a writable view of
vmlab's cache, so a vmlab inside the guest finds the kernel and images the host already has and
writes new ones to guest RAM. Scenario `files:` travel in the initramfs under FILES_PREFIX and
the init copies them into the writable places (HOST_ROOTFS_WRITABLE).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Mapping

from vmlab.scenario import HOST_ROOTFS_WRITABLE

HOST_ENV_GUEST_PATH = "/vmlab-host.env"
"""Where the env file sits in the initramfs; the init copies it to /run/vmlab/host.env."""

FILES_PREFIX = "/vmlab-files"
"""Scenario files for a rootfs: host guest live under this prefix in the initramfs."""

PASSED_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "LANG", "LC_ALL", "VMLAB_KERNEL", "VMLAB_IMAGES_DIR",
              "VMLAB_BUSYBOX", "VMLAB_QEMU", "CC")
"""Host variables the guest shell inherits as they are (when set)."""


def host_env(environ: Mapping[str, str] | None = None, executable: str = sys.executable) -> str:
    """The guest shell's environment as `export K=V` lines (sourced by the init's stage 2)."""
    from vmlab.image.cache import cache_root

    env = dict(os.environ if environ is None else environ)
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    bindir = str(Path(executable).parent) if executable else ""
    if bindir and bindir not in path.split(":"):
        path = f"{bindir}:{path}"
    elif bindir:  # the interpreter running vmlab wins over shims and other pythons
        path = ":".join([bindir] + [p for p in path.split(":") if p != bindir])
    out = {"PATH": path, "VMLAB_CACHE_DIR": str(cache_root().resolve())}
    out.update({k: env[k] for k in PASSED_ENV if env.get(k)})
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(out.items()))


def writable(path: str) -> bool:
    """Whether a guest path is writable in a rootfs: host guest (tmpfs or overlay)."""
    return _under(path, HOST_ROOTFS_WRITABLE)


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def overlay_dirs() -> list[Path]:
    """Extra host dirs the guest gets as overlays: vmlab's cache, unless already writable there."""
    from vmlab.image.cache import cache_root

    root = cache_root().resolve()
    return [] if writable(str(root)) or not root.is_dir() else [root]


TMPFS_DIRS = ("/tmp", "/run", "/var/tmp", "/var/log")
"""Fresh tmpfs in a rootfs: host guest: the host's files there are hidden."""


def masked_host_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Host dirs vmlab itself needs in the guest that a guest tmpfs would hide: its own source tree
    (a checkout in /tmp, as a CI clone may be) and PYTHONPATH entries there. The guest init binds
    them read-only from the host's root (vmlab.hostpath=)."""
    env = os.environ if environ is None else environ
    wanted = [Path(__file__).resolve().parents[1]]
    wanted += [Path(p).resolve() for p in env.get("PYTHONPATH", "").split(":") if p]
    out: list[Path] = []
    for path in wanted:
        if _under(str(path), TMPFS_DIRS) and path.is_dir() and path not in out and str(path) not in TMPFS_DIRS:
            out.append(path)
    return out


def unsupported(spec) -> str | None:
    """Why this VM cannot boot with rootfs: host (when --rootfs host is applied to a scenario that
    validation could not check against it), or None."""
    if spec.initrd is not None:
        return "initrd: cannot be combined with it (vmlab's own initramfs mounts the host's root)"
    if spec.share is not None:
        return "share: is not available with it; the host's files are already visible read-only"
    bad = [guest for guest in spec.files if not writable(guest)]
    if bad:
        return (f"files: {', '.join(bad)} would be on the host's read-only root; files go under "
                f"{', '.join(HOST_ROOTFS_WRITABLE)}")
    return None


def guest_files(files: Mapping[str, Path], env_file: Path) -> dict[str, Path]:
    """extra_files for ensure_image: the env file plus the scenario's files under FILES_PREFIX."""
    out = {HOST_ENV_GUEST_PATH: env_file}
    out.update({FILES_PREFIX + guest: host for guest, host in files.items()})
    return out
