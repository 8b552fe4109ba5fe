"""Every scenario shipped in scenarios/ runs and passes; `vmlab run` reports failures clearly."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmlab.lab import Lab
from vmlab.scenario import load_scenario

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN_ELSEWHERE = {"nested-vhost": "tests/integration/test_nested_vhost.py"}
"""Scenarios another test runs (with more checks around the same boot); not booted twice."""
SCENARIOS = sorted(p for p in (REPO / "scenarios").glob("*.yaml") if p.stem not in RUN_ELSEWHERE)


def test_there_are_scenarios():
    names = {p.stem for p in SCENARIOS}
    assert {"hello", "boot", "vm-to-vm", "seqpacket", "many-connections", "bulk-integrity",
            "reset-mid-transfer", "faults", "fault-duplicate", "fault-reorder", "fault-credit-stall",
            "fault-corrupt"} <= names


# Scenarios whose point is a delay: (step name, at least this many seconds), checked on the result.
MIN_SECONDS = {"fault-credit-stall": ("upload 1 MiB (blocked until the stall ends)", 2.5)}


def test_scenarios_run_elsewhere_have_their_test():
    for stem, test in RUN_ELSEWHERE.items():
        assert (REPO / "scenarios" / f"{stem}.yaml").is_file()
        assert f"{stem}.yaml" in (REPO / test).read_text()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_passes(path, tmp_path, request):
    artifacts = request.config.getoption("vmlab_artifacts")
    transport = request.config.getoption("vmlab_transport")
    scenario = load_scenario(path)
    with Lab(scenario, transport=transport,
             artifacts_dir=Path(artifacts) / f"scenario-{path.stem}" if artifacts else None) as lab:
        results = lab.run_steps()
    failures = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert len(results) == len(scenario.steps)
    if path.stem in MIN_SECONDS:
        name, seconds = MIN_SECONDS[path.stem]
        step = next(r for r in results if r.name == name)
        assert step.seconds >= seconds, f"{name} took {step.seconds:.2f}s, expected >= {seconds}s"


def run_cli(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, "-m", "vmlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_vmlab_run_hello_shows_the_message_and_writes_junit(tmp_path):
    junit = tmp_path / "hello.xml"
    proc = run_cli("run", "scenarios/hello.yaml", "--junit-xml", str(junit))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "srv received 13 bytes: 'Hello, world!'" in proc.stdout
    assert "PASSED: 3 passed, 0 failed, 0 skipped" in proc.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_vmlab_run_with_a_broken_message_fails_and_says_why(tmp_path):
    text = (REPO / "scenarios" / "hello.yaml").read_text()
    broken = tmp_path / "hello-broken.yaml"
    broken.write_text(text.replace('expect: {id: srv, message: "Hello, world!"}',
                                   'expect: {id: srv, message: "Goodbye, world!", timeout: 5}'))
    assert broken.read_text() != text
    proc = run_cli("run", str(broken), "--transport", "vhost-user", "--artifacts", str(tmp_path / "art"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "expected message 'Goodbye, world!'" in proc.stdout
    assert "'Hello, world!'" in proc.stdout           # what actually arrived
    assert f"{broken}:" in proc.stdout                 # where the failing step is written
    assert (tmp_path / "art" / "guest.console.log").exists()
    assert (tmp_path / "art" / "backend.log").exists()


def test_vmlab_run_rejects_an_invalid_scenario_without_booting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vms:\n  - name: g\n    cid: 2\n")
    proc = run_cli("run", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:3:" in proc.stderr and "host" in proc.stderr.lower()


def test_dgram_scenario_gets_a_clear_error(tmp_path):
    bad = tmp_path / "dgram.yaml"
    bad.write_text("vms:\n  - {name: g, cid: 3}\nsteps:\n  - host_listen: {id: s, port: 9999, type: dgram}\n")
    proc = run_cli("run", str(bad))
    assert proc.returncode == 2
    assert "SOCK_DGRAM is not supported" in proc.stderr and f"{bad}:4:" in proc.stderr


def test_a_lab_that_cannot_come_up_exits_3_with_the_reason_and_leaves_nothing(tmp_path):
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))   # a private runtime base to inspect
    proc = subprocess.run([sys.executable, "-m", "vmlab", "run", "scenarios/hello.yaml", "--kernel",
                           str(tmp_path / "no-such-vmlinuz")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "lab setup failed" in proc.stdout and "no-such-vmlinuz" in proc.stdout
    assert "FAILED: the lab did not come up" in proc.stdout
    assert list((runtime / "vmlab").iterdir()) == [], "runtime dir left behind"
