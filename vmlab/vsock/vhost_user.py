"""vhost-user protocol (QEMU docs/interop/vhost-user.rst): message codec + one frontend session.

The codec is pure (bytes <-> dataclasses). `VhostUserSession` reads messages from one frontend
connection (non-blocking, fds via SCM_RIGHTS), keeps the negotiated state (features, memory
table, per-vring configuration and eventfds) and tells its `SessionListener` (the device) when
rings start, stop or change. A malformed message ends the session; an unsupported request only
fails that request.
"""
from __future__ import annotations

import array
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Protocol

from .memory import GuestMemory, GuestMemoryError, RegionSpec

log = logging.getLogger("vmlab.vsock.vhost_user")

# -- requests (front-end -> back-end) ---------------------------------------------------
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
RESET_DEVICE = 34
SET_STATUS = 39
GET_STATUS = 40

REQUEST_NAMES = {v: k for k, v in dict(globals()).items()
                 if isinstance(v, int) and k.isupper() and k.startswith(("GET_", "SET_", "RESET_"))}

# -- header flags -----------------------------------------------------------------------
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_NOFD = 0x100
VRING_IDX_MASK = 0xFF

# -- feature bits -----------------------------------------------------------------------
VIRTIO_VSOCK_F_SEQPACKET = 1
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_RESET_DEVICE = 13

DEVICE_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                   | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_SEQPACKET)
                   | (1 << VIRTIO_F_NOTIFY_ON_EMPTY) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
PROTOCOL_FEATURES = ((1 << PROTOCOL_F_MQ) | (1 << PROTOCOL_F_REPLY_ACK) | (1 << PROTOCOL_F_CONFIG)
                     | (1 << PROTOCOL_F_RESET_DEVICE))

NUM_QUEUES = 2                      # rx, tx (QEMU keeps the event queue itself)
MAX_VRINGS = 3                      # index 2 (event queue) is accepted and ignored
MAX_FDS = 8
MAX_PAYLOAD = 4096
CONFIG_SPACE_MAX = 256

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HDR = struct.Struct("<III")


class ProtocolError(Exception):
    """The frontend sent something malformed: the session is closed."""


class RequestError(Exception):
    """A well-formed request we refuse (error ack if the frontend asked for one)."""


# -- codec ------------------------------------------------------------------------------
@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.request, f"request {self.request}")


@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class ConfigMsg:
    offset: int
    size: int
    flags: int
    data: bytes


def encode(msg: Message) -> bytes:
    return HEADER.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload


def decode_header(data: bytes) -> tuple[int, int, int]:
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload too large: {size}")
    return request, flags, size


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, need {size}")


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(payload: bytes) -> int:
    _need(payload, U64.size, "u64")
    return U64.unpack_from(payload)[0]


def encode_vring_state(state: VringState) -> bytes:
    return VRING_STATE.pack(state.index, state.num)


def decode_vring_state(payload: bytes) -> VringState:
    _need(payload, VRING_STATE.size, "vring state")
    return VringState(*VRING_STATE.unpack_from(payload))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def decode_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, VRING_ADDR.size, "vring addr")
    return VringAddr(*VRING_ADDR.unpack_from(payload))


def encode_mem_table(regions: list[RegionSpec]) -> bytes:
    out = struct.pack("<II", len(regions), 0)
    for r in regions:
        out += MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


def decode_mem_table(payload: bytes) -> list[RegionSpec]:
    _need(payload, 8, "memory table")
    count = struct.unpack_from("<I", payload)[0]
    if count > MAX_FDS:
        raise ProtocolError(f"memory table with {count} regions")
    _need(payload, 8 + count * MEM_REGION.size, "memory table")
    return [RegionSpec(*MEM_REGION.unpack_from(payload, 8 + i * MEM_REGION.size))
            for i in range(count)]


def encode_config(cfg: ConfigMsg) -> bytes:
    return CONFIG_HDR.pack(cfg.offset, cfg.size, cfg.flags) + cfg.data


