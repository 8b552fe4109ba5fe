"""vhost-user codec, the protocol session over a real socketpair, and VsockDevice driven by a
fake frontend (what QEMU does) over an in-memory guest."""
from __future__ import annotations

import asyncio
import mmap
import os
import select
import socket
import struct
import threading

import pytest

from vmlab.vsock import vhost_user as vu
from vmlab.vsock.device import VsockDevice
from vmlab.vsock.memory import RegionSpec
from vmlab.vsock.virtqueue import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

MiB = 1 << 20
UVA = 0x7F1200000000
PF = (1 << vu.PROTOCOL_F_REPLY_ACK) | (1 << vu.PROTOCOL_F_CONFIG) | (1 << vu.PROTOCOL_F_MQ)
HDR = struct.Struct("<QQIIIHHIII")
OP_REQUEST, OP_RST, OP_RW = 1, 3, 5


# -- codec ------------------------------------------------------------------------------
def test_header_roundtrip():
    data = vu.encode(vu.Message(vu.GET_FEATURES, vu.VERSION | vu.FLAG_NEED_REPLY, b"12345678"))
    assert data[:12] == struct.pack("<III", 1, 0x9, 8)
    assert vu.decode_header(data[:12]) == (1, 0x9, 8)


@pytest.mark.parametrize("header", [struct.pack("<III", 1, 0, 0), struct.pack("<III", 1, 2, 0),
                                    struct.pack("<III", 1, 1, 1 << 20)])
def test_bad_headers(header):
    with pytest.raises(vu.ProtocolError):
        vu.decode_header(header)


def test_payload_codecs_roundtrip():
    assert vu.decode_u64(vu.encode_u64(0x1234_5678_9ABC)) == 0x1234_5678_9ABC
    state = vu.VringState(1, 128)
    assert vu.decode_vring_state(vu.encode_vring_state(state)) == state
    addr = vu.VringAddr(1, 0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0)
    raw = vu.encode_vring_addr(addr)
    assert len(raw) == 40 and struct.unpack_from("<Q", raw, 16)[0] == addr.used
    assert vu.decode_vring_addr(raw) == addr
    regions = [RegionSpec(0, MiB, UVA, 0), RegionSpec(4 * MiB, MiB, UVA + 4 * MiB, 4096)]
    table = vu.encode_mem_table(regions)
    assert len(table) == 8 + 2 * 32
    assert vu.decode_mem_table(table) == regions
    cfg = vu.ConfigMsg(0, 8, 0, struct.pack("<Q", 3))
    assert vu.decode_config(vu.encode_config(cfg)) == cfg


@pytest.mark.parametrize("fn,payload", [
    (vu.decode_u64, b"1234"),
    (vu.decode_vring_state, b"\0" * 7),
    (vu.decode_vring_addr, b"\0" * 39),
    (vu.decode_mem_table, struct.pack("<II", 2, 0) + b"\0" * 32),
    (vu.decode_mem_table, struct.pack("<II", 9, 0) + b"\0" * 9 * 32),
    (vu.decode_config, struct.pack("<III", 0, 4096, 0)),
])
def test_short_or_oversized_payloads(fn, payload):
    with pytest.raises(vu.ProtocolError):
        fn(payload)


# -- message reader over a socketpair -----------------------------------------------------
def test_fds_travel_with_their_message():
    a, b = socket.socketpair()
    efd = os.eventfd(0)
    vu.send_message(a, vu.Message(vu.GET_FEATURES))
    vu.send_message(a, vu.Message(vu.SET_VRING_KICK, payload=vu.encode_u64(1), fds=[efd]))
    b.setblocking(False)
    reader = vu.MessageReader(b)
    msgs = reader.read()
    assert [m.request for m in msgs] == [vu.GET_FEATURES, vu.SET_VRING_KICK]
    assert msgs[0].fds == [] and len(msgs[1].fds) == 1
    os.write(msgs[1].fds[0], (1).to_bytes(8, "little"))     # the same eventfd
    assert int.from_bytes(os.read(efd, 8), "little") == 1
    vu.close_fds(msgs[1].fds)
    for s in (a, b):
        s.close()
    os.close(efd)


def test_too_many_fds_is_a_protocol_error():
    a, b = socket.socketpair()
    fds = [os.eventfd(0) for _ in range(vu.MAX_FDS + 1)]
    vu.send_message(a, vu.Message(vu.SET_MEM_TABLE, payload=b"\0" * 8, fds=fds))
    b.setblocking(False)
    with pytest.raises(vu.ProtocolError):
        vu.MessageReader(b).read()
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()


# -- session with a recording listener --------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.changed: list[int] = []
        self.stopped: list[int] = []
        self.resets: list[str] = []

    def vring_changed(self, index: int) -> None:
        self.changed.append(index)

    def vring_stop(self, index: int) -> int:
        self.stopped.append(index)
        return 42

    def session_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def before_memory_change(self) -> None:
        pass

    def config_space(self) -> bytes:
        return struct.pack("<Q", 9)


@pytest.fixture
def session():
    front, back = socket.socketpair()
    rec = Recorder()
    s = vu.VhostUserSession(back, rec, name="t")

    def call(request, payload=b"", fds=(), flags=vu.VERSION, reply=True):
        vu.send_message(front, vu.Message(request, flags, payload, list(fds)))
        alive = s.on_readable()
        if not reply:
            return alive
        front.settimeout(5)
        return vu.recv_message(front)

    yield s, rec, call
    s.close()
    front.close()


def test_feature_negotiation(session):
    s, _, call = session
    features = vu.decode_u64(call(vu.GET_FEATURES).payload)
    for bit in (32, 28, 29, 1, 30):
        assert features >> bit & 1
    assert vu.decode_u64(call(vu.GET_PROTOCOL_FEATURES).payload) & PF == PF
    call(vu.SET_PROTOCOL_FEATURES, vu.encode_u64(PF), reply=False)
    call(vu.SET_FEATURES, vu.encode_u64(features), reply=False)
    assert s.has_feature(vu.VIRTIO_VSOCK_F_SEQPACKET)
    assert vu.decode_u64(call(vu.GET_QUEUE_NUM).payload) == 2


