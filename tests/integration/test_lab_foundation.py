"""The foundation with real guests: console runner, QMP control, kernel error detection, teardown."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmlab.lab import Lab, LabOptions
from vmlab.qemu.console import ConsoleError, KernelError
from vmlab.scenario import VmSpec, inline_scenario

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def qemu_pids_with(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{text}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def plain_lab():
    """One guest without vsock, shared by the console and QMP tests of this module."""
    with Lab(inline_scenario(vms=[VmSpec(name="plain", vsock=False)])) as lab:
        yield lab


def test_console_run_returns_exit_code_and_exact_output(plain_lab):
    vm = plain_lab.vm("plain")
    assert vm.run("echo hello; echo world") == (0, "hello\nworld\n")
    assert vm.run("exit_code() { return 7; }; exit_code")[0] == 7
    rc, out = vm.run("cat /proc/cmdline")
    assert rc == 0 and "vmlab.name=plain" in out and "console=ttyS0" in out


def test_console_outputs_never_leak_between_commands(plain_lab):
    vm = plain_lab.vm("plain")
    rc, out = vm.run("seq 1 3000")
    assert rc == 0 and out.split() == [str(i) for i in range(1, 3001)]
    for i in range(5):
        assert vm.run(f"echo only-{i}") == (0, f"only-{i}\n")


def test_console_timeout_reports_last_lines_and_recovers(plain_lab):
    vm = plain_lab.vm("plain")
    with pytest.raises(ConsoleError) as info:
        vm.run("echo before-the-hang; sleep 30", timeout=2)
    assert "timed out" in str(info.value) and "before-the-hang" in str(info.value)
    assert vm.run("echo recovered") == (0, "recovered\n")


def test_qmp_status_stop_cont(plain_lab):
    vm = plain_lab.vm("plain")
    assert vm.qmp.status() == "running"
    vm.qmp.stop()
    assert vm.qmp.status() == "paused"
    vm.qmp.wait_event("STOP", timeout=5)
    with pytest.raises(ConsoleError):
        vm.run("echo while-paused", timeout=1.5)  # a paused guest cannot answer
    vm.qmp.cont()
    assert vm.qmp.status() == "running"
    assert vm.run("echo resumed", timeout=20)[1].endswith("resumed\n")


def test_qmp_system_reset_reboots_the_guest(plain_lab):
    vm = plain_lab.vm("plain")
    vm.run("echo marker > /tmp/before-reset")
    mark = len(vm.qmp.events)
    vm.qmp.system_reset()
    vm.qmp.wait_event("RESET", timeout=10, since=mark)
    vm.wait_ready(120)
    assert vm.run("test -e /tmp/before-reset")[0] == 1  # fresh initramfs after the reboot
    assert vm.machine.alive()


def test_qmp_events_are_logged(plain_lab):
    log = plain_lab.vm("plain").machine.qmp_log.read_text()
    assert '"event": "STOP"' in log and '"execute": "cont"' in log


BARRIER_QEMU = """#!/bin/sh
# Go on only once all {n} QEMUs of the lab have been forked: a lab that waited for one guest's
# console before forking the next would never let the first one get past this.
touch "{dir}/$$"
tries=0
while [ "$(ls "{dir}" | wc -l)" -lt {n} ]; do
    tries=$((tries + 1))
    if [ $tries -gt 300 ]; then echo "only $(ls "{dir}" | wc -l) of {n} QEMUs were started" >&2; exit 1; fi
    sleep 0.1
done
exec qemu-system-x86_64 "$@"
"""


def test_every_qemu_is_forked_before_the_lab_waits_for_any_console(tmp_path):
    barrier = tmp_path / "started"
    barrier.mkdir()
    wrapper = tmp_path / "barrier-qemu"
    wrapper.write_text(BARRIER_QEMU.format(n=3, dir=barrier))
    wrapper.chmod(0o755)
    vms = [VmSpec(name=f"b{i}", vsock=False) for i in range(3)]
    with Lab(inline_scenario(vms=vms), LabOptions(qemu=str(wrapper))) as lab:
        lab_id = lab.lab_id
        assert [vm.run(f"echo {vm.name}") for vm in lab.vms] == [(0, f"b{i}\n") for i in range(3)]
    assert len(list(barrier.iterdir())) == 3
    assert not qemu_pids_with(lab_id)


def test_kernel_panic_is_detected_and_teardown_is_clean():
    lab = Lab(inline_scenario(vms=[VmSpec(name="crash", vsock=False)]))
    with pytest.raises(KernelError, match="Kernel panic"):
        with lab:
            lab_id = lab.lab_id
            vm = lab.vm("crash")
            vm.run("echo c > /proc/sysrq-trigger", timeout=30)
    assert "crash" in lab.kernel_errors() and lab.failed
    assert not qemu_pids_with(lab_id)
    assert not lab.runtime.path.exists()


def test_teardown_after_an_exception_leaves_nothing():
    class Boom(Exception):
        pass

    lab = Lab(inline_scenario(vms=[VmSpec(name="a", vsock=False), VmSpec(name="b", vsock=False)]))
    with pytest.raises(Boom):
        with lab:
            pids = [vm.machine.pid for vm in lab.vms]
            assert all(qemu_pids_with(lab.lab_id) for _ in pids)
            raise Boom()
    assert not qemu_pids_with(lab.lab_id)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert not lab.runtime.path.exists()


def _start_cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vmlab", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not printed; got:\n{''.join(seen)}")


def qemu_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "qemu-system"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("when", ["kept", "booting"])
def test_sigint_to_vmlab_run_tears_everything_down(tmp_path, when):
    scenario = tmp_path / "keep.yaml"
    scenario.write_text("vms:\n  - {name: k1, vsock: false}\n  - {name: k2, vsock: false}\n"
                        "steps:\n  - run: {vm: k1, command: 'true'}\n")
    proc = _start_cli(["run", "--keep", str(scenario)], tmp_path)
    try:
        if when == "kept":
            _read_until(proc, "is up; Ctrl-C", 240)
        else:
            _read_until(proc, "scenario keep", 60)
            deadline = time.monotonic() + 60
            while len(qemu_children(proc.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        qemus = qemu_children(proc.pid)
        assert len(qemus) == 2, "the lab's QEMUs should be running before the signal"
        run_dirs = {Path(p).parent for p in Path("/proc", str(qemus[0]), "cmdline").read_bytes().decode().split("\0")
                    if p.endswith(".serial")}
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "tearing the lab down" in rest
    for pid in qemus:
        assert not Path(f"/proc/{pid}").exists(), f"qemu {pid} survived SIGINT"
    for run_dir in run_dirs:
        assert not run_dir.exists(), f"runtime dir {run_dir} left behind"


def test_qmp_system_powerdown_is_an_orderly_guest_poweroff():
    with Lab(inline_scenario(vms=[VmSpec(name="off", vsock=False)])) as lab:
        vm = lab.vm("off")
        vm.qmp.system_powerdown()
        assert vm.machine.wait_exit(60) == 0
        event = vm.qmp.wait_event("SHUTDOWN", timeout=5)
        assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