def decode_config(payload: bytes) -> ConfigMsg:
    _need(payload, CONFIG_HDR.size, "config")
    offset, size, flags = CONFIG_HDR.unpack_from(payload)
    if size > CONFIG_SPACE_MAX:
        raise ProtocolError(f"config size {size}")
    return ConfigMsg(offset, size, flags, bytes(payload[CONFIG_HDR.size:CONFIG_HDR.size + size]))


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message (with fds if any) in a single sendmsg; used by tests as a frontend."""
    data = encode(msg)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds))] if msg.fds else []
    sent = sock.sendmsg([data], anc)
    if sent != len(data):
        raise ProtocolError("short send")


def recv_message(sock: socket.socket) -> Message:
    """Blocking receive of one whole message (frontend side in tests)."""
    reader = MessageReader(sock)
    while True:
        msgs = reader.read(max_messages=1)
        if msgs:
            return msgs[0]
        if reader.eof:
            raise EOFError("connection closed")


class MessageReader:
    """Incremental, non-blocking message reader that keeps fds with their own message.

    The header is read with recvmsg(12): a Unix stream socket delivers the fds of a sendmsg
    with its first byte, and never merges data past an skb that carries fds.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.eof = False
        self._buf = bytearray()
        self._want = HEADER.size
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []

    def close(self) -> None:
        close_fds(self._fds)

    def read(self, max_messages: int = 64) -> list[Message]:
        out: list[Message] = []
        try:
            self._read_into(out, max_messages)
        except BaseException:
            for msg in out:             # complete messages before the bad one: their fds too
                close_fds(msg.fds)
            raise
        return out

    def _read_into(self, out: list[Message], max_messages: int) -> None:
        while len(out) < max_messages and not self.eof:
            try:
                data, anc, msg_flags, _ = self.sock.recvmsg(
                    self._want - len(self._buf), socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                self.eof = True
                break
            self._take_fds(anc)
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError("too many fds (control data truncated)")
            if not data:
                self.eof = True
                break
            self._buf += data
            if len(self._buf) < self._want:
                continue
            if self._header is None:
                self._header = decode_header(bytes(self._buf))
                self._buf.clear()
                self._want = self._header[2]
                if self._want:
                    continue
            request, flags, _ = self._header
            out.append(Message(request, flags, bytes(self._buf), self._fds))
            self._fds = []
            self._buf.clear()
            self._header = None
            self._want = HEADER.size

    def _take_fds(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise ProtocolError(f"{len(self._fds)} fds with one message")


# -- session ----------------------------------------------------------------------------
@dataclass
class VringConfig:
    """What the frontend told us about one vring."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    base_seq: int = 0                   # bumped by every SET_VRING_BASE
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False               # got a kick fd since the last stop


class SessionListener(Protocol):
    """What the device does in response to frontend requests."""

    def vring_changed(self, index: int) -> None:
        """Config of a vring (or the memory table) changed: (re)start/stop processing it."""

    def vring_stop(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring, return the next avail index to process."""

    def session_reset(self, reason: str) -> None:
        """RESET_OWNER / RESET_DEVICE: forget all ring state."""

    def before_memory_change(self) -> None:
        """About to replace the memory table: drop views into the old one."""

    def config_space(self) -> bytes:
        """The device config space (virtio-vsock: le64 guest_cid)."""


class VhostUserSession:
    """Protocol state for one connected frontend."""

    def __init__(self, sock: socket.socket, listener: SessionListener, *,
                 device_features: int = DEVICE_FEATURES,
                 protocol_features: int = PROTOCOL_FEATURES, name: str = "vhost-user") -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.listener = listener
        self.name = name
        self.device_features = device_features
        self.protocol_features_offered = protocol_features
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mem = GuestMemory()
        self.vrings = [VringConfig(i) for i in range(MAX_VRINGS)]
        self.reader = MessageReader(sock)
        self.closed = False
        self._retired: list[int] = []       # replaced fds, closed after the listener saw the change

    # -- state helpers ----------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def rings_need_enable(self) -> bool:
        """With PROTOCOL_FEATURES negotiated rings start disabled until SET_VRING_ENABLE."""
        return self.has_feature(VHOST_USER_F_PROTOCOL_FEATURES)

    def vring_runnable(self, index: int) -> bool:
        v = self.vrings[index]
        return (v.started and v.addr is not None and v.num > 0 and self.mem.mapped
                and (v.enabled or not self.rings_need_enable))

    # -- I/O --------------------------------------------------------------------------
    def on_readable(self) -> bool:
        """Handle what arrived; False once the session is over (EOF or malformed input)."""
        if self.closed:
            return False
        try:
            for msg in self.reader.read():
                self.handle(msg)
        except ProtocolError as exc:
            log.warning("%s: protocol error, dropping frontend: %s", self.name, exc)
            return False
        except OSError as exc:
            log.warning("%s: socket error, dropping frontend: %s", self.name, exc)
            return False
        return not self.reader.eof

    def close(self) -> None:
        """Forget the frontend: close its fds and socket, unmap memory."""
        if self.closed:
            return
        self.closed = True
        self.reader.close()
        close_fds(self._retired)
        for v in self.vrings:
            self._drop_fds(v)
        self.mem.close()
        try:
            self.sock.close()
        except OSError:
            pass

    @staticmethod
    def _drop_fds(v: VringConfig) -> None:
        for attr in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(v, attr)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(v, attr, None)

    def _reply(self, msg: Message, payload: bytes) -> None:
        data = HEADER.pack(msg.request, VERSION | FLAG_REPLY, len(payload)) + payload
        try:
            sent = self.sock.send(data)
        except BlockingIOError as exc:
            raise ProtocolError("frontend does not read replies") from exc
        if sent != len(data):
            raise ProtocolError("short reply")

    # -- dispatch ---------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Run one request; fds attached to it are closed unless the handler kept them."""
        handler = _HANDLERS.get(msg.request)
        log.debug("%s: %s flags=%#x size=%d fds=%d", self.name, msg.name, msg.flags,
                  len(msg.payload), len(msg.fds))
        try:
            if handler is None:
                raise RequestError(f"unsupported {msg.name}")
            reply = handler(self, msg)
        except RequestError as exc:
            log.warning("%s: %s refused: %s", self.name, msg.name, exc)
            if msg.need_reply and self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1:
                self._reply(msg, encode_u64(1))
            return
        finally:
            close_fds(msg.fds)
            close_fds(self._retired)
        if reply is not None:
            self._reply(msg, reply)
        elif msg.need_reply and self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1:
            self._reply(msg, encode_u64(0))

    def _vring(self, index: int) -> VringConfig:
        if not 0 <= index < MAX_VRINGS:
            raise RequestError(f"vring index {index} out of range")
        return self.vrings[index]

    def _ring_fd(self, msg: Message) -> tuple[VringConfig, int | None]:
        value = decode_u64(msg.payload)
        index = value & VRING_IDX_MASK
        if value & VRING_NOFD:
            fd = None
        else:
            if len(msg.fds) != 1:
                raise ProtocolError(f"{msg.name} needs exactly one fd, got {len(msg.fds)}")
            fd = msg.fds.pop()
        if index >= MAX_VRINGS:
            if fd is not None:
                self._retired.append(fd)
            raise RequestError(f"vring index {index} out of range")
        return self.vrings[index], fd

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.device_features)

    def _set_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload)
        if value & ~self.device_features:
            raise RequestError(f"features {value:#x} not offered")
        self.features = value
        for index in range(NUM_QUEUES):
            self.listener.vring_changed(index)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.protocol_features_offered)

    def _set_protocol_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload)
        if value & ~self.protocol_features_offered:
            raise RequestError(f"protocol features {value:#x} not offered")
        self.protocol_features = value

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset(self, msg: Message) -> None:
        self.listener.session_reset(f"frontend sent {msg.name}")
        for v in self.vrings:
            self._retired.extend(fd for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd is not None)
        self.vrings = [VringConfig(i) for i in range(MAX_VRINGS)]
        self.features = 0

    def _set_mem_table(self, msg: Message) -> None:
        regions = decode_mem_table(msg.payload)
        if len(regions) != len(msg.fds):
            raise ProtocolError(f"memory table: {len(regions)} regions, {len(msg.fds)} fds")
        fds, msg.fds[:] = list(msg.fds), []
        self.listener.before_memory_change()
        try:
            self.mem.map(regions, fds)
        except GuestMemoryError as exc:
            raise RequestError(str(exc)) from exc
        finally:
            for index in range(NUM_QUEUES):
                self.listener.vring_changed(index)

    def _set_vring_num(self, msg: Message) -> None:
        state = decode_vring_state(msg.payload)
        num = state.num
        if num == 0 or num > 32768 or num & (num - 1):
            raise RequestError(f"bad vring size {num}")
        self._vring(state.index).num = num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = decode_vring_addr(msg.payload)
        self._vring(addr.index).addr = addr
        if addr.index < NUM_QUEUES:
            self.listener.vring_changed(addr.index)

    def _set_vring_base(self, msg: Message) -> None:
        state = decode_vring_state(msg.payload)
        if state.num > 0xFFFF:
            raise RequestError(f"bad vring base {state.num}")
        v = self._vring(state.index)
        v.base = state.num
        v.base_seq += 1

    def _get_vring_base(self, msg: Message) -> bytes:
        state = decode_vring_state(msg.payload)
        if not 0 <= state.index < MAX_VRINGS:
            return encode_vring_state(VringState(state.index, 0))
        v = self.vrings[state.index]
        base = v.base
        if state.index < NUM_QUEUES:
            base = self.listener.vring_stop(state.index)
        v.started = False
        v.base = base
        if v.kick_fd is not None:
            self._retired.append(v.kick_fd)
            v.kick_fd = None
        return encode_vring_state(VringState(state.index, base))

    def _set_vring_kick(self, msg: Message) -> None:
        v, fd = self._ring_fd(msg)
        if v.kick_fd is not None:
            self._retired.append(v.kick_fd)
        v.kick_fd = fd
        v.started = True
        if fd is None:
            log.warning("%s: vring %d without kick fd (polling) is not supported", self.name, v.index)
        if v.index < NUM_QUEUES:
            self.listener.vring_changed(v.index)

    def _set_vring_call(self, msg: Message) -> None:
        v, fd = self._ring_fd(msg)
        if v.call_fd is not None:
            self._retired.append(v.call_fd)
        v.call_fd = fd
        if v.index < NUM_QUEUES:
            self.listener.vring_changed(v.index)

    def _set_vring_err(self, msg: Message) -> None:
        v, fd = self._ring_fd(msg)
        if v.err_fd is not None:
            self._retired.append(v.err_fd)
        v.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        state = decode_vring_state(msg.payload)
        if state.num not in (0, 1):
            raise RequestError(f"bad enable value {state.num}")
        v = self._vring(state.index)
        v.enabled = bool(state.num)
        if v.index < NUM_QUEUES:
            self.listener.vring_changed(v.index)

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(NUM_QUEUES)

    def _get_config(self, msg: Message) -> bytes:
        cfg = decode_config(msg.payload)
        space = self.listener.config_space()
        if cfg.offset + cfg.size > len(space) or cfg.size == 0:
            log.warning("%s: GET_CONFIG %d+%d outside config space", self.name, cfg.offset, cfg.size)
            return encode_config(ConfigMsg(cfg.offset, 0, cfg.flags, b""))
        return encode_config(ConfigMsg(cfg.offset, cfg.size, cfg.flags,
                                       space[cfg.offset:cfg.offset + cfg.size]))

    def _set_config(self, msg: Message) -> None:
        decode_config(msg.payload)
        raise RequestError("config space is read-only")


