"""Failure bundles: one .tar.gz that someone else reruns with `vmlab replay` or `reproduce.sh`.

Layout (everything under one top directory named after the bundle):
  manifest.json        vmlab/QEMU/kernel identity, seed, iteration, transport, the recorded result
  scenario/            the scenario file and the files it names (paths relative to it)
  kernel/vmlinuz       only with --bundle-kernel
  logs/                console, QMP, qemu, backend logs and the pcap of the run
  report.txt           what `vmlab run` printed for that run
  reproduce.sh         reruns exactly that scenario with that seed (and kernel)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmlab import __version__

MANIFEST = "manifest.json"
FORMAT = 1


class BundleError(RuntimeError):
    """A bundle that cannot be written or read; the message says which file and why."""


@dataclass
class RunRecord:
    """What a bundle records about the run it comes from."""

    scenario_path: Path
    seed: int
    base_seed: int
    iteration: int
    reused: bool
    transport: str | None
    accel: str
    kernel: Path | None
    ok: bool
    failure: str                        # "[ 3] FAIL ... -- detail" of the first failing step, or ""
    report: str
    argv: list[str]
    logs: list[Path] = field(default_factory=list)


def qemu_version(qemu: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return out.splitlines()[0].strip() if out else "unknown"


def kernel_identity(kernel: Path | None) -> dict[str, Any]:
    if kernel is None or not kernel.exists():
        return {"path": str(kernel) if kernel else None}
    from vmlab.image.kernel import kernel_version
    h = hashlib.sha256()
    with open(kernel, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    try:
        version = kernel_version(kernel)
    except Exception as exc:  # noqa: BLE001 - identity is best effort, the hash is exact
        version = f"unknown ({exc})"
    return {"path": str(kernel), "version": version, "sha256": h.hexdigest(),
            "size": kernel.stat().st_size}


def scenario_files(scenario: Any) -> list[Path]:
    """Host files a scenario names (VM files/share/kernel/initrd, host send_file)."""
    out: list[Path] = []
    for vm in scenario.vms:
        out += [Path(p) for p in (vm.files or {}).values()]
        for attr in ("share", "kernel", "initrd"):
            p = getattr(vm, attr, None)
            if p:
                out.append(Path(p))
    for step in scenario.steps:
        if step.action == "host_connect" and getattr(step.params, "send_file", None):
            out.append(Path(step.params.send_file))
    return out


def _reproduce_args(rec: RunRecord, scenario_rel: str, kernel_rel: str | None) -> list[str]:
    args = ["run", scenario_rel]
    if rec.reused and rec.iteration > 1:
        # the failing run happened on VMs reused from earlier runs: replay the whole sequence
        args += ["--seed", str(rec.base_seed), "--until-fail", "--max", str(rec.iteration)]
    else:
        args += ["--seed", str(rec.seed)]
    if rec.transport:
        args += ["--transport", rec.transport]
    if kernel_rel:
        args += ["--kernel", kernel_rel]
    return args


def write_bundle(dest: Path, scenario: Any, rec: RunRecord, include_kernel: bool = False) -> Path:
    """Write the bundle for one run to `dest` (.tar.gz); returns dest."""
    src = Path(rec.scenario_path).resolve()
    base = src.parent
    top = dest.name.removesuffix(".tar.gz").removesuffix(".tgz") or "vmlab-bundle"
    named, missing = relative_members(base, scenario_files(scenario), "scenario")
    members: list[tuple[Path, str]] = [(src, f"scenario/{src.name}"), *named]
    kernel_rel = None
    if include_kernel and rec.kernel is not None and rec.kernel.exists():
        kernel_rel = "kernel/vmlinuz"
        members.append((rec.kernel, kernel_rel))
    for log in rec.logs:
        if log.exists():
            members.append((log, f"logs/{log.name}"))
    args = _reproduce_args(rec, f"scenario/{src.name}", kernel_rel)
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vmlab": __version__, "qemu": qemu_version(), "kernel": kernel_identity(rec.kernel),
        "kernel_bundled": kernel_rel is not None,
        "scenario": f"scenario/{src.name}", "scenario_name": scenario.name,
        "seed": rec.seed, "base_seed": rec.base_seed, "iteration": rec.iteration,
        "reused_vms": rec.reused, "transport": rec.transport, "accel": rec.accel,
        "result": "passed" if rec.ok else "failed", "failure": rec.failure,
        "argv": rec.argv, "replay_args": args, "not_bundled": missing,
    }
    how = (f"runs 1..{rec.iteration} from seed {rec.base_seed} on reused VMs, as recorded"
           if rec.reused and rec.iteration > 1 else "one run, as recorded")
    script = ("#!/bin/sh\n"
              f"# Reruns scenario {scenario.name!r} with seed {rec.seed} ({how})"
              f"{' on the bundled kernel' if kernel_rel else ''}.\n"
              f"# Recorded result: {manifest['result']}"
              f"{': ' + rec.failure.splitlines()[0] if rec.failure else ''}\n"
              'cd "$(dirname "$0")" || exit 2\n'
              f"exec vmlab {shlex.join(args)} \"$@\"\n")
    return write_archive(dest, top, members, manifest, rec.report, script)


def write_archive(dest: Path, top: str, members: list[tuple[Path, str]], manifest: dict[str, Any],
                  report: str, script: str) -> Path:
    """The .tar.gz itself: files (path, name in the bundle), then manifest, report and
    reproduce.sh, all under `top/`; written to a temp name and renamed, so never half there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path, arc in members:
                tar.add(str(path), arcname=f"{top}/{arc}")
            for arc, text, mode in ((MANIFEST, json.dumps(manifest, indent=2) + "\n", 0o644),
                                    ("report.txt", report, 0o644),
                                    ("reproduce.sh", script, 0o755)):
                data = text.encode()
                info = tarfile.TarInfo(f"{top}/{arc}")
                info.size, info.mode, info.mtime = len(data), mode, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write bundle {dest}: {exc}") from exc
    return dest


def relative_members(base: Path, paths: list[Path], prefix: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """(path, prefix/relative path) for each file under `base`; the rest as 'not bundled' notes."""
    members: list[tuple[Path, str]] = []
    missing: list[str] = []
    for p in paths:
        p = p if p.is_absolute() else base / p
        try:
            rel = p.resolve().relative_to(base)
        except ValueError:
            missing.append(f"{p} (outside the scenario's directory)")
            continue
        if p.exists():
            members.append((p, f"{prefix}/{rel}"))
        else:
            missing.append(f"{p} (missing)")
    return members, missing


def extract_bundle(path: Path, into: Path) -> tuple[Path, dict[str, Any]]:
    """Unpack a bundle into `into`; returns (its top directory, its manifest)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            names = tar.getnames()
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1:
                raise BundleError(f"{path}: not a vmlab bundle (expected one top directory)")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:                                  # Python without extraction filters
                for m in tar.getmembers():
                    if m.name.startswith("/") or ".." in m.name.split("/") or not (
                            m.isfile() or m.isdir()):
                        raise BundleError(f"{path}: unsafe member {m.name!r}")
                tar.extractall(into)
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"cannot read bundle {path}: {exc}") from exc
    top = into / tops.pop()
    try:
        manifest = json.loads((top / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: no readable {MANIFEST}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this vmlab reads {FORMAT}")
    return top, manifest


def copy_logs(src_dir: Path) -> list[Path]:
    return sorted(p for p in src_dir.iterdir() if p.is_file()) if src_dir.is_dir() else []


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
