"""Failure bundles from the pytest plugin (`--vmlab-artifacts`): `vmlab replay` reruns the test.

A failed test is Python code around a lab, so rerunning only the lab's scenario would not
reproduce it: the bundle carries the test file (and its directory's conftest.py), the scenario
file and the files it names when the lab came from one, the logs, the failure report, and
replays with pytest: that test node, the same fault seed, transport and accelerator.

Layout (under one top directory, as `vmlab run --bundle`):
  manifest.json   runner "pytest", test node, seed, vmlab/QEMU/kernel identity, what is not bundled
  test/           the test file, its conftest.py, the scenario (paths relative to the test file)
  logs/           console, QMP, qemu, backend logs (and the pcap) of the failed test's lab
  report.txt      pytest's failure report
  reproduce.sh    python3 -m pytest test/<file>::<test> --vmlab-seed N ...
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmlab import __version__
from vmlab.bundle import (
    FORMAT, kernel_identity, qemu_version, relative_members, scenario_files, write_archive,
)

NOT_BUNDLED_NOTE = ("only the test file and its directory's conftest.py are bundled: other "
                    "modules it imports and conftest.py files of parent directories must exist "
                    "where it is replayed")


@dataclass
class PytestRecord:
    """What a pytest failure bundle records."""

    test_file: Path                 # the failed test's module
    node: str                       # its node id after the file ("test_x" or "TestC::test_x[p]"); "" = module
    seed: int                       # the session's fault seed (--vmlab-seed)
    repeat: int                     # --vmlab-repeat (run i had seed seed+i-1)
    transport: str | None
    accel: str
    kernel: Path | None
    report: str                     # pytest's failure text
    argv: list[str]
    logs: list[Path] = field(default_factory=list)
    scenario: Any = None            # the lab's Scenario (files are bundled when it has a source)


def replay_args(rec: PytestRecord, test_arc: str) -> list[str]:
    target = f"{test_arc}::{rec.node}" if rec.node else test_arc
    args = ["-m", "pytest", target, "-p", "no:cacheprovider", "--vmlab-seed", str(rec.seed),
            "--vmlab-accel", rec.accel]
    if rec.transport:
        args += ["--vmlab-transport", rec.transport]
    if rec.repeat > 1:
        args += ["--vmlab-repeat", str(rec.repeat)]
    return args


def write_pytest_bundle(dest: Path, rec: PytestRecord) -> Path:
    """Write the bundle of one failed test to `dest` (.tar.gz); returns dest."""
    test_file = rec.test_file.resolve()
    base = test_file.parent
    test_arc = f"test/{test_file.name}"
    members: list[tuple[Path, str]] = [(test_file, test_arc)]
    if (base / "conftest.py").is_file():
        members.append((base / "conftest.py", "test/conftest.py"))
    missing = [NOT_BUNDLED_NOTE]
    source = getattr(rec.scenario, "source", None)
    if source is not None:
        named, notes = relative_members(base, [Path(source), *scenario_files(rec.scenario)], "test")
        members += named
        missing += notes
    members += [(log, f"logs/{log.name}") for log in rec.logs if log.exists()]
    args = replay_args(rec, test_arc)
    first_line = next((ln for ln in rec.report.splitlines() if ln.startswith("E ")),
                      rec.report.strip().splitlines()[-1] if rec.report.strip() else "failed")
    manifest = {
        "format": FORMAT, "runner": "pytest",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vmlab": __version__, "qemu": qemu_version(), "kernel": kernel_identity(rec.kernel),
        "kernel_bundled": False, "test": args[2], "scenario": None,
        "scenario_name": getattr(rec.scenario, "name", None), "seed": rec.seed,
        "repeat": rec.repeat, "transport": rec.transport, "accel": rec.accel,
        "result": "failed", "failure": first_line, "argv": rec.argv, "replay_args": args,
        "not_bundled": missing,
    }
    script = ("#!/bin/sh\n"
              f"# Reruns the failed pytest test {args[2]} with fault seed {rec.seed}.\n"
              f"# Recorded result: failed: {first_line}\n"
              f"# Note: {NOT_BUNDLED_NOTE}.\n"
              'cd "$(dirname "$0")" || exit 2\n'
              f"exec python3 {shlex.join(args)} \"$@\"\n")
    top = dest.name.removesuffix(".tar.gz").removesuffix(".tgz") or "vmlab-bundle"
    return write_archive(dest, top, members, manifest, rec.report, script)
