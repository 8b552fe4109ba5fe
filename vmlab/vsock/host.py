"""The host end of vsock for tests, whatever the transport.

``host_listen`` / ``host_connect`` return the same objects for both transports:

* ``vhost`` (kernel vhost-vsock): real ``AF_VSOCK`` sockets.
* ``vhost-user`` (our backend, "hybrid vsock"): Unix sockets. Listening on port P means
  listening at ``<uds_path>_<P>`` for every VM served; connecting means connecting to the VM's
  ``uds_path``, writing ``CONNECT <port>\\n`` and reading ``OK <hostport>\\n``.

A test written against these runs unchanged on a KVM host with /dev/vhost-vsock and here.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterable

from vmlab.vsock.unixsock import is_stale_socket, listen_unix

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
VMADDR_PORT_ANY = 0xFFFFFFFF
MAX_LINE = 64
# What a host stream socket of the hybrid transport asks for as SO_SNDBUF (Linux doubles it to
# 512 KiB, or twice net.core.wmem_max if that is lower). The backend reads it only into guest
# rx buffers, as far as the guest's credit goes: a guest's whole window (256 KiB by default)
# must be waiting there, or every credit update costs the backend two reads and two wakeups
# (the default 208 KiB held less than a window). vmlab's shim asks the same for AF_VSOCK.
HOST_SNDBUF = 256 * 1024


@dataclass(frozen=True)
class HostEndpoint:
    """How the host reaches one VM's vsock device."""

    transport: str                 # "vhost" | "vhost-user"
    vm_name: str
    cid: int
    uds_path: str | None = None    # vhost-user only


def _kind(type: str) -> int:
    if type == "stream":
        return socket.SOCK_STREAM
    if type == "seqpacket":
        return socket.SOCK_SEQPACKET
    raise ValueError(f"vsock type must be 'stream' or 'seqpacket', not {type!r}")


def _seqpacket_path(uds_path: str) -> str:
    return uds_path + "_seqpacket"     # same naming as vmlab.vsock.hybrid


class HostConn:
    """A connected vsock stream/seqpacket; behaves like the socket it wraps."""

    def __init__(self, sock: socket.socket, peer_cid: int, peer_port: int | None = None,
                 local_port: int | None = None, transport: str = "vhost-user") -> None:
        self.sock = sock
        self.peer_cid = peer_cid
        self.peer_port = peer_port
        self.local_port = local_port
        self.transport = transport

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        self.sock.sendall(data, flags)

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        return self.sock.send(data, flags)

    def recv(self, n: int, flags: int = 0) -> bytes:
        return self.sock.recv(n, flags)

    def recv_into(self, buf: Any, n: int = 0, flags: int = 0) -> int:
        return self.sock.recv_into(buf, n, flags)

    def recv_exact(self, n: int) -> bytes:
        """Exactly n bytes (stream), or raise EOFError with what came."""
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_all(self, limit: int = 1 << 31) -> bytes:
        """Everything until EOF."""
        out = bytearray()
        while len(out) < limit:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "HostConn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:       # anything else a socket has
        return getattr(self.sock, name)

    def __repr__(self) -> str:
        return (f"<HostConn {self.transport} peer cid {self.peer_cid} port {self.peer_port}"
                f" fd {self.sock.fileno()}>")


