"""One VM's virtio-vsock device: a vhost-user frontend (QEMU) plus rx/tx split virtqueues.

Turns tx chains into (header, payload views) for the router and hands out rx buffers; see
docs/architecture.md "Device <-> router interface". Everything the guest controls is checked
in virtqueue.py/memory.py; a violation marks the device broken (the router is told once) and
the device ignores its rings until the guest re-initialises it. Nothing here raises into the
event loop.

Ring stop (GET_VRING_BASE) is not a reset by itself: QEMU stops the rings for a QMP `stop`
as well as for a guest reset. The device pauses and remembers where each ring stopped; when
the rings restart at the same base index and the same guest-physical ring addresses (and
features) it resumes and the router's connections survive; anything else is a guest reset
and the router is told once before the new rings are used.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

from . import accel
from .memory import GuestMemoryError
from .unixsock import listen_unix
from .vhost_user import (VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_EVENT_IDX,
                         VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_VSOCK_F_SEQPACKET, VhostUserSession)
from .virtqueue import DescChain, Virtqueue, VirtqueueError

log = logging.getLogger("vmlab.vsock.device")

HDR_LEN = 44
RX, TX = 0, 1
TX_BATCH = 256                          # chains per loop iteration before yielding to other VMs
RX_FILL_BATCH = 64                      # rx buffers one rx_fill() fills at most
RELAY_RX_MAX = 1024                     # rx buffers one relay_to() looks at (the C side's cap)
# Bulk tx (a drain moved >= TX_BULK_BYTES in >= 2 chains): the guest kicks only every
# TX_KICK_AHEAD + 1 chains and the device looks at the ring itself TX_POLL_DELAY (up to
# TX_POLL_MAX) after each drain, so a guest that posts fewer is never left waiting longer than
# that. A TCG guest adds
# its packets more slowly than the backend drains them and kicked about once per 2 packets:
# each kick is a backend wakeup, which costs more than the packets it carries. Interactive
# traffic (single packets, control) keeps a kick per chain.
TX_BULK_BYTES = 64 * 1024
TX_KICK_AHEAD = 3
TX_POLL_DELAY = 0.001                   # libuv timers have 1 ms resolution: 0.5 ms ran at once
# A look that finds nothing doubles the next delay, up to TX_POLL_MAX; one that finds chains
# goes back to TX_POLL_DELAY. A sender limited by its peer's credit posts exactly the chains a
# window allows, so its kick comes with the last one and the look after it is a wakeup for
# nothing (VM->VM: ~4k per GiB, nearly half of the backend's wakeups); its next kick then
# comes before the longer delay runs out and cancels the look.
TX_POLL_MAX = 0.004


class _Drain(threading.local):
    """The devices given rx packets while a tx drain runs (VM<->VM relay): the drain flushes
    them when it ends, one interrupt each, instead of a loop callback each (a loop iteration
    per relayed batch)."""

    def __init__(self) -> None:
        self.devs: list[VsockDevice] | None = None


_DRAIN = _Drain()


class DeviceHandler(Protocol):
    """Implemented by the router (see docs/architecture.md)."""

    def on_tx_packet(self, dev: "VsockDevice", header: bytes, payload: list[memoryview]) -> None: ...
    def on_rx_ready(self, dev: "VsockDevice") -> None: ...
    def on_device_reset(self, dev: "VsockDevice", reason: str) -> None: ...
    # Optional: relay_tx(dev, budget) -> (chains, payload bytes, ring drained) it took from
    # dev's tx ring itself, before any on_tx_packet (the router's batched VM->VM relay and
    # guest->host sends, with relay_to() and send_stream() below); drained: it took every
    # chain the ring had.


@dataclass(eq=False, slots=True)
class RxBuffer:
    """A guest rx buffer: 44 header bytes (maybe split) and `payload` views after them."""

    capacity: int
    payload: list[memoryview]
    head: int = 0
    header: list[memoryview] = field(default_factory=list)
    epoch: int = 0
    seq: int = 0
    views: list[memoryview] = field(default_factory=list)   # everything to release

    def release(self) -> None:
        for view in self.payload:
            view.release()
        for view in self.header:
            view.release()
        if self.views:
            for view in self.views:
                view.release()
            self.views = []
        self.payload = []
        self.header = []
        self.capacity = 0


@dataclass(frozen=True)
class _StopPoint:
    """Where a ring stood at GET_VRING_BASE, to tell a resume from a guest reset."""

    base: int                                   # next avail index we returned
    num: int
    rings: tuple[int, int, int] | None          # desc/avail/used as guest-physical addresses
    features: int


def _ring_gpas(session: VhostUserSession, index: int) -> tuple[int, int, int] | None:
    """The ring's desc/avail/used frontend addresses translated to guest-physical ones."""
    addr = session.vrings[index].addr
    if addr is None:
        return None
    out = []
    for uva in (addr.desc, addr.avail, addr.used):
        for region in session.mem.regions:
            start = region.spec.userspace_addr
            if start <= uva < region.uva_end:
                out.append(region.spec.guest_phys_addr + (uva - start))
                break
        else:
            return None
    return out[0], out[1], out[2]


