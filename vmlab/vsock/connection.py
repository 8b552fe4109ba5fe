"""One host-terminated vsock connection: state machine and credit flow control.

The backend terminates guest <-> host connections itself (the host end is a Unix socket), so
it must behave like a Linux vsock peer: it advertises ``buf_alloc``/``fwd_cnt`` for what it
receives and never sends the guest more than the guest's credit allows (Linux silently drops
packets that overrun it, see virtio_transport_inc_rx_pkt). Everything is bounded by credit:

* guest -> host: what the Unix socket does not take right away is kept, but the guest can only
  send ``buf_alloc`` bytes beyond what we have forwarded, so the buffer never exceeds buf_alloc.
  A guest that overruns its credit is reset, never buffered without bound.
* host -> guest: we read the Unix socket only while the guest has credit, straight into its
  rx buffer (``recvmsg_into``), so a slow guest stops our reads, not our memory.

I/O readiness comes from the event loop (``add_reader``/``add_writer``); packets leave through
a small environment object (``ConnEnv``, implemented by ``hybrid.Hybrid``) that queues them for
the guest in order.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from vmlab.vsock.packet import (
    HEADER, SEQ_EOM, SEQ_EOR, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, U32_MASK, Header, Op,
    Type,
)

log = logging.getLogger(__name__)

ConnKey = tuple[int, int, int, int]  # (local_cid, local_port, peer_cid, peer_port)

DEFAULT_BUF_ALLOC = 256 * 1024       # same as Linux's default SO_VM_SOCKETS_BUFFER_SIZE
CREDIT_LOW = 64 * 1024               # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: Linux's update threshold
MAX_SEQ_MSG = 1024 * 1024            # largest host SEQPACKET message we forward to a guest
MAX_BUF_ALLOC = 0xFFFFFFFF           # VIRTIO_VSOCK_MAX_BUF_SIZE: the kernel's clamp of buf_alloc
FRAME_EOR = 0x01                     # framed SEQPACKET: the message ends a record (MSG_EOR)
CLOSE_TIMEOUT = 8.0                  # VSOCK_CLOSE_TIMEOUT: wait this long for the guest's RST
CONNECT_TIMEOUT = 10.0               # host-initiated: wait this long for RESPONSE
LINGER_TIMEOUT = 60.0                # keep flushing to a slow host reader after the guest left
# Out of credit: ask for it (CREDIT_REQUEST) only after this long. A Linux receiver sends its own
# CREDIT_UPDATE once it has read most of its buffer; asking at once made it answer with whatever
# little it had read so far, and in bulk host->guest transfers that ping-pong doubled the guest's
# tx packets and split the data into small credit windows. The delay keeps a peer that only
# answers requests from stalling for good.
CREDIT_REQUEST_DELAY = 0.01

_AGAIN = (BlockingIOError, InterruptedError)
_AGAIN_ERRNOS = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))
_INT = struct.Struct("i")
_INT_ZERO = bytes(4)


class State(enum.Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True)
class Credit:
    """virtio-vsock credit arithmetic; every counter is a u32 that wraps, as on the wire."""

    buf_alloc: int = DEFAULT_BUF_ALLOC   # our receive buffer, advertised to the peer
    fwd_cnt: int = 0                     # peer bytes we passed on (freed)
    last_fwd_cnt: int = 0                # fwd_cnt the peer last heard from us
    rx_cnt: int = 0                      # peer bytes received
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0                      # bytes we sent to the peer
    rx_limit: int = 0                    # the largest buf_alloc we ever advertised (resize)

    def peer_credit(self) -> int:
        """Bytes we may still send: peer_buf_alloc - (tx_cnt - peer_fwd_cnt), never < 0."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def sent(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32_MASK

    def buffered(self) -> int:
        """Peer bytes received but not yet passed on."""
        return (self.rx_cnt - self.fwd_cnt) & U32_MASK

    def resize(self, buf_alloc: int) -> None:
        """A new receive buffer size; bytes the peer sent under a larger window we advertised
        earlier are still taken (they are not an overrun)."""
        self.rx_limit = max(self.rx_limit, self.buf_alloc)
        self.buf_alloc = buf_alloc

    def receive(self, n: int) -> bool:
        """Account n received bytes; False if the peer overran the credit we gave it."""
        if self.buffered() + n > max(self.buf_alloc, self.rx_limit):
            return False
        self.rx_cnt = (self.rx_cnt + n) & U32_MASK
        return True

    def forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & U32_MASK

    def peer_view_free(self) -> int:
        """How much room the peer believes we have (from the fwd_cnt it last saw)."""
        return self.buf_alloc - ((self.rx_cnt - self.last_fwd_cnt) & U32_MASK)

    def update_needed(self, low: int = CREDIT_LOW) -> bool:
        """Send a CREDIT_UPDATE: the peer thinks we are nearly full, but we freed space."""
        return self.fwd_cnt != self.last_fwd_cnt and self.peer_view_free() < low

    def stamp(self, hdr: Header) -> Header:
        hdr.buf_alloc = self.buf_alloc
        hdr.fwd_cnt = self.fwd_cnt
        self.last_fwd_cnt = self.fwd_cnt
        return hdr


