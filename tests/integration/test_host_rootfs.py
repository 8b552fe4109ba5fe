"""rootfs: host guests boot the host's own userspace read-only and keep vmlab's console contract."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "scenarios" / "repro" / "notes" / "client.py"
PY_TIMEOUT = 240  # the host's python starting over 9p under TCG on a busy machine


@pytest.mark.vmlab(vms=[{"name": "h", "rootfs": "host", "files": {"/root/client.py": CLIENT}}])
def test_the_notes_python_client_runs_in_a_host_rootfs_guest(lab, vsock_listen, guest):
    vm = lab.vm("h")
    with vsock_listen(lab, 9999) as server:
        vm.check("cd /root && python3 client.py", timeout=PY_TIMEOUT)
        with server.accept(timeout=30) as conn:
            assert conn.recv_all() == b"Hello, world!"
    # byte for byte the notes' file, not a copy of it vmlab rewrote
    assert vm.check("sha256sum /root/client.py").split()[0] == \
        subprocess.run(["sha256sum", str(CLIENT)], capture_output=True, text=True).stdout.split()[0]
    vm.check("python3 -c 'import socket; socket.AF_VSOCK'", timeout=PY_TIMEOUT)
    assert "socat version" in vm.check("socat -V", timeout=60)
    # the same interpreter (and vmlab) as the host's
    assert vm.check(f"test -x {sys.executable} && command -v python3").strip() == \
        str(Path(sys.executable).parent / "python3")
    # the helper is still there, and the console contract holds (exit codes, output)
    assert guest(vm).info()["cid"] == vm.cid
    assert vm.run("exit 7") == (7, "")


@pytest.mark.vmlab(vms=1, rootfs="host")
def test_the_host_is_never_written_and_the_writable_places_are_in_guest_ram(lab):
    vm = lab.vm("vm0")
    name = f"vmlab-ro-{uuid.uuid4().hex[:8]}"
    for path in (f"/usr/{name}", f"/{name}", f"/work/{name}"):
        rc, out = vm.run(f"touch {path}")
        assert rc != 0 and "Read-only file system" in out, (path, out)
        assert not os.path.exists(path)
    # /etc and /root are overlays: writes land in guest RAM, never on the host
    vm.check(f"echo guest >/etc/{name} && echo guest >/root/{name} && cat /etc/{name} /root/{name}")
    assert not os.path.exists(f"/etc/{name}") and not os.path.exists(f"/root/{name}")
    mounts = vm.check("cat /proc/mounts")
    assert "vmlabroot / 9p ro," in mounts
    for tmp in ("/tmp", "/run", "/var/tmp"):
        assert f"tmpfs {tmp} tmpfs" in mounts
    # even a remount read-write cannot get through: QEMU exports the root readonly=on
    vm.run("mount -o remount,rw / 2>&1; true")
    rc, out = vm.run(f"echo x >/usr/{name}")
    assert rc != 0 and not os.path.exists(f"/usr/{name}"), out
    # the guest kernel's own modules are at /lib/modules/$(uname -r), e.g. for vhost_vsock
    # (a module-free kernel, vmlab's minimal one, has none to load)
    vm.check("test ! -e /proc/modules || { modprobe vhost_vsock && test -c /dev/vhost-vsock; }", timeout=60)


def test_vmlab_run_rootfs_host_runs_hello(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vmlab", "run", "--rootfs", "host", "scenarios/hello.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "srv received 13 bytes: 'Hello, world!'" in proc.stdout


def test_vmlab_run_rootfs_host_refuses_a_scenario_it_cannot_honour():
    """reproducer.yaml writes /usr/local/bin and mounts a share: said before anything boots."""
    proc = subprocess.run([sys.executable, "-m", "vmlab", "run", "--rootfs", "host", "scenarios/reproducer.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "VM 'guest' with rootfs host: share: is not available" in proc.stdout
