"""virtio_vsock_hdr codec and the op/type/flag constants (virtio spec 5.10.6).

One precompiled ``struct.Struct`` does all the work: the router parses every packet, so the
codec has to be cheap, and a single definition keeps the layout in exactly one place.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
# le32 flags, le32 buf_alloc, le32 fwd_cnt
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
assert HEADER_SIZE == 44

U32_MASK = 0xFFFFFFFF

VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF

MAX_PKT_PAYLOAD = 64 * 1024  # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: Linux never sends more per packet


class Type(enum.IntEnum):
    STREAM = 1
    SEQPACKET = 2


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


# SHUTDOWN flags
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

# SEQPACKET RW flags
SEQ_EOM = 1
SEQ_EOR = 2


@dataclass(slots=True)
class Header:
    """A decoded virtio_vsock_hdr; ``len`` is the payload length that follows it."""

    src_cid: int = 0
    dst_cid: int = 0
    src_port: int = 0
    dst_port: int = 0
    len: int = 0
    type: int = Type.STREAM
    op: int = Op.INVALID
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "Header":
        return cls(*HEADER.unpack_from(buf, offset))

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        HEADER.pack_into(buf, offset, self.src_cid, self.dst_cid, self.src_port,
                         self.dst_port, self.len, self.type, self.op, self.flags,
                         self.buf_alloc, self.fwd_cnt)

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                           self.len, self.type, self.op, self.flags, self.buf_alloc,
                           self.fwd_cnt)

    def copy(self, **changes: int) -> "Header":
        h = Header(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                   self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)
        for k, v in changes.items():
            setattr(h, k, v)
        return h

    def reply(self, op: int, **changes: int) -> "Header":
        """A header going back to this packet's sender (ports/cids swapped, no payload)."""
        h = Header(self.dst_cid, self.src_cid, self.dst_port, self.src_port, 0, self.type, op)
        for k, v in changes.items():
            setattr(h, k, v)
        return h

    def describe(self) -> str:
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op{self.op}"
        return (f"{op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
                f"len={self.len} type={self.type} flags={self.flags:#x} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}")


def rst_for(hdr: Header) -> Header:
    """The RST Linux sends for a packet that has no socket (virtio_transport_reset_no_sock)."""
    return hdr.reply(Op.RST)
