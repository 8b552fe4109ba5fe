"""The LINKTYPE_VSOCK writer, decoded by the real tshark."""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmlab.vsock.packet import Header, Op, Type
from vmlab.vsock.pcap import LINKTYPE_VSOCK, PcapWriter


def _write_sample(path: Path, snaplen: int = 65535) -> None:
    with PcapWriter(path, snaplen=snaplen) as w:
        w.write(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.REQUEST, 0, 262144, 0))
        payload = memoryview(bytearray(b"Hello, world!"))
        w.write(Header(3, 2, 1025, 9999, 13, Type.STREAM, Op.RW, 0, 262144, 0), [payload])
        w.write(Header(2, 3, 9999, 1025, 0, Type.STREAM, Op.RST))


def test_file_layout(tmp_path: Path) -> None:
    p = tmp_path / "a.pcap"
    _write_sample(p, snaplen=32 + 44 + 5)
    raw = p.read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, LINKTYPE_VSOCK)
    off = 24 + 16 + 32 + 44                      # skip the REQUEST record
    incl, orig = struct.unpack_from("<II", raw, off + 8)
    assert (incl, orig) == (32 + 44 + 5, 32 + 44 + 13)   # snaplen cuts the payload
    assert raw[off + 16 + 76: off + 16 + 81] == b"Hello"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_decodes_vsock_fields(tmp_path: Path) -> None:
    p = tmp_path / "b.pcap"
    _write_sample(p)
    out = subprocess.run(["tshark", "-r", str(p), "-V"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.count("Frame ") >= 3
    assert "Source cid: 3" in out
    assert "Destination port: 9999" in out
    fields = subprocess.run(
        ["tshark", "-r", str(p), "-T", "fields", "-e", "vsock.src_cid", "-e", "vsock.dst_port",
         "-e", "vsock.op", "-e", "vsock.virtio.op"],
        capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    rows = [line.split("\t") for line in fields if line]
    assert rows[0][:3] == ["3", "9999", "1"]       # CONNECT
    assert rows[1][:3] == ["3", "9999", "4"]       # PAYLOAD
    assert rows[2][:3] == ["2", "1025", "2"]       # DISCONNECT
    assert [r[3] for r in rows] == ["1", "5", "3"]  # virtio ops REQUEST, RW, RST


def test_fifo_output_is_live_and_a_fifo_without_reader_is_a_clear_error(tmp_path: Path) -> None:
    import os
    fifo = tmp_path / "live.pcap"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="FIFO with no reader"):
        PcapWriter(fifo)
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        w = PcapWriter(fifo)
        assert w.live
        w.write(Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.REQUEST))
        got = os.read(rd, 4096)                 # already there: flushed per packet
        assert len(got) == 24 + 16 + 32 + 44
        assert struct.unpack_from("<I", got)[0] == 0xA1B2C3D4
        w.close()
    finally:
        os.close(rd)