def test_need_reply_acks_success_and_failure(session):
    s, _, call = session
    call(vu.SET_PROTOCOL_FEATURES, vu.encode_u64(PF), reply=False)
    ack = call(vu.SET_OWNER, flags=vu.VERSION | vu.FLAG_NEED_REPLY)
    assert ack.flags & vu.FLAG_REPLY and vu.decode_u64(ack.payload) == 0
    nack = call(200, flags=vu.VERSION | vu.FLAG_NEED_REPLY)          # unknown request
    assert vu.decode_u64(nack.payload) != 0
    nack = call(vu.SET_CONFIG, vu.encode_config(vu.ConfigMsg(0, 8, 0, b"\0" * 8)),
                flags=vu.VERSION | vu.FLAG_NEED_REPLY)
    assert vu.decode_u64(nack.payload) != 0
    assert call(vu.SET_FEATURES, vu.encode_u64(1 << 5), reply=False)   # not offered: refused
    assert s.features == 0
    assert not s.closed


def test_get_config_returns_the_cid(session):
    _, _, call = session
    reply = call(vu.GET_CONFIG, vu.encode_config(vu.ConfigMsg(0, 8, 0, b"\0" * 8)))
    assert vu.decode_config(reply.payload).data == struct.pack("<Q", 9)
    bad = call(vu.GET_CONFIG, vu.encode_config(vu.ConfigMsg(4, 8, 0, b"\0" * 8)))
    assert vu.decode_config(bad.payload).size == 0


def test_vring_fds_and_base(session):
    s, rec, call = session
    kick = os.eventfd(0)
    call(vu.SET_VRING_KICK, vu.encode_u64(1), fds=[kick], reply=False)
    assert s.vrings[1].started and s.vrings[1].kick_fd is not None
    assert rec.changed[-1] == 1
    call(vu.SET_VRING_CALL, vu.encode_u64(0 | vu.VRING_NOFD), reply=False)
    assert s.vrings[0].call_fd is None
    reply = call(vu.GET_VRING_BASE, vu.encode_vring_state(vu.VringState(1, 0)))
    assert vu.decode_vring_state(reply.payload) == vu.VringState(1, 42)
    assert rec.stopped == [1] and not s.vrings[1].started and s.vrings[1].kick_fd is None
    os.close(kick)


def test_missing_fd_disconnects(session):
    s, _, call = session
    assert call(vu.SET_VRING_KICK, vu.encode_u64(0), reply=False) is False


def test_bad_version_disconnects(session):
    _, _, call = session
    assert call(vu.GET_FEATURES, flags=0x2, reply=False) is False


def test_reset_device_forgets_rings(session):
    s, rec, call = session
    kick = os.eventfd(0)
    call(vu.SET_VRING_KICK, vu.encode_u64(0), fds=[kick], reply=False)
    call(vu.RESET_DEVICE, reply=False)
    assert rec.resets and s.vrings[0].kick_fd is None and not s.vrings[0].started
    os.close(kick)


# -- VsockDevice with a fake frontend ----------------------------------------------------
RINGS = {0: (0x0000, 0x1000, 0x2000), 1: (0x4000, 0x5000, 0x6000)}
RX_DATA, TX_DATA, QSIZE = 0x10000, 0x40000, 16


class RstHandler:
    """Answers every REQUEST with RST, like the integration test's handler."""

    def __init__(self) -> None:
        self.packets: list[tuple] = []
        self.payloads: list[bytes] = []
        self.resets: list[str] = []
        self.pending: list[bytes] = []
        self.event = threading.Event()

    def on_tx_packet(self, dev, header, payload):
        fields = HDR.unpack(header)
        self.packets.append(fields)
        self.payloads.append(b"".join(bytes(v) for v in payload))
        if fields[6] == OP_REQUEST:
            self.pending.append(HDR.pack(fields[1], fields[0], fields[3], fields[2], 0,
                                         fields[5], OP_RST, 0, 0, 0))
            self.on_rx_ready(dev)
        self.event.set()

    def on_rx_ready(self, dev):
        while self.pending:
            buf = dev.rx_pop()
            if buf is None:
                return
            dev.rx_push(buf, self.pending.pop(0), 0)

    def on_device_reset(self, dev, reason):
        self.resets.append(reason)
        self.event.set()


