"""The reproduction kit end to end (real guests): --until-fail with seeded faults, bundles that
replay to the same failure elsewhere, captures that count each packet once, `--pcap -`."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vmlab.vsock.faults import stream_seed

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLAKY = REPO / "scenarios" / "flaky" / "connect-drop.yaml"


def fault_probability() -> float:
    from vmlab.scenario import load_scenario
    return next(s.params.probability for s in load_scenario(FLAKY).steps if s.action == "fault")


def vmlab(*args: str, cwd: Path, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "vmlab", *args], cwd=cwd, env=env,
                          capture_output=True, timeout=timeout, **kw)


def first_failing_run(seed: int, runs: int) -> int | None:
    """What the fault's RNG stream (keyed by seed and its step, step 2) decides, run by run."""
    p = fault_probability()
    for i in range(1, runs + 1):
        if random.Random(stream_seed(seed + i - 1, "step2")).random() < p:
            return i
    return None


def test_until_fail_stops_at_the_seeded_failure_and_the_bundle_replays_it(tmp_path: Path) -> None:
    seed = next(s for s in range(1000) if first_failing_run(s, 6) == 3)
    work = tmp_path / "here"
    work.mkdir()
    shutil.copy(FLAKY, work / "flaky.yaml")
    bundle = tmp_path / "flaky-bundle.tar.gz"
    proc = vmlab("run", "flaky.yaml", "--until-fail", "--max", "6", "--seed", str(seed),
                 "--bundle-on-failure", str(bundle), cwd=work, text=True)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert f"seed {seed}; up to 6 run(s), reusing the VMs" in out
    assert "run 1/6: PASS" in out and "run 2/6: PASS" in out and "run 3/6: FAIL" in out
    assert "run 4/6" not in out                                   # stopped at the first failure
    assert f"first failing run 3 (seed {seed + 2}" in out
    assert "FAILED: 3 run(s), 1 failed" in out
    failing = next(line for line in out.splitlines() if "FAIL " in line and "expect srv" in line)
    detail = failing.split("  -- ", 1)[1]
    assert "expected message 'hi'" in detail
    with tarfile.open(bundle) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"manifest.json", "reproduce.sh", "report.txt", "scenario/flaky.yaml"} <= names
    assert {"logs/backend.log", "logs/guest.console.log"} <= names
    assert any(n.startswith("logs/") and n.endswith(".pcap") for n in names)

    elsewhere = tmp_path / "elsewhere"            # a fresh directory without the scenario
    elsewhere.mkdir()
    replay = vmlab("replay", str(bundle), cwd=elsewhere, text=True)
    rout = replay.stdout
    assert replay.returncode == 1, rout + replay.stderr
    assert "recorded failure:" in rout and detail in rout       # the same failure, same words
    assert "run 3/3: FAIL" in rout and f"first failing run 3 (seed {seed + 2}" in rout
    assert list(elsewhere.iterdir()) == []         # the replay cleaned up after itself


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_vm_to_vm_capture_streamed_to_stdout_has_each_packet_once(tmp_path: Path) -> None:
    pcap = tmp_path / "stream.pcap"
    with open(pcap, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "vmlab", "run", "scenarios/vm-to-vm.yaml",
                               "--pcap", "-"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=900,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        f.write(proc.stdout)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "PASSED" in err and "scenario vm-to-vm" in err      # the report went to stderr
    assert proc.stdout[:4] == bytes.fromhex("d4c3b2a1")          # stdout is the pcap itself
    rows = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "vsock.virtio.src_cid",
         "-e", "vsock.virtio.dst_cid", "-e", "vsock.virtio.dst_prot", "-e", "vsock.virtio.op",
         "-e", "vsock.virtio.len"], capture_output=True, text=True, timeout=120, check=True,
    ).stdout.splitlines()
    pkts = [r.split("\t") for r in rows if r]
    rw = [p for p in pkts if p[3] == "5"]
    b_to_a = [p for p in rw if p[:3] == ["4", "3", "5000"]]
    assert sum(int(p[4]) for p in b_to_a) == len("hello from b"), pkts     # once, not twice
    assert len(b_to_a) == 1
    requests = [p for p in pkts if p[3] == "1"]
    assert len(requests) == 2, pkts                 # one per connection (b->a, a->b)
