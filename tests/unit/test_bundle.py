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


def test_pytest_bundle_holds_the_test_its_scenario_and_replays_with_pytest(tmp_path: Path) -> None:
    from vmlab.pytest_bundle import NOT_BUNDLED_NOTE, PytestRecord, write_pytest_bundle

    d = tmp_path / "tests"
    (d / "data").mkdir(parents=True)
    (d / "test_x.py").write_text("def test_a(vm): assert 0\n")
    (d / "conftest.py").write_text("# fixtures\n")
    (d / "data" / "msg").write_text("m\n")
    (d / "lab.yaml").write_text("name: l\nvms:\n  - {name: g, files: {/root/msg: data/msg,"
                                " /root/far: ../outside}}\n")
    (tmp_path / "outside").write_text("x\n")
    log = tmp_path / "g.console.log"
    log.write_text("console\n")
    rec = PytestRecord(test_file=d / "test_x.py", node="test_a[vmlab-run2]", seed=11, repeat=3,
                       transport="vhost-user", accel="tcg", kernel=None,
                       report="E   AssertionError: MISMATCH\n", argv=["-x"], logs=[log],
                       scenario=load_scenario(d / "lab.yaml"))
    out = write_pytest_bundle(tmp_path / "p.tar.gz", rec)
    top, manifest = extract_bundle(out, tmp_path / "x")
    got = sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file())
    assert got == ["logs/g.console.log", "manifest.json", "report.txt", "reproduce.sh",
                   "test/conftest.py", "test/data/msg", "test/lab.yaml", "test/test_x.py"]
    assert manifest["runner"] == "pytest" and manifest["test"] == "test/test_x.py::test_a[vmlab-run2]"
    assert manifest["replay_args"] == ["-m", "pytest", "test/test_x.py::test_a[vmlab-run2]", "-p",
                                       "no:cacheprovider", "--vmlab-seed", "11", "--vmlab-accel",
                                       "tcg", "--vmlab-transport", "vhost-user", "--vmlab-repeat", "3"]
    assert manifest["failure"] == "E   AssertionError: MISMATCH"
    assert manifest["not_bundled"][0] == NOT_BUNDLED_NOTE
    assert any("outside" in n for n in manifest["not_bundled"][1:])
    script = (top / "reproduce.sh").read_text()
    assert "exec python3 -m pytest 'test/test_x.py::test_a[vmlab-run2]' -p" in script
