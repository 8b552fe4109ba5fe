"""vmlab.hostcheck against this real host, plus fake qemu binaries for the failure paths."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab import hostcheck as hc
from vmlab import kernelioctl as kio

QEMU = hc.find_qemu()
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
NO_VHOST_NODE = not os.path.exists(hc.VHOST_VSOCK_DEV)


def _no_hw_virt() -> bool:
    return not hc.cpu_virt_flags() and not any(
        Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd"))


def _script(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_ioctl_numbers_match_kernel_headers():
    assert kio.KVM_GET_API_VERSION == 0xAE00
    assert kio.KVM_CREATE_VM == 0xAE01
    assert kio.KVM_CHECK_EXTENSION == 0xAE03
    assert kio.VHOST_GET_FEATURES == 0x8008AF00
    assert kio.VHOST_SET_OWNER == 0xAF01
    assert kio.VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60


def test_cpu_virt_flags_parses_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu vme svm sse2\n\nprocessor\t: 1\nflags\t\t: fpu svm\n")
    assert hc.cpu_virt_flags(str(f)) == {"svm"}
    f.write_text("flags\t\t: fpu vme hypervisor sse2\n")
    assert hc.cpu_virt_flags(str(f)) == set()
    assert hc.cpu_virt_flags(str(tmp_path / "absent")) == set()


def test_kvm_usable_is_honest_about_this_host():
    check = hc.kvm_usable(probe_qemu=False)
    assert check.name == "kvm" and check.detail and "\n" not in check.detail
    if not os.path.exists(hc.KVM_DEV):
        assert not check.ok and "missing" in check.detail
    if _no_hw_virt():
        assert not check.ok
        assert "vmx" in check.detail and "svm" in check.detail
        assert check.hint


def test_kvm_usable_later_steps_with_hw_virt_assumed(tmp_path, monkeypatch):
    """Pretend the CPU has vmx, so the KVM_CREATE_VM and qemu probe steps run here too."""
    if not _kvm_ioctls_work():
        pytest.skip("/dev/kvm does not create VMs for this user")
    monkeypatch.setattr(hc, "cpu_virt_flags", lambda: {"vmx"})
    assert hc.kvm_usable(probe_qemu=False) == hc.Check("kvm", True, "/dev/kvm usable (API 12, vmx)")
    hang = _script(tmp_path, "qemu-hang", "exec sleep 30\n")
    check = hc.kvm_usable(qemu_path=hang, probe_timeout=0.5)
    assert not check.ok and check.detail == "qemu -accel kvm probe hung for 0.5s"


def test_choose_accel_follows_kvm_check():
    assert hc.choose_accel("tcg") == ("tcg", None)
    with pytest.raises(ValueError):
        hc.choose_accel("hvf")
    if hc.kvm_usable().ok:
        assert hc.choose_accel("auto") == ("kvm", None)
        return
    accel, notice = hc.choose_accel("auto")
    assert accel == "tcg"
    assert notice.startswith("KVM not usable: ") and notice.endswith("falling back to TCG")
    with pytest.raises(hc.AccelUnavailable, match="KVM not usable"):
        hc.choose_accel("kvm")


def test_qemu_kvm_probe_kills_a_hanging_qemu(tmp_path):
    pidfile = tmp_path / "pid"
    fake = _script(tmp_path, "qemu-hang", f'echo $$ > {pidfile}\nexec sleep 30\n')
    ok, why = hc.qemu_kvm_probe(fake, timeout=0.5, name="helper-hostcheck")
    assert not ok and "hung" in why
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_qemu_kvm_probe_reports_qemu_error_line(tmp_path):
    fake = _script(tmp_path, "qemu-err",
                   'echo "qemu-system-x86_64: -accel kvm: Could not access KVM kernel module" >&2\nexit 1\n')
    ok, why = hc.qemu_kvm_probe(fake, timeout=5, name="helper-hostcheck")
    assert not ok
    assert why == "qemu -accel kvm probe failed: qemu-system-x86_64: -accel kvm: Could not access KVM kernel module"


def _kvm_ioctls_work() -> bool:
    import fcntl
    try:
        fd = os.open(hc.KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.close(fcntl.ioctl(fd, hc.KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@needs_qemu
def test_qemu_kvm_probe_real_qemu_agrees_with_ioctls():
    ok, why = hc.qemu_kvm_probe(QEMU, timeout=10, name="helper-hostcheck")
    assert ok == _kvm_ioctls_work(), why


def test_qemu_has_device_parses_help_and_caches(tmp_path):
    counter = tmp_path / "calls"
    fake = _script(tmp_path, "qemu-dev", f'echo x >> {counter}\n'
                   'echo \'name "vhost-vsock-pci", bus PCI\'\n'
                   'echo \'name "vhost-user-vsock-pci", bus PCI, desc "x"\'\n')
    assert hc.qemu_has_device(fake, "vhost-vsock-pci")
    assert hc.qemu_has_device(fake, "vhost-user-vsock-pci")
    assert not hc.qemu_has_device(fake, "vhost-vsock")
    assert counter.read_text().count("x") == 1


def test_a_qemu_that_does_not_answer_is_unknown_not_missing(tmp_path, monkeypatch):
    """In the nested lab `qemu -device help` takes a minute; a timeout must not read as 'no device'."""
    monkeypatch.setattr(hc, "QEMU_PROBE_TIMEOUT", 0.5)
    slow = _script(tmp_path, "qemu-slow", "sleep 5\n")
    assert hc.qemu_has_device(slow, "vhost-vsock-pci") is None
    vu = hc.vhost_user_usable(slow)
    assert vu.ok and "did not list its devices" in vu.detail
    broken = _script(tmp_path, "qemu-broken", "exit 1\n")
    assert hc.qemu_has_device(broken, "vhost-vsock-pci") is None


@needs_qemu
def test_real_qemu_version_and_vsock_devices():
    assert hc.qemu_version(QEMU).count(".") >= 1
    assert hc.qemu_has_device(QEMU, "vhost-vsock-pci")
    assert hc.qemu_has_device(QEMU, "vhost-user-vsock-pci")


def test_vhost_vsock_usable_matches_device_node():
    check = hc.vhost_vsock_usable()
    if NO_VHOST_NODE:
        assert not check.ok
        assert "missing" in check.detail
        assert "modprobe vhost_vsock" in check.hint
    elif check.ok:
        assert "features" in check.detail


@pytest.mark.skipif(not NO_VHOST_NODE, reason="/dev/vhost-vsock exists on this host")
def test_resolve_transport_without_vhost_vsock():
    transport, notice = hc.resolve_transport("auto")
    assert transport == "vhost-user"
    assert "vhost" in notice and "missing" in notice
    with pytest.raises(hc.TransportUnavailable) as err:
        hc.resolve_transport("vhost")
    msg = str(err.value)
    assert "transport 'vhost' unavailable" in msg
    assert "modprobe vhost_vsock" in msg and "vhost-user" in msg


def test_resolve_transport_explicit_and_invalid():
    assert hc.resolve_transport("vhost-user") == ("vhost-user", None)
    with pytest.raises(ValueError, match="unknown transport"):
        hc.resolve_transport("virtio")


def test_resolve_transport_checks_qemu_devices(tmp_path):
    fake = _script(tmp_path, "qemu-nodev", 'echo \'name "virtio-net-pci", bus PCI\'\n')
    with pytest.raises(hc.TransportUnavailable, match="vhost-user-vsock-pci"):
        hc.resolve_transport("vhost-user", qemu_path=fake)


def test_elf_static_detection(tmp_path):
    assert hc._elf_is_static(os.path.realpath(sys.executable)) is False
    text = tmp_path / "t.sh"
    text.write_text("#!/bin/sh\n")
    assert hc._elf_is_static(str(text)) is None
    busybox = hc.check_busybox()
    assert busybox.name == "busybox-static" and busybox.detail


def test_privileges_as_root():
    if os.geteuid() == 0:
        assert hc.has_cap_net_bind_service()
        assert hc.check_privileges().ok


def test_image_callback_problems_and_crash():
    rep = hc.check_host(image_status=lambda: {"problems": ["no kernel found:\n  - x"],
                                              "kernel_version": None})
    img = next(c for c in rep.checks if c.name == "image")
    assert not img.ok and not img.optional and img.detail == "no kernel found: - x"
    assert not rep.ok

    def boom() -> dict:
        raise RuntimeError("cache unreadable")

    img = next(c for c in hc.check_host(image_status=boom).checks if c.name == "image")
    assert not img.ok and "cache unreadable" in img.detail

    good = hc.check_host(image_status=lambda: {"problems": [], "kernel_version": "6.1.0",
                                               "kernel_origin": "host", "up_to_date": True})
    img = next(c for c in good.checks if c.name == "image")
    assert img.ok and "6.1.0" in img.detail and "cached" in img.detail
    assert good.image["kernel_version"] == "6.1.0"


def test_report_text_and_json_round_trip():
    rep = hc.check_host()
    assert rep.accel in ("kvm", "tcg")
    assert set(rep.transports) <= {"vhost", "vhost-user"}
    if NO_VHOST_NODE:
        assert "vhost" not in rep.transports
    again = hc.HostReport.from_dict(json.loads(hc.to_json(rep)))
    assert again == rep
    assert json.loads(hc.to_json(rep))["ok"] == rep.ok

    text = hc.render_text(rep)
    lines = text.splitlines()
    for c in rep.checks:
        line = next(l for l in lines if l.split()[1:2] == [c.name])
        assert line.split()[0] == c.status
        assert c.detail in line
    assert lines[-1] == ("host ready" if rep.ok else "host NOT ready")


def test_cli_json_is_parseable_by_other_tools():
    out = subprocess.run([sys.executable, "-c",
                          "from vmlab.hostcheck import check_host, to_json; print(to_json(check_host()))"],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    d = json.loads(out)
    assert {"kvm", "vhost_vsock", "vhost_user_vsock_device", "transports", "accel", "checks"} <= d.keys()
