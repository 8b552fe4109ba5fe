"""Bundles: what goes in, what reproduce.sh says, and that a bundle reads back."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from vmlab.bundle import BundleError, RunRecord, extract_bundle, write_bundle
from vmlab.scenario import load_scenario


def make(tmp_path: Path, **kw) -> tuple[Path, Path]:
    d = tmp_path / "src"
    (d / "repro").mkdir(parents=True)
    (d / "repro" / "probe.sh").write_text("#!/bin/sh\necho hi\n")
    (d / "s.yaml").write_text(
        "name: s\ntransport: vhost-user\nvms:\n  - {name: g, cid: 3, files: {/bin/probe: repro/probe.sh}}\n"
        "steps:\n  - run: {vm: g, command: probe}\n")
    log = tmp_path / "g.console.log"
    log.write_text("console\n")
    rec = RunRecord(scenario_path=d / "s.yaml", seed=7, base_seed=5, iteration=3,
                    reused=kw.get("reused", False), transport="vhost-user", accel="tcg",
                    kernel=None, ok=False, failure="[ 1] FAIL  1.00s  run probe  -- exited 1",
                    report="report\n", argv=["run", "s.yaml"], logs=[log])
    out = write_bundle(tmp_path / "b.tar.gz", load_scenario(d / "s.yaml"), rec)
    return out, d


def test_bundle_has_the_scenario_its_files_logs_and_a_reproduce_script(tmp_path: Path) -> None:
    out, _ = make(tmp_path)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        script = tar.extractfile("b/reproduce.sh").read().decode()
        mode = tar.getmember("b/reproduce.sh").mode
    assert {"b/manifest.json", "b/report.txt", "b/scenario/s.yaml", "b/scenario/repro/probe.sh",
            "b/logs/g.console.log"} <= names
    assert "vmlab run scenario/s.yaml --seed 7 --transport vhost-user" in script and mode & 0o100
    top, manifest = extract_bundle(out, tmp_path / "x")
    assert manifest["seed"] == 7 and manifest["result"] == "failed"
    assert manifest["qemu"] and manifest["vmlab"]
    assert (top / "scenario" / "repro" / "probe.sh").exists()


def test_a_failure_on_reused_vms_replays_the_whole_sequence(tmp_path: Path) -> None:
    out, _ = make(tmp_path, reused=True)
    _, manifest = extract_bundle(out, tmp_path / "x")
    assert manifest["replay_args"][2:] == ["--seed", "5", "--until-fail", "--max", "3",
                                           "--transport", "vhost-user"]


def test_not_a_bundle_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(BundleError, match="cannot read bundle"):
        extract_bundle(bad, tmp_path / "y")
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        p = tmp_path / "manifest.json"
        p.write_text(json.dumps({"format": 99}))
        tar.add(p, arcname="z/manifest.json")
    with pytest.raises(BundleError, match="format 99"):
        extract_bundle(tmp_path / "z.tar.gz", tmp_path / "w")
