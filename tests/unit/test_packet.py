"""The virtio_vsock_hdr codec against hand-assembled bytes."""

import struct

import pytest

from vmlab.vsock.packet import HEADER_SIZE, Header, Op, Type, rst_for, SEQ_EOM


def test_header_is_44_bytes_little_endian() -> None:
    h = Header(src_cid=3, dst_cid=2, src_port=1025, dst_port=9999, len=13,
               type=Type.STREAM, op=Op.RW, flags=0, buf_alloc=262144, fwd_cnt=7)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 44
    expected = (struct.pack("<Q", 3) + struct.pack("<Q", 2) + struct.pack("<I", 1025)
                + struct.pack("<I", 9999) + struct.pack("<I", 13) + struct.pack("<H", 1)
                + struct.pack("<H", 5) + struct.pack("<I", 0) + struct.pack("<I", 262144)
                + struct.pack("<I", 7))
    assert raw == expected


def test_roundtrip_with_offset_and_max_values() -> None:
    h = Header(2**64 - 1, 2**32 - 1, 2**32 - 1, 0, 65536, Type.SEQPACKET, Op.CREDIT_REQUEST,
               SEQ_EOM, 2**32 - 1, 2**32 - 1)
    buf = bytearray(4 + HEADER_SIZE)
    h.pack_into(buf, 4)
    assert Header.unpack_from(buf, 4) == h
    assert Header.unpack_from(memoryview(bytes(buf))[4:]) == h


def test_unpack_short_buffer_raises() -> None:
    with pytest.raises(struct.error):
        Header.unpack_from(b"\0" * 43)


def test_reply_swaps_addresses() -> None:
    h = Header(3, 2, 1234, 80, 10, Type.STREAM, Op.REQUEST, 0, 5, 6)
    r = rst_for(h)
    assert (r.src_cid, r.dst_cid, r.src_port, r.dst_port) == (2, 3, 80, 1234)
    assert (r.op, r.len, r.type, r.buf_alloc) == (Op.RST, 0, Type.STREAM, 0)
    c = h.copy(len=3)
    assert c.len == 3 and h.len == 10
    assert "REQUEST 3:1234->2:80" in h.describe()