class FakeQemu:
    """Plays QEMU: memfd guest RAM, rings, eventfds, and the driver side of both queues."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(5)
        self.fd = os.memfd_create("fake-guest")
        os.ftruncate(self.fd, MiB)
        self.raw = mmap.mmap(self.fd, MiB)
        self.kick = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.avail = {0: 0, 1: 0}
        self.next_desc = {0: 0, 1: 0}

    def close(self) -> None:
        self.sock.close()
        self.raw.close()
        for fd in [self.fd, *self.kick.values(), *self.call.values()]:
            os.close(fd)

    def send(self, request, payload=b"", fds=(), need_reply=False):
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        vu.send_message(self.sock, vu.Message(request, flags, payload, list(fds)))
        if need_reply or request in (vu.GET_FEATURES, vu.GET_VRING_BASE, vu.GET_CONFIG,
                                     vu.GET_PROTOCOL_FEATURES):
            return vu.recv_message(self.sock)
        return None

    def setup(self, features=None, indirect=False):
        offered = vu.decode_u64(self.send(vu.GET_FEATURES).payload)
        self.send(vu.SET_PROTOCOL_FEATURES, vu.encode_u64(PF))
        self.send(vu.SET_OWNER)
        if features is None:
            features = (1 << 32) | (1 << 30) | (1 << 29) | (1 << vu.VIRTIO_VSOCK_F_SEQPACKET)
            if indirect:
                features |= 1 << 28
        assert features & ~offered == 0
        self.features = features
        self.send(vu.SET_FEATURES, vu.encode_u64(features))
        table = vu.encode_mem_table([RegionSpec(0, MiB, UVA, 0)])
        assert vu.decode_u64(self.send(vu.SET_MEM_TABLE, table, [self.fd], True).payload) == 0
        self.raw[:0x8000] = bytes(0x8000)
        for q, (desc, avail, used) in RINGS.items():
            self.avail[q] = 0
            self.next_desc[q] = 0
            self.send(vu.SET_VRING_NUM, vu.encode_vring_state(vu.VringState(q, QSIZE)))
            self.send(vu.SET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, 0)))
            self.send(vu.SET_VRING_ADDR, vu.encode_vring_addr(
                vu.VringAddr(q, 0, UVA + desc, UVA + used, UVA + avail, 0)))
            self.send(vu.SET_VRING_KICK, vu.encode_u64(q), [self.kick[q]])
            self.send(vu.SET_VRING_CALL, vu.encode_u64(q), [self.call[q]])
            ack = self.send(vu.SET_VRING_ENABLE, vu.encode_vring_state(vu.VringState(q, 1)),
                            need_reply=True)
            assert vu.decode_u64(ack.payload) == 0

    def stop(self) -> list[int]:
        """What QEMU 7.2 does on `stop` (and on a guest reset): disable, then GET_VRING_BASE."""
        for q in (0, 1):
            self.send(vu.SET_VRING_ENABLE, vu.encode_vring_state(vu.VringState(q, 0)))
        return [vu.decode_vring_state(self.send(
            vu.GET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, 0))).payload).num
            for q in (0, 1)]

    def restart(self, bases, features=None, uva=UVA, rings=None):
        """What QEMU 7.2 does on `cont`: features, memory table, every ring again at `bases`.
        The rings' contents are left alone (a resumed guest keeps its rings)."""
        self.send(vu.SET_FEATURES, vu.encode_u64(self.features if features is None else features))
        table = vu.encode_mem_table([RegionSpec(0, MiB, uva, 0)])
        assert vu.decode_u64(self.send(vu.SET_MEM_TABLE, table, [self.fd], True).payload) == 0
        for q, (desc, avail, used) in (rings or RINGS).items():
            self.send(vu.SET_VRING_NUM, vu.encode_vring_state(vu.VringState(q, QSIZE)))
            self.send(vu.SET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, bases[q])))
            self.send(vu.SET_VRING_ADDR, vu.encode_vring_addr(
                vu.VringAddr(q, 0, uva + desc, uva + used, uva + avail, 0)))
            self.send(vu.SET_VRING_KICK, vu.encode_u64(q), [self.kick[q]])
            self.send(vu.SET_VRING_CALL, vu.encode_u64(q), [self.call[q]])
            ack = self.send(vu.SET_VRING_ENABLE, vu.encode_vring_state(vu.VringState(q, 1)),
                            need_reply=True)
            assert vu.decode_u64(ack.payload) == 0

    def used_area(self, q) -> bytes:
        """Everything the device may write in ring q (used flags, idx, ring, avail_event)."""
        used = RINGS[q][2]
        return bytes(self.raw[used:used + 6 + 8 * QSIZE])

    def _desc(self, q, addr, length, flags, nxt=0):
        i = self.next_desc[q]
        self.next_desc[q] = (i + 1) % QSIZE
        struct.pack_into("<QIHH", self.raw, RINGS[q][0] + 16 * i, addr, length, flags, nxt)
        return i

    def _publish(self, q, head, kick=True):
        self.publish(q, [head], kick)

    def publish(self, q, heads, kick=True):
        """Make chains available with one avail idx store (and kick, unless kick=False)."""
        for ring in (0, 1):     # like virtqueue_enable_cb(): interrupt on the next used entry
            _, avail_area, used_area = RINGS[ring]
            used_idx = struct.unpack_from("<H", self.raw, used_area + 2)[0]
            struct.pack_into("<H", self.raw, avail_area + 4 + 2 * QSIZE, used_idx)
        avail = RINGS[q][1]
        for head in heads:
            struct.pack_into("<H", self.raw, avail + 4 + 2 * (self.avail[q] % QSIZE), head)
            self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.raw, avail + 2, self.avail[q])
        if kick:
            os.write(self.kick[q], (1).to_bytes(8, "little"))

    def add_rx_buffer(self, slot, split=False):
        base = RX_DATA + slot * 0x2000
        if split:      # 10 + 34 header bytes, then the payload buffer
            c = (self.next_desc[0] + 1) % QSIZE
            head = self._desc(0, base, 10, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, c)
            self._desc(0, base + 10, 34, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, (c + 1) % QSIZE)
            self._desc(0, base + 44, 4096, VRING_DESC_F_WRITE)
        else:
            head = self._desc(0, base, 44 + 4096, VRING_DESC_F_WRITE)
        self._publish(0, head)

    def send_packet(self, header, payload=b"", slot=0, split_at=None, kick=True, publish=True):
        """Write a tx chain and publish it; publish=False: return its head unpublished."""
        base = TX_DATA + slot * 0x2000
        self.raw[base:base + len(header) + len(payload)] = header + payload
        cut = 44 if split_at is None else split_at
        parts = [(base, cut), (base + cut, 44 - cut)] if cut < 44 else [(base, 44)]
        if payload:
            parts.append((base + 44, len(payload)))
        first = self.next_desc[1]
        for n, (addr, length) in enumerate(parts):
            last = n == len(parts) - 1
            self._desc(1, addr, length, 0 if last else VRING_DESC_F_NEXT,
                       (first + n + 1) % QSIZE)
        if not publish:
            return first
        self._publish(1, first, kick)

    def avail_event(self, q) -> int:
        """The avail idx the device asked to be kicked at (EVENT_IDX)."""
        return struct.unpack_from("<H", self.raw, RINGS[q][2] + 4 + 8 * QSIZE)[0]

    def used(self, q):
        used = RINGS[q][2]
        idx = struct.unpack_from("<H", self.raw, used + 2)[0]
        return idx, [struct.unpack_from("<II", self.raw, used + 4 + 8 * i) for i in range(idx)]

    def wait_call(self, q, timeout=5.0) -> bool:
        r, _, _ = select.select([self.call[q]], [], [], timeout)
        if r:
            os.read(self.call[q], 8)
        return bool(r)


