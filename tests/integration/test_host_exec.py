"""Unmodified host AF_VSOCK programs against real guests: `vmlab exec`, the `host_run` fixture.

One lab of two guests for the module. On vhost-user (this machine) the programs run under the
LD_PRELOAD shim; on vhost they run unchanged. The reference notes' servers are
scenarios/repro/notes/, byte for byte as the notes have them; the C one is compiled from a copy
with its stray "liesten" token line read as `listen(s, 0);`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

VMLAB_SCENARIO = [{"name": "a", "memory_mib": 256}, {"name": "b", "memory_mib": 256}]
ROOT = Path(__file__).resolve().parents[2]
NOTES = ROOT / "scenarios" / "repro" / "notes"
STRAY_LISTEN = re.compile(r"^\tlisten\(s, 0\); -*liesten$", re.M)


def _compile(src: Path, out: Path, *extra: str) -> Path:
    r = subprocess.run(["gcc", "-O2", "-o", str(out), str(src), *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def notes_c_server(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("bin")
    src = STRAY_LISTEN.subn("\tlisten(s, 0);", (NOTES / "server.c").read_text())
    assert src[1] == 1, "the notes' server.c no longer has its stray listen line"
    (build / "server.c").write_text(src[0])
    return _compile(build / "server.c", build / "notes_server", "-w")


def _vmlab_exec(lab, *argv: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "vmlab", "exec", "--lab", lab.lab_id, "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, **kwargs)


def _wait_listening(lab, port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    from vmlab.shim import LabTarget
    from vmlab.shim.process import unix_listening, vsock_listening

    target = LabTarget.from_lab(lab)
    deadline = time.monotonic() + timeout
    while True:
        up = unix_listening(f"{target.host_ns}:{port}") if target.shimmed else vsock_listening(port)
        if up:
            return
        if proc.poll() is not None:
            pytest.fail(f"program exited {proc.returncode} before listening: {proc.stdout.read()}")
        assert time.monotonic() < deadline, f"nothing listens on vsock port {port}"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 60, input: str | None = None) -> str:
    try:
        out, _ = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"program did not finish: {out[-2000:]}")
    return out


# -- the reference notes' servers ---------------------------------------------------------------

def test_notes_c_server_under_vmlab_exec(module_lab, guest, notes_c_server):
    a = module_lab.vm("a")
    proc = _vmlab_exec(module_lab, str(notes_c_server))
    try:
        _wait_listening(module_lab, 9999, proc)
        client = guest(a).connect(2, 9999, send="Hello, world!")
        assert client.errors() == [], client.summary()
        out = _finish(proc)
    finally:
        proc.kill()
    assert "Received 13 bytes: Hello, world!" in out, out
    assert proc.returncode == 0


def test_notes_python_server_with_host_run(module_lab, guest, host_run):
    b = module_lab.vm("b")
    server = host_run(module_lab, [sys.executable, str(NOTES / "server.py")], background=True)
    server.wait_listening(9999, timeout=60)
    client = guest(b).connect(2, 9999, send="Hello, world!")
    assert client.errors() == [], client.summary()
    assert server.wait(60) == 0, server.output()
    out = server.output()
    assert f"Connection opened by cid={b.cid} port=" in out, out
    assert "Received bytes: b'Hello, world!'" in out, out


def test_one_listener_gets_every_vm(module_lab, guest, host_run):
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "s.bind((socket.VMADDR_CID_ANY, 6100)); s.listen()\n"
        "for _ in range(2):\n"
        "    c, (cid, port) = s.accept()\n"
        "    print('peer', cid, port, c.getsockname(), c.recv(64).decode(), flush=True)\n"
    )
    server = host_run(module_lab, [sys.executable, "-c", script], background=True)
    server.wait_listening(6100, timeout=60)
    for vm in module_lab.vms:
        client = guest(vm).connect(2, 6100, send=f"hi from {vm.name}")
        assert client.errors() == [], client.summary()
    assert server.wait(60) == 0, server.output()
    out = server.output()
    for vm in module_lab.vms:
        assert f"peer {vm.cid} " in out and f"(2, 6100) hi from {vm.name}" in out, out


# -- socat ------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is installed by scripts/install-deps")
def test_socat_vsock_listen(module_lab, guest):
    a = module_lab.vm("a")
    proc = _vmlab_exec(module_lab, "socat", "-u", "VSOCK-LISTEN:6200", "STDOUT")
    try:
        _wait_listening(module_lab, 6200, proc)
        client = guest(a).connect(2, 6200, send="Hello, socat!")
        assert client.errors() == [], client.summary()
        out = _finish(proc)
    finally:
        proc.kill()
    assert out == "Hello, socat!", out


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is installed by scripts/install-deps")
def test_socat_vsock_connect(module_lab, guest):
    b = module_lab.vm("b")
    server = guest(b).listen(6201, chunk=64)
    proc = _vmlab_exec(module_lab, "socat", "-", f"VSOCK-CONNECT:{b.cid}:6201", stdin=subprocess.PIPE)
    out = _finish(proc, input="Hello, guest!")
    assert proc.returncode == 0, out
    server.wait(timeout=30)
    assert server.received_data() == "Hello, guest!"


# -- kernel-like behaviour and errors, from an unmodified Python program ---------------------------

ERRORS_SCRIPT = r'''
import errno, fcntl, json, socket, struct, sys
cid, closed_port, open_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {}
def err(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
S = lambda t=socket.SOCK_STREAM: socket.socket(socket.AF_VSOCK, t)
out["refused"] = err(lambda: S().connect((cid, closed_port)))
def refused_timeout():
    s = S(); s.settimeout(10); s.connect((cid, closed_port))
out["refused_nonblocking"] = err(refused_timeout)
out["no_such_cid"] = err(lambda: S().connect((cid + 1000, closed_port)))
out["dgram"] = err(lambda: S(socket.SOCK_DGRAM))
a = S(); a.bind((socket.VMADDR_CID_HOST, 7777))
out["addr_in_use"] = err(lambda: S().bind((socket.VMADDR_CID_ANY, 7777)))
out["bind_twice"] = err(lambda: a.bind((socket.VMADDR_CID_HOST, 7778)))
out["bind_other_cid"] = err(lambda: S().bind((cid, 7779)))
out["listen_unbound"] = err(lambda: S().listen())
out["peer_unconnected"] = err(lambda: S().getpeername())
out["unbound_name"] = list(S().getsockname())
e = S(); e.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
out["any_port"] = e.getsockname()[1]
out["priv_port"] = err(lambda: S().bind((socket.VMADDR_CID_HOST, 80)))
with open("/dev/vsock", "rb") as f:
    out["local_cid"] = struct.unpack("I", fcntl.ioctl(f, 0x7b9, b"\0" * 4))[0]
b = S()
b.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE, 1 << 30)
out["buffer_clamped"] = b.getsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE)
b.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE, 1 << 30)
b.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE, 1 << 30)
out["buffer_large"] = b.getsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE)
out["domain"] = b.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
c = S(); c.settimeout(20); c.connect((cid, open_port))
out["peer"] = list(c.getpeername())
out["name_cid"] = c.getsockname()[0]
out["greeting"] = c.recv(64).decode()
print(json.dumps(out))
'''


def test_errors_and_options_like_the_kernel(module_lab, guest, host_run, tmp_path):
    a = module_lab.vm("a")
    guest(a).listen(6301, send="greetings")
    script = tmp_path / "errors.py"
    script.write_text(ERRORS_SCRIPT)
    proc = host_run(module_lab, [sys.executable, str(script), str(a.cid), "6300", "6301"], timeout=90,
                    env={"VMLAB_VSOCK_QUIET": "1"})
    assert proc.returncode == 0, proc.output()
    got = json.loads(proc.output().strip().splitlines()[-1])
    assert got["refused"] == "ECONNRESET"              # what virtio reports for an RST to a REQUEST
    assert got["refused_nonblocking"] == "ECONNRESET"
    assert got["no_such_cid"] == "ENODEV"              # no transport reaches that CID
    assert got["dgram"] == "ENODEV"                    # virtio-vsock has no datagram transport
    assert got["addr_in_use"] == "EADDRINUSE"
    assert got["bind_twice"] == "EINVAL"
    assert got["bind_other_cid"] == "EADDRNOTAVAIL"
    assert got["listen_unbound"] == "EINVAL"
    assert got["peer_unconnected"] == "ENOTCONN"
    assert got["unbound_name"] == [0xFFFFFFFF, 0xFFFFFFFF]
    assert 1024 <= got["any_port"] < 0xFFFFFFFF
    assert got["priv_port"] == 0                        # root: CAP_NET_BIND_SERVICE
    assert got["local_cid"] == 2
    assert got["buffer_clamped"] == 262144 and got["buffer_large"] == 1 << 30
    assert got["domain"] == 40
    assert got["peer"] == [a.cid, 6301] and got["name_cid"] == 2
    assert got["greeting"] == "greetings"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) drops the capability")
def test_privileged_port_needs_cap_net_bind_service(module_lab, host_run):
    script = ("import socket\ns = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
              "try:\n    s.bind((socket.VMADDR_CID_HOST, 80))\nexcept PermissionError as e:\n"
              "    print('EACCES', e.errno)\nelse:\n    print('bound')\n")
    proc = host_run(module_lab, ["setpriv", "--bounding-set", "-net_bind_service", sys.executable, "-c", script])
    assert proc.output().strip() == "EACCES 13", proc.output()
    proc = host_run(module_lab, [sys.executable, "-c", script])
    assert proc.output().strip() == "bound", proc.output()


# -- vmlab exec's own errors -------------------------------------------------------------------------

def test_exec_refuses_static_binaries(module_lab, tmp_path):
    if module_lab.transport != "vhost-user":
        pytest.skip("on vhost a static binary uses the kernel's AF_VSOCK directly")
    src = tmp_path / "s.c"
    src.write_text("int main(void){return 0;}\n")
    static = tmp_path / "static-prog"
    r = subprocess.run(["gcc", "-static", "-o", str(static), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"static libc missing (libc6-dev): {r.stderr}")
    proc = _vmlab_exec(module_lab, str(static))
    out = _finish(proc)
    assert proc.returncode == 2
    assert "statically linked" in out and "LD_PRELOAD" in out, out
