"""The host side as Unix sockets ("hybrid vsock", as in Firecracker and vhost-device-vsock).

* host -> guest: a program connects to the VM's ``uds_path`` (SOCK_STREAM) or
  ``<uds_path>_seqpacket`` (SOCK_SEQPACKET), writes ``CONNECT <port>\\n`` and gets
  ``OK <hostport>\\n`` once the guest accepted; the socket then *is* the connection.
  If the guest refuses, the Unix socket is closed without a reply.
* guest -> host (dst CID 2, port P): we connect to ``<uds_path>_<P>`` (a SOCK_SEQPACKET socket
  for SEQPACKET connections); nobody there -> RST, i.e. ECONNRESET/ECONNREFUSED in the guest.
* lab-wide host listeners (``host_ns`` in the config, used by the ``vmlab exec`` shim): when
  ``<uds_path>_<P>`` does not answer, we connect to the abstract Unix name ``\\0<host_ns>:<P>``
  (one listener for every VM of the lab) and first write a 16-byte preamble
  ``b"VSK1" + <guest cid> + <guest port> + <P>`` (u32 little endian) so the listener learns
  the peer address.  ``CONNECT <port> <srcport>\n`` asks for a specific host port.
* options (the shim's; vmlab.vsock.host sends none, so nothing changes for it):
  ``CONNECT <port> [<srcport>] [frame] [buf=<n>]\n`` -- ``frame`` (SEQPACKET): after the OK
  line every message either way is one flags byte (``FRAME_EOR``: MSG_EOR / VIRTIO_VSOCK_SEQ_EOR)
  and the data; ``buf=<n>``: advertise buf_alloc n (SO_VM_SOCKETS_BUFFER_SIZE). Guest -> host
  SEQPACKET to a lab-wide listener is always framed, announced by the preamble magic ``VSK2``.
* out of band: ``CTL <hostport> <guestport> shut_rd|buf=<n>\n`` on ``uds_path`` acts on the
  existing connection (2, hostport, this VM, guestport): the host program's shutdown(SHUT_RD)
  (an AF_UNIX shutdown(SHUT_RD) is invisible to the peer) or SO_VM_SOCKETS_BUFFER_SIZE set after
  connect/accept. Answer ``OK\n``, or the socket is closed without one (no such connection).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import struct
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmlab.vsock.connection import (
    CLOSE_TIMEOUT, CONNECT_TIMEOUT, DEFAULT_BUF_ALLOC, ConnKey, Connection,
)
from vmlab.vsock.unixsock import listen_unix
from vmlab.vsock.packet import VMADDR_CID_HOST, Header, Op, Type, rst_for

if TYPE_CHECKING:
    from vmlab.vsock.router import Router

log = logging.getLogger(__name__)

MAX_LINE = 64                       # "CONNECT 4294967295\n" is 19 bytes
HANDSHAKE_TIMEOUT = 10.0            # a host client must send its CONNECT line within this
MAX_HANDSHAKES_PER_VM = 128         # host clients that have not sent CONNECT yet, per VM
MAX_CONNS_PER_VM = 4096             # host-terminated connections per VM (each has a Unix socket)
MAX_PENDING_PER_VM = 256            # guest connects waiting for a full host listen backlog, per VM
GUEST_CONNECT_RETRY = 0.05          # a full Unix listen backlog answers EAGAIN: retry a while
_CONNECT_RE = re.compile(
    rb"CONNECT ([0-9]{1,10})(?: ([0-9]{1,10}))?((?: frame| buf=[0-9]{1,10})*)\r?\n?")
_CTL_RE = re.compile(rb"CTL ([0-9]{1,10}) ([0-9]{1,10}) (shut_rd|buf=[0-9]{1,10})\r?\n?")
PREAMBLE = struct.Struct("<4sIII")  # magic, peer (guest) cid, peer port, local (host) port
PREAMBLE_MAGIC = b"VSK1"            # unframed
PREAMBLE_MAGIC_FRAMED = b"VSK2"     # SEQPACKET, every message after it is framed (FRAME_EOR)


def host_listener_name(host_ns: str, port: int) -> str:
    """The abstract Unix address of a lab-wide host listener on vsock port `port`."""
    return f"\0{host_ns}:{port}"
_FIRST_HOST_PORT = 1 << 30          # ephemeral host ports for host-initiated connections


def _options(text: bytes) -> dict[bytes, int] | None:
    """CONNECT options (`` frame buf=<n>``) -> {b"frame": 1, b"buf": n}; None if one repeats."""
    out: dict[bytes, int] = {}
    for tok in text.split():
        name, _, val = tok.partition(b"=")
        if name in out:
            return None
        out[name] = int(val) if val else 1
    if out.get(b"buf", 0) > 0xFFFFFFFF:
        return None
    return out


def _is_plain_socket(path: str) -> bool:
    """A socket file itself (lstat): a symlink in the run dir is never followed."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    if stat.S_ISLNK(mode):
        log.warning("%s is a symlink: not following it (guest connect refused)", path)
    return stat.S_ISSOCK(mode)