# Device.rx_fill (want, hdr_last, hdr_mid, fd) -> (filled, bytes, errno, offered) | None
RxFill = Callable[..., "tuple[int, int, int, int] | None"]


class RxBufferLike(Protocol):
    capacity: int
    payload: list[memoryview]


class ConnEnv(Protocol):
    """What a connection needs from its owner (hybrid.Hybrid)."""

    loop: asyncio.AbstractEventLoop

    def send_packet(self, conn: "Connection", hdr: Header) -> None: ...
    def want_rx(self, conn: "Connection") -> None: ...
    def release(self, conn: "Connection") -> None: ...


def trim_views(views: list[memoryview], n: int) -> list[memoryview]:
    """The first n bytes of a list of views, as views."""
    out: list[memoryview] = []
    for v in views:
        if n <= 0:
            break
        if len(v) > n:
            v = v[:n]
        out.append(v)
        n -= len(v)
    return out


def skip_views(views: list[memoryview], n: int) -> list[memoryview]:
    """The views after their first n bytes."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def copy_into(views: list[memoryview], data: memoryview) -> int:
    """Scatter data into views; returns bytes copied."""
    off = 0
    for v in views:
        if off >= len(data):
            break
        k = min(len(v), len(data) - off)
        v[:k] = data[off:off + k]
        off += k
    return off


def scatter(src: list[memoryview], dst: list[memoryview], n: int) -> int:
    """Copy the first n bytes of src (a list of views, consumed in place: what is left of it
    stays in src) into the views dst; returns bytes copied (n unless src or dst is shorter)."""
    done = 0
    di = 0
    doff = 0
    while done < n and src and di < len(dst):
        s = src[0]
        d = dst[di]
        k = min(len(s), len(d) - doff, n - done)
        d[doff:doff + k] = s[:k]
        done += k
        doff += k
        if k == len(s):
            src.pop(0)
        else:
            src[0] = s[k:]
        if doff == len(d):
            di += 1
            doff = 0
    return done


@dataclass(eq=False)
class Connection:
    """A guest <-> host-Unix-socket connection; one per (2, host_port, guest_cid, guest_port)."""

    env: ConnEnv
    key: ConnKey
    vm: str
    type: int
    sock: socket.socket
    state: State = State.CONNECTING
    credit: Credit = field(default_factory=Credit)
    ok_line: bytes | None = None          # host-initiated: sent to the host on RESPONSE
    close_timeout: float = CLOSE_TIMEOUT
    peer_shut: int = 0                    # SHUTDOWN flags the guest sent
    local_shut: int = 0                   # SHUTDOWN flags we sent
    host_wr_closed: bool = False          # we did sock.shutdown(SHUT_WR)
    host_rd_closed: bool = False          # the host program shut its reading side (SHUT_RD)
    framed: bool = False                  # SEQPACKET: each Unix message is <flags byte> + data
    out: deque = field(default_factory=deque)   # (memoryview, sendmsg flags) not yet written
    out_bytes: int = 0
    seq_parts: list = field(default_factory=list)  # partial guest SEQPACKET message
    rx_msg: memoryview | None = None      # host SEQPACKET message being sent to the guest
    rx_msg_eor: bool = False
    rx_off: int = 0
    reading: bool = False
    read_tried: bool = False              # a host socket read happened (stream: _on_readable)
    writing: bool = False
    waiting_credit: bool = False
    credit_requested: bool = False
    lingering: bool = False
    timer: asyncio.TimerHandle | None = None
    credit_timer: asyncio.TimerHandle | None = None   # the delayed CREDIT_REQUEST
    credit_wait_since: float = 0.0      # loop time credit ran out (while waiting_credit)
    on_close: Callable[["Connection", str], None] | None = None

    # --- identity -------------------------------------------------------------------------
    @property
    def local_port(self) -> int:
        return self.key[1]

    @property
    def peer_cid(self) -> int:
        return self.key[2]

    @property
    def peer_port(self) -> int:
        return self.key[3]

    def __repr__(self) -> str:
        return (f"<Connection {self.vm} {self.key[0]}:{self.key[1]}<->{self.key[2]}:{self.key[3]}"
                f" {self.state.value}>")

    def header(self, op: int, flags: int = 0, length: int = 0) -> Header:
        """A header from our end to the guest, stamped with our current credit."""
        return self.credit.stamp(Header(self.key[0], self.key[2], self.key[1], self.key[3],
                                        length, self.type, op, flags))

    def send(self, op: int, flags: int = 0) -> None:
        self.env.send_packet(self, self.header(op, flags))

    # --- lifecycle ------------------------------------------------------------------------
    def start_connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Host-initiated: send REQUEST and wait for RESPONSE/RST."""
        self.send(Op.REQUEST)
        self._arm(timeout, self._connect_timeout)

    def accept(self) -> None:
        """Guest-initiated and the host Unix socket is connected: answer RESPONSE."""
        self.state = State.ESTABLISHED
        self.send(Op.RESPONSE)
        self.start_reading()

    def _connect_timeout(self) -> None:
        log.info("%r: no RESPONSE from the guest, giving up", self)
        self.reset("connect timeout")

    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.env.loop.call_later(delay, fn)

    def reset(self, reason: str, send_rst: bool = True) -> None:
        """Abort: RST to the guest (unless it is the one resetting), close the Unix socket."""
        if self.state is State.CLOSED:
            return
        if send_rst:
            self.send(Op.RST)
        self._close(reason)

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._cancel_credit_request()
        self._stop_reading()
        self.env.release(self)
        if self.out_bytes and not self.lingering and self.sock.fileno() >= 0:
            # the guest is gone but a slow host reader still has data coming: keep flushing
            self.lingering = True
            self.timer = self.env.loop.call_later(LINGER_TIMEOUT, self._destroy)
            self._start_writing()
            log.debug("%r: closed (%s), lingering with %d bytes", self, reason, self.out_bytes)
            return
        self._destroy(reason)

    def _destroy(self, reason: str = "linger timeout") -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._stop_reading()
        self._stop_writing()
        self.out.clear()
        self.out_bytes = 0
        try:
            self.sock.close()
        except OSError:
            pass
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self, reason)
        log.debug("%r: destroyed (%s)", self, reason)

    # --- packets from the guest -----------------------------------------------------------
    def on_credit_update(self, buf_alloc: int, fwd_cnt: int) -> bool:
        """The guest's credit update on an established connection (on_packet's CREDIT_UPDATE
        case, without a Header: Router._host_credit). False, having done nothing, in any
        other state: on_packet decides there."""
        if self.state is not State.ESTABLISHED:
            return False
        credit = self.credit
        before = credit.peer_credit()
        credit.update_peer(buf_alloc, fwd_cnt)
        if credit.peer_credit() > before:
            self._credit_grew()
        return True

    def on_packet(self, hdr: Header, payload: list[memoryview]) -> None:
        """Every packet the guest sends on this connection (already routed here)."""
        if self.state is State.CLOSED:
            return
        if hdr.op == Op.CREDIT_UPDATE and self.on_credit_update(hdr.buf_alloc, hdr.fwd_cnt):
            return
        before = self.credit.peer_credit()
        self.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        op = hdr.op
        if op == Op.RST:
            self.reset("guest RST", send_rst=False)
            return
        if self.state is State.CONNECTING:
            if op == Op.RESPONSE and self.ok_line is not None:
                self._established()
            else:
                self.reset(f"unexpected {Op(op).name if op in Op._value2member_map_ else op} "
                           "while connecting")
            return
        if op == Op.RW:
            self._guest_data(hdr, payload)
        elif op == Op.CREDIT_REQUEST:
            self.send(Op.CREDIT_UPDATE)
        elif op == Op.CREDIT_UPDATE:
            pass                                # in a state on_credit_update leaves here
        elif op == Op.SHUTDOWN:
            self._guest_shutdown(hdr.flags & SHUTDOWN_BOTH)
        else:
            self.reset(f"unexpected op {op}")
            return
        if self.state is not State.CLOSED and self.credit.peer_credit() > before:
            self._credit_grew()

    def _established(self) -> None:
        assert self.ok_line is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = State.ESTABLISHED
        try:
            self.sock.send(self.ok_line)
        except OSError as e:
            self.reset(f"host gone before OK: {e}")
            return
        self.start_reading()

    def _credit_grew(self) -> None:
        """Credit came back: read the host socket now (in the pump that follows the guest's
        update) instead of re-arming the reader and waiting a loop iteration for readiness;
        an empty socket re-arms it itself (EAGAIN)."""
        if self.waiting_credit:
            self.waiting_credit = False
            self.credit_requested = False       # the request timer lapses (_request_credit)
            self.env.want_rx(self)

    def _guest_data(self, hdr: Header, payload: list[memoryview]) -> None:
        n = hdr.len
        if n == 0:
            return
        if not self.credit.receive(n):
            log.warning("%r: guest overran its credit (%d bytes buffered, +%d, buf_alloc %d)",
                        self, self.credit.buffered(), n, self.credit.buf_alloc)
            self.reset("credit overrun")
            return
        if self.peer_shut & SHUTDOWN_SEND or self.host_wr_closed or self.host_rd_closed:
            self.credit.forwarded(n)       # nowhere to go; keep the books straight
            return
        if self.type == Type.SEQPACKET:
            self.seq_parts.append(b"".join(payload))
            if hdr.flags & SEQ_EOM:
                msg = memoryview(b"".join(self.seq_parts))
                self.seq_parts.clear()
                self._queue_out(msg, socket.MSG_EOR if hdr.flags & SEQ_EOR else 0)
        elif not self.out:
            try:
                sent = self.sock.sendmsg(payload)
            except _AGAIN:
                sent = 0
            except OSError as e:
                self._host_write_failed(e, n)
                return
            self.credit.forwarded(sent)
            if sent < n:
                rest = memoryview(b"".join(skip_views(payload, sent)))   # copy what is left
                self.out.append((rest, 0))
                self.out_bytes += len(rest)
                self._start_writing()
        else:
            data = memoryview(b"".join(payload))
            self.out.append((data, 0))
            self.out_bytes += len(data)
        self._after_forward()

    # --- guest data in batches (Router.relay_tx, VsockDevice.send_stream, C) ----------------
    def batch_room(self) -> int:
        """Guest data bytes a batch may send straight to the host socket now: the credit left
        when this is an established STREAM connection with nothing buffered for the host and
        nothing shut; 0 otherwise (then every packet takes on_packet)."""
        if self.state is not State.ESTABLISHED or self.type != Type.STREAM or self.out \
                or self.peer_shut & SHUTDOWN_SEND or self.host_wr_closed or self.host_rd_closed:
            return 0
        credit = self.credit
        return max(credit.buf_alloc, credit.rx_limit) - credit.buffered()

    def took_batch(self, data_bytes: int, sent: int, rest: bytes | None, buf_alloc: int,
                   fwd_cnt: int) -> None:
        """Book a batch of RW packets (data_bytes, within batch_room()) of which the host
        socket took `sent` and `rest` is the copied remainder: what on_packet does for each
        of them, once (the last header's credit fields, forwarded bytes, what waits for the
        host, a credit update if the guest needs one)."""
        before = self.credit.peer_credit()
        self.credit.update_peer(buf_alloc, fwd_cnt)
        self.credit.receive(data_bytes)
        self.credit.forwarded(sent)
        if rest:
            self.out.append((memoryview(rest), 0))
            self.out_bytes += len(rest)
            self._start_writing()
        self._after_forward()
        if self.state is not State.CLOSED and self.credit.peer_credit() > before:
            self._credit_grew()

    def _send_msg(self, msg: memoryview, flags: int) -> None:
        """One guest message to the host socket; framed: the flags byte first."""
        if self.framed:
            self.sock.sendmsg([bytes((FRAME_EOR if flags & socket.MSG_EOR else 0,)), msg])
        else:
            self.sock.sendmsg([msg], [], flags)

    def _queue_out(self, msg: memoryview, flags: int) -> None:
        if not self.out:
            try:
                self._send_msg(msg, flags)
                self.credit.forwarded(len(msg))
                return
            except _AGAIN:
                pass
            except OSError as e:
                self._host_write_failed(e, len(msg))
                return
        self.out.append((msg, flags))
        self.out_bytes += len(msg)
        self._start_writing()

    def _after_forward(self) -> None:
        if self.state is State.CLOSED:
            return
        if self.credit.update_needed():
            self.send(Op.CREDIT_UPDATE)
        self._check_done()

    def on_writable(self) -> None:
        """The host socket drained: write what we kept."""
        try:
            self._flush_out()
        except Exception:                       # a bug here must cost one connection only
            log.exception("%r: flushing to the host failed", self)
            self._destroy("internal error") if self.lingering else self.reset("internal error")

    def _flush_out(self) -> None:
        try:
            while self.out:
                data, flags = self.out[0]
                if self.type == Type.SEQPACKET:
                    self._send_msg(data, flags)
                    sent = len(data)
                else:
                    sent = self.sock.send(data)
                self.credit.forwarded(sent)
                self.out_bytes -= sent
                if sent < len(data):
                    self.out[0] = (data[sent:], flags)
                    break
                self.out.popleft()
        except _AGAIN:
            pass
        except OSError as e:
            self._host_write_failed(e)
            return
        if not self.out:
            self._stop_writing()
            if self.lingering:
                self._destroy("flushed after close")
                return
        if not self.lingering:
            self._after_forward()

    def _host_write_failed(self, e: OSError, unsent: int = 0) -> None:
        """`unsent`: guest bytes of the failed write that are not in `out`."""
        log.debug("%r: host socket write failed: %s", self, e)
        if isinstance(e, BrokenPipeError) and not self.lingering and not self._peer_hung_up():
            self.credit.forwarded(unsent)  # EPIPE from a live peer: it did shutdown(SHUT_RD)
            self.host_shut_rd()
            return
        self.out.clear()
        self.out_bytes = 0
        if self.lingering:
            self._destroy(f"host gone while lingering: {e}")
        else:
            self.reset(f"host write failed: {e}")

    # --- what the host program asked for out of band (hybrid CTL lines) ------------------
    def host_shut_rd(self) -> None:
        """The host program did shutdown(SHUT_RD): tell the guest (SHUTDOWN with the RCV flag,
        as the kernel sends it) and drop guest data from now on, as the kernel does."""
        if self.state is State.CLOSED or self.host_rd_closed:
            return
        self.host_rd_closed = True
        if self.out:
            self.credit.forwarded(self.out_bytes)    # the host will never read it
            self.out.clear()
            self.out_bytes = 0
            self._stop_writing()
        self.seq_parts.clear()
        if self.state is State.ESTABLISHED and not self.local_shut & SHUTDOWN_RCV:
            self.local_shut |= SHUTDOWN_RCV
            self.send(Op.SHUTDOWN, SHUTDOWN_RCV)

    def set_buf_alloc(self, n: int) -> None:
        """The host program's SO_VM_SOCKETS_BUFFER_SIZE (already clamped to its min/max by the
        shim; the kernel's transport clamps to VIRTIO_VSOCK_MAX_BUF_SIZE). On an established
        connection the guest hears it at once (CREDIT_UPDATE), as the kernel tells its peer."""
        n = max(0, min(n, MAX_BUF_ALLOC))
        if n == self.credit.buf_alloc:
            return
        self.credit.resize(n)   # the Unix socket's SO_SNDBUF stays: it is window on top (docs)
        if self.state is State.ESTABLISHED:
            self.send(Op.CREDIT_UPDATE)

    def _guest_shutdown(self, flags: int) -> None:
        self.peer_shut |= flags
        if flags & SHUTDOWN_RCV:
            # the guest reads no more: stop reading the host (its writes now fail with EPIPE)
            self._stop_reading()
            self.rx_msg = None
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        self._check_done()

    def _check_done(self) -> None:
        """Half-close the host side once the guest's data is out; RST when both are done."""
        if self.state is State.CLOSED or self.out:
            return
        if self.peer_shut & SHUTDOWN_SEND and not self.host_wr_closed:
            self.host_wr_closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self.peer_shut == SHUTDOWN_BOTH:
            # as Linux does: the peer shut both directions and nothing is pending -> RST
            self.reset("guest closed")

    # --- host -> guest data ---------------------------------------------------------------
    def start_reading(self) -> None:
        if self.reading or self.state is not State.ESTABLISHED:
            return
        if self.peer_shut & SHUTDOWN_RCV or self.local_shut & SHUTDOWN_SEND:
            return
        self.reading = True
        self.env.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            try:
                self.env.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass

    def _start_writing(self) -> None:
        if not self.writing:
            self.writing = True
            self.env.loop.add_writer(self.sock.fileno(), self.on_writable)

    def _stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            try:
                self.env.loop.remove_writer(self.sock.fileno())
            except (ValueError, OSError):
                pass

    def _on_readable(self) -> None:
        # Don't spin on a readable socket while the guest may have no buffers: the router
        # calls fill*() when it has some, and we re-arm the reader when the socket runs dry.
        # A stream keeps its reader armed when the router read from it right away (saves an
        # epoll_ctl pair per batch); it is stopped when nothing was read (no rx buffer, no
        # credit, not established), so a readable socket cannot make the loop spin.
        stream = self.type == Type.STREAM
        if not stream:
            self._stop_reading()
        self.read_tried = False
        try:
            self.env.want_rx(self)
        except Exception:
            log.exception("%r: rx failed", self)
            self.reset("internal error")
            return
        if stream and not self.read_tried:
            self._stop_reading()

    def fill(self, buf: RxBufferLike) -> Header | None:
        """Move host data into one guest rx buffer. Returns the header to push, or None when
        the buffer stays unused (no data, no credit, EOF); the connection re-arms itself."""
        if self.state is not State.ESTABLISHED or self.peer_shut & SHUTDOWN_RCV \
                or self.local_shut & SHUTDOWN_SEND:
            return None
        credit = self.credit.peer_credit()
        if credit <= 0:
            self._wait_credit()
            return None
        if self.type == Type.SEQPACKET:
            return self._fill_seq(buf, credit)
        lens = self._recv_stream([buf], credit)
        return self.header(Op.RW, 0, lens[0]) if lens else None

    def readable_bytes(self) -> int:
        """Bytes waiting in the host socket (FIONREAD); 0 if unknown. The rx path pops guest
        buffers for this much, not for the whole credit, so fewer are popped and given back."""
        try:
            return _INT.unpack(fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, _INT_ZERO))[0]
        except (OSError, ValueError):
            return 0

    def fill_many(self, bufs: list[RxBufferLike]) -> list[tuple[int, bytes]]:
        """Stream only: move host data into several guest rx buffers with one read, bounded by
        the guest's credit. Returns (payload length, packed header) for the first k buffers
        used (k may be 0); the caller gives the others back. Same side effects as fill()."""
        if self.state is not State.ESTABLISHED or self.peer_shut & SHUTDOWN_RCV \
                or self.local_shut & SHUTDOWN_SEND:
            return []
        credit = self.credit.peer_credit()
        if credit <= 0:
            self._wait_credit()
            return []
        lens = self._recv_stream(bufs, credit)
        if not lens:
            return []
        c = self.credit
        c.last_fwd_cnt = c.fwd_cnt             # what header() -> stamp() does, once per batch
        k = self.key
        pack = HEADER.pack
        return [(n, pack(k[0], k[2], k[1], k[3], n, self.type, Op.RW, 0, c.buf_alloc,
                         c.fwd_cnt)) for n in lens]

    def fill_device(self, fill: RxFill) -> tuple[int, int] | None:
        """Stream only: fill_many() without RxBuffers: the device reads the socket straight
        into its next rx buffers (one readv, headers from one template). Returns (buffers
        filled, bytes), or None when the device cannot; then the caller uses fill_many()."""
        if self.state is not State.ESTABLISHED or self.peer_shut & SHUTDOWN_RCV \
                or self.local_shut & SHUTDOWN_SEND:
            return 0, 0
        c = self.credit
        credit = c.peer_credit()
        if credit <= 0:
            self._wait_credit()
            return 0, 0
        k = self.key
        hdr = HEADER.pack(k[0], k[2], k[1], k[3], 0, self.type, Op.RW, 0, c.buf_alloc, c.fwd_cnt)
        res = fill(credit, hdr, hdr, self.sock.fileno())
        if res is None:
            return None
        self.read_tried = True
        n, got, err, asked = res
        if err:
            if err in _AGAIN_ERRNOS:
                self.start_reading()
            else:
                self.reset(f"host read failed: {os.strerror(err)}")
            return 0, 0
        if got == 0:            # asked > 0 and not EAGAIN: a real EOF
            self._host_eof()
            return 0, 0
        c.last_fwd_cnt = c.fwd_cnt             # the headers carried it (stamp())
        c.sent(got)
        if got < asked:
            self.start_reading()    # probably drained: let the loop tell us about more
        elif c.peer_credit() <= 0:
            self._wait_credit()     # what the next fill would find, without another pump turn
        else:
            self.env.want_rx(self)  # filled every byte offered: likely more waiting
        return n, got

    def _recv_stream(self, bufs: list[RxBufferLike], credit: int) -> list[int]:
        """One recvmsg_into over the buffers' payload views (at most credit bytes); returns the
        bytes each buffer got (only the non-empty ones, in order), [] if none (re-armed)."""
        views: list[memoryview] = []
        want = 0
        for buf in bufs:
            room = credit - want
            if room <= 0:
                break
            if buf.capacity <= room:
                views += buf.payload
                want += buf.capacity
            else:
                views += trim_views(buf.payload, room)
                want += room
        if want <= 0:
            return []
        self.read_tried = True
        try:
            got = self.sock.recvmsg_into(views)[0]
        except _AGAIN:
            self.start_reading()
            return []
        except OSError as e:
            self.reset(f"host read failed: {e}")
            return []
        if got == 0:            # want > 0 and not EAGAIN: a real EOF (never a 0-byte request)
            self._host_eof()
            return []
        self.credit.sent(got)
        if got < want:
            self.start_reading()    # probably drained: let the loop tell us about more
        elif self.credit.peer_credit() <= 0:
            self._wait_credit()     # what the next fill would find, without another pump turn
        else:
            self.env.want_rx(self)  # filled every byte we asked for: likely more waiting
        lens: list[int] = []
        left = got
        for buf in bufs:
            n = buf.capacity if buf.capacity < left else left
            lens.append(n)
            left -= n
            if left <= 0:
                break
        return lens

    def _fill_seq(self, buf: RxBufferLike, credit: int) -> Header | None:
        if self.rx_msg is None:
            try:
                probe = bytearray(1)
                size = self.sock.recv_into(probe, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
                if size == 0:
                    data, _, flags, _ = self.sock.recvmsg(1)
                    if self._peer_hung_up():
                        self._host_eof()
                    else:
                        self.start_reading()   # an empty message: vsock cannot carry it
                    return None
                if size > MAX_SEQ_MSG + self.framed:
                    self.reset(f"host message of {size} bytes is too large")
                    return None
                data, _, flags, _ = self.sock.recvmsg(size)
            except _AGAIN:
                self.start_reading()
                return None
            except OSError as e:
                self.reset(f"host read failed: {e}")
                return None
            if self.framed:
                if len(data) <= 1:              # an empty message: vsock cannot carry it
                    self.start_reading()
                    return None
                flags = socket.MSG_EOR if data[0] & FRAME_EOR else 0
                data = memoryview(data)[1:]
            if len(data) > self.credit.peer_buf_alloc:
                # Linux's sender would get EMSGSIZE; the guest could never take it whole
                self.reset(f"host message of {len(data)} bytes exceeds the guest's buffer")
                return None
            self.rx_msg = memoryview(data)
            self.rx_msg_eor = bool(flags & socket.MSG_EOR)
            self.rx_off = 0
        msg = self.rx_msg
        n = min(credit, buf.capacity, len(msg) - self.rx_off)
        copy_into(buf.payload, msg[self.rx_off:self.rx_off + n])
        self.rx_off += n
        flags = 0
        if self.rx_off >= len(msg):
            flags = SEQ_EOM | (SEQ_EOR if self.rx_msg_eor else 0)
            self.rx_msg = None
            self.start_reading()
        else:
            self.env.want_rx(self)
        self.credit.sent(n)
        return self.header(Op.RW, flags, n)

    def _wait_credit(self) -> None:
        self._stop_reading()                # _credit_grew() re-arms it
        if not self.waiting_credit:
            self.waiting_credit = True
            self.credit_wait_since = self.env.loop.time()
        if not self.credit_requested and self.credit_timer is None:
            self.credit_timer = self.env.loop.call_later(CREDIT_REQUEST_DELAY, self._request_credit)

    def _request_credit(self) -> None:
        """Still no credit CREDIT_REQUEST_DELAY after it ran out: ask the guest for it. The
        timer is not cancelled when credit comes back (a bulk transfer runs out of credit
        thousands of times a second): it lapses here, or waits out the rest of the delay
        when credit ran out again since."""
        self.credit_timer = None
        if not self.waiting_credit or self.credit_requested or self.state is not State.ESTABLISHED:
            return
        left = self.credit_wait_since + CREDIT_REQUEST_DELAY - self.env.loop.time()
        if left > 0:
            self.credit_timer = self.env.loop.call_later(left, self._request_credit)
            return
        self.credit_requested = True
        self.send(Op.CREDIT_REQUEST)

    def _cancel_credit_request(self) -> None:
        if self.credit_timer is not None:
            self.credit_timer.cancel()
            self.credit_timer = None

    def _peer_hung_up(self) -> bool:
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP | select.POLLHUP)
        ev = p.poll(0)
        return bool(ev and ev[0][1] & (select.POLLRDHUP | select.POLLHUP))

    def _host_eof(self) -> None:
        """The host stopped sending: SHUTDOWN(SEND) on a half-close, both flags on a close."""
        self._stop_reading()
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLHUP)
        closed = any(ev & select.POLLHUP for _, ev in p.poll(0))
        flags = SHUTDOWN_BOTH if closed else SHUTDOWN_SEND
        self.local_shut |= flags
        if closed:
            self.out.clear()            # the host cannot read what we kept for it
            self.out_bytes = 0
            self._stop_writing()
            self.state = State.CLOSING
            self.send(Op.SHUTDOWN, flags)
            self._arm(self.close_timeout, lambda: self.reset("close timeout"))
        else:
            self.send(Op.SHUTDOWN, flags)

