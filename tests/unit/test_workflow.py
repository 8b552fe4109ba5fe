"""The GitHub Actions workflow has the shape docs/ci.md promises (we cannot run it here)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
REQUIRED_APT = {"qemu-system-x86", "busybox-static", "socat", "cpio", "kmod", "tshark", "gcc", "zstd"}
INSTALL_SCRIPT = REPO / "scripts" / "install-deps"


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _runs(job: dict) -> list:
    return [s["run"] for s in job["steps"] if "run" in s]


def _all_steps(wf: dict) -> list:
    return [s for job in wf["jobs"].values() for s in job["steps"]]


def test_triggers(wf):
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in on and "pull_request" in on


def test_jobs_exist_on_ubuntu(wf):
    assert {"unit", "vhost", "vhost-user"} <= set(wf["jobs"])
    for job in wf["jobs"].values():
        assert job["runs-on"] == "ubuntu-latest"
        assert job["timeout-minutes"] > 0


def test_every_step_is_a_command_or_pinned_action(wf):
    for step in _all_steps(wf):
        assert ("run" in step) != ("uses" in step), step
        if "run" in step:
            assert isinstance(step["run"], str) and step["run"].strip(), step
        else:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_run_steps_are_valid_bash(wf):
    """GitHub runs `run:` with `bash -e`; `bash -n` catches quoting and heredoc slips."""
    for step in _all_steps(wf):
        if "run" in step:
            script = re.sub(r"\$\{\{[^}]*\}\}", "EXPR", step["run"])
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
            assert proc.returncode == 0, f"{step.get('name', script)}: {proc.stderr}"


def test_vhost_job_loads_module_and_uses_vhost_transport(wf):
    runs = "\n".join(_runs(wf["jobs"]["vhost"]))
    assert "modprobe vhost_vsock" in runs
    assert "chmod 0666 /dev/vhost-vsock" in runs
    assert 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"' in runs
    assert "udevadm trigger --name-match=kvm" in runs
    assert "chmod 0644 /boot/vmlinuz-*" in runs
    assert "python -m vmlab check" in runs
    pytest_cmd = next(r for r in _runs(wf["jobs"]["vhost"]) if "-m pytest" in r)
    args = shlex.split(pytest_cmd)
    assert args[args.index("--vmlab-transport") + 1] == "vhost"
    assert args[args.index("-n") + 1] == "2"
    assert "--vmlab-artifacts" in args


def test_vhost_user_job_does_not_need_vhost_vsock(wf):
    runs = _runs(wf["jobs"]["vhost-user"])
    assert not any("vhost_vsock" in r for r in runs)
    args = shlex.split(next(r for r in runs if "-m pytest" in r))
    assert args[args.index("--vmlab-transport") + 1] == "vhost-user"


@pytest.mark.parametrize("job", ["vhost", "vhost-user"])
def test_artifacts_uploaded_on_failure(wf, job):
    ups = [s for s in wf["jobs"][job]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(ups) == 1
    assert ups[0]["if"] == "failure()"
    assert ups[0]["with"]["path"].rstrip("/") == "artifacts"


def test_python_matrix_only_for_unit(wf):
    versions = wf["jobs"]["unit"]["strategy"]["matrix"]["python"]
    assert versions == ["3.10", "3.11", "3.12"]  # strings: a bare 3.10 would be 3.1
    assert all("strategy" not in wf["jobs"][j] for j in ("vhost", "vhost-user"))


def _install_script_packages() -> set:
    text = INSTALL_SCRIPT.read_text()
    match = re.search(r'^APT_PACKAGES="([^"]+)"', text, re.M)
    assert match, "scripts/install-deps must define APT_PACKAGES"
    return set(match.group(1).split())


def test_install_script_has_the_required_packages():
    assert REQUIRED_APT <= _install_script_packages()


def test_every_job_installs_with_the_shared_script(wf):
    """README, .ci/run and every CI job install the same things, from one script."""
    for name, job in wf["jobs"].items():
        assert any(r.strip() == "scripts/install-deps" for r in _runs(job)), f"job {name} does not run scripts/install-deps"
    assert "scripts/install-deps" in (REPO / ".ci" / "run").read_text()
    assert "scripts/install-deps" in (REPO / "README.md").read_text()


def test_actionlint_accepts_workflow():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint not installed")
    proc = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