def seqpacket_path(uds_path: str) -> str:
    return uds_path + "_seqpacket"


@dataclass(eq=False)
class HybridVm:
    name: str
    cid: int
    uds_path: str
    listeners: list[socket.socket] = field(default_factory=list)


@dataclass(eq=False)
class _Handshake:
    vm: HybridVm
    sock: socket.socket
    type: int
    timer: asyncio.TimerHandle | None = None


class Hybrid:
    """All host-terminated connections of all VMs; the router hands it every dst_cid 2 packet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, router: "Router", *,
                 buf_alloc: int = DEFAULT_BUF_ALLOC, close_timeout: float = CLOSE_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, host_ns: str | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_conns_per_vm: int = MAX_CONNS_PER_VM,
                 max_handshakes_per_vm: int = MAX_HANDSHAKES_PER_VM,
                 max_pending_per_vm: int = MAX_PENDING_PER_VM) -> None:
        self.loop = loop
        self.host_ns = host_ns
        self.router = router
        self.buf_alloc = buf_alloc
        self.close_timeout = close_timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.max_conns_per_vm = max_conns_per_vm
        self.max_handshakes_per_vm = max_handshakes_per_vm
        self.max_pending_per_vm = max_pending_per_vm
        self.pending_per_cid: Counter[int] = Counter()   # pending_guest entries by guest CID
        self.conns_per_vm: Counter[str] = Counter()
        self.handshakes_per_vm: Counter[str] = Counter()
        self.vms: dict[str, HybridVm] = {}
        self.conns: dict[ConnKey, Connection] = {}
        self.lingering: set[Connection] = set()
        self.handshakes: set[_Handshake] = set()
        self.pending_guest: dict[ConnKey, asyncio.TimerHandle] = {}
        self._next_port = _FIRST_HOST_PORT
        self.stats = router.stats

    # --- listeners ------------------------------------------------------------------------
    def add_vm(self, name: str, cid: int, uds_path: str) -> None:
        vm = HybridVm(name, cid, uds_path)
        for path, typ in ((uds_path, Type.STREAM), (seqpacket_path(uds_path), Type.SEQPACKET)):
            kind = socket.SOCK_STREAM if typ == Type.STREAM else socket.SOCK_SEQPACKET
            s = listen_unix(path, kind)   # a socket file left by a crashed run is replaced
            vm.listeners.append(s)
            self.loop.add_reader(s.fileno(), self._on_accept, vm, s, typ)
        self.vms[name] = vm

    def close(self) -> None:
        """Reset every connection and unlink every socket we created."""
        for conn in list(self.conns.values()):
            conn.reset("backend exit")
        for conn in list(self.lingering):
            conn._destroy("backend exit")
        for hs in list(self.handshakes):
            self._drop_handshake(hs, "backend exit")
        for t in self.pending_guest.values():
            t.cancel()
        self.pending_guest.clear()
        self.pending_per_cid.clear()
        for vm in self.vms.values():
            for s in vm.listeners:
                try:
                    self.loop.remove_reader(s.fileno())
                except (ValueError, OSError):
                    pass
                s.close()
            for path in (vm.uds_path, seqpacket_path(vm.uds_path)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self.vms.clear()

    # --- host -> guest --------------------------------------------------------------------
    def _on_accept(self, vm: HybridVm, lsock: socket.socket, typ: int) -> None:
        for _ in range(64):
            try:
                s, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("%s: accept failed: %s", vm.name, e)
                return
            if self.handshakes_per_vm[vm.name] >= self.max_handshakes_per_vm:
                self._count_limit("handshake_overflow",      # silent clients: refuse, don't hoard fds
                                  "%s: %d host clients have not sent CONNECT: refusing another",
                                  vm.name, self.handshakes_per_vm[vm.name])
                s.close()
                continue
            s.setblocking(False)
            hs = _Handshake(vm, s, typ)
            hs.timer = self.loop.call_later(self.handshake_timeout, self._drop_handshake, hs,
                                            "handshake timeout")
            self.handshakes.add(hs)
            self.handshakes_per_vm[vm.name] += 1
            self.loop.add_reader(s.fileno(), self._on_handshake, hs)

    def _drop_handshake(self, hs: _Handshake, why: str, close: bool = True) -> None:
        if hs not in self.handshakes:
            return
        self.handshakes.discard(hs)
        self.handshakes_per_vm[hs.vm.name] -= 1
        if hs.timer is not None:
            hs.timer.cancel()
        try:
            self.loop.remove_reader(hs.sock.fileno())
        except (ValueError, OSError):
            pass
        if close:
            log.info("%s: host connection dropped: %s", hs.vm.name, why)
            self.stats["handshake_rejected"] += 1
            hs.sock.close()

    def _on_handshake(self, hs: _Handshake) -> None:
        try:
            if hs.type == Type.SEQPACKET:
                line = hs.sock.recv(MAX_LINE)     # one message, nothing beyond it is consumed
                if not line:
                    return self._drop_handshake(hs, "EOF before CONNECT")
            else:
                peek = hs.sock.recv(MAX_LINE, socket.MSG_PEEK)
                if not peek:
                    return self._drop_handshake(hs, "EOF before CONNECT")
                nl = peek.find(b"\n")
                if nl < 0:
                    if len(peek) >= MAX_LINE:
                        return self._drop_handshake(hs, "CONNECT line too long")
                    return                        # wait for the rest of the line
                line = hs.sock.recv(nl + 1)       # consume exactly the line
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._drop_handshake(hs, f"read failed: {e}")
        if line.startswith(b"CTL "):
            return self._on_ctl(hs, line)
        m = _CONNECT_RE.fullmatch(line)
        opts = _options(m.group(3)) if m is not None else None
        if (m is None or opts is None or int(m.group(1)) > 0xFFFFFFFF
                or (m.group(2) is not None and int(m.group(2)) >= 0xFFFFFFFF)):
            return self._drop_handshake(hs, f"malformed handshake {line[:MAX_LINE]!r}")
        self._drop_handshake(hs, "", close=False)
        port = int(m.group(1))
        vm = hs.vm
        if self.conns_per_vm[vm.name] >= self.max_conns_per_vm:
            self._count_limit("conn_limit", "%s: %d connections: host connect refused (limit)",
                              vm.name, self.conns_per_vm[vm.name])
            hs.sock.close()
            return
        hport = int(m.group(2)) if m.group(2) is not None else None
        if hport is None or (VMADDR_CID_HOST, hport, vm.cid, port) in self.conns:
            hport = self._alloc_port(vm.cid, port)
        key = (VMADDR_CID_HOST, hport, vm.cid, port)
        conn = self._new_conn(vm, key, hs.type, hs.sock)
        conn.framed = b"frame" in opts and hs.type == Type.SEQPACKET
        if b"buf" in opts:
            conn.set_buf_alloc(opts[b"buf"])
        conn.ok_line = f"OK {hport}\n".encode()
        self.stats["host_connects"] += 1
        conn.start_connect(self.connect_timeout)

    def _on_ctl(self, hs: _Handshake, line: bytes) -> None:
        """An out-of-band request for an existing connection of this VM (module docstring)."""
        m = _CTL_RE.fullmatch(line)
        conn = None
        if m is not None and int(m.group(1)) <= 0xFFFFFFFF and int(m.group(2)) <= 0xFFFFFFFF:
            conn = self.conns.get((VMADDR_CID_HOST, int(m.group(1)), hs.vm.cid, int(m.group(2))))
        if m is None or conn is None:
            return self._drop_handshake(hs, f"CTL for no connection: {line[:MAX_LINE]!r}")
        self._drop_handshake(hs, "", close=False)
        what = m.group(3)
        self.stats["ctl"] += 1
        if what == b"shut_rd":
            conn.host_shut_rd()
        else:
            conn.set_buf_alloc(int(what[4:]))
        try:
            hs.sock.send(b"OK\n")
        except OSError:
            pass
        hs.sock.close()

    def _alloc_port(self, cid: int, port: int) -> int:
        while True:
            p = self._next_port
            self._next_port = p + 1 if p < 0x7FFFFFFF else _FIRST_HOST_PORT
            if (VMADDR_CID_HOST, p, cid, port) not in self.conns:
                return p

    def _new_conn(self, vm: HybridVm, key: ConnKey, typ: int, sock: socket.socket) -> Connection:
        conn = Connection(env=self, key=key, vm=vm.name, type=typ, sock=sock,
                          close_timeout=self.close_timeout)
        try:
            # room for a whole credit window of guest data: a full-speed guest then rarely
            # meets a partial write (which costs a copy into our own buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.buf_alloc)
        except OSError:
            pass
        conn.credit.buf_alloc = self.buf_alloc
        conn.on_close = self._on_conn_destroyed
        self.conns[key] = conn
        self.conns_per_vm[vm.name] += 1
        return conn

    # --- guest -> host --------------------------------------------------------------------
    def on_guest_packet(self, vm_name: str, hdr: Header, payload: list[memoryview]) -> None:
        key = (VMADDR_CID_HOST, hdr.dst_port, hdr.src_cid, hdr.src_port)
        conn = self.conns.get(key)
        if conn is not None:
            if conn.type != hdr.type:
                conn.reset("type mismatch")
                return
            conn.on_packet(hdr, payload)
            return
        if key in self.pending_guest:
            if hdr.op == Op.RST:
                self._unpark(key)
            return
        if hdr.op == Op.REQUEST:
            self._guest_connect(vm_name, key, hdr, 0.0)
        elif hdr.op != Op.RST:
            self.router.send_to_vm(vm_name, rst_for(hdr))

    def _guest_connect(self, vm_name: str, key: ConnKey, hdr: Header, waited: float) -> None:
        self._unpark(key)
        vm = self.vms.get(vm_name)
        if vm is None:
            return
        if self.conns_per_vm[vm_name] >= self.max_conns_per_vm:
            self._count_limit("conn_limit",     # a guest flooding connections gets RST
                              "%s: %d connections: guest connect refused (limit)", vm_name,
                        self.conns_per_vm[vm_name])
            self._refuse(vm_name, hdr)
            return
        kind = socket.SOCK_SEQPACKET if hdr.type == Type.SEQPACKET else socket.SOCK_STREAM
        targets = [f"{vm.uds_path}_{hdr.dst_port}"]
        if self.host_ns:
            targets.append(host_listener_name(self.host_ns, hdr.dst_port))
        s = None
        framed = False
        for path in targets:
            if not path.startswith("\0") and not _is_plain_socket(path):
                continue                        # nothing there, or planted: never follow it
            s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
            except (BlockingIOError, InterruptedError):
                s.close()
                if waited == 0 and self.pending_per_cid[key[2]] >= self.max_pending_per_vm:
                    self._count_limit("pending_limit",  # a guest flooding a listener nobody accepts
                                      "%s: %d guest connects wait for host listen backlogs: "
                                      "refused (limit)", vm_name, self.pending_per_cid[key[2]])
                    self._refuse(vm_name, hdr)
                    return
                if waited < self.connect_timeout:   # listener backlog full: try again shortly
                    self._park(key, self.loop.call_later(
                        GUEST_CONNECT_RETRY, self._guest_connect, vm_name, key, hdr,
                        waited + GUEST_CONNECT_RETRY))
                    return
                self._count_limit("backlog_full", "%s: %s: backlog full for %.1fs", vm_name,
                                  path.lstrip("\0"), waited, level=logging.INFO)
                self._refuse(vm_name, hdr)
                return
            except OSError as e:
                s.close()
                s = None
                log.debug("%s: guest connect to %r: %s", vm_name, path, e)
                continue
            framed = path.startswith("\0") and hdr.type == Type.SEQPACKET
            if path.startswith("\0"):
                magic = PREAMBLE_MAGIC_FRAMED if framed else PREAMBLE_MAGIC
                try:   # 16 bytes into an empty socket buffer: never short, never blocks
                    s.send(PREAMBLE.pack(magic, hdr.src_cid, hdr.src_port, hdr.dst_port))
                except OSError as e:
                    log.info("%s: host listener %r gone: %s", vm_name, path, e)
                    s.close()
                    s = None
                    continue
            break
        if s is None:
            self._refuse(vm_name, hdr)
            return
        conn = self._new_conn(vm, key, hdr.type, s)
        conn.framed = framed
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self.stats["guest_connects"] += 1
        conn.accept()

    def _count_limit(self, counter: str, msg: str, *args: object, level: int = logging.WARNING) -> None:
        """Count a refusal; log it only the 1st, 2nd, 4th, 8th ... time: a guest flooding
        connections must not flood the backend's log file as well."""
        self.stats[counter] += 1
        n = self.stats[counter]
        if n & (n - 1) == 0:
            log.log(level, msg + " [%s: %d so far, logged at powers of two]", *args, counter, n)

    def _park(self, key: ConnKey, timer: asyncio.TimerHandle) -> None:
        """A guest connect that waits for a full host listen backlog (counted per VM)."""
        self.pending_guest[key] = timer
        self.pending_per_cid[key[2]] += 1

    def _unpark(self, key: ConnKey) -> None:
        timer = self.pending_guest.pop(key, None)
        if timer is not None:
            timer.cancel()
            self.pending_per_cid[key[2]] -= 1

    def _refuse(self, vm_name: str, hdr: Header) -> None:
        self.stats["refused"] += 1
        self.router.send_to_vm(vm_name, rst_for(hdr))

    # --- ConnEnv for Connection -----------------------------------------------------------
    def send_packet(self, conn: Connection, hdr: Header) -> None:
        self.router.send_to_vm(conn.vm, hdr)

    def want_rx(self, conn: Connection) -> None:
        self.router.want_rx(conn.vm, conn)

    def release(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            self.conns_per_vm[conn.vm] -= 1
        self.router.forget(conn.vm, conn)
        if conn.lingering or conn.out_bytes:
            self.lingering.add(conn)

    def _on_conn_destroyed(self, conn: Connection, reason: str) -> None:
        self.lingering.discard(conn)

    # --- resets ---------------------------------------------------------------------------
    def reset_vm(self, vm_name: str, notify_guest: bool) -> int:
        """Reset every host connection of one VM (device reset or a transport_reset fault)."""
        n = 0
        for conn in [c for c in self.conns.values() if c.vm == vm_name]:
            conn.reset("vm reset", send_rst=notify_guest)
            n += 1
        for key in [k for k, t in self.pending_guest.items()
                    if (vm := self.vms.get(vm_name)) is not None and k[2] == vm.cid]:
            self._unpark(key)
        return n

    def reset_key(self, key: ConnKey) -> bool:
        conn = self.conns.get(key)
        if conn is None:
            return False
        conn.reset("fault")
        return True

    def snapshot(self) -> dict:
        states: dict[str, int] = {}
        for c in self.conns.values():
            states[c.state.value] = states.get(c.state.value, 0) + 1
        per_vm = {name: {"connections": self.conns_per_vm[name],
                         "handshakes": self.handshakes_per_vm[name],
                         "pending_connects": self.pending_per_cid[vm.cid], "buffered_out": 0}
                  for name, vm in self.vms.items()}
        for c in self.conns.values():
            if c.vm in per_vm:
                per_vm[c.vm]["buffered_out"] += c.out_bytes
        return {"connections": len(self.conns), "states": states,
                "lingering": len(self.lingering), "handshakes": len(self.handshakes),
                "buffered_out": sum(c.out_bytes for c in self.conns.values()),
                "per_vm": per_vm,
                "limits": {"connections_per_vm": self.max_conns_per_vm,
                           "handshakes_per_vm": self.max_handshakes_per_vm,
                           "pending_connects_per_vm": self.max_pending_per_vm,
                           "buffered_out_per_connection": self.buf_alloc}}


__all__ = ["Hybrid", "HybridVm", "PREAMBLE", "PREAMBLE_MAGIC", "PREAMBLE_MAGIC_FRAMED",
           "host_listener_name", "seqpacket_path"]
