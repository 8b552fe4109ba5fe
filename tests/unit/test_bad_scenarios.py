"""The bad-input catalogue: scenarios with exactly the messages they must give, bad CLI arguments.

tests/unit/data/bad/exact/NAME.yaml is loaded and must give exactly the lines of NAME.expected
(`{file}`/`{dir}` stand for its path/directory); `vmlab run` prints the same lines and exits 2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab.scenario import ScenarioError, load_scenario

EXACT = Path(__file__).parent / "data" / "bad" / "exact"
CASES = sorted(EXACT.glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[2]


def expected_lines(path: Path) -> list[str]:
    text = path.with_suffix(".expected").read_text()
    return [line.replace("{file}", str(path)).replace("{dir}", str(path.parent))
            for line in text.splitlines() if line]


def test_the_catalogue_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert all(p.with_suffix(".expected").exists() for p in CASES)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_bad_scenario_gives_exactly_its_messages(path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert [str(p) for p in info.value.problems] == expected_lines(path)


def vmlab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vmlab", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("name", ["cid-host", "alias-bomb", "not-utf8", "vm2vm-vhost"])
def test_vmlab_run_prints_the_messages_and_exits_2(name: str) -> None:
    path = EXACT / f"{name}.yaml"
    r = vmlab("run", str(path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["vmlab: invalid scenario:", *expected_lines(path)]
    assert "Traceback" not in r.stderr + r.stdout


HELLO = str(ROOT / "scenarios" / "hello.yaml")


@pytest.mark.parametrize("args,message", [
    (["run"], "the following arguments are required: scenario"),
    (["run", HELLO, "--transport", "vsock"], "argument --transport: invalid choice: 'vsock'"),
    (["run", HELLO, "--accel", "xen"], "argument --accel: invalid choice: 'xen'"),
    (["run", HELLO, "--boot-timeout", "soon"], "--boot-timeout: expected a number of seconds"),
    (["run", HELLO, "--boot-timeout", "-1"], "--boot-timeout: must be a number of seconds > 0"),
    (["run", HELLO, "--boot-timeout", "0"], "--boot-timeout: must be a number of seconds > 0"),
    (["run", HELLO, "--pcap", "/"], "--pcap /: is a directory, expected a file name"),
    (["run", HELLO, "--pcap", "/etc/hostname/x.pcap"], "--pcap /etc/hostname/x.pcap: cannot create"),
    (["run", HELLO, "--artifacts", "/etc/hostname"], "--artifacts /etc/hostname: exists and is not a directory"),
    (["run", HELLO, "--junit-xml", "/proc/nope/r.xml"], "--junit-xml /proc/nope/r.xml: cannot create"),
    (["run", "/no/such/scenario.yaml"], "/no/such/scenario.yaml: cannot read scenario: No such file"),
    (["validate", "/no/such/scenario.yaml"], "/no/such/scenario.yaml: cannot read scenario"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["console", "nosuchvm"], "no running lab has a VM 'nosuchvm'"),
    (["image", "build", "--kernel", "/etc/hostname"], "/etc/hostname is not an x86 bzImage"),
    (["image", "build", "--kernel", "/no/such/vmlinuz"], "/no/such/vmlinuz"),
])
def test_bad_cli_arguments_fail_fast_with_a_clear_message(args, message) -> None:
    r = vmlab(*args)
    assert r.returncode != 0 and message in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "booted" not in r.stdout                     # nothing was started
