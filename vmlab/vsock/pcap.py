"""pcap writer for LINKTYPE_VSOCK (271), the format of Linux's vsockmon tap device.

Each record is ``struct af_vsockmon_hdr`` (include/uapi/linux/vsockmon.h) followed by the
44-byte virtio_vsock_hdr and the payload, which is exactly what Wireshark's vsock dissector
decodes; so a capture from the backend reads like one taken on a real host's vsockmon0.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from pathlib import Path
from typing import BinaryIO, Iterable

from vmlab.vsock.packet import HEADER_SIZE, Header, Op

LINKTYPE_VSOCK = 271
PCAP_MAGIC = 0xA1B2C3D4

AF_VSOCK_OP_UNKNOWN = 0
AF_VSOCK_OP_CONNECT = 1
AF_VSOCK_OP_DISCONNECT = 2
AF_VSOCK_OP_CONTROL = 3
AF_VSOCK_OP_PAYLOAD = 4
AF_VSOCK_TRANSPORT_VIRTIO = 2

_GLOBAL = struct.Struct("<IHHiIII")      # magic, v2, v4, thiszone, sigfigs, snaplen, linktype
_RECORD = struct.Struct("<IIII")         # ts_sec, ts_usec, incl_len, orig_len
_MONHDR = struct.Struct("<QQIIHHH2x")    # af_vsockmon_hdr, 32 bytes
assert _MONHDR.size == 32

# the same mapping Linux uses in virtio_transport_build_skb()
_OPMAP = {
    Op.REQUEST: AF_VSOCK_OP_CONNECT, Op.RESPONSE: AF_VSOCK_OP_CONNECT,
    Op.RST: AF_VSOCK_OP_DISCONNECT, Op.SHUTDOWN: AF_VSOCK_OP_DISCONNECT,
    Op.RW: AF_VSOCK_OP_PAYLOAD,
    Op.CREDIT_UPDATE: AF_VSOCK_OP_CONTROL, Op.CREDIT_REQUEST: AF_VSOCK_OP_CONTROL,
}


F_SETPIPE_SZ = 1031


def _open_output(path: Path) -> tuple[BinaryIO, bool]:
    """(file, live): a regular file, or a FIFO/pipe a reader (wireshark -k -i -) already has
    open. Live outputs are flushed per packet; a FIFO without a reader is an error, not a hang."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
    except OSError as e:
        if e.errno == 6:                       # ENXIO
            raise OSError(e.errno, f"{path}: a FIFO with no reader (start the reader first, "
                                   "e.g. `wireshark -k -i FIFO`)") from None
        raise
    mode = os.fstat(fd).st_mode
    live = stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    if stat.S_ISFIFO(mode):
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)   # room for bursts while the reader lags
        except OSError:
            pass
    return os.fdopen(fd, "wb"), live


class PcapWriter:
    """Appends vsock packets to a pcap file, FIFO or pipe; ``snaplen`` caps the stored payload
    per packet. A live output (FIFO, pipe) is flushed after every packet, so a reader sees each
    packet as it happens; a slow reader slows the lab down (the pipe fills up) rather than
    losing packets."""

    def __init__(self, path: str | Path, snaplen: int = 65535) -> None:
        self.path = Path(path)
        self.snaplen = max(snaplen, _MONHDR.size + HEADER_SIZE)
        self.packets = 0
        f, self.live = _open_output(self.path)
        self._f: BinaryIO | None = f
        f.write(_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, self.snaplen, LINKTYPE_VSOCK))
        if self.live:
            f.flush()

    def write(self, hdr: Header, payload: Iterable[bytes | memoryview] = (),
              payload_len: int | None = None, ts: float | None = None) -> None:
        """Record one packet; ``payload`` may be memoryviews into guest memory (copied here)."""
        f = self._f
        if f is None:
            return
        views = list(payload)
        total = sum(len(v) for v in views) if payload_len is None else payload_len
        room = self.snaplen - _MONHDR.size - HEADER_SIZE
        parts: list[bytes | memoryview] = []
        for v in views:
            if room <= 0:
                break
            part = v[:room]
            parts.append(part)
            room -= len(part)
        incl = _MONHDR.size + HEADER_SIZE + sum(len(p) for p in parts)
        orig = _MONHDR.size + HEADER_SIZE + total
        t = time.time() if ts is None else ts
        sec = int(t)
        f.write(_RECORD.pack(sec, int((t - sec) * 1e6), incl, orig))
        f.write(_MONHDR.pack(hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port,
                             _OPMAP.get(hdr.op, AF_VSOCK_OP_UNKNOWN),
                             AF_VSOCK_TRANSPORT_VIRTIO, HEADER_SIZE))
        f.write(hdr.pack())
        for p in parts:
            f.write(p)
        self.packets += 1
        if self.live:
            f.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