def request_header(src_port=1000, dst_port=1234):
    return HDR.pack(7, 2, src_port, dst_port, 0, 1, OP_REQUEST, 0, 65536, 0)


@pytest.fixture
def running(tmp_path):
    loop = asyncio.new_event_loop()
    handler = RstHandler()
    dev = VsockDevice("t", 7, str(tmp_path / "t.vhost-user.sock"), loop, handler)
    dev.start()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fakes: list[FakeQemu] = []

    def connect() -> FakeQemu:
        fake = FakeQemu(dev.socket_path)
        fakes.append(fake)
        return fake

    yield dev, handler, connect
    loop.call_soon_threadsafe(dev.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    for fake in fakes:
        fake.close()
    loop.close()
    assert not os.path.exists(dev.socket_path)


def sync(fake: FakeQemu) -> None:
    """A round trip through the device's loop: everything sent before is handled."""
    fake.send(vu.GET_FEATURES)


def test_device_config_space_has_the_cid(running):
    _, _, connect = running
    fake = connect()
    reply = fake.send(vu.GET_CONFIG, vu.encode_config(vu.ConfigMsg(0, 8, 0, b"\0" * 8)))
    assert vu.decode_config(reply.payload).data == struct.pack("<Q", 7)


@pytest.mark.parametrize("split_hdr,split_rx", [(None, False), (20, True)])
def test_request_gets_rst_through_both_rings(running, split_hdr, split_rx):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    assert dev.seqpacket
    fake.add_rx_buffer(0, split=split_rx)
    fake.send_packet(request_header(), b"hello", split_at=split_hdr)
    assert fake.wait_call(0), "no rx interrupt"
    assert handler.packets[0][6] == OP_REQUEST and handler.payloads == [b"hello"]
    idx, elems = fake.used(0)
    assert idx == 1 and elems[0][1] == 44
    reply = HDR.unpack(fake.raw[RX_DATA:RX_DATA + 44])
    assert reply[6] == OP_RST and reply[0] == 2 and reply[1] == 7 and reply[3] == 1000
    assert fake.used(1) == (1, [(0, 0)])
    assert dev.stats["tx_packets"] == 1 and dev.stats["rx_packets"] == 1


def test_rst_waits_for_an_rx_buffer(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.send_packet(request_header())
    assert fake.wait_call(1)                       # tx completed, no rx buffer yet
    assert fake.used(0)[0] == 0
    fake.add_rx_buffer(0)                          # the kick makes on_rx_ready deliver it
    assert fake.wait_call(0)
    assert HDR.unpack(fake.raw[RX_DATA:RX_DATA + 44])[6] == OP_RST


def test_guest_fault_breaks_device_once_until_reset(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    struct.pack_into("<QIHH", fake.raw, RINGS[1][0], TX_DATA, 44, VRING_DESC_F_NEXT, 0)  # loop
    fake._publish(1, 0)
    assert handler.event.wait(5)
    sync(fake)
    assert dev.broken and "loop" in dev.broken
    assert len(handler.resets) == 1 and dev.stats["errors"] == 1
    fake.send_packet(request_header(), slot=1)     # ignored while broken
    sync(fake)
    assert handler.packets == []
    for q in (0, 1):                               # the guest resets the device
        fake.send(vu.GET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, 0)))
    assert len(handler.resets) == 1                # same incident, reported once
    fake.setup()
    sync(fake)
    assert dev.broken is None
    fake.add_rx_buffer(0)
    fake.send_packet(request_header())
    assert fake.wait_call(0)
    assert HDR.unpack(fake.raw[RX_DATA:RX_DATA + 44])[6] == OP_RST


def test_get_vring_base_pauses_without_reset(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header())
    assert fake.wait_call(0)
    bases = [vu.decode_vring_state(
        fake.send(vu.GET_VRING_BASE, vu.encode_vring_state(vu.VringState(q, 0))).payload).num
        for q in (0, 1)]
    assert bases == [1, 1]
    assert handler.resets == []                    # VM stop or guest reset: not known yet
    assert dev.paused and in_loop(dev, dev.rx_pop) is None


def test_frontend_eof_resets_and_a_new_frontend_works(running):
    dev, handler, connect = running
    first = connect()
    first.setup()
    second = connect()                             # refused while the first is connected
    assert second.sock.recv(1) == b""
    first.sock.close()
    assert handler.event.wait(5)
    assert handler.resets == ["frontend disconnected"]
    third = connect()
    third.setup()
    third.add_rx_buffer(0)
    third.send_packet(request_header())
    assert third.wait_call(0)
    assert HDR.unpack(third.raw[RX_DATA:RX_DATA + 44])[6] == OP_RST


def test_malformed_message_drops_only_that_frontend(running):
    dev, handler, connect = running
    fake = connect()
    fake.sock.sendall(struct.pack("<III", vu.GET_FEATURES, 0x2, 0))   # version 2
    assert fake.sock.recv(1) == b""
    again = connect()
    assert vu.decode_u64(again.send(vu.GET_FEATURES).payload) == vu.DEVICE_FEATURES


def in_loop(dev: VsockDevice, fn):
    """Run fn on the device's loop thread (device methods are not thread-safe)."""
    import concurrent.futures
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            fut.set_result(fn())
        except BaseException as exc:   # pragma: no cover - surfaced by result()
            fut.set_exception(exc)
    dev.loop.call_soon_threadsafe(run)
    return fut.result(5)


def test_rx_cancel_puts_back_newest_and_reuses_older(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    for slot in range(3):
        fake.add_rx_buffer(slot)
    sync(fake)
    a, b = in_loop(dev, lambda: (dev.rx_pop(), dev.rx_pop()))
    assert a.head == 0 and b.head == 1 and a.capacity == 4096
    in_loop(dev, lambda: dev.rx_cancel(a))         # older: kept aside, handed out next
    assert in_loop(dev, dev.rx_pop) is a
    in_loop(dev, lambda: dev.rx_cancel(b))         # newest from the ring: un-popped
    c = in_loop(dev, dev.rx_pop)
    assert c is not b and c.head == 1
    in_loop(dev, lambda: (dev.rx_push(c, request_header(), 0),
                          dev.rx_push(a, request_header(), 0)))
    assert fake.wait_call(0)
    sync(fake)
    assert fake.used(0) == (2, [(1, 44), (0, 44)])
    assert dev.stats["interrupts"] == 1               # one batch, one interrupt
    d = in_loop(dev, dev.rx_pop)
    with pytest.raises(ValueError):
        in_loop(dev, lambda: dev.rx_push(d, b"short", 0))
    with pytest.raises(ValueError):
        in_loop(dev, lambda: dev.rx_push(d, request_header(), d.capacity + 1))


def test_stop_returns_buffers_in_flight_and_ignores_stale_ones(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.add_rx_buffer(1)
    sync(fake)
    held = in_loop(dev, dev.rx_pop)
    view = held.payload[0]
    view[:4] = b"data"
    fake.send(vu.SET_VRING_ENABLE, vu.encode_vring_state(vu.VringState(0, 0)))
    base = vu.decode_vring_state(fake.send(
        vu.GET_VRING_BASE, vu.encode_vring_state(vu.VringState(0, 0))).payload).num
    assert base == 1
    assert fake.used(0) == (1, [(0, 0)])           # handed back empty, ring accounting intact
    assert handler.resets == [] and dev.paused
    in_loop(dev, lambda: dev.rx_push(held, request_header(), 4))   # stale: ignored
    assert fake.used(0)[0] == 1
    with pytest.raises(ValueError):
        view[:1]                                   # views were released


def test_memory_table_change_while_running(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header(src_port=1))
    assert fake.wait_call(0)
    table = vu.encode_mem_table([RegionSpec(0, MiB, UVA, 0)])
    assert vu.decode_u64(fake.send(vu.SET_MEM_TABLE, table, [fake.fd], True).payload) == 0
    fake.add_rx_buffer(1)
    fake.send_packet(request_header(src_port=2), slot=1)
    assert fake.wait_call(0)
    assert fake.used(0)[0] == 2 and not dev.broken
    assert [p[2] for p in handler.packets] == [1, 2]


def test_random_messages_never_escape_as_exceptions():
    """Fuzz the session with well-framed garbage: it answers, refuses, or drops the frontend."""
    import random
    rng = random.Random(99)
    requests = list(range(0, 45)) + [1000]
    fds_before = len(os.listdir("/proc/self/fd"))
    outcomes = {True: 0, False: 0}
    for _ in range(30):
        front, back = socket.socketpair()
        rec = Recorder()
        s = vu.VhostUserSession(back, rec, name="fuzz")
        alive = True
        for _ in range(rng.randrange(1, 6)):
            request = rng.choice(requests)
            flags = rng.choice([vu.VERSION, vu.VERSION | vu.FLAG_NEED_REPLY])
            if rng.random() < 0.02:
                flags = rng.getrandbits(32)
            payload = rng.randbytes(rng.choice([8, 8, 8, 12, 40, 72, 0, 4, 300]))
            fds = [os.eventfd(0) for _ in range(rng.choice([0, 0, 1, 2]))]
            try:
                vu.send_message(front, vu.Message(request, flags, payload, fds))
            finally:
                for fd in fds:
                    os.close(fd)
            alive = s.on_readable()
            if not alive:
                break
        outcomes[alive] += 1
        s.close()
        front.close()
    assert outcomes[True] and outcomes[False]          # both paths were exercised
    assert len(os.listdir("/proc/self/fd")) == fds_before   # no fd leaked on any path


def test_frontend_disconnect_closes_every_fd(running):
    import time
    dev, handler, connect = running
    fake = connect()
    sync(fake)
    before = len(os.listdir("/proc/self/fd"))     # fake's own fds + the accepted socket
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header())
    assert fake.wait_call(0)
    assert len(os.listdir("/proc/self/fd")) > before   # memfd and eventfds received
    fake.sock.close()
    deadline = time.monotonic() + 5
    while not handler.resets and time.monotonic() < deadline:
        time.sleep(0.01)
    in_loop(dev, lambda: None)
    assert handler.resets == ["frontend disconnected"]
    assert len(os.listdir("/proc/self/fd")) == before - 2  # both ends of the connection gone


# -- stop/cont (resume) versus guest reset -----------------------------------------------
def wait_until(cond, timeout=5.0) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def rst_for_port(port):
    return HDR.pack(2, 7, 1234, port, 0, 1, OP_RST, 0, 0, 0)


def test_stop_cont_keeps_state_and_data_flows_after_resume(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header(src_port=1))
    assert fake.wait_call(0)
    assert fake.stop() == [1, 1]
    assert handler.resets == [] and dev.paused
    frozen = [fake.used_area(q) for q in (0, 1)]
    # The router has something for the guest while the rings are stopped: it must wait.
    def queue_while_paused():
        handler.pending.append(rst_for_port(99))
        handler.on_rx_ready(dev)
        return dev.rx_pop()
    assert in_loop(dev, queue_while_paused) is None
    # Chains the guest queued before the stop (and their kicks) are not touched while paused.
    fake.add_rx_buffer(1)
    fake.add_rx_buffer(2)
    fake.send_packet(request_header(src_port=2), slot=1)
    sync(fake)
    assert [fake.used_area(q) for q in (0, 1)] == frozen
    assert len(handler.packets) == 1 and handler.pending == [rst_for_port(99)]

    fake.restart([1, 1])                           # cont: same bases, same rings
    assert wait_until(lambda: fake.used(0)[0] == 3 and fake.used(1)[0] == 2), fake.used(0)
    sync(fake)
    assert handler.resets == [] and not dev.paused and dev.broken is None
    assert [p[2] for p in handler.packets] == [1, 2]
    replies = sorted(HDR.unpack(fake.raw[RX_DATA + s * 0x2000:RX_DATA + s * 0x2000 + 44])[3]
                     for s in (1, 2))
    assert replies == [2, 99]                      # the queued RST and the new REQUEST's RST
    assert handler.pending == []
    # ... and the rings keep working normally afterwards
    fake.add_rx_buffer(3)
    fake.send_packet(request_header(src_port=3), slot=2)
    assert wait_until(lambda: fake.used(0)[0] == 4)
    assert HDR.unpack(fake.raw[RX_DATA + 3 * 0x2000:RX_DATA + 3 * 0x2000 + 44])[3] == 3
    assert handler.resets == []


@pytest.mark.parametrize("kind,reset", [
    ("same", False),
    ("same-gpa-new-uva", False),                   # rings compared as guest-physical addresses
    ("base-0", True),
    ("ring-moved", True),
    ("features", True),
])
def test_restart_after_stop_resumes_or_resets_once(running, kind, reset):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header())
    assert fake.wait_call(0)
    bases = fake.stop()
    assert bases == [1, 1] and handler.resets == []
    kw = {"same": {}, "same-gpa-new-uva": {"uva": UVA + (1 << 30)}, "base-0": {},
          "ring-moved": {"rings": {0: (0x7000, 0x1000, 0x2000), 1: RINGS[1]}},
          "features": {"features": fake.features & ~(1 << vu.VIRTIO_VSOCK_F_SEQPACKET)}}[kind]
    fake.restart([0, 0] if kind == "base-0" else bases, **kw)
    sync(fake)
    assert handler.resets == (["guest reset the device"] if reset else [])
    assert not dev.paused and dev.broken is None
    fake.restart(fake.stop(), **kw)                # the next stop/cont is a plain pause again
    sync(fake)
    assert len(handler.resets) == (1 if reset else 0)


def test_guest_reset_then_new_rings_work(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header(src_port=1))
    assert fake.wait_call(0)
    fake.stop()
    fake.setup()                                   # driver re-init: zeroed rings, base 0
    sync(fake)
    assert handler.resets == ["guest reset the device"]
    fake.add_rx_buffer(0)
    fake.send_packet(request_header(src_port=5))
    assert fake.wait_call(0)
    assert fake.used(0) == (1, [(0, 44)])
    assert HDR.unpack(fake.raw[RX_DATA:RX_DATA + 44])[3] == 5
    assert len(handler.resets) == 1


@pytest.mark.parametrize("signal", ["RESET_DEVICE", "RESET_OWNER", "eof"])
def test_reset_signals_while_paused_reset_at_once_and_only_once(running, signal):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    fake.send_packet(request_header())
    assert fake.wait_call(0)
    fake.stop()
    assert handler.resets == []
    if signal == "eof":
        fake.sock.close()
        assert wait_until(lambda: handler.resets)
        in_loop(dev, lambda: None)
        assert handler.resets == ["frontend disconnected"] and not dev.paused
        return
    fake.send(getattr(vu, signal))
    sync(fake)
    assert handler.resets == [f"frontend sent {signal}"] and not dev.paused
    fake.setup()
    sync(fake)
    assert len(handler.resets) == 1
    fake.add_rx_buffer(0)
    fake.send_packet(request_header())
    assert fake.wait_call(0)


# -- rx buffer shapes (device._split_header) ------------------------------------------------
@pytest.mark.parametrize("sizes", [[44, 4096], [4140], [44], [20, 24, 100], [20, 4120], [44, 10, 20],
                                   [50, 7]])
def test_split_header_shapes(sizes):
    from vmlab.vsock.device import HDR_LEN, _split_header
    from vmlab.vsock.virtqueue import DescChain
    backing = bytearray(sum(sizes))
    whole = memoryview(backing)
    views, pos = [], 0
    for n in sizes:
        views.append(whole[pos:pos + n])
        pos += n
    buf = _split_header(DescChain(5, [], views, 0, len(backing)))
    assert buf.head == 5 and buf.capacity == len(backing) - HDR_LEN
    assert sum(len(v) for v in buf.header) == HDR_LEN
    assert sum(len(v) for v in buf.payload) == buf.capacity
    for i, view in enumerate(buf.header):
        view[:] = bytes([i + 1]) * len(view)
    for view in buf.payload:
        view[:] = b"p" * len(view)
    assert bytes(backing[HDR_LEN:]) == b"p" * buf.capacity
    assert b"p" not in backing[:HDR_LEN] and 0 not in backing[:HDR_LEN]
    buf.release()
    for view in views:                  # every view handed out is released with the buffer
        with pytest.raises(ValueError):
            view[0]
    assert buf.capacity == 0 and buf.payload == [] and buf.header == []


def test_rx_pop_batch_equals_rx_pop_in_a_loop_and_push_batch_publishes_once(running):
    """The batch calls the router's stream path uses: same buffers as rx_pop() one by one
    (split and whole headers), room/max_bufs limits, one flush and interrupt for the batch."""
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    for slot, split in ((0, False), (1, True), (2, False), (3, False)):
        fake.add_rx_buffer(slot, split=split)
    sync(fake)
    assert in_loop(dev, lambda: dev.rx_pop_batch(0, 8, 8)) == []       # no room wanted
    bufs = in_loop(dev, lambda: dev.rx_pop_batch(4096 + 1, 8, 8))       # room for two
    assert [b.capacity for b in bufs] == [4096, 4096] and [b.head for b in bufs] == [0, 1]
    more = in_loop(dev, lambda: dev.rx_pop_batch(1 << 20, 1, 8))        # max_bufs 1
    assert [b.head for b in more] == [4]                # slot 2's descriptor (after 3 split ones)
    hdrs = [(n, HDR.pack(2, 7, 1, 2, n, 1, 5, 0, 0, 0)) for n in (100, 4096, 7)]
    in_loop(dev, lambda: dev.rx_push_batch(bufs + more, hdrs))
    assert fake.wait_call(0)
    sync(fake)
    assert fake.used(0) == (3, [(0, 144), (1, 44 + 4096), (4, 51)])
    assert dev.stats["interrupts"] == 1 and dev.stats["rx_bytes"] == 100 + 4096 + 7
    assert HDR.unpack_from(fake.raw, RX_DATA + 0x2000)[4] == 4096       # split header written
    in_loop(dev, lambda: dev.rx_push_batch(bufs, hdrs))                 # stale: ignored
    assert fake.used(0)[0] == 3
    left = in_loop(dev, lambda: dev.rx_pop_batch(1 << 20, 8, 8))
    assert [b.head for b in left] == [5]
    in_loop(dev, lambda: dev.rx_cancel(left[0]))
    assert [b.head for b in in_loop(dev, lambda: dev.rx_pop_batch(1, 8, 8))] == [5]


def test_rx_pop_batch_on_a_malformed_rx_chain_breaks_the_device_once(running):
    dev, handler, connect = running
    fake = connect()
    fake.setup()
    fake.add_rx_buffer(0)
    head = fake._desc(0, RX_DATA + 0x2000, 4140, 0)      # device-readable: not an rx buffer
    fake._publish(0, head)
    sync(fake)
    assert in_loop(dev, lambda: dev.rx_pop_batch(1 << 20, 8, 8)) == []
    assert dev.broken and "device-readable" in dev.broken
    assert handler.resets and dev.stats["errors"] == 1
    assert in_loop(dev, lambda: dev.rx_pop_batch(1 << 20, 8, 8)) == []


def test_fds_of_a_message_complete_before_a_malformed_one_are_closed():
    """Found by tests/fuzz (vhost_user, seed 13): a message decoded in the same read as a bad
    header that follows it was dropped with its fds still open (one leak per bad frontend)."""
    front, back = socket.socketpair()
    back.setblocking(False)
    fds = [os.eventfd(0) for _ in range(3)]
    ours = []
    try:
        vu.send_message(front, vu.Message(vu.SET_OWNER, vu.VERSION, b"", fds))
        front.sendall(struct.pack("<III", vu.GET_FEATURES, 0x2, 0))    # bad version
        reader = vu.MessageReader(back)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(vu.ProtocolError):
            reader.read()
        reader.close()
        ours = set(os.listdir("/proc/self/fd")) - before
        assert ours == set()
    finally:
        for fd in fds:
            os.close(fd)
        front.close()
        back.close()


# -- rx_fill through the device, pure Python and the C accelerator ---------------------------
def _add_linux_rx(fake: FakeQemu, slot: int) -> None:
    """An rx buffer as Linux posts it with INDIRECT_DESC: table of header + 4 KiB payload."""
    from vmlab.vsock.virtqueue import VRING_DESC_F_INDIRECT
    base = RX_DATA + slot * 0x2000
    table = 0x8000 + 32 * slot
    struct.pack_into("<QIHHQIHH", fake.raw, table, base, 44,
                     VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1, base + 44, 4096,
                     VRING_DESC_F_WRITE, 0)
    fake._publish(0, fake._desc(0, table, 32, VRING_DESC_F_INDIRECT))


def test_rx_fill_publishes_once_and_hands_other_shapes_to_rx_pop(running, rx_accel):
    dev, handler, connect = running
    fake = connect()
    fake.setup(indirect=True)
    in_loop(dev, lambda: setattr(dev, "accel", rx_accel))
    for slot in range(3):
        _add_linux_rx(fake, slot)
    fake.add_rx_buffer(3, split=True)                # 10 + 34 + 4096: not rx_fill's shape
    _add_linux_rx(fake, 4)
    sync(fake)
    hdr = HDR.pack(2, 7, 1, 2, 0, 1, 5, 0, 65536, 0)
    data = bytes(range(256)) * 40                    # 10240 bytes: 2.5 buffers
    res = in_loop(dev, lambda: dev.rx_fill(len(data), hdr, hdr, -1, [memoryview(data)]))
    assert res == (3, len(data), 0, len(data))
    assert fake.wait_call(0)                         # one flush, one interrupt for the batch
    sync(fake)
    assert fake.used(0) == (3, [(0, 44 + 4096), (1, 44 + 4096), (2, 44 + 2048)])
    assert [HDR.unpack_from(fake.raw, RX_DATA + s * 0x2000)[4] for s in range(3)] == [
        4096, 4096, 2048]
    got = b"".join(bytes(fake.raw[RX_DATA + s * 0x2000 + 44:RX_DATA + s * 0x2000 + 44 + n])
                   for s, n in ((0, 4096), (1, 4096), (2, 2048)))
    assert got == data
    assert dev.stats["rx_filled"] == 3 and dev.stats["rx_bytes"] == len(data)
    assert dev.stats["interrupts"] == 1
    # the direct buffer is next: rx_fill declines, rx_pop takes it, then rx_fill goes on
    assert in_loop(dev, lambda: dev.rx_fill(1, hdr, hdr, -1, [memoryview(b"x")])) is None
    buf = in_loop(dev, dev.rx_pop)
    assert buf is not None and buf.capacity == 4096 and len(buf.header) == 2
    assert in_loop(dev, lambda: dev.rx_fill(1, hdr, hdr, -1, [memoryview(b"x")]))[:2] == (1, 1)
    in_loop(dev, lambda: dev.rx_cancel(buf))         # older than rx_fill's chain: kept, no unpop
    again = in_loop(dev, dev.rx_pop)
    assert again is buf
    in_loop(dev, lambda: dev.rx_push(buf, hdr, 0))
    sync(fake)
    idx, elems = fake.used(0)
    assert idx == 5 and sorted(h for h, _ in elems[3:]) == [3, 6]   # split: descs 3-5
    assert in_loop(dev, lambda: dev.rx_fill(1, hdr, hdr, -1, [memoryview(b"x")])) is None
    assert not dev.broken


def test_rx_fill_on_an_avail_idx_jump_breaks_the_device_once(running, rx_accel):
    dev, handler, connect = running
    fake = connect()
    fake.setup(indirect=True)
    in_loop(dev, lambda: setattr(dev, "accel", rx_accel))
    sync(fake)
    struct.pack_into("<H", fake.raw, RINGS[0][1] + 2, QSIZE + 1)
    hdr = bytes(44)
    assert in_loop(dev, lambda: dev.rx_fill(100, hdr, hdr, -1, [memoryview(b"x" * 100)])) is None
    assert dev.broken and "avail idx" in dev.broken
    assert handler.resets and dev.stats["errors"] == 1
    assert in_loop(dev, lambda: dev.rx_fill(100, hdr, hdr, -1, [memoryview(b"x")])) is None


def _bulk_tx_device(running, monkeypatch, delay: float, max_delay: float):
    """A running device with these bulk-tx look delays, its ring's first look done (one small
    packet taken). Returns (dev, handler, fake, the small packet's header)."""
    from vmlab.vsock import device
    monkeypatch.setattr(device, "TX_POLL_DELAY", delay)
    monkeypatch.setattr(device, "TX_POLL_MAX", max_delay)
    dev, handler, connect = running
    dev._tx_poll_delay = delay
    fake = connect()
    fake.setup()
    small = HDR.pack(7, 2, 1000, 1234, 5, 1, OP_RW, 0, 65536, 0)
    fake.send_packet(small, b"first", slot=60)
    assert wait_until(lambda: fake.used(1)[0] == 1 and fake.avail_event(1) == 1)
    return dev, handler, fake, small


def test_bulk_tx_asks_for_fewer_kicks_and_never_leaves_a_chain_waiting(running, monkeypatch):
    """A drain of >= 64 KiB in >= 2 chains: the device asks to be kicked only after
    TX_KICK_AHEAD + 1 more chains and looks at the ring itself meanwhile, so a chain the
    guest posts without a kick (as Linux does below avail_event) is still taken, soon; a drain
    of one small chain returns to a kick per chain."""
    from vmlab.vsock.device import TX_KICK_AHEAD
    dev, handler, fake, small = _bulk_tx_device(running, monkeypatch, 0.3, 0.3)  # time to look
    n = 40000
    rw = HDR.pack(7, 2, 1000, 1234, n, 1, OP_RW, 0, 65536, 0)
    heads = [fake.send_packet(rw, bytes(n), slot=0, publish=False),
             fake.send_packet(rw, b"\x01" * n, slot=20, publish=False)]
    fake.publish(1, heads)                                  # one drain, one kick
    assert wait_until(lambda: fake.used(1)[0] == 3)
    assert wait_until(lambda: fake.avail_event(1) == 3 + TX_KICK_AHEAD)
    assert dev.stats["kicks"] == 2
    fake.send_packet(small, b"hello", slot=40, kick=False)  # below avail_event: no kick
    assert wait_until(lambda: fake.used(1)[0] == 4, timeout=2.0), "chain left waiting"
    assert handler.payloads[3] == b"hello" and dev.stats["kicks"] == 2
    assert wait_until(lambda: fake.avail_event(1) == 4)     # back to a kick per chain
    assert handler.payloads[:3] == [b"first", bytes(n), b"\x01" * n]


def test_bulk_tx_looks_that_find_nothing_back_off_but_a_chain_is_still_taken(running,
                                                                           monkeypatch):
    """A credit-limited sender posts exactly what a window allows, so the device's own look
    after a bulk drain finds nothing: each such look doubles the next delay up to TX_POLL_MAX
    (fewer wakeups for nothing); a chain posted without a kick is still taken by the next
    look, which goes back to TX_POLL_DELAY."""
    dev, handler, fake, small = _bulk_tx_device(running, monkeypatch, 0.01, 0.04)
    n = 40000
    rw = HDR.pack(7, 2, 1000, 1234, n, 1, OP_RW, 0, 65536, 0)
    sent = 1
    for delay in (0.02, 0.04, 0.04):                         # doubled, then capped
        polls = dev.stats["tx_polls"]
        heads = [fake.send_packet(rw, bytes(n), slot=0, publish=False),
                 fake.send_packet(rw, bytes(n), slot=20, publish=False)]
        fake.publish(1, heads)                              # a bulk drain, then nothing
        sent += 2
        assert wait_until(lambda: fake.used(1)[0] == sent)
        assert wait_until(lambda: dev.stats["tx_polls"] == polls + 1)
        assert wait_until(lambda: dev._tx_poll_delay == delay)
    assert dev.stats["tx_poll_hits"] == 0
    heads = [fake.send_packet(rw, bytes(n), slot=0, publish=False),
             fake.send_packet(rw, bytes(n), slot=20, publish=False)]
    fake.publish(1, heads)
    assert wait_until(lambda: fake.used(1)[0] == sent + 2)
    fake.send_packet(small, b"hello", slot=40, kick=False)  # below avail_event: no kick
    assert wait_until(lambda: fake.used(1)[0] == sent + 3, timeout=2.0), "chain left waiting"
    assert dev.stats["tx_poll_hits"] == 1 and dev._tx_poll_delay == 0.01
    assert handler.payloads[-1] == b"hello"
