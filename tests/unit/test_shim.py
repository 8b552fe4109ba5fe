"""The vmlab exec shim with real sockets and no guests: this test plays the backend's host side
(the CONNECT/OK handshake, the accept preamble) and checks what an unmodified Python program
sees through the LD_PRELOAD library."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmlab.shim import (
    LabTarget, ShimError, build_shim, check_program, command_argv, elf_is_static, shim_env,
)
from vmlab.shim.process import HostProcess, unix_listening


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    return build_shim(cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def target(tmp_path: Path) -> LabTarget:
    ns = f"vmlab-test:{os.getpid()}:{abs(hash(str(tmp_path))) % 10**12}"   # abstract names are short
    return LabTarget(lab_id="lab-test", transport="vhost-user", host_ns=ns,
                     uds_paths={3: str(tmp_path / "a.vsock")})


def run_py(code: str, target: LabTarget, shim: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = shim_env(target, shim=shim)
    env["VMLAB_VSOCK_QUIET"] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_build_is_cached_by_content(shim: Path, tmp_path: Path) -> None:
    assert shim.is_file() and shim.name == "libvmlab-vsock.so"
    assert build_shim(cache=shim.parents[2]) == shim
    src = tmp_path / "vsock_shim.c"
    src.write_text("int x;\n")
    other = build_shim(cache=shim.parents[2], src=src)
    assert other != shim and other.is_file()
    src.write_text("this is not C\n")
    with pytest.raises(ShimError, match="compiling vsock_shim.c failed"):
        build_shim(cache=shim.parents[2], src=src)


def test_env_on_vhost_is_untouched_and_on_vhost_user_preloads(target: LabTarget, shim: Path) -> None:
    vhost = LabTarget(lab_id="x", transport="vhost", uds_paths={})
    assert shim_env(vhost, base={"A": "1"}) == {"A": "1"}
    env = shim_env(target, base={"LD_PRELOAD": "libother.so"}, shim=shim)
    assert env["LD_PRELOAD"] == f"{shim} libother.so"
    assert env["VMLAB_VSOCK_VMS"] == f"3={target.uds_paths[3]}"
    assert env["VMLAB_VSOCK_NS"] == target.host_ns
    with pytest.raises(ShimError, match="mixes transports"):
        shim_env(LabTarget(lab_id="m", transport=None, host_ns="n", uds_paths={3: "/x"}), shim=shim)


def test_lab_target_from_state() -> None:
    state = {"run_dir": "/tmp/vmlab-0/lab-abc", "host_ns": "vmlab:/tmp/vmlab-0/lab-abc",
             "vms": {"a": {"cid": 3, "transport": "vhost-user", "uds_path": "/tmp/vmlab-0/lab-abc/a.vsock"},
                     "b": {"cid": 4, "transport": "vhost-user", "uds_path": "/tmp/vmlab-0/lab-abc/b.vsock"}}}
    t = LabTarget.from_state(state)
    assert (t.lab_id, t.transport, t.shimmed) == ("lab-abc", "vhost-user", True)
    assert t.uds_paths == {3: "/tmp/vmlab-0/lab-abc/a.vsock", 4: "/tmp/vmlab-0/lab-abc/b.vsock"}


def test_static_binaries_are_detected(tmp_path: Path, target: LabTarget) -> None:
    assert elf_is_static(Path(sys.executable).resolve()) is False
    assert elf_is_static(Path("/bin/sh").resolve()) is False
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    script.chmod(0o755)
    assert elf_is_static(script) is None
    assert check_program(str(script), target) == script          # its interpreter is dynamic
    src = tmp_path / "m.c"
    src.write_text("int main(void){return 0;}\n")
    static = tmp_path / "static"
    subprocess.run(["gcc", "-static", "-o", str(static), str(src)], check=True)
    assert elf_is_static(static) is True
    with pytest.raises(ShimError, match="statically linked"):
        check_program(str(static), target)
    assert check_program(str(static), LabTarget("v", "vhost")) == static   # vhost: runs as it is
    wrapper = tmp_path / "w.sh"
    wrapper.write_text(f"#!{static}\n")
    wrapper.chmod(0o755)
    with pytest.raises(ShimError, match="statically linked"):
        check_program(str(wrapper), target)
    with pytest.raises(ShimError, match="command not found"):
        check_program("no-such-program-here", target)
    assert command_argv("echo hi") == ["/bin/sh", "-c", "echo hi"]


PROBE = r'''
import errno, json, socket, sys
def err(fn):
    try:
        r = fn(); return r if r is not None else 0
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
S = lambda t=socket.SOCK_STREAM: socket.socket(socket.AF_VSOCK, t)
out = {}
out["dgram"] = err(lambda: S(socket.SOCK_DGRAM))
out["raw"] = err(lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_RAW))
a = S(); a.bind((2, 5555))
out["in_use"] = err(lambda: S().bind((socket.VMADDR_CID_ANY, 5555)))
out["rebind"] = err(lambda: a.bind((2, 5556)))
out["name"] = list(a.getsockname())
out["no_cid"] = err(lambda: S().connect((77, 1)))
out["host_cid"] = err(lambda: S().connect((2, 1)))
s = S()
s.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_MIN_SIZE, 4096)
s.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE, 100)
out["min_clamp"] = s.getsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE)
out["bad_opt"] = err(lambda: s.getsockopt(socket.AF_VSOCK, 99))
out["type"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
out["seq_type"] = S(socket.SOCK_SEQPACKET).getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
out["sndbuf"] = S().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
out["seq_sndbuf"] = S(socket.SOCK_SEQPACKET).getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
print(json.dumps(out))
'''


def test_socket_calls_without_a_backend(target: LabTarget, shim: Path) -> None:
    r = run_py(PROBE, target, shim)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["dgram"] == "ENODEV" and got["raw"] == "ESOCKTNOSUPPORT"
    assert got["in_use"] == "EADDRINUSE" and got["rebind"] == "EINVAL"
    assert got["name"] == [2, 5555]
    assert got["no_cid"] == "ENODEV" and got["host_cid"] == "ENODEV"
    assert got["min_clamp"] == 4096 and got["bad_opt"] == "ENOPROTOOPT"
    assert got["type"] == socket.SOCK_STREAM and got["seq_type"] == socket.SOCK_SEQPACKET
    # a stream socket holds a guest's whole credit window; SEQPACKET keeps its message size cap
    assert got["sndbuf"] == window_sndbuf()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as plain:
        assert got["seq_sndbuf"] == plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def window_sndbuf() -> int:
    """What Linux makes of the shim's SO_SNDBUF request (HOST_SNDBUF): doubled, capped first."""
    from vmlab.vsock.host import HOST_SNDBUF
    return 2 * min(HOST_SNDBUF, int(Path("/proc/sys/net/core/wmem_max").read_text()))


