"""Run unmodified host AF_VSOCK programs against a lab (`vmlab exec`, `host_run`, fixtures).

On the vhost-user transport a program's AF_VSOCK sockets are served by the lab's backend
through an LD_PRELOAD library (`vsock_shim.c`, compiled on first use with gcc and cached by
content like the guest helper); on the vhost transport the program runs as it is (the kernel's
real AF_VSOCK reaches the guests). See docs/exec.md.
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vmlab.image.ccompile import CompileError, compile_cached, content_key

SOURCE = Path(__file__).with_name("vsock_shim.c")
CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden")
LIBS = ("-ldl", "-lpthread")
ENV_NS, ENV_VMS = "VMLAB_VSOCK_NS", "VMLAB_VSOCK_VMS"


class ShimError(RuntimeError):
    """The program cannot be run under the shim; the message says why and what to do."""


def shim_key(src: Path = SOURCE) -> str:
    return content_key(src, CFLAGS + LIBS)


def build_shim(cache: Path | None = None, src: Path = SOURCE) -> Path:
    """Return the compiled shim, compiling it once per source version (cached by content)."""
    if not src.is_file():
        raise ShimError(f"shim source {src} is missing (broken checkout or install?)")
    try:
        return compile_cached(src, "shim", "libvmlab-vsock.so", CFLAGS, LIBS, cache=cache)
    except CompileError as exc:
        raise ShimError(str(exc)) from None


@dataclass
class LabTarget:
    """What a host program needs to know about a lab: its transport and its VMs' host sides."""

    lab_id: str
    transport: str | None                        # "vhost", "vhost-user" or None (mixed / none)
    host_ns: str | None = None
    uds_paths: dict[int, str] = field(default_factory=dict)   # cid -> hybrid socket (vhost-user)

    @classmethod
    def from_lab(cls, lab: Any) -> "LabTarget":
        return cls(lab_id=lab.lab_id, transport=lab.transport, host_ns=lab.host_ns,
                   uds_paths={vm.cid: str(vm.uds_path) for vm in lab.vms if vm.uds_path})

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "LabTarget":
        """From a running lab's lab.json (vmlab.runtime.running_labs())."""
        vms = state.get("vms", {})
        kinds = {v.get("transport") for v in vms.values() if v.get("transport")}
        return cls(lab_id=Path(state["run_dir"]).name, transport=kinds.pop() if len(kinds) == 1 else None,
                   host_ns=state.get("host_ns"),
                   uds_paths={int(v["cid"]): v["uds_path"] for v in vms.values() if v.get("uds_path")})

    @property
    def shimmed(self) -> bool:
        return bool(self.uds_paths)


def shim_env(target: LabTarget, base: Mapping[str, str] | None = None,
             shim: Path | None = None) -> dict[str, str]:
    """The environment a program runs with: unchanged on vhost, LD_PRELOAD + lab on vhost-user."""
    env = dict(os.environ if base is None else base)
    if not target.shimmed:
        return env
    if target.transport != "vhost-user":
        raise ShimError(f"lab {target.lab_id} mixes transports; host programs need one transport "
                        "(all VMs vhost-user, or all vhost)")
    if not target.host_ns:
        raise ShimError(f"lab {target.lab_id} was started by a vmlab without lab-wide host listeners; "
                        "restart it with this version")
    lib = str(shim or build_shim())
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib} {preload}".strip() if lib not in preload.split() else preload
    env[ENV_NS] = target.host_ns
    env[ENV_VMS] = ";".join(f"{cid}={path}" for cid, path in sorted(target.uds_paths.items()))
    return env


def resolve_program(program: str, path: str | None = None) -> Path:
    """The executable `program` names (as execvp would find it), or ShimError."""
    if "/" in program:
        p = Path(program)
        if not p.exists():
            raise ShimError(f"{program}: no such file")
    else:
        found = shutil.which(program, path=path if path is not None else os.environ.get("PATH"))
        if not found:
            raise ShimError(f"{program}: command not found")
        p = Path(found)
    if not os.access(p, os.X_OK) or p.is_dir():
        raise ShimError(f"{p}: not an executable file")
    return p


def elf_is_static(path: Path) -> bool | None:
    """True for an ELF executable without PT_INTERP (statically linked), False for a dynamic
    one, None for something that is not ELF (a script: its interpreter decides)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != b"\x7fELF":
                return None
            is64, little = ident[4] == 2, ident[5] == 1
            end = "<" if little else ">"
            if is64:
                e_type, = struct.unpack_from(end + "H", ident, 16)
                phoff, = struct.unpack_from(end + "Q", ident, 32)
                phentsize, phnum = struct.unpack_from(end + "HH", ident, 54)
            else:
                e_type, = struct.unpack_from(end + "H", ident, 16)
                phoff, = struct.unpack_from(end + "I", ident, 28)
                phentsize, phnum = struct.unpack_from(end + "HH", ident, 42)
            if phnum == 0 or phentsize < 4 or phnum > 4096:
                return True
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    del e_type
    for i in range(min(phnum, len(table) // phentsize)):
        p_type, = struct.unpack_from(end + "I", table, i * phentsize)
        if p_type == 3:           # PT_INTERP
            return False
    return True


def check_program(program: str, target: LabTarget, path: str | None = None) -> Path:
    """Resolve `program`; on a shimmed lab refuse static binaries with a clear message."""
    exe = resolve_program(program, path)
    if target.shimmed:
        # follow a "#!" script to its interpreter: that is what LD_PRELOAD has to enter
        probe = exe
        for _ in range(4):
            if elf_is_static(probe) is not None:
                break
            try:
                first = probe.read_bytes()[:256].split(b"\n", 1)[0]
            except OSError:
                break
            if not first.startswith(b"#!"):
                break
            parts = first[2:].strip().split()
            if not parts:
                break
            interp = parts[0].decode(errors="replace")
            if Path(interp).name == "env" and len(parts) > 1:
                found = shutil.which(parts[1].decode(errors="replace"))
                if not found:
                    break
                interp = found
            probe = Path(interp)
        if elf_is_static(probe):
            raise ShimError(
                f"{probe} is statically linked: the vhost-user transport serves host AF_VSOCK "
                "programs through an LD_PRELOAD library, which a static binary never loads. "
                "Link it dynamically (drop -static), or run the lab with the vhost transport "
                "(/dev/vhost-vsock), where programs use the kernel's AF_VSOCK directly.")
    return exe


def command_argv(command: str | list[str]) -> list[str]:
    """A `host_run` command: a list runs as is, a string runs in `sh -c` (dynamic, shimmed)."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return list(command)


__all__ = ["LabTarget", "ShimError", "build_shim", "check_program", "command_argv", "elf_is_static",
           "resolve_program", "shim_env"]
