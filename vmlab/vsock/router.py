"""The one place every packet passes: spoof check, routing by CID, capture, faults, rx queueing.

Capture sees each packet once, as its sender sent it (after faults, before any split): a
guest's packet to the host side when it is routed there, a packet towards a guest when it is
queued (VM<->VM relay, control, router RSTs) or when host data is read into the guest's buffer.
Faults (vsock/faults.py decides, this module acts) sit between the sender and the receiver.

Implements ``DeviceHandler`` (docs/architecture.md). Guest -> anything packets come in through
``on_tx_packet``; anything -> guest packets go out through ``send_to_vm`` (control packets and
VM<->VM relay data, queued in order per device) or are pulled straight from a host socket into
a guest rx buffer by ``pump`` (zero copy). Nothing reads a host socket for a VM that has no rx
buffer: the pump stops and resumes on ``on_rx_ready``.

VM <-> VM traffic is relayed as-is: both ends are Linux vsock stacks doing their own credit
accounting, so the relay buffer per flow is bounded by the receiver's advertised buf_alloc.
Packets larger than the receiver's rx buffers are split (EOM/EOR stay on the last piece).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from vmlab.vsock.connection import Connection, copy_into, scatter, skip_views, trim_views
from vmlab.vsock.faults import FaultInjector, FaultRule
from vmlab.vsock.packet import (
    HEADER, HEADER_SIZE, MAX_PKT_PAYLOAD, SEQ_EOM, SEQ_EOR, VMADDR_CID_HOST, Header, Op, Type, rst_for,
)

log = logging.getLogger(__name__)

MAX_CONTROL_QUEUE = 8192              # control packets waiting for rx buffers, per VM
MAX_RELAY_BYTES = 64 * 1024 * 1024    # relay data waiting for rx buffers, per VM
RX_BATCH = 64                         # rx buffers filled by one host socket read
RX_BATCH_IOV = 512                    # payload views in one read (IOV_MAX is 1024)


class _NoRoom(Exception):
    """The guest's next rx buffer cannot hold any payload."""


class DeviceLike(Protocol):
    name: str
    cid: int
    broken: str | None

    def rx_pop(self) -> Any: ...
    def rx_push(self, buf: Any, header: bytes, payload_len: int) -> None: ...
    def rx_cancel(self, buf: Any) -> None: ...
    def flush(self) -> None: ...


def _push_filled(dev: DeviceLike, bufs: list, filled: list[tuple[int, bytes]]) -> int:
    """Publish the first len(filled) of `bufs` (payload length, header each) in one batch where
    the device has one, and give the unused rest back, newest first so the device can unpop
    it. Returns how many were pushed."""
    k = len(filled)
    for buf in reversed(bufs[k:]):
        dev.rx_cancel(buf)
    if k:
        push_batch = getattr(dev, "rx_push_batch", None)
        if push_batch is not None:
            push_batch(bufs, filled)
        else:
            for buf, (n, header) in zip(bufs, filled):
                dev.rx_push(buf, header, n)
    return k


def _pop_batch(dev: DeviceLike, room: int, max_bufs: int, max_views: int) -> list[Any]:
    """rx_pop() until `room` payload bytes (VsockDevice.rx_pop_batch's semantics), for
    devices without rx_pop_batch."""
    bufs: list[Any] = []
    got = views = 0
    while got < room and len(bufs) < max_bufs:
        buf = dev.rx_pop()
        if buf is None:
            break
        if buf.capacity <= 0 or (bufs and views + len(buf.payload) > max_views):
            dev.rx_cancel(buf)              # header-only buffer / too many pieces: later
            break
        bufs.append(buf)
        got += buf.capacity
        views += len(buf.payload)
    return bufs


class HostSide(Protocol):
    """What the router needs from the host end of CID 2 (today vsock/hybrid.py's Hybrid).

    The router owns this interface so that it never imports the host side: the host side
    reaches back through the router's public methods (send_to_vm, want_rx, forget, stats).
    """

    def on_guest_packet(self, vm_name: str, hdr: Header, payload: list[memoryview]) -> None: ...
    def reset_vm(self, vm_name: str, notify_guest: bool) -> int: ...
    def reset_key(self, key: tuple[int, int, int, int]) -> bool: ...
    def snapshot(self) -> dict: ...