def test_dgram_error_is_clear_on_stderr(target: LabTarget, shim: Path) -> None:
    env = shim_env(target, shim=shim)
    r = subprocess.run([sys.executable, "-c", "import socket; socket.socket(socket.AF_VSOCK, socket.SOCK_DGRAM)"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "SOCK_DGRAM) is not supported" in r.stderr and "No such device" in r.stderr


ACCEPT = r'''
import socket, sys
s = socket.socket(socket.AF_VSOCK, getattr(socket, sys.argv[1]))
s.bind((socket.VMADDR_CID_ANY, 6000)); s.listen(0)
c, peer = s.accept()
print(peer, c.getpeername(), c.getsockname(), flush=True)
print(c.recv(100), c.recv(100), flush=True)
print(c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), flush=True)
'''


@pytest.mark.parametrize("kind", ["SOCK_STREAM", "SOCK_SEQPACKET"])
def test_accept_takes_the_peer_from_the_preamble(target: LabTarget, shim: Path, tmp_path: Path, kind: str) -> None:
    proc = HostProcess([sys.executable, "-c", ACCEPT, kind], target, tmp_path / "out.log",
                       env={"LD_PRELOAD": str(shim)}).start()
    try:
        name = f"{target.host_ns}:6000"
        proc._until(lambda: unix_listening(name), "listener", 60)
        typ = getattr(socket, kind)
        b = socket.socket(socket.AF_UNIX, typ)
        b.connect("\0" + name)
        b.send(struct.pack("<4sIII", b"VSK1", 7, 1234, 6000))
        b.send(b"one")
        time.sleep(0.2)
        b.send(b"two")
        assert proc.wait(60) == 0, proc.output()
    finally:
        proc.close()
    lines = proc.output().splitlines()
    assert lines[0] == "(7, 1234) (7, 1234) (2, 6000)"
    if kind == "SOCK_SEQPACKET":
        assert lines[1] == "b'one' b'two'"                   # one message per recv
    else:
        assert lines[1].replace("' b'", "") == "b'onetwo'"   # the preamble is not data
        assert int(lines[2]) == window_sndbuf()              # accepted: a window's room too


class FakeHybrid:
    """The backend's per-VM host listener: answers CONNECT <port> with OK or closes."""

    def __init__(self, path: str, typ: int, refuse: set[int]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, typ)
        self.sock.bind(path)
        self.sock.listen()
        self.typ, self.refuse, self.lines = typ, refuse, []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                self.handle(c, c.recv(64).decode())

    def handle(self, c: socket.socket, line: str) -> None:
        self.lines.append(line)
        if int(line.split()[1]) in self.refuse:
            return
        time.sleep(0.3)                                       # the guest takes its time
        c.send(b"OK 4242\n")
        c.send(b"data from the guest")
        time.sleep(0.5)

    def close(self) -> None:
        self.sock.close()


CONNECT = r'''
import errno, socket, sys
def attempt(port, timeout):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((3, port))
    except OSError as e:
        return errno.errorcode[e.errno]
    got = b""
    while True:
        d = s.recv(100)
        if not d:
            break
        got += d
    return f"{s.getsockname()} {s.getpeername()} {got!r}"
print(attempt(80, None)); print(attempt(81, None)); print(attempt(82, 5)); print(attempt(83, 5))
b = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); b.bind((2, 7001))
b.connect((3, 84)); print("bound", b.getsockname())
r = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
try:
    r.connect((3, 83))
except OSError:
    pass
print("renewed", r.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
'''


def test_connect_blocking_and_with_a_timeout(target: LabTarget, shim: Path) -> None:
    srv = FakeHybrid(target.uds_paths[3], socket.SOCK_STREAM, refuse={81, 83})
    try:
        r = run_py(CONNECT, target, shim)
    finally:
        srv.close()
    assert r.returncode == 0, r.stderr
    ok = "(2, 4242) (3, {}) b'data from the guest'"
    assert r.stdout.splitlines() == [ok.format(80), "ECONNRESET", ok.format(82), "ECONNRESET",
                                     "bound (2, 4242)", f"renewed {window_sndbuf()}"]
    assert srv.lines[:4] == ["CONNECT 80\n", "CONNECT 81\n", "CONNECT 82\n", "CONNECT 83\n"]
    assert srv.lines[4] == "CONNECT 84 7001\n"                 # a bound client asks for its port


def test_connect_timeout_option(target: LabTarget, shim: Path) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(target.uds_paths[3])
    silent.listen()                                           # accepts, never answers
    code = ("import ctypes, socket, struct, time\ns = socket.socket(socket.AF_VSOCK)\n"
            "tv = ctypes.create_string_buffer(struct.pack('qq', 0, 300000))\n"   # Python takes ints only
            "assert ctypes.CDLL(None).setsockopt(s.fileno(), socket.AF_VSOCK, 6, tv, 16) == 0\n"
            "t = time.monotonic()\ntry:\n    s.connect((3, 9))\nexcept TimeoutError as e:\n"
            "    print('ETIMEDOUT', round(time.monotonic() - t, 1))\n")
    try:
        r = run_py(code, target, shim)
    finally:
        silent.close()
    assert r.returncode == 0, r.stderr
    word, secs = r.stdout.split()
    assert word == "ETIMEDOUT" and float(secs) < 1.9     # 0.3 s, not the 2 s default


def test_unshimmed_fds_are_untouched(target: LabTarget, shim: Path) -> None:
    code = ("import socket, os\na, b = socket.socketpair()\na.send(b'x'); print(b.recv(1))\n"
            "t = socket.socket(socket.AF_INET); t.bind(('127.0.0.1', 0)); print(t.getsockname()[0])\n"
            "fd = os.dup(a.fileno()); os.close(fd); print(open('/dev/null').read() == '')\n")
    r = run_py(code, target, shim)
    assert r.stdout.split() == ["b'x'", "127.0.0.1", "True"], r.stderr


LOWAT = r'''
import select, socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, 6001)); s.listen()
c, _ = s.accept()
c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 10)
p = select.poll(); p.register(c, select.POLLIN)
e = select.epoll(); e.register(c.fileno(), select.EPOLLIN)                      # level-triggered
o = select.epoll(); o.register(c.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
print("below", p.poll(300), select.select([c], [], [], 0.3)[0], e.poll(0.3), o.poll(0.3), flush=True)
print("at", [ev for _, ev in p.poll(10000)], len(select.select([c], [], [], 10)[0]),
      [ev for _, ev in e.poll(10)], [ev for _, ev in o.poll(10)], flush=True)
'''


def start_listener(code: str, port: int, target: LabTarget, shim: Path, tmp_path: Path) -> HostProcess:
    """A Python program under the shim, once its vsock listener on `port` is up."""
    proc = HostProcess([sys.executable, "-c", code], target, tmp_path / "out.log",
                       env={"LD_PRELOAD": str(shim)}).start()
    try:
        proc._until(lambda: unix_listening(f"{target.host_ns}:{port}"), "listener", 60)
    except BaseException:
        proc.close()
        raise
    return proc


def test_poll_waits_for_the_low_water_mark(target: LabTarget, shim: Path, tmp_path: Path) -> None:
    proc = start_listener(LOWAT, 6001, target, shim, tmp_path)
    try:
        name = f"{target.host_ns}:6001"
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.connect("\0" + name)
        b.send(struct.pack("<4sIII", b"VSK1", 7, 1234, 6001) + b"abc")
        proc.wait_for_output("below", timeout=20)
        b.send(b"defghij")
        assert proc.wait(60) == 0, proc.output()
    finally:
        proc.close()
    # poll, select, epoll (the one-shot registration is re-armed after a masked wake-up)
    pollin = select_pollin()
    assert proc.output().split("\n")[:2] == ["below [] [] [] []", f"at [{pollin}] 1 [{pollin}] [{pollin}]"]


def select_pollin() -> int:
    import select
    return select.POLLIN


DUPFORK = r'''
import os, socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, 6002)); s.listen()
c, _ = s.accept()
d = socket.socket(fileno=os.dup(c.fileno()))       # a dup is the same vsock socket
c.close()
print("dup", d.family == socket.AF_VSOCK, d.getpeername(), flush=True)
pid = os.fork()
if pid == 0:                                       # so is the child's copy after fork
    print("child", d.getpeername(), d.recv(10), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
fd = os.dup2(d.fileno(), 50)
print("dup2", socket.socket(fileno=fd).getsockname(), flush=True)
'''


def test_dup_and_fork_keep_the_vsock_socket(target: LabTarget, shim: Path, tmp_path: Path) -> None:
    proc = HostProcess([sys.executable, "-c", DUPFORK], target, tmp_path / "out.log",
                       env={"LD_PRELOAD": str(shim)}).start()
    try:
        name = f"{target.host_ns}:6002"
        proc._until(lambda: unix_listening(name), "listener", 60)
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.connect("\0" + name)
        b.send(struct.pack("<4sIII", b"VSK1", 9, 4321, 6002) + b"to child")
        assert proc.wait(60) == 0, proc.output()
    finally:
        proc.close()
    assert proc.output().splitlines() == ["dup True (9, 4321)", "child (9, 4321) b'to child'",
                                          "dup2 (2, 6002)"]


def test_an_fd_closed_behind_the_shims_back_is_not_mistaken_for_vsock(target: LabTarget, shim: Path) -> None:
    code = ("import ctypes, errno, os, socket\n"
            "s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); fd = s.detach()\n"
            "ctypes.CDLL(None).syscall(3, fd)                 # close(2) without libc's close()\n"
            "u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # reuses the number\n"
            "assert u.fileno() == fd, (u.fileno(), fd)\n"
            "t = socket.socket(fileno=os.dup(fd))\nprint(t.family == socket.AF_UNIX, repr(u.getsockname()))\n")
    r = run_py(code, target, shim)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "''"], r.stdout


class FakeCtl(FakeHybrid):
    """The backend's per-VM socket as the shim's out-of-band channel: records CTL lines, says OK."""

    def __init__(self, path: str) -> None:
        super().__init__(path, socket.SOCK_STREAM, refuse=set())

    def handle(self, c: socket.socket, line: str) -> None:
        self.lines.append(line)
        c.send(b"OK\n")


FRAMED = r'''
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_SEQPACKET)
s.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE, 1 << 22)  # u64
s.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE, 1 << 22)
s.bind((socket.VMADDR_CID_ANY, 6002)); s.listen()
c, peer = s.accept()
for n in (100, 100, 2):
    d, _, fl, _ = c.recvmsg(n)
    print(d, bool(fl & socket.MSG_EOR), bool(fl & socket.MSG_TRUNC), flush=True)
c.sendmsg([b"rec"], [], socket.MSG_EOR); c.send(b"msg")
c.shutdown(socket.SHUT_RD)
print("done", flush=True)
'''


def test_framed_seqpacket_eor_both_ways_and_ctl_for_shut_rd_and_buffer_size(
        target: LabTarget, shim: Path, tmp_path: Path) -> None:
    ctl = FakeCtl(target.uds_paths[3])
    proc = start_listener(FRAMED, 6002, target, shim, tmp_path)
    try:
        b = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.connect(f"\0{target.host_ns}:6002")
        b.send(struct.pack("<4sIII", b"VSK2", 3, 1234, 6002))
        for m in (b"\x01one", b"\x00two", b"\x010123456789"):
            b.send(m)
        b.settimeout(20)
        got = [b.recv(100), b.recv(100)]
        assert proc.wait(60) == 0, proc.output()
    finally:
        proc.close()
        ctl.sock.close()
    assert proc.output().splitlines() == ["b'one' True False", "b'two' False False",
                                          "b'01' True True", "done"]
    assert got == [b"\x01rec", b"\x00msg"]                 # the flags byte carries MSG_EOR
    assert ctl.lines == ["CTL 6002 1234 buf=4194304\n", "CTL 6002 1234 shut_rd\n"]