_HANDLERS = {
    GET_FEATURES: VhostUserSession._get_features,
    SET_FEATURES: VhostUserSession._set_features,
    GET_PROTOCOL_FEATURES: VhostUserSession._get_protocol_features,
    SET_PROTOCOL_FEATURES: VhostUserSession._set_protocol_features,
    SET_OWNER: VhostUserSession._set_owner,
    RESET_OWNER: VhostUserSession._reset,
    RESET_DEVICE: VhostUserSession._reset,
    SET_MEM_TABLE: VhostUserSession._set_mem_table,
    SET_VRING_NUM: VhostUserSession._set_vring_num,
    SET_VRING_ADDR: VhostUserSession._set_vring_addr,
    SET_VRING_BASE: VhostUserSession._set_vring_base,
    GET_VRING_BASE: VhostUserSession._get_vring_base,
    SET_VRING_KICK: VhostUserSession._set_vring_kick,
    SET_VRING_CALL: VhostUserSession._set_vring_call,
    SET_VRING_ERR: VhostUserSession._set_vring_err,
    SET_VRING_ENABLE: VhostUserSession._set_vring_enable,
    GET_QUEUE_NUM: VhostUserSession._get_queue_num,
    GET_CONFIG: VhostUserSession._get_config,
    SET_CONFIG: VhostUserSession._set_config,
}

__all__ = ["Message", "MessageReader", "ProtocolError", "RequestError", "SessionListener",
           "VhostUserSession", "VringAddr", "VringConfig", "VringState"]