# --- per-device state -----------------------------------------------------------------------
@dataclass(eq=False)
class DevState:
    dev: DeviceLike
    name: str
    cid: int
    group: str
    queue: deque = field(default_factory=deque)     # (Header, bytes | None) for this guest
    queued_bytes: int = 0
    queued_ctrl: int = 0
    ready: dict = field(default_factory=dict)       # Connections with data for this guest
    pumping: bool = False
    fill: Any = None                                # dev.rx_fill, where the device has it
    control: Any = None                             # dev.rx_control, where it has it
    relay_to: Any = None                            # dev.relay_to, where it has it
    send_stream: Any = None                         # dev.send_stream, where it has it
    relay_peer: "DevState | None" = None            # where its last one-step relay went
    host_flow: tuple[int, int] | None = None        # (src, dst port) of its last host data


_OPS = frozenset(int(o) for o in Op if o != Op.INVALID)
_STREAM, _RW = int(Type.STREAM), int(Op.RW)
_NONE_TAKEN = (0, 0, False)
_CREDIT_OPS = frozenset((int(Op.CREDIT_UPDATE), int(Op.CREDIT_REQUEST)))
_CREDIT_UPDATE = int(Op.CREDIT_UPDATE)


def _copy(payload: list[memoryview]) -> list[memoryview]:
    """Payload that must outlive the call that lent the views (one copy)."""
    return [memoryview(b"".join(payload))] if payload else []


def _join(payload: list[memoryview], hdr: Header) -> bytes | None:
    return b"".join(payload) if payload and hdr.len else None


FlowKey = tuple[int, int, int, int]   # normalized (cid_a, port_a, cid_b, port_b), a < b


def _fill_templates(hdr: Header) -> tuple[bytes, bytes]:
    """rx_fill's two header templates for a packet split over rx buffers: the last piece keeps
    the flags, the others lose SEQPACKET's EOM/EOR (as _deliver_queued splits)."""
    last = HEADER.pack(hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port, 0, hdr.type,
                       hdr.op, hdr.flags, hdr.buf_alloc, hdr.fwd_cnt)
    if hdr.type != Type.SEQPACKET or not hdr.flags & (SEQ_EOM | SEQ_EOR):
        return last, last
    return last, HEADER.pack(hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port, 0,
                             hdr.type, hdr.op, hdr.flags & ~(SEQ_EOM | SEQ_EOR),
                             hdr.buf_alloc, hdr.fwd_cnt)


def _flow_key(hdr: Header) -> FlowKey:
    a = (hdr.src_cid, hdr.src_port)
    b = (hdr.dst_cid, hdr.dst_port)
    return (*a, *b) if a <= b else (*b, *a)  # type: ignore[return-value]