class HostListener:
    """Listens on one vsock port for one or more VMs; ``accept`` returns a ``HostConn``."""

    def __init__(self, port: int, socks: list[tuple[socket.socket, HostEndpoint | None]],
                 paths: list[str], type: str, vsock_peers: set[int] | None = None) -> None:
        self.port = port
        self.type = type
        self._socks = socks                # (listening socket, endpoint or None for AF_VSOCK)
        self._paths = paths                # Unix socket paths we created
        # AF_VSOCK ports are host-wide: a guest of another lab may knock; only ours get through.
        self._vsock_peers = vsock_peers

    def accept(self, timeout: float | None = None) -> HostConn:
        """The next connection from any served VM; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            socks = self._socks
            if not socks or any(s.fileno() < 0 for s, _ in socks):
                raise OSError(errno.EBADF, "listener is closed")   # (maybe by another thread)
            # poll, not select: a host program holding 1024+ fds (FD_SETSIZE) must still accept
            poller = select.poll()
            for s, _ in socks:
                poller.register(s, select.POLLIN)
            slice_ms = 500 if left is None else int(min(left, 0.5) * 1000)
            ready = {fd for fd, _ in poller.poll(slice_ms)}
            for s, ep in socks:
                if s.fileno() not in ready:
                    continue
                try:
                    conn, addr = s.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(True)
                if ep is None:             # AF_VSOCK: the kernel tells who it is
                    if self._vsock_peers is not None and addr[0] not in self._vsock_peers:
                        conn.close()
                        continue
                    return HostConn(conn, addr[0], addr[1], self.port, "vhost")
                _hold_a_window(conn, self.type)
                return HostConn(conn, ep.cid, None, self.port, "vhost-user")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no vsock connection on port {self.port} within {timeout}s")

    def close(self) -> None:
        for s, _ in self._socks:
            s.close()
        self._socks = []
        for p in self._paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._paths = []

    def __enter__(self) -> "HostListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_listen(port: int, *, vms: Iterable[HostEndpoint], type: str = "stream",
                cid: int = VMADDR_CID_ANY, busy_timeout: float = 0.0) -> HostListener:
    """Listen on vsock ``port`` on the host for connections from ``vms``.

    ``port`` may be VMADDR_PORT_ANY (or -1): a free port is chosen, see ``.port``.
    With the vhost transport ports are host-wide: ``busy_timeout`` waits that long for another
    lab to release the port (labs run side by side under pytest-xdist), and connections from
    guests that are not in ``vms`` are refused.
    """
    kind = _kind(type)
    eps = list(vms)
    if port == -1:
        port = VMADDR_PORT_ANY
    socks: list[tuple[socket.socket, HostEndpoint | None]] = []
    paths: list[str] = []
    try:
        if any(ep.transport == "vhost" for ep in eps):
            s = socket.socket(socket.AF_VSOCK, kind | socket.SOCK_CLOEXEC)
            socks.append((s, None))
            _bind_vsock(s, cid, port, busy_timeout)
            s.listen(128)
            s.setblocking(False)
            port = s.getsockname()[1]
        hybrid = [ep for ep in eps if ep.transport == "vhost-user"]
        for ep in hybrid:
            if not ep.uds_path:
                raise ValueError(f"{ep.vm_name}: vhost-user endpoint without uds_path")
        if hybrid and port == VMADDR_PORT_ANY:
            port = _free_hybrid_port(hybrid)
        for ep in hybrid:
            path = f"{ep.uds_path}_{port}"
            socks.append((listen_unix(path, kind, replace=is_stale_socket), ep))
            paths.append(path)
        unknown = [ep for ep in eps if ep.transport not in ("vhost", "vhost-user")]
        if unknown:
            raise ValueError(f"unknown transport {unknown[0].transport!r} ({unknown[0].vm_name})")
    except BaseException:
        for s, _ in socks:
            s.close()
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise
    vsock_peers = {ep.cid for ep in eps if ep.transport == "vhost"}
    return HostListener(port, socks, paths, type, vsock_peers or None)


def _bind_vsock(s: socket.socket, cid: int, port: int, busy_timeout: float) -> None:
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            s.bind((cid, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _free_hybrid_port(eps: list[HostEndpoint]) -> int:
    for _ in range(1000):
        p = random.randint(1024, 0x7FFFFFFF)
        if not any(os.path.exists(f"{ep.uds_path}_{p}") for ep in eps):
            return p
    raise OSError(errno.EADDRINUSE, "no free vsock port found")


def host_connect(cid: int, port: int, *, endpoint: HostEndpoint, type: str = "stream",
                 timeout: float = 10) -> HostConn:
    """Connect from the host to ``port`` in the guest ``cid``.

    Raises ConnectionRefusedError (nobody listens / the guest refused) or
    ConnectionResetError, TimeoutError after ``timeout``. The returned connection keeps
    ``timeout`` as its socket timeout, like ``socket.create_connection``.
    """
    kind = _kind(type)
    if endpoint.transport == "vhost":
        s = socket.socket(socket.AF_VSOCK, kind | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect((cid, port))
        except BaseException:
            s.close()
            raise
        return HostConn(s, cid, port, s.getsockname()[1], "vhost")
    if endpoint.transport != "vhost-user":
        raise ValueError(f"unknown transport {endpoint.transport!r}")
    if cid != endpoint.cid:
        raise ValueError(f"cid {cid} is not {endpoint.vm_name}'s ({endpoint.cid})")
    if not endpoint.uds_path:
        raise ValueError(f"{endpoint.vm_name}: vhost-user endpoint without uds_path")
    path = endpoint.uds_path if type == "stream" else _seqpacket_path(endpoint.uds_path)
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    _hold_a_window(s, type)
    try:
        try:
            s.connect(path)
        except FileNotFoundError as e:
            raise ConnectionRefusedError(errno.ECONNREFUSED,
                                         f"no vsock backend socket at {path}") from e
        s.sendall(f"CONNECT {port}\n".encode())
        line = _read_line(s, type)
        if not line:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"vsock connect to cid {cid} port {port} refused")
        parts = line.split()
        if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
            raise ConnectionResetError(errno.ECONNRESET,
                                       f"bad reply from the vsock backend: {line!r}")
        return HostConn(s, cid, port, int(parts[1]), "vhost-user")
    except BaseException:
        s.close()
        raise


def _hold_a_window(s: socket.socket, type: str) -> None:
    """Room in a host stream socket for a whole credit window of guest-bound data (HOST_SNDBUF).
    Stream only: a SEQPACKET socket's SO_SNDBUF also caps its message size (EMSGSIZE)."""
    if type != "stream":
        return
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SNDBUF)
    except OSError:
        pass                # the default still works, at two reads per window


def _read_line(s: socket.socket, type: str) -> bytes:
    """The OK line, without consuming a byte of the stream after it."""
    if type == "seqpacket":
        return s.recv(MAX_LINE)
    line = bytearray()
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            return b""
        line += c
        if len(line) > MAX_LINE:
            raise ConnectionResetError(errno.ECONNRESET, "vsock backend reply too long")
    return bytes(line)


__all__ = ["HostEndpoint", "HostConn", "HostListener", "host_listen", "host_connect",
           "VMADDR_CID_ANY", "VMADDR_CID_HOST", "VMADDR_PORT_ANY"]