def _split_header(chain: DescChain) -> RxBuffer:
    """First 44 writable bytes are the header (they may span descriptors), the rest payload."""
    views = chain.writable
    first = views[0]
    flen = len(first)
    if flen == HDR_LEN:                 # Linux 6.1: header descriptor + payload descriptor(s)
        return RxBuffer(chain.write_len - HDR_LEN, views[1:], chain.head, [first], 0, 0, [])
    if flen > HDR_LEN:
        return RxBuffer(chain.write_len - HDR_LEN, [first[HDR_LEN:]] + views[1:], chain.head,
                        [first[:HDR_LEN]], 0, 0, [first])
    header, payload, need = [], [], HDR_LEN
    for view in views:
        if need == 0:
            payload.append(view)
        elif len(view) <= need:
            header.append(view)
            need -= len(view)
        else:
            header.append(view[:need])
            payload.append(view[need:])
            need = 0
    return RxBuffer(capacity=chain.write_len - HDR_LEN, payload=payload, head=chain.head,
                    header=header, views=list(views))


class VsockDevice:
    """One VM's vsock device behind a vhost-user socket (one frontend at a time)."""

    def __init__(self, name: str, cid: int, socket_path: str,
                 loop: asyncio.AbstractEventLoop, handler: DeviceHandler) -> None:
        self.name = name
        self.cid = cid
        self.socket_path = str(socket_path)
        self.loop = loop
        self.handler = handler
        self.broken: str | None = None
        self.stats: dict[str, int] = dict(tx_packets=0, rx_packets=0, tx_bytes=0, rx_bytes=0,
                                          rx_filled=0, kicks=0, interrupts=0, errors=0,
                                          tx_polls=0, tx_poll_hits=0)
        self._listener: socket.socket | None = None
        self._session: VhostUserSession | None = None
        self._queues: list[Virtqueue | None] = [None, None]
        self._sigs: list[tuple | None] = [None, None]
        self._kick_fds: list[int | None] = [None, None]
        # next avail idx of a paused/broken ring, with the SET_VRING_BASE count it is newer than
        self._saved_base: list[tuple[int, int] | None] = [None, None]
        self._remap: list[bool] = [False, False]
        # rings stopped by GET_VRING_BASE while connections live: paused until they restart
        self._stopped: list[_StopPoint | None] = [None, None]
        self._features: int | None = None   # what the rings ran with since the last incident
        self._up = False                    # rings ran since the last incident
        self._reset_seen = True             # a reset happened since the device broke
        self._epoch = 0                     # bumps invalidate outstanding rx buffers
        self._rx_seq = 0
        self._rx_last_ring_pop: int | None = None
        self._rx_out: dict[int, RxBuffer] = {}
        self._rx_free: list[RxBuffer] = []
        self._flush_scheduled = False
        self._tx_scheduled = False
        self._tx_poll: asyncio.TimerHandle | None = None   # bulk mode's own look at the ring
        self._tx_poll_delay = TX_POLL_DELAY
        self.accel = accel.load()           # None: pure Python (VMLAB_NO_ACCEL, no compiler)
        # the handler's batched relay (relay_to) needs the accelerator
        self._relay_tx = getattr(handler, "relay_tx", None) if self.accel is not None else None

    # -- public API -------------------------------------------------------------------
    @property
    def seqpacket(self) -> bool:
        """VIRTIO_VSOCK_F_SEQPACKET negotiated by the current frontend."""
        s = self._session
        return s is not None and s.has_feature(VIRTIO_VSOCK_F_SEQPACKET)

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def paused(self) -> bool:
        """Rings stopped (VM stopped or guest resetting); connections kept until they restart."""
        return self._stopped[RX] is not None or self._stopped[TX] is not None

    def start(self) -> None:
        """Bind and listen on socket_path (a stale socket file is replaced)."""
        path = self.socket_path
        sock = listen_unix(path, backlog=1)   # QEMU is the one and only client
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        log.info("%s: listening on %s (cid %d)", self.name, path, self.cid)

    def close(self) -> None:
        """Drop the frontend, unmap memory, stop listening and unlink socket_path."""
        if self._session is not None:
            self._drop_frontend("device closed")
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def rx_pop(self) -> RxBuffer | None:
        """Next free guest rx buffer; None -> wait for on_rx_ready."""
        q = self._queues[RX]
        stopped = self._stopped
        if q is None or self.broken or stopped[RX] is not None or stopped[TX] is not None:
            return None                       # no ring, broken, or paused
        if self._rx_free:
            buf = self._rx_free.pop()
            self._rx_out[buf.seq] = buf
            return buf
        try:
            chain = q.pop()
            if chain is None:
                if not q.enable_notification():
                    return None
                chain = q.pop()
                if chain is None:
                    return None
            if chain.readable:
                chain.release()
                raise VirtqueueError(f"{q.name}: rx chain with device-readable descriptors")
            if chain.write_len < HDR_LEN:
                chain.release()
                raise VirtqueueError(f"{q.name}: rx buffer of {chain.write_len} bytes < header")
        except (VirtqueueError, ValueError) as exc:
            self._fault(str(exc))
            return None
        buf = _split_header(chain)
        self._rx_seq += 1
        buf.seq = self._rx_last_ring_pop = self._rx_seq
        buf.epoch = self._epoch
        self._rx_out[buf.seq] = buf
        return buf

    def rx_push(self, buf: RxBuffer, header: bytes, payload_len: int) -> None:
        """Publish a filled rx buffer: header written now, used len 44+payload_len."""
        if len(header) != HDR_LEN:
            raise ValueError(f"header must be {HDR_LEN} bytes, got {len(header)}")
        if buf.epoch != self._epoch or self._rx_out.pop(buf.seq, None) is None:
            log.debug("%s: rx_push of a stale buffer ignored", self.name)
            return
        if not 0 <= payload_len <= buf.capacity:
            self._rx_out[buf.seq] = buf
            raise ValueError(f"payload_len {payload_len} outside 0..{buf.capacity}")
        q = self._queues[RX]
        if q is None:
            buf.release()
            return
        if len(buf.header) == 1:
            buf.header[0][:] = header
        else:
            pos = 0
            for view in buf.header:
                view[:] = header[pos:pos + len(view)]
                pos += len(view)
        q.push(buf.head, HDR_LEN + payload_len)
        buf.release()
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += payload_len
        self._schedule_flush()

    def rx_pop_batch(self, room: int, max_bufs: int, max_views: int) -> list[RxBuffer]:
        """rx_pop() in a loop, in one call: buffers for up to `room` payload bytes (always at
        least one if there is one), at most `max_bufs` buffers and `max_views` payload views.
        A header-only buffer, or one that would exceed max_views, ends the batch and is given
        back. Same checks as rx_pop(); a guest fault returns [] (the device is broken)."""
        q = self._queues[RX]
        stopped = self._stopped
        if q is None or self.broken or stopped[RX] is not None or stopped[TX] is not None:
            return []
        out: list[RxBuffer] = []
        free = self._rx_free
        rx_out = self._rx_out
        got = views = 0
        try:
            while got < room and len(out) < max_bufs:
                if free:
                    buf = free.pop()
                else:
                    fast = q.pop_rx_linux(min(max_bufs - len(out), max_views - views),
                                          room - got, HDR_LEN)
                    if fast:
                        epoch = self._epoch
                        seq = self._rx_seq
                        for head, hview, pview in fast:
                            seq += 1
                            buf = RxBuffer(len(pview), [pview], head, [hview], epoch, seq, [])
                            rx_out[seq] = buf
                            out.append(buf)
                            got += buf.capacity
                        views += len(fast)
                        self._rx_seq = self._rx_last_ring_pop = seq
                        continue
                    chain = q.pop()             # any other shape: the generic walk
                    if chain is None:
                        if not q.enable_notification():
                            break
                        chain = q.pop()
                        if chain is None:
                            break
                    if chain.readable:
                        chain.release()
                        raise VirtqueueError(f"{q.name}: rx chain with device-readable descriptors")
                    if chain.write_len < HDR_LEN:
                        chain.release()
                        raise VirtqueueError(f"{q.name}: rx buffer of {chain.write_len} bytes < header")
                    buf = _split_header(chain)
                    self._rx_seq += 1
                    buf.seq = self._rx_last_ring_pop = self._rx_seq
                    buf.epoch = self._epoch
                rx_out[buf.seq] = buf
                npay = len(buf.payload)
                if buf.capacity <= 0 or (out and views + npay > max_views):
                    self.rx_cancel(buf)
                    break
                out.append(buf)
                got += buf.capacity
                views += npay
        except (VirtqueueError, ValueError) as exc:
            self._fault(str(exc))
            return []
        return out

    def rx_push_batch(self, bufs: list[RxBuffer], filled: list[tuple[int, bytes]]) -> None:
        """rx_push(buf, header, n) for each (n, header) in `filled` and the buffer at the same
        position in `bufs`, with one stats update and one scheduled flush."""
        q = self._queues[RX]
        epoch = self._epoch
        rx_out = self._rx_out
        total = pushed = 0
        for buf, (n, header) in zip(bufs, filled):
            if buf.epoch != epoch or rx_out.pop(buf.seq, None) is None:
                log.debug("%s: rx_push of a stale buffer ignored", self.name)
                continue
            if not 0 <= n <= buf.capacity or len(header) != HDR_LEN:
                rx_out[buf.seq] = buf
                raise ValueError(f"payload_len {n} outside 0..{buf.capacity} or bad header")
            if q is None:
                buf.release()
                continue
            hv = buf.header
            if len(hv) == 1:
                hv[0][:] = header
            else:
                pos = 0
                for view in hv:
                    view[:] = header[pos:pos + len(view)]
                    pos += len(view)
            q.push(buf.head, HDR_LEN + n)
            if buf.views:
                buf.release()
            else:                             # inlined release(): payload and header views
                for view in buf.payload:
                    view.release()
                for view in hv:
                    view.release()
                buf.payload = buf.header = []
                buf.capacity = 0
            total += n
            pushed += 1
        if pushed:
            self.stats["rx_packets"] += pushed
            self.stats["rx_bytes"] += total
            self._schedule_flush()

    def rx_fill(self, want: int, hdr_last: bytes, hdr_mid: bytes, fd: int = -1,
                src: list[memoryview] | None = None, flush_soon: bool = True,
                ) -> tuple[int, int, int, int] | None:
        """Fill the next Linux-shaped rx buffers in the ring with up to `want` payload bytes
        in one call (Virtqueue.fill_rx: one readv from fd, or copied from `src`; headers from
        the two templates), no RxBuffer per buffer; flushed with the rest. Returns (filled,
        bytes, errno, offered), or None when it cannot (no ring, paused, broken, or the next
        chain has another shape): then the caller takes rx_pop_batch(), which also re-arms
        notifications on an empty ring. A guest fault breaks the device and returns None.
        flush_soon=False: the caller calls flush() itself (the router's pump does)."""
        q = self._queues[RX]
        stopped = self._stopped
        if q is None or self.broken or stopped[RX] is not None or stopped[TX] is not None:
            return None
        try:
            k, got, err, asked = q.fill_rx(RX_FILL_BATCH, want, hdr_last, hdr_mid, fd, src,
                                           self.accel)
        except (VirtqueueError, ValueError) as exc:
            self._fault(str(exc))
            return None
        if not asked:
            return None
        if k:
            self._rx_last_ring_pop = None     # rx_cancel must not unpop past these chains
            stats = self.stats
            stats["rx_packets"] += k
            stats["rx_filled"] += k             # of them by rx_fill
            stats["rx_bytes"] += got
            if flush_soon:
                self._schedule_flush()
        return k, got, err, asked

    def rx_control(self, header: bytes) -> bool:
        """Put a header-only packet (`header`, len 0) into the next rx buffer if that is
        Linux-shaped (Virtqueue.pop_rx_linux's checks) and nothing handed out earlier waits;
        flushed soon. False, having done nothing, otherwise: the caller takes rx_pop(), which
        also re-arms notifications on an empty ring."""
        q = self._queues[RX]
        stopped = self._stopped
        if q is None or self.broken or stopped[RX] is not None or stopped[TX] is not None \
                or self._rx_free or len(header) != HDR_LEN:
            return False
        try:
            bufs = q.pop_rx_linux(1, 1, HDR_LEN, direct=True)
        except (VirtqueueError, ValueError) as exc:
            self._fault(str(exc))
            return False
        if not bufs:
            return False
        head, hview, pview = bufs[0]
        hview[:] = header
        hview.release()
        pview.release()
        q.push(head, HDR_LEN)
        self._rx_last_ring_pop = None         # rx_cancel must not unpop past this chain
        stats = self.stats
        stats["rx_packets"] += 1
        self._schedule_flush()
        return True

    def relay_to(self, peer: "VsockDevice", max_n: int,
                 ) -> tuple[int, int, int, int, int, int, tuple[tuple[int, int], ...], bool] | None:
        """Up to max_n of this guest's leading tx chains that are STREAM data or credit
        packets for `peer`, straight into peer's rx buffers in one C call
        (Virtqueue.relay_stream; the checks Router._relay_stream makes). Counts them on both
        devices. With EVENT_IDX on both rings the same C call publishes peer's rx ring, and
        this device's tx ring when the run took every chain it had (Virtqueue.relay_publish:
        the drain's flush then finds nothing); else peer's flush is scheduled and this
        device's used elements go out with its drain's flush. Returns relay_stream's counts
        and whether they were all the chains the ring had, or None when it cannot run here
        (no accelerator, a queue missing, stopped or broken, rx buffers handed out earlier
        waiting) or there is no chain to relay. A fault in peer's ring breaks peer, not this
        device; one in this device's tx ring raises VirtqueueError (the drain's)."""
        accel = self.accel
        q = self._queues[TX]
        pq = peer._queues[RX]
        if accel is None or q is None or pq is None or peer is self or peer.broken \
                or peer._stopped[RX] is not None or peer._stopped[TX] is not None \
                or peer._rx_free:
            return None
        have = q._available(max_n)
        if not have:
            return None
        try:
            rx_have = pq._available(RELAY_RX_MAX)
        except VirtqueueError as exc:
            peer._fault(str(exc))
            return None
        published = q.event_idx and pq.event_idx and q.accel is not None \
            and pq.accel is not None
        if published:                         # both rings' flush in the same C call
            res, signalled, rx_signalled = q.relay_publish(have, pq, rx_have, self.cid,
                                                           peer.cid, accel)
        else:
            res = q.relay_stream(have, pq, rx_have, self.cid, peer.cid, accel)
        chains = res[0]
        if chains:
            stats = self.stats
            stats["tx_packets"] += chains
            stats["tx_bytes"] += res[1]
            taken = res[4] + res[5]
            if taken:
                peer._rx_last_ring_pop = None   # rx_cancel must not unpop past these chains
                pstats = peer.stats
                pstats["rx_packets"] += taken
                pstats["rx_filled"] += res[4]
                pstats["rx_bytes"] += res[3]
                if not published:
                    peer._schedule_flush()
            if published:
                peer.stats["interrupts"] += rx_signalled
                stats["interrupts"] += signalled
        return (*res, chains == have)

    def send_stream(self, fd: int, src_port: int, dst_port: int, max_bytes: int, max_n: int,
                    ) -> tuple[int, int, int, int, bytes | None, int, int, int, bool] | None:
        """Up to max_n of this guest's leading tx chains that are STREAM data of the flow
        src_port -> host:dst_port, within max_bytes, to the host socket `fd` in one C call
        (Virtqueue.send_stream). Counts them; the used elements go out with the drain's
        flush. Returns send_stream's result and whether it took every chain the ring had, or
        None (no accelerator or tx queue, or no chain)."""
        accel = self.accel
        q = self._queues[TX]
        if accel is None or q is None:
            return None
        have = q._available(max_n)
        if not have:
            return None
        res = q.send_stream(have, fd, self.cid, src_port, dst_port, max_bytes, accel)
        chains = res[0]
        if chains:
            stats = self.stats
            stats["tx_packets"] += chains
            stats["tx_bytes"] += res[1]
        return (*res, chains == have)

    def rx_cancel(self, buf: RxBuffer) -> None:
        """Give an unused buffer back; it is handed out again by the next rx_pop."""
        if buf.epoch != self._epoch or self._rx_out.pop(buf.seq, None) is None:
            return
        q = self._queues[RX]
        if q is None:
            buf.release()
            return
        if buf.seq == self._rx_last_ring_pop:
            q.unpop()                         # it is the newest chain taken from the ring
            self._rx_last_ring_pop = None
            buf.release()
            return
        self._rx_free.append(buf)

    def flush(self) -> None:
        """Publish used entries of both queues; at most one interrupt per queue."""
        self._flush_scheduled = False
        for q in self._queues:
            if q is not None and q.pending:
                try:
                    if q.flush():
                        self.stats["interrupts"] += 1
                except (VirtqueueError, ValueError) as exc:
                    self._fault(str(exc))
                    return

    # -- frontend connection ----------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: accept failed: %s", self.name, exc)
            return
        if self._session is not None:
            log.warning("%s: second frontend refused (one is connected)", self.name)
            conn.close()
            return
        log.info("%s: frontend connected", self.name)
        self._session = VhostUserSession(conn, self, name=self.name)
        self._reset_seen = True
        self.loop.add_reader(conn.fileno(), self._on_frontend)

    def _on_frontend(self) -> None:
        session = self._session
        if session is None:
            return
        try:
            ok = session.on_readable()
            reason = "frontend disconnected"
        except Exception as exc:              # never raise into the loop
            log.exception("%s: error handling frontend request", self.name)
            ok, reason = False, f"frontend handling failed: {exc}"
        if not ok and self._session is session:
            self._drop_frontend(reason)

    def _drop_frontend(self, reason: str) -> None:
        session = self._session
        assert session is not None
        self.loop.remove_reader(session.sock.fileno())
        self._stop_all(flush=False)
        self._session = None
        session.close()
        self._saved_base = [None, None]
        self._stopped = [None, None]
        log.info("%s: %s", self.name, reason)
        self._incident(reason)

    # -- SessionListener --------------------------------------------------------------
    def config_space(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def before_memory_change(self) -> None:
        for index, q in enumerate(self._queues):
            if q is not None:
                try:
                    q.flush()
                except (VirtqueueError, ValueError) as exc:
                    self._fault(str(exc))
                if self._queues[index] is q:
                    q.release()
                    self._remap[index] = True

    def session_reset(self, reason: str) -> None:
        self._stop_all(flush=True)
        self._saved_base = [None, None]
        self._stopped = [None, None]
        self._reset_seen = True
        self._incident(reason)

    def vring_stop(self, index: int) -> int:
        session = self._session
        assert session is not None
        q = self._queues[index]
        self._set_kick_reader(index, None)
        if q is None:
            base = self._base_for(index)
        else:
            if index == RX:
                self._return_rx_buffers(q)
            try:
                q.flush()
            except VirtqueueError as exc:
                log.warning("%s: flush on stop failed: %s", self.name, exc)
            base = q.last_avail
            self._drop_queue(index)
        self._saved_base[index] = None
        self._reset_seen = True
        cfg = session.vrings[index]
        if self._up and self._stopped[index] is None and cfg.addr is not None:
            # VM stop or guest reset: we cannot tell yet. Keep the router's state and decide
            # when the ring restarts (a second stop keeps the first stop point).
            self._stopped[index] = _StopPoint(base, cfg.num, _ring_gpas(session, index),
                                              session.features)
            log.info("%s: %s stopped at %d: paused until the rings restart", self.name,
                     "rx" if index == RX else "tx", base)
        return base

    def vring_changed(self, index: int) -> None:
        try:
            self._reconcile(index)
        except VirtqueueError as exc:
            self._fault(str(exc))

    # -- ring management --------------------------------------------------------------
    def _reconcile(self, index: int) -> None:
        session = self._session
        if session is None:
            return
        cfg = session.vrings[index]
        self._set_kick_reader(index, cfg.kick_fd)
        if self._up and self._features is not None and session.features != self._features:
            # Features only change after a virtio reset: the guest re-negotiated.
            log.info("%s: features changed %#x -> %#x: guest reset", self.name,
                     self._features, session.features)
            self._stopped = [None, None]
            self._incident("guest reset the device")
        if self.broken:
            if not self._reset_seen:
                return                        # stay dead until the guest resets the device
            log.info("%s: device re-initialised after fault", self.name)
            self.broken = None
        q = self._queues[index]
        if not session.vring_runnable(index):
            if q is not None:                 # disabled (or memory gone): pause the ring
                if session.mem.mapped and not self._remap[index]:
                    if index == RX:
                        self._return_rx_buffers(q)
                    q.flush()
                self._save_base(index, q)
                self._drop_queue(index)
            return
        if self.paused:
            if not all(self._stopped[i] is None or session.vring_runnable(i) for i in (RX, TX)):
                return                        # wait until every stopped ring runs again
            self._restarted(index)
            if self._session is not session or self.broken:
                return
            q = self._queues[index]
        assert cfg.addr is not None
        sig = (cfg.num, cfg.addr.desc, cfg.addr.avail, cfg.addr.used,
               session.has_feature(VIRTIO_RING_F_EVENT_IDX),
               session.has_feature(VIRTIO_RING_F_INDIRECT_DESC),
               session.has_feature(VIRTIO_F_NOTIFY_ON_EMPTY))
        fresh = False
        if q is not None and self._sigs[index] != sig:
            try:
                q.flush()
            finally:
                self._save_base(index, q)
                self._drop_queue(index)
                q = None
        if q is None:
            q = Virtqueue(session.mem, cfg.num, cfg.addr.desc, cfg.addr.avail, cfg.addr.used,
                          event_idx=sig[4], indirect=sig[5], notify_on_empty=sig[6],
                          next_avail=self._base_for(index),
                          name=f"{self.name}.{'rx' if index == RX else 'tx'}")
            q.accel = self.accel
            self._queues[index] = q
            self._sigs[index] = sig
            self._saved_base[index] = None
            self._remap[index] = False
            fresh = True
            log.debug("%s: %s running (size %d, avail %d, used %d)", self.name, q.name,
                      q.size, q.last_avail, q.used_idx)
        elif self._remap[index]:
            q.remap(session.mem)
            self._remap[index] = False
        q.call_fd = cfg.call_fd
        if not self._up:
            self._features = session.features
        self._up = True
        self._reset_seen = False
        if fresh:
            # Kicks sent before we got the kick fd are lost: look at the ring once now.
            if index == TX:
                self._schedule_tx()
            else:
                self.loop.call_soon(self._rx_ready)

    def _restarted(self, index: int) -> None:
        """Every stopped ring runs again: resume (same place) or guest reset (anything else)."""
        session = self._session
        assert session is not None
        changes = []
        for i, stop in enumerate(self._stopped):
            if stop is None:
                continue
            name = "rx" if i == RX else "tx"
            base = self._base_for(i)
            if base != stop.base:
                changes.append(f"{name} base {base}, stopped at {stop.base}")
            if session.vrings[i].num != stop.num:
                changes.append(f"{name} size {session.vrings[i].num}, was {stop.num}")
            rings = _ring_gpas(session, i)
            if rings is None or rings != stop.rings:
                changes.append(f"{name} ring addresses changed")
            if session.features != stop.features:
                changes.append(f"features {session.features:#x}, were {stop.features:#x}")
        resumed_rx = self._stopped[RX] is not None
        self._stopped = [None, None]
        if changes:
            log.info("%s: rings restarted elsewhere (%s): guest reset", self.name,
                     "; ".join(changes))
            self._incident("guest reset the device")
        else:
            log.info("%s: rings resumed where they stopped: connections kept", self.name)
            if not resumed_rx:
                self.loop.call_soon(self._rx_ready)   # rx_pop returned None meanwhile
        for other in (RX, TX):
            if other != index:
                self._reconcile(other)

    def _save_base(self, index: int, q: Virtqueue) -> None:
        assert self._session is not None
        self._saved_base[index] = (q.last_avail, self._session.vrings[index].base_seq)

    def _base_for(self, index: int) -> int:
        """Where a ring (re)starts: our saved position unless SET_VRING_BASE came after it."""
        assert self._session is not None
        cfg = self._session.vrings[index]
        saved = self._saved_base[index]
        if saved is not None and saved[1] == cfg.base_seq:
            return saved[0]
        return cfg.base

    def _drop_queue(self, index: int) -> None:
        q = self._queues[index]
        if q is None:
            return
        if index == RX:
            self._invalidate_rx()
        else:
            self._cancel_tx_poll()
        q.release()
        self._queues[index] = None
        self._sigs[index] = None

    def _stop_all(self, flush: bool) -> None:
        for index in (RX, TX):
            self._set_kick_reader(index, None)
            q = self._queues[index]
            if q is not None and flush:
                try:
                    q.flush()
                except VirtqueueError:
                    pass
            self._drop_queue(index)

    def _set_kick_reader(self, index: int, fd: int | None) -> None:
        old = self._kick_fds[index]
        if old == fd:
            return
        if old is not None:
            self.loop.remove_reader(old)
        self._kick_fds[index] = fd
        if fd is not None:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, self._on_kick, index)

    def _return_rx_buffers(self, q: Virtqueue) -> None:
        """Ring stops: hand popped-but-unused rx buffers back as empty (len 0) used entries."""
        for buf in list(self._rx_out.values()) + self._rx_free:
            try:
                q.push(buf.head, 0)
            except VirtqueueError:
                pass
        self._invalidate_rx()

    def _invalidate_rx(self) -> None:
        self._epoch += 1
        for buf in list(self._rx_out.values()) + self._rx_free:
            buf.release()
        self._rx_out.clear()
        self._rx_free.clear()
        self._rx_last_ring_pop = None

    # -- faults and incidents ---------------------------------------------------------
    def _fault(self, reason: str) -> None:
        """The guest broke the rules: stop using the rings until the device is reset."""
        if self.broken:
            return
        self.broken = reason
        self.stats["errors"] += 1
        self._stopped = [None, None]
        log.warning("%s: device broken: %s", self.name, reason)
        for index in (RX, TX):
            q = self._queues[index]
            if q is not None:
                self._save_base(index, q)
                self._drop_queue(index)
        self._incident(f"device broken: {reason}")

    def _incident(self, reason: str) -> None:
        if not self._up:
            return
        self._up = False
        try:
            self.handler.on_device_reset(self, reason)
        except Exception:
            log.exception("%s: on_device_reset failed", self.name)

    # -- kicks ------------------------------------------------------------------------
    def _on_kick(self, index: int) -> None:
        try:
            self._kick(index)
        except Exception as exc:              # a bug must not take the whole backend down
            self.stats["errors"] += 1
            log.exception("%s: kick handling failed", self.name)
            self._fault(f"internal error: {exc}")

    def _kick(self, index: int) -> None:
        fd = self._kick_fds[index]
        if fd is None:
            return
        try:
            os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: kick fd read failed: %s", self.name, exc)
            self._set_kick_reader(index, None)
            return
        self.stats["kicks"] += 1
        if self.broken or self._queues[index] is None:
            return
        if index == TX:
            self._process_tx()
        else:
            self._rx_ready()

    def _rx_ready(self) -> None:
        if self.broken or self._queues[RX] is None:
            return
        try:
            self.handler.on_rx_ready(self)
        except Exception:
            self.stats["errors"] += 1
            log.exception("%s: on_rx_ready failed", self.name)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            devs = _DRAIN.devs
            if devs is not None:
                devs.append(self)           # flushed when the running tx drain ends
            else:
                self.loop.call_soon(self.flush)

    def _schedule_tx(self) -> None:
        if not self._tx_scheduled:
            self._tx_scheduled = True
            self.loop.call_soon(self._process_tx)

    def _process_tx(self) -> None:
        """Drain the tx ring: every chain -> on_tx_packet, one used flush per batch; then
        flush the devices the packets went to (_Drain)."""
        if _DRAIN.devs is not None:
            self._drain_tx()
            return
        _DRAIN.devs = devs = []
        try:
            self._drain_tx()
        finally:
            _DRAIN.devs = None
            for dev in devs:
                if dev._flush_scheduled:
                    try:
                        dev.flush()
                    except Exception:
                        log.exception("%s: flush failed", dev.name)

    def _drain_tx(self) -> None:
        self._tx_scheduled = False
        self._cancel_tx_poll()
        q = self._queues[TX]
        if q is None or self.broken:
            return
        budget = TX_BATCH
        chains = nbytes = 0
        relay = self._relay_tx
        try:
            while True:
                q.disable_notification()
                while budget:
                    if relay is not None:
                        took, plen, drained = relay(self, budget)
                        if took:
                            budget -= took
                            chains += took
                            nbytes += plen
                            if self._queues[TX] is not q:
                                return
                            if drained:
                                break         # nothing more in the ring (flush, re-arm, look)
                            continue
                    fast = q.pop_tx_linux(budget, HDR_LEN)
                    if fast:
                        budget -= len(fast)
                        chains += len(fast)
                        for i, (head, header, pview, plen) in enumerate(fast):
                            nbytes += plen
                            self._tx_packet(header, [pview] if pview is not None else [],
                                            plen)
                            if pview is not None:
                                pview.release()
                            if self._queues[TX] is not q:
                                for _, _, rest, _ in fast[i + 1:]:
                                    if rest is not None:
                                        rest.release()
                                return        # the handler's reaction reset the device
                            q.push(head, 0)
                        continue
                    chain = q.pop()
                    if chain is None:
                        break
                    budget -= 1
                    chains += 1
                    nbytes += chain.read_len
                    self._tx_chain(chain)
                    if self._queues[TX] is not q:
                        return                # the handler's reaction reset the device
                    q.push(chain.head, 0)
                if q.flush():
                    self.stats["interrupts"] += 1
                if not budget:
                    self._schedule_tx()       # let other VMs run; kicks stay off meanwhile
                    return
                bulk = q.event_idx and chains >= 2 and nbytes >= TX_BULK_BYTES
                q.kick_ahead = TX_KICK_AHEAD if bulk else 0
                if not q.enable_notification():
                    if bulk:
                        self._tx_poll = self.loop.call_later(self._tx_poll_delay,
                                                             self._poll_tx)
                    return
        except (VirtqueueError, ValueError) as exc:
            self._fault(str(exc))

    def _poll_tx(self) -> None:
        """Bulk mode: look at the tx ring without a kick (the guest may post fewer chains
        than kick_ahead asks for); a drain with little in it returns to a kick per chain."""
        self._tx_poll = None
        if self._stopped[TX] is None:
            q = self._queues[TX]
            self.stats["tx_polls"] += 1
            try:
                hit = q is not None and not self.broken and q.has_avail()
            except VirtqueueError:
                hit = True                      # _process_tx() reports it
            if hit:
                self.stats["tx_poll_hits"] += 1
                self._tx_poll_delay = TX_POLL_DELAY
            else:
                self._tx_poll_delay = min(2 * self._tx_poll_delay, TX_POLL_MAX)
            self._process_tx()

    def _cancel_tx_poll(self) -> None:
        if self._tx_poll is not None:
            self._tx_poll.cancel()
            self._tx_poll = None

    def _tx_chain(self, chain: DescChain) -> None:
        views = chain.readable
        if chain.read_len < HDR_LEN:
            self.stats["errors"] += 1
            log.warning("%s: tx packet of %d bytes < header dropped", self.name, chain.read_len)
            chain.release()
            return
        first = views[0]
        extra: list[memoryview] = []
        if len(first) >= HDR_LEN:
            header = bytes(first[:HDR_LEN])
            payload = views[1:]
            if len(first) > HDR_LEN:
                tail = first[HDR_LEN:]
                extra.append(tail)
                payload.insert(0, tail)
        else:
            parts, need, payload = [], HDR_LEN, []
            for view in views:
                if need == 0:
                    payload.append(view)
                elif len(view) <= need:
                    parts.append(bytes(view))
                    need -= len(view)
                else:
                    parts.append(bytes(view[:need]))
                    tail = view[need:]
                    extra.append(tail)
                    payload.append(tail)
                    need = 0
            header = b"".join(parts)
        try:
            self._tx_packet(header, payload, chain.read_len - HDR_LEN)
        finally:
            for view in extra:
                view.release()
            chain.release()

    def _tx_packet(self, header: bytes, payload: list[memoryview], nbytes: int) -> None:
        stats = self.stats
        stats["tx_packets"] += 1
        stats["tx_bytes"] += nbytes
        try:
            self.handler.on_tx_packet(self, header, payload)
        except Exception:
            stats["errors"] += 1
            log.exception("%s: on_tx_packet failed", self.name)


__all__ = ["DeviceHandler", "HDR_LEN", "RxBuffer", "VsockDevice", "GuestMemoryError"]