class Router:
    """Routes packets between VM devices, the hybrid host side and the hooks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.devs: dict[str, DevState] = {}
        self.by_cid: dict[int, DevState] = {}
        self.hybrid: HostSide | None = None
        self.stats: Counter[str] = Counter()
        self.faults = FaultInjector()
        self.capture: Callable[[Header, list[memoryview]], None] | None = None
        self.flows: dict[FlowKey, int] = {}         # VM<->VM flow -> its vsock type

    def add_device(self, dev: DeviceLike, group: str = "default") -> None:
        st = DevState(dev, dev.name, dev.cid, group, fill=getattr(dev, "rx_fill", None),
                      control=getattr(dev, "rx_control", None),
                      relay_to=getattr(dev, "relay_to", None),
                      send_stream=getattr(dev, "send_stream", None))
        if dev.cid in self.by_cid:
            raise ValueError(f"CID {dev.cid} used twice ({self.by_cid[dev.cid].name}, {dev.name})")
        self.devs[dev.name] = st
        self.by_cid[dev.cid] = st

    # --- DeviceHandler --------------------------------------------------------------------
    def on_tx_packet(self, dev: DeviceLike, header: bytes, payload: list[memoryview]) -> None:
        st = self.devs.get(dev.name)
        if st is None:
            self.stats["unknown_device"] += 1
            return
        try:
            self._on_tx(st, header, payload)
        except Exception:                       # one VM's mess must not stop the others
            log.exception("%s: error handling a tx packet", dev.name)
            self.stats["errors"] += 1

    def _on_tx(self, st: DevState, header: bytes, payload: list[memoryview]) -> None:
        if len(header) < HEADER_SIZE:
            self.stats["malformed"] += 1
            return
        f = HEADER.unpack_from(header)
        if f[0] == st.cid and self.capture is None and not self.faults.rules:
            if f[5] == _STREAM and (f[6] == _RW or f[6] in _CREDIT_OPS) \
                    and self._relay_stream(st, f, header, payload):
                return
            if f[6] == _CREDIT_UPDATE and f[1] == VMADDR_CID_HOST and not f[4] \
                    and self._host_credit(st, f):
                return
        hdr = Header(*f)
        if hdr.src_cid != st.cid:
            self.stats["spoofed"] += 1
            log.debug("%s: spoofed packet dropped: %s", st.name, hdr.describe())
            return
        avail = sum(len(v) for v in payload)
        if hdr.len > avail or hdr.len > MAX_PKT_PAYLOAD or (hdr.len and hdr.op != Op.RW):
            self.stats["malformed"] += 1
            log.debug("%s: malformed packet dropped (%d payload bytes): %s", st.name, avail,
                      hdr.describe())
            return
        if hdr.len != avail:
            payload = trim_views(payload, hdr.len)
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += hdr.len
        if self.faults.rules:
            rule = self.faults.check("tx", st.name, hdr)
            if rule is not None:
                self._fault(rule, hdr, payload, lambda h, p: self._accept_tx(st, h, p))
                return
        self._accept_tx(st, hdr, payload)

    def _accept_tx(self, st: DevState, hdr: Header, payload: list[memoryview]) -> None:
        """A guest's packet as the receiving side sees it (after faults): the checks a
        receiver makes (a corrupted header must fail them), then routing."""
        if hdr.src_cid != st.cid:
            self.stats["spoofed"] += 1
            return
        if hdr.type not in (Type.STREAM, Type.SEQPACKET) or (
                hdr.type == Type.SEQPACKET and not getattr(st.dev, "seqpacket", True)):
            self.stats["bad_type"] += 1
            if hdr.op != Op.RST:
                self.send_to_vm(st.name, rst_for(hdr))
            return
        if hdr.op not in _OPS:
            self.stats["bad_op"] += 1
            if hdr.op != Op.RST:
                self.send_to_vm(st.name, rst_for(hdr))
            return
        self._route(st, hdr, payload)

    # --- faults: FaultRule (vsock/faults.py) decided; here the packet is acted on ----------
    def _fault(self, rule: FaultRule, hdr: Header, payload: list[memoryview],
               forward: Callable[[Header, list[memoryview]], None]) -> None:
        """Apply a fault; `forward` sends a packet on to where it was going. `payload` views
        are valid only during the call: whatever is kept for later is copied."""
        kind = rule.kind
        self.stats[f"fault_{kind}"] += 1
        (log.info if rule.hits <= 10 else log.debug)(      # the first hits go into the bundle's log
            "fault %s (rule %s, hit %d): %s", kind, rule.key, rule.hits, hdr.describe())
        if kind == "drop":
            return
        if kind == "rst":
            self.reset_flow(hdr)
        elif kind == "delay":
            self.loop.call_later(rule.next_delay(), forward, hdr, _copy(payload))
        elif kind == "duplicate":
            forward(hdr, payload)
            forward(hdr.copy(), payload)
        elif kind == "corrupt":
            forward(rule.corrupted(hdr), payload)
        elif kind == "reorder":
            held = rule.state.setdefault("held", [])
            held.append((forward, hdr, _copy(payload)))
            if len(held) >= rule.window:
                self._release_reorder(rule)
            elif "timer" not in rule.state:
                rule.state["timer"] = self.loop.call_later(rule.delay, self._release_reorder,
                                                           rule)
        elif kind == "credit_stall":
            if "stall_end" not in rule.state:
                rule.state["stall_end"] = time.monotonic() + rule.stall
                rule.state["last"] = {}
                self.loop.call_later(rule.stall, self._end_stall, rule)
            rule.state["last"][(hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port)] = (
                forward, hdr)
            if hdr.op != Op.CREDIT_UPDATE:       # credit updates are held back
                forward(hdr.copy(buf_alloc=0), payload)
        else:                                    # parse() only makes known kinds
            forward(hdr, payload)

    def _release_reorder(self, rule: FaultRule) -> None:
        """A full (or timed-out) reorder window goes on in reverse order."""
        held = rule.state.pop("held", [])
        timer = rule.state.pop("timer", None)
        if timer is not None:
            timer.cancel()
        for forward, hdr, data in reversed(held):
            forward(hdr, data)

    def _end_stall(self, rule: FaultRule) -> None:
        """The stall is over: each stalled flow gets the credit its sender really advertised."""
        rule.state["released"] = True
        rule.state.pop("stall_end", None)
        for forward, hdr in rule.state.pop("last", {}).values():
            if hdr.op != Op.RST:
                forward(hdr.copy(op=Op.CREDIT_UPDATE, len=0, flags=0), [])

    def _route(self, st: DevState, hdr: Header, payload: list[memoryview]) -> None:
        dst = hdr.dst_cid
        if dst != VMADDR_CID_HOST or self.hybrid is None:
            peer = self.by_cid.get(dst)
            if peer is not None and peer is not st and peer.group == st.group:
                self._relay(st, peer, hdr, payload)     # captured once, when queued for the peer
                return
        if self.capture is not None:
            self.capture(hdr, payload)
        if dst == VMADDR_CID_HOST and self.hybrid is not None:
            self.hybrid.on_guest_packet(st.name, hdr, payload)
            if hdr.op == Op.RW and hdr.type == Type.STREAM:
                st.host_flow = (hdr.src_port, hdr.dst_port)    # relay_tx batches the next
            return
        self.stats["unroutable"] += 1
        if hdr.op != Op.RST:
            self.send_to_vm(st.name, rst_for(hdr))

    def _host_credit(self, st: DevState, f: tuple) -> bool:
        """A guest's credit update for one of its established host connections, before any
        Header object (the host->guest hot path: one per window of data the guest read).
        The caller checked src_cid, dst_cid 2, len 0, no capture or faults; the connection's
        type must match. Returns False, having done nothing, for anything else: then the
        general path runs, with every check and counter. stats.host_credit counts these."""
        hybrid = self.hybrid
        if hybrid is None:
            return False
        conn = hybrid.conns.get((VMADDR_CID_HOST, f[3], st.cid, f[2]))
        if conn is None or conn.type != f[5] or not conn.on_credit_update(f[8], f[9]):
            return False
        stats = self.stats
        stats["tx_packets"] += 1
        stats["host_credit"] += 1
        return True

    def _relay_stream(self, st: DevState, f: tuple, header: bytes,
                      payload: list[memoryview]) -> bool:
        """The hot VM<->VM case in one step, before any Header object: STREAM data, or a
        credit update/request, from a guest that is not spoofing to a peer guest with nothing
        queued, and no capture or faults. The sender's header goes into the receiver's buffers
        as it is (rx_fill sets each piece's len; STREAM has no EOM/EOR to move), which is what
        the general path (_on_tx -> _relay) writes too. Returns False, having done nothing,
        for anything else (or when the receiver cannot take it this way): then the general
        path runs, with every check and counter."""
        dst = f[1]
        peer = self.by_cid.get(dst)
        if peer is None or peer is st or peer.group != st.group or peer.queue \
                or peer.pumping or (dst == VMADDR_CID_HOST and self.hybrid is not None):
            return False
        length = f[4]
        if f[6] == _RW:
            if peer.fill is None or not 0 < length <= MAX_PKT_PAYLOAD:
                return False
            if len(payload) == 1:
                avail = len(payload[0])
            else:
                avail = sum(len(v) for v in payload)
            if avail < length:
                return False                     # malformed: the general path counts it
            if avail != length:
                payload = trim_views(payload, length)
            res = peer.fill(length, header, header, -1, payload)
            if res is None:
                return False
        elif length or peer.control is None or not peer.control(header):
            return False
        stats = self.stats
        stats["tx_packets"] += 1
        stats["relayed"] += 1
        stats["relayed_fast"] += 1
        st.relay_peer = peer                     # relay_tx() tries the next ones in a batch
        a = (f[0], f[2])
        b = (dst, f[3])
        self.flows[(*a, *b) if a <= b else (*b, *a)] = _STREAM
        if not length:
            stats["rx_packets"] += 1
            return True
        stats["tx_bytes"] += length
        k, moved = res[0], res[1]
        if k:
            stats["split"] += k if moved < length else k - 1
            stats["rx_packets"] += k
            stats["rx_bytes"] += moved
        if moved < length:                       # the receiver's ring is full: queue the rest
            rest = Header(*f)
            rest.len = length - moved
            self._queue_relay(st, peer, rest, skip_views(payload, moved) if moved else payload)
        return True

    def relay_tx(self, dev: DeviceLike, budget: int) -> tuple[int, int, bool]:
        """DeviceHandler hook, before any packet of a tx drain is popped: a whole run of the
        guest's chains in one C call, where the last packets of the same kind took the fast
        way: to the peer guest of its last one-step relay (_relay_batch), or to the host
        connection its last stream data went to (_host_batch). Returns (chains, payload
        bytes, whether that was all the ring had) taken; (0, 0, False): the drain pops as
        usual."""
        st = self.devs.get(dev.name)
        if st is None:
            return _NONE_TAKEN
        if st.relay_peer is not None:
            res = self._relay_batch(st, budget)
            if res[0]:
                return res
        if st.host_flow is not None:
            return self._host_batch(st, budget)
        return _NONE_TAKEN

    def _relay_batch(self, st: DevState, budget: int) -> tuple[int, int, bool]:
        """_relay_stream for a run of chains (dev.relay_to), while its conditions hold (peer
        still there, in the group, nothing queued for it, no capture, no fault rules);
        counted as _relay_stream counts, plus relayed_batch."""
        peer = st.relay_peer
        assert peer is not None
        if peer.queue or peer.pumping or self.capture is not None or self.faults.rules \
                or self.by_cid.get(peer.cid) is not peer or peer.group != st.group:
            st.relay_peer = None
            return _NONE_TAKEN
        res = st.relay_to(peer.dev, budget) if st.relay_to is not None else None
        if res is None or not res[0]:
            return _NONE_TAKEN
        chains, plen, data_pkts, data_bytes, rx_data, control, flows = res[:7]
        stats = self.stats
        stats["tx_packets"] += chains
        stats["relayed"] += chains
        stats["relayed_fast"] += chains
        stats["relayed_batch"] += chains
        stats["tx_bytes"] += data_bytes
        stats["split"] += rx_data - data_pkts
        stats["rx_packets"] += rx_data + control
        stats["rx_bytes"] += data_bytes
        table = self.flows
        for sport, dport in flows:
            a = (st.cid, sport)
            b = (peer.cid, dport)
            table[(*a, *b) if a <= b else (*b, *a)] = _STREAM
        return chains, plen, res[7]

    def _host_batch(self, st: DevState, budget: int) -> tuple[int, int, bool]:
        """Guest->host stream data of the connection the guest's last RW packet went to, a
        run of chains in one sendmsg (dev.send_stream, C), within the credit the connection
        has left (Connection.batch_room), no capture, no fault rules; booked on the
        connection as on_packet would (Connection.took_batch). stats.host_batch counts the
        packets (also in tx_packets)."""
        hybrid = self.hybrid
        sport, dport = st.host_flow  # type: ignore[misc]
        if hybrid is None or self.capture is not None or self.faults.rules:
            st.host_flow = None
            return _NONE_TAKEN
        conn = hybrid.conns.get((VMADDR_CID_HOST, dport, st.cid, sport))
        if conn is None:
            st.host_flow = None
            return _NONE_TAKEN
        room = conn.batch_room()
        if room <= 0 or st.send_stream is None:
            return _NONE_TAKEN
        res = st.send_stream(conn.sock.fileno(), sport, dport, room, budget)
        if res is None or not res[0]:
            return _NONE_TAKEN                   # a send error: on_packet meets it
        chains, plen, data_bytes, sent, rest, buf_alloc, fwd_cnt = res[:7]
        stats = self.stats
        stats["tx_packets"] += chains
        stats["tx_bytes"] += data_bytes
        stats["host_batch"] += chains
        try:
            conn.took_batch(data_bytes, sent, rest, buf_alloc, fwd_cnt)
        except Exception:                        # one connection's bug costs that connection
            log.exception("%r: booking a batch failed", conn)
            stats["errors"] += 1
            conn.reset("internal error")
        return chains, plen, res[8]

    def _relay(self, src: DevState, dst: DevState, hdr: Header,
               payload: list[memoryview]) -> None:
        fk = _flow_key(hdr)
        if hdr.op == Op.RST:
            self.flows.pop(fk, None)
        else:
            self.flows[fk] = hdr.type
        self.stats["relayed"] += 1
        if hdr.len and not dst.queue and not dst.pumping and self.capture is None \
                and not self.faults.rules:
            # Straight from the sender's tx buffers into the receiver's rx buffers: one copy.
            hdr, payload = self._relay_direct(dst, hdr, payload)
            if not hdr.len:
                return
        self._queue_relay(src, dst, hdr, payload)

    def _queue_relay(self, src: DevState, dst: DevState, hdr: Header,
                     payload: list[memoryview]) -> None:
        """What the receiver cannot take now waits in its queue (copied: the sender's views
        are lent for this call only), bounded by MAX_RELAY_BYTES."""
        data = b"".join(payload) if hdr.len else None
        if data is not None and dst.queued_bytes + len(data) > MAX_RELAY_BYTES:
            self.stats["relay_overflow"] += 1
            log.warning("%s -> %s: relay queue full, resetting %s", src.name, dst.name,
                        hdr.describe())
            self.reset_flow(hdr)
            return
        self.send_to_vm(dst.name, hdr, data, sender=src.name)

    def _relay_direct(self, dst: DevState, hdr: Header,
                      payload: list[memoryview]) -> tuple[Header, list[memoryview]]:
        """Copy a relayed RW packet into as many of dst's rx buffers as it has; returns what
        is left (a header with len 0 when everything went out; a header-only buffer ends
        the batch and the rest waits in the queue). Splits as _deliver_queued does (EOM/EOR
        on the last piece). No flush here: the device flushes what was pushed
        once this loop iteration ends (one interrupt per tx batch, not per packet)."""
        dev = dst.dev
        left = hdr.len
        src = list(payload)
        seq = hdr.type == Type.SEQPACKET
        mid_flags = hdr.flags & ~(SEQ_EOM | SEQ_EOR) if seq else hdr.flags
        pack = HEADER.pack
        fill = getattr(dev, "rx_fill", None)
        if fill is not None:
            last, mid = _fill_templates(hdr)
            res = fill(left, last, mid, -1, src)
            if res is not None:                 # else: the RxBuffer way below
                k, moved = res[0], res[1]
                if k:
                    self.stats["split"] += k if moved < left else k - 1
                    self.stats["rx_packets"] += k
                    self.stats["rx_bytes"] += moved
                if not moved:
                    return hdr, payload
                if moved == left:
                    return hdr.copy(len=0), []
                return hdr.copy(len=left - moved), skip_views(src, moved)
        pushed = moved = 0
        pop_batch = getattr(dev, "rx_pop_batch", None)
        if pop_batch is not None:
            bufs = pop_batch(left, RX_BATCH, RX_BATCH_IOV)
        else:
            bufs = _pop_batch(dev, left, RX_BATCH, RX_BATCH_IOV)
        filled: list[tuple[int, bytes]] = []
        for buf in bufs:
            if not left:
                break
            n = scatter(src, buf.payload, min(left, buf.capacity))
            left -= n
            if left:
                self.stats["split"] += 1
            filled.append((n, pack(hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port, n,
                                   hdr.type, hdr.op, mid_flags if left else hdr.flags,
                                   hdr.buf_alloc, hdr.fwd_cnt)))
            moved += n
        pushed = _push_filled(dev, bufs, filled)
        if pushed:
            self.stats["rx_packets"] += pushed
            self.stats["rx_bytes"] += moved
        if left == hdr.len:
            return hdr, payload
        return hdr.copy(len=left), src

    def on_rx_ready(self, dev: DeviceLike) -> None:
        st = self.devs.get(dev.name)
        if st is not None:
            self.pump(st)

    def on_device_reset(self, dev: DeviceLike, reason: str) -> None:
        log.info("%s: device reset (%s): resetting its connections", dev.name, reason)
        self.reset_vm(dev.name, notify_guest=False)

    # --- towards a guest ------------------------------------------------------------------
    def send_to_vm(self, name: str, hdr: Header, data: bytes | None = None,
                   sender: str | None = None) -> None:
        """Queue a packet for a guest (control, or relay data from VM `sender`) and deliver
        what fits now."""
        st = self.devs.get(name)
        if st is None:
            return
        if self.faults.rules:
            rule = self.faults.check("rx", name, hdr, sender)
            if rule is not None:
                self._fault(rule, hdr, [memoryview(data)] if data else [],
                            lambda h, p: self._enqueue(st, h, _join(p, h)))
                return
        self._enqueue(st, hdr, data)

    def _enqueue(self, st: DevState, hdr: Header, data: bytes | None) -> None:
        if data is None:
            if not st.queue and not st.pumping and self.capture is None \
                    and st.control is not None and st.control(hdr.pack()):
                stats = self.stats              # nothing waits before it: straight into the
                stats["rx_packets"] += 1        # next rx buffer (a credit update, mostly),
                stats["control_fast"] += 1      # as _deliver would put it there
                return
            if st.queued_ctrl >= MAX_CONTROL_QUEUE:
                self.stats["control_dropped"] += 1
                return
            st.queued_ctrl += 1
        else:
            st.queued_bytes += len(data)
        if self.capture is not None:             # whole, as sent: before any split
            self.capture(hdr, [memoryview(data)] if data else [])
        st.queue.append((hdr, data))
        self.pump(st)

    def want_rx(self, name: str, conn: Connection) -> None:
        st = self.devs.get(name)
        if st is None:
            return
        st.ready[conn] = None
        self.pump(st)

    def forget(self, name: str, conn: Connection) -> None:
        st = self.devs.get(name)
        if st is not None:
            st.ready.pop(conn, None)

    def pump(self, st: DevState) -> None:
        """Fill the guest's rx buffers: queued packets first (order!), then host sockets."""
        if st.pumping:
            return                               # the outer pump picks new work up
        st.pumping = True
        pushed = 0
        dev = st.dev
        try:
            while True:
                if st.queue:
                    if st.queue[0][1] is not None:      # relayed data: many buffers per call
                        n = self._fill_queued(st)
                        if n:
                            pushed += n
                            continue
                    buf = dev.rx_pop()
                    if buf is None:
                        break
                    try:
                        pushed += self._deliver_queued(st, buf)
                    except _NoRoom:
                        break
                    continue
                if not st.ready:
                    break
                conn = next(iter(st.ready))
                del st.ready[conn]
                if conn.type == Type.STREAM and self.capture is None and not self.faults.rules:
                    n = self._fill_batch(st, conn)
                    if n < 0:
                        break
                    pushed += n
                    continue
                buf = dev.rx_pop()
                if buf is None or buf.capacity <= 0:
                    if buf is not None:             # no room for data: wait for real buffers
                        dev.rx_cancel(buf)
                    st.ready[conn] = None
                    break
                try:
                    hdr = conn.fill(buf)
                except Exception:
                    log.exception("%r: fill failed", conn)
                    hdr = None
                    conn.reset("internal error")
                if hdr is None:
                    dev.rx_cancel(buf)
                    continue
                if self.faults.rules and self._host_data_fault(st, buf, hdr):
                    continue
                pushed += self._deliver(st, buf, hdr, hdr.len)
        except Exception:
            log.exception("%s: rx pump failed", st.name)
            self.stats["errors"] += 1
        finally:
            st.pumping = False
            if pushed:
                try:
                    dev.flush()
                except Exception:
                    log.exception("%s: flush failed", st.name)

    def _fill_batch(self, st: DevState, conn: Connection) -> int:
        """Stream host data into up to RX_BATCH guest rx buffers with one socket read (Linux
        guests post 4 KiB buffers), popping buffers only for what the socket holds (FIONREAD)
        and the credit allows. Returns the buffers pushed, -1 when there is no rx buffer."""
        dev = st.dev
        fill = getattr(dev, "rx_fill", None)
        if fill is not None:
            try:                                # pump() flushes once it is done
                res = conn.fill_device(partial(fill, flush_soon=False))
            except Exception:
                log.exception("%r: fill failed", conn)
                conn.reset("internal error")
                dev.flush()                     # what was filled before it failed
                return 0
            if res is not None:                 # else: no Linux-shaped buffer next
                if res[0]:
                    self.stats["rx_packets"] += res[0]
                    self.stats["rx_bytes"] += res[1]
                return res[0]
        credit = conn.credit.peer_credit()
        if credit <= 0:
            conn.fill_many([])                  # no buffer needed to ask for credit
            return 0
        queued = conn.readable_bytes()
        room = min(credit, queued) if queued > 0 else 1   # 0: EOF or nothing; one read tells
        pop_batch = getattr(dev, "rx_pop_batch", None)
        if pop_batch is not None:
            bufs = pop_batch(room, RX_BATCH, RX_BATCH_IOV)
        else:
            bufs = _pop_batch(dev, room, RX_BATCH, RX_BATCH_IOV)
        if not bufs:
            st.ready[conn] = None               # wait for (real) rx buffers
            return -1
        try:
            filled = conn.fill_many(bufs)
        except Exception:
            log.exception("%r: fill failed", conn)
            filled = []
            conn.reset("internal error")
        k = _push_filled(dev, bufs, filled)
        if k:
            self.stats["rx_packets"] += k
            self.stats["rx_bytes"] += sum(n for n, _ in filled)
        return k

    def _host_data_fault(self, st: DevState, buf: Any, hdr: Header) -> bool:
        """Faults on host data already read into a guest buffer: drop/rst give the buffer back;
        the other kinds copy the data out and go the queued way (like relay data)."""
        rule = self.faults.check("rx", st.name, hdr)
        if rule is None:
            return False
        data = b"".join(trim_views(buf.payload, hdr.len)) if hdr.len else None
        st.dev.rx_cancel(buf)
        self._fault(rule, hdr, [memoryview(data)] if data else [],
                    lambda h, p: self._enqueue(st, h, _join(p, h)))
        return True

    def _fill_queued(self, st: DevState) -> int | None:
        """The queue's first packet is data (relayed, captured and faulted when queued): fill
        the next Linux-shaped rx buffers with it in one rx_fill, as _relay_direct does.
        Returns the buffers filled, or None when rx_fill cannot (no rx_fill, other buffer
        shapes, empty ring, nothing filled): then _deliver_queued's one-buffer way, which also
        re-arms notifications on an empty ring."""
        fill = getattr(st.dev, "rx_fill", None)
        if fill is None:
            return None
        hdr, data = st.queue[0]
        view = memoryview(data)
        left = len(view)
        last, mid = _fill_templates(hdr)
        res = fill(left, last, mid, -1, [view], flush_soon=False)
        if res is None:
            return None
        k, moved = res[0], res[1]
        if not k:
            return None
        if moved < left:
            st.queue[0] = (hdr.copy(len=left - moved), view[moved:])
            self.stats["split"] += k
        else:
            st.queue.popleft()
            self.stats["split"] += k - 1
        st.queued_bytes -= moved
        self.stats["rx_packets"] += k
        self.stats["rx_bytes"] += moved
        return k

    def _deliver_queued(self, st: DevState, buf: Any) -> int:
        hdr, data = st.queue[0]
        if data is None:
            st.queue.popleft()
            st.queued_ctrl -= 1
            return self._deliver(st, buf, hdr, 0, captured=True)
        n = min(len(data), buf.capacity)
        if n <= 0:                                  # header-only buffer: data must wait
            st.dev.rx_cancel(buf)
            self.stats["rx_buffer_too_small"] += 1
            raise _NoRoom
        view = memoryview(data)
        copy_into(buf.payload, view[:n])
        if n < len(data):                       # split: EOM/EOR belong to the last piece
            piece = hdr.copy(len=n, flags=hdr.flags & ~(SEQ_EOM | SEQ_EOR)
                             if hdr.type == Type.SEQPACKET else hdr.flags)
            st.queue[0] = (hdr.copy(len=len(data) - n), view[n:])   # a view: no copy
            self.stats["split"] += 1
        else:
            piece = hdr
            st.queue.popleft()
        st.queued_bytes -= n
        return self._deliver(st, buf, piece, n, captured=True)

    def _deliver(self, st: DevState, buf: Any, hdr: Header, n: int,
                 captured: bool = False) -> int:
        if self.capture is not None and not captured:
            self.capture(hdr, trim_views(buf.payload, n) if n else [])
        st.dev.rx_push(buf, hdr.pack(), n)
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += n
        return 1

    # --- resets ---------------------------------------------------------------------------
    def reset_flow(self, hdr: Header) -> None:
        """Reset the connection a packet belongs to, on both ends."""
        if VMADDR_CID_HOST in (hdr.src_cid, hdr.dst_cid) and self.hybrid is not None:
            host_port, guest = ((hdr.src_port, (hdr.dst_cid, hdr.dst_port))
                                if hdr.src_cid == VMADDR_CID_HOST
                                else (hdr.dst_port, (hdr.src_cid, hdr.src_port)))
            if self.hybrid.reset_key((VMADDR_CID_HOST, host_port, *guest)):
                return
        self.flows.pop(_flow_key(hdr), None)
        for cid, rst in ((hdr.src_cid, rst_for(hdr)), (hdr.dst_cid, hdr.copy(op=Op.RST, len=0))):
            st = self.by_cid.get(cid)
            if st is not None:
                rst.buf_alloc = rst.fwd_cnt = rst.flags = 0
                self._enqueue(st, rst, None)

    def reset_vm(self, name: str, notify_guest: bool) -> int:
        """RST every connection of one VM: its host connections and its VM<->VM flows."""
        st = self.devs.get(name)
        if st is None:
            raise KeyError(name)
        n = self.hybrid.reset_vm(name, notify_guest) if self.hybrid is not None else 0
        if not notify_guest:
            st.queue.clear()
            st.queued_bytes = st.queued_ctrl = 0
            st.ready.clear()
        for fk in [k for k in self.flows if st.cid in (k[0], k[2])]:
            typ = self.flows.pop(fk)
            a, b = (fk[0], fk[1]), (fk[2], fk[3])
            mine, peer = (a, b) if a[0] == st.cid else (b, a)
            n += 1
            pst = self.by_cid.get(peer[0])
            if pst is not None:
                self._enqueue(pst, Header(mine[0], peer[0], mine[1], peer[1], 0, typ,
                                          Op.RST), None)
            if notify_guest:
                self._enqueue(st, Header(peer[0], mine[0], peer[1], mine[1], 0, typ,
                                         Op.RST), None)
        self.stats["vm_resets"] += 1
        return n

    def snapshot(self) -> dict:
        vms = {}
        for st in self.devs.values():
            vms[st.name] = {"cid": st.cid, "group": st.group,
                            "broken": getattr(st.dev, "broken", None),
                            "queued_packets": len(st.queue), "queued_bytes": st.queued_bytes,
                            "waiting_conns": len(st.ready)}
        out: dict[str, Any] = {"stats": dict(self.stats), "vms": vms, "flows": len(self.flows),
                               "seed": self.faults.seed, "faults": self.faults.report()}
        if self.hybrid is not None:
            out["hybrid"] = self.hybrid.snapshot()
        return out
