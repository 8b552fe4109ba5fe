"""The vmlab command line as a user meets it: help, check, validate, image, console on a kept lab."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

REPO = Path(__file__).resolve().parents[2]


def vmlab(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vmlab", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args", [[], ["run"], ["check"], ["image", "build"], ["image", "status"],
                                  ["console"], ["ls"], ["validate"], ["replay"], ["qmp"],
                                  ["exec-guest"], ["capture"], ["exec"],
                                  ["kernel"], ["kernel", "build"], ["kernel", "ls"], ["kernel", "rm"], ["bisect"]])
def test_every_command_has_help(args):
    proc = vmlab(*args, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vmlab"), proc.stderr


def test_exec_without_a_lab_or_program_says_so():
    proc = vmlab("exec", "--lab", "no-such-lab", "--", "true")
    assert proc.returncode == 2 and "no running lab 'no-such-lab'" in proc.stderr
    proc = vmlab("exec", "--lab", "no-such-lab")
    assert proc.returncode == 2 and "no program given" in proc.stderr


def test_check_reports_honestly_in_text_and_json():
    text = vmlab("check")
    assert "qemu" in text.stdout.lower() and "kvm" in text.stdout.lower()
    report = json.loads(vmlab("check", "--json").stdout)
    assert "vhost-user" in report["transports"]
    cpu_flags = Path("/proc/cpuinfo").read_text()
    if not re.search(r"\b(vmx|svm)\b", cpu_flags):
        assert report["accel"] == "tcg" and not report["kvm"]["ok"] and report["kvm"]["detail"]
    if not Path("/dev/vhost-vsock").exists():
        assert "vhost" not in report["transports"] and not report["vhost_vsock"]["ok"]


def test_validate_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vms:\n  - name: a\n    cid: 3\n  - name: b\n    cid: 3\n    memroy: 128M\n")
    proc = vmlab("validate", str(bad), str(REPO / "scenarios" / "hello.yaml"))
    assert proc.returncode == 2
    assert f"{bad}:5:" in proc.stderr and "CID 3 is already used" in proc.stderr
    assert f"{bad}:6:" in proc.stderr and "memory" in proc.stderr      # did-you-mean for the typo
    assert "hello.yaml: ok" in proc.stdout


@pytest.mark.integration
def test_image_build_uses_the_cache_and_status_agrees():
    built = vmlab("image", "build")
    assert built.returncode == 0, built.stderr
    initrd = re.search(r"initrd: (\S+)", built.stdout).group(1)
    assert Path(initrd).is_file()
    status = json.loads(vmlab("image", "status").stdout)
    assert status["up_to_date"] is True and str(status["initrd"]) == initrd


@pytest.mark.integration
def test_console_attaches_to_a_kept_vm_and_detaches(tmp_path):
    scenario = tmp_path / "kept.yaml"
    scenario.write_text("vms:\n  - {name: kept, vsock: false}\nsteps:\n  - run: {vm: kept, command: 'echo ok'}\n")
    run = pexpect.spawn(sys.executable, ["-m", "vmlab", "run", "--keep", str(scenario)], cwd=str(REPO),
                        encoding="utf-8", timeout=240)
    try:
        run.expect(r"lab (lab-\S+) is up")
        lab_id = run.match.group(1)
        run.expect(r"vmlab console kept --lab")
        ls = vmlab("ls")
        assert lab_id in ls.stdout and "kept" in ls.stdout
        console = pexpect.spawn(sys.executable, ["-m", "vmlab", "console", "kept", "--lab", lab_id],
                                cwd=str(REPO), encoding="utf-8", timeout=60)
        console.expect("attached to kept")
        console.send("echo hello-from-the-console\r")
        console.expect("hello-from-the-console")
        console.send("\x1d")
        console.expect("detached")
        console.expect(pexpect.EOF)
        run.kill(signal.SIGINT)
        run.expect("tearing the lab down")
        run.expect(pexpect.EOF)
    finally:
        if run.isalive():
            run.terminate(force=True)
    run.close()
    assert run.exitstatus == 130
    assert lab_id not in vmlab("ls").stdout


@pytest.mark.integration
def test_run_with_pcap_writes_a_capture_wireshark_decodes(tmp_path):
    pcap = tmp_path / "hello.pcap"
    proc = vmlab("run", "scenarios/hello.yaml", "--transport", "vhost-user", "--pcap", str(pcap))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"capture: {pcap}" in proc.stdout and pcap.stat().st_size > 24
    fields = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "vsock.src_cid", "-e", "vsock.dst_cid",
                             "-e", "vsock.dst_port", "-e", "vsock.op"], capture_output=True, text=True, timeout=60)
    assert fields.returncode == 0, fields.stderr
    rows = [line.split("\t") for line in fields.stdout.splitlines() if line.strip()]
    assert ["3", "2", "9999", "1"] in rows          # vsockmon op CONNECT: the guest's REQUEST to port 9999
    assert ["3", "2", "9999", "4"] in rows          # vsockmon op PAYLOAD: the RW data packet
    assert b"Hello, world!" in pcap.read_bytes()   # payloads are captured, not just headers
