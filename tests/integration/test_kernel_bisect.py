"""`vmlab bisect` on synthetic git trees: one whose "kernel" comes from a stub build command, one
whose commits are real kernel configs.

The stub (data/stub_kernel_build.py) turns the stock kernel into one without vsock_loopback at
the commits that carry the "bug"; one commit does not build. The real one
(data/config_kernel_build.sh) builds the distribution's 6.1 source with vmlab's recipe and each
commit's fragment; the "bug" is a fragment that leaves vsock loopback out. Every tested commit
boots a real guest and runs a real scenario, so good/bad come from vmlab run, not from the build.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().parent / "data" / "stub_kernel_build.py"
CONFIG_BUILD = Path(__file__).resolve().parent / "data" / "config_kernel_build.sh"

SCENARIO = """\
name: loopback-works
vms:
  - name: guest
    cid: 3
steps:
  - run: {vm: guest, command: "modprobe vsock_loopback && grep -q vsock_loopback /proc/modules"}
"""

pytestmark = pytest.mark.integration


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def init_repo(repo: Path) -> None:
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.org")
    git(repo, "config", "user.name", "t")


def make_tree(repo: Path) -> list[str]:
    """c0..c6: loopback in c0-c3, gone from c4 on (the first bad commit); c5 does not build."""
    init_repo(repo)
    commits = []
    for i in range(7):
        (repo / "loopback").write_text("no\n" if i >= 4 else "yes\n")
        (repo / "version").write_text(f"{i}\n")
        broken = repo / "BROKEN"
        if i == 5:
            broken.write_text("x\n")
        elif broken.exists():
            broken.unlink()
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"c{i}" + (" drops vsock_loopback" if i == 4 else ""))
        commits.append(git(repo, "rev-parse", "HEAD"))
    return commits


def stock_root() -> Path:
    from vmlab.image.cache import cache_root
    from vmlab.image.kernel import resolve_kernel

    ksrc = resolve_kernel(None, cache_root())
    if ksrc.modules_dir is None:
        pytest.skip("the default kernel has no modules directory to build the stub from")
    return ksrc.vmlinuz.parent.parent


@pytest.fixture
def forget_builds(tmp_path):
    """The stub builds land in the real kernel store; remove them afterwards."""
    yield
    from vmlab.kernel import store
    for build in store.all_builds():
        if build.meta.source.startswith(str(tmp_path)):
            store.remove(build)


def test_bisect_finds_the_first_bad_commit(tmp_path, forget_builds):
    repo = tmp_path / "linux"
    commits = make_tree(repo)
    scenario = tmp_path / "loopback.yaml"
    scenario.write_text(SCENARIO)
    logs = tmp_path / "logs"
    env = {**os.environ, "STUB_KERNEL_ROOT": str(stock_root())}
    proc = subprocess.run(
        [sys.executable, "-m", "vmlab", "bisect", "--src", str(repo), "--logs", str(logs),
         "--build-cmd", f"{sys.executable} {STUB}", commits[0], commits[6], "--", str(scenario)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"first bad commit: {commits[4]}" in proc.stdout, proc.stdout
    steps = [json.loads(l) for l in (logs / "steps.jsonl").read_text().splitlines()]
    verdicts = {s["commit"]: s["verdict"] for s in steps}
    assert verdicts[commits[4]] == "bad"
    assert all(v == "good" for c, v in verdicts.items() if commits.index(c) < 4)
    assert verdicts.get(commits[5], "skip") == "skip"
    # the first bad commit's logs are kept: build log and the failing run's console
    kept = logs / commits[4][:12]
    assert (kept / "build.log").read_text().count("loopback=no") == 1
    assert "FAILED" in (kept / "run-1.out").read_text()
    assert list((kept / "run-1").glob("*.console.log"))
    # the tree is back where it was, with no bisect in progress
    assert git(repo, "rev-parse", "HEAD") == commits[6]
    assert not (repo / ".git" / "BISECT_START").exists()


def test_bisect_refuses_a_dirty_tree_and_bad_refs(tmp_path):
    repo = tmp_path / "linux"
    commits = make_tree(repo)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SCENARIO)
    run = lambda *a: subprocess.run([sys.executable, "-m", "vmlab", "bisect", "--src", str(repo), *a],
                                    cwd=tmp_path, capture_output=True, text=True, timeout=120)
    p = run("nonesuch", commits[6], "--", str(scenario))
    assert p.returncode == 2 and "'nonesuch' is not a commit" in p.stderr
    p = run(commits[0], commits[6])
    assert p.returncode == 2 and "needs a scenario" in p.stderr
    (repo / "version").write_text("dirty\n")
    p = run(commits[0], commits[6], "--", str(scenario))
    assert p.returncode == 2 and "uncommitted changes" in p.stderr


def test_bisect_over_real_kernel_builds_of_two_configs(tmp_path, forget_builds):
    """c0-c1: vmlab's config; c2 (the first bad commit) leaves vsock loopback out; c3, c4 too.
    Two real kernels: vmlab's minimal one (cached by install-deps) and one without loopback (an
    incremental build of the same tree, cached afterwards). scenarios/loopback.yaml decides."""
    repo = tmp_path / "configs"
    init_repo(repo)
    commits = []
    for i in range(5):
        (repo / "frag.config").write_text("# CONFIG_VSOCKETS_LOOPBACK is not set\n" if i >= 2 else "")
        (repo / "version").write_text(f"{i}\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"c{i}" + (" drops vsock loopback" if i == 2 else ""))
        commits.append(git(repo, "rev-parse", "HEAD"))
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [sys.executable, "-m", "vmlab", "bisect", "--src", str(repo), "--logs", str(logs),
         "--build-cmd", f"sh {CONFIG_BUILD}", commits[0], commits[4], "--", str(REPO / "scenarios" / "loopback.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"first bad commit: {commits[2]}" in proc.stdout, proc.stdout
    steps = [json.loads(l) for l in (logs / "steps.jsonl").read_text().splitlines()]
    verdicts = {s["commit"]: s["verdict"] for s in steps}
    assert verdicts[commits[2]] == "bad" and verdicts.get(commits[1], "good") == "good"
    # the kernels were real builds: the first bad commit's has no loopback, a good one's has it
    from vmlab.kernel import store
    configs = {b.meta.commit: (b.kernel.parent / "config").read_text() for b in store.all_builds()
               if b.meta.source.startswith(str(tmp_path))}
    assert "# CONFIG_VSOCKETS_LOOPBACK is not set" in configs[commits[2]]
    good = [c for c in commits[:2] if c in configs]
    assert all("CONFIG_VSOCKETS_LOOPBACK=y" in configs[c] for c in good)
    print(proc.stdout)
