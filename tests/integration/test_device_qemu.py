"""A real QEMU (TCG) guest against VsockDevice: CID via GET_CONFIG, REQUEST -> RST through
both rings, a guest reset over QMP (one incident) and a stop/cont (a pause, no incident) after
which the device works again."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import tempfile
import threading
from pathlib import Path

import pytest

from vmlab.vsock import vhost_user as vu
from vmlab.vsock.device import VsockDevice

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.integration

CID = 42
HDR = struct.Struct("<QQIIIHHIII")     # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
OP_REQUEST, OP_RST = 1, 3


class RstHandler:
    """Every guest REQUEST is answered with RST (nobody listens on the host)."""

    def __init__(self) -> None:
        self.requests: list[tuple] = []
        self.resets: list[str] = []
        self.pending: list[bytes] = []
        self.lock = threading.Lock()

    def on_tx_packet(self, dev, header, payload):
        src_cid, dst_cid, src_port, dst_port, _len, typ, op, *_ = HDR.unpack(header)
        if op == OP_REQUEST:
            self.requests.append((src_cid, dst_cid, dst_port))
            self.pending.append(HDR.pack(dst_cid, src_cid, dst_port, src_port, 0, typ, OP_RST,
                                         0, 0, 0))
            self.on_rx_ready(dev)

    def on_rx_ready(self, dev):
        while self.pending:
            buf = dev.rx_pop()
            if buf is None:
                return
            dev.rx_push(buf, self.pending.pop(0), 0)

    def on_device_reset(self, dev, reason):
        self.resets.append(reason)
        self.pending.clear()


class Guest:
    """pexpect on QEMU's stdio serial console; commands end with an exit-status marker."""

    def __init__(self, child) -> None:
        self.child = child

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, list[dict]]:
        self.child.sendline(f"{cmd}; echo VU-END-$?")
        self.child.expect(r"VU-END-(\d+)\r*\n", timeout=timeout)
        out = self.child.before
        events = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
        return int(self.child.match.group(1)), events


@pytest.fixture
def qemu_device():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    from vmlab.image import ensure_image
    image = ensure_image()
    tmp = Path(tempfile.mkdtemp(prefix="vmlab-vu-it-"))
    loop = asyncio.new_event_loop()
    handler = RstHandler()
    dev = VsockDevice("it", CID, str(tmp / "it.vhost-user.sock"), loop, handler)
    dev.start()
    thread = threading.Thread(target=loop.run_forever, name="device-loop", daemon=True)
    thread.start()
    argv = ["-name", "helper-vhostuser-it", "-accel", "tcg", "-m", "256M", "-smp", "1",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine", "pc,memory-backend=mem", "-nodefaults", "-nographic", "-serial", "stdio",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
            "-chardev", f"socket,id=vu,path={dev.socket_path}",
            "-device", "vhost-user-vsock-pci,chardev=vu",
            "-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off"]
    child = pexpect.spawn("qemu-system-x86_64", argv, encoding="utf-8", timeout=180,
                          codec_errors="replace")
    try:
        child.expect("VMLAB-READY")
        yield dev, handler, Guest(child), tmp / "qmp.sock"
    finally:
        if child.isalive():
            os.kill(child.pid, signal.SIGKILL)
        child.close(force=True)
        assert not child.isalive(), "qemu left behind"
        loop.call_soon_threadsafe(dev.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


def connect_fails_fast(guest: Guest, port: int) -> None:
    rc, events = guest.run(f"vmlab-guest connect 2 {port}", timeout=30)
    errors = [e for e in events if e.get("event") == "error"]
    assert rc != 0 and errors, events
    assert errors[0]["errno"] in (104, 111), errors[0]      # ECONNRESET / ECONNREFUSED


def test_guest_sees_cid_and_rst_survives_reset(qemu_device):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    dev, handler, guest, qmp_path = qemu_device
    rc, events = guest.run("vmlab-guest info")
    assert rc == 0 and events[0]["cid"] == CID               # GET_CONFIG gave the CID
    session = dev._session
    assert session is not None
    assert session.has_feature(vu.VIRTIO_RING_F_EVENT_IDX)
    assert session.has_feature(vu.VIRTIO_RING_F_INDIRECT_DESC)

    connect_fails_fast(guest, 1234)
    assert handler.requests == [(CID, 2, 1234)]
    assert dev.stats["tx_packets"] >= 1 and dev.stats["rx_packets"] >= 1
    assert dev.broken is None

    qmp = QEMUMonitorProtocol(str(qmp_path))
    qmp.connect()
    try:
        qmp.cmd("system_reset")
        guest.child.expect("VMLAB-READY")
        assert handler.resets == ["guest reset the device"]  # one incident, not one per ring
        connect_fails_fast(guest, 1235)
        assert handler.requests[-1] == (CID, 2, 1235)
        assert len(handler.resets) == 1
        assert dev.broken is None
        qmp.cmd("stop")                                      # rings stop: a pause, no incident
        assert dev.paused and len(handler.resets) == 1       # QMP stop returns after GET_VRING_BASE
        qmp.cmd("cont")
        connect_fails_fast(guest, 1236)                      # and they run again after cont
        assert handler.requests[-1] == (CID, 2, 1236)
        assert len(handler.resets) == 1, handler.resets
        try:
            qmp.cmd("quit")
        except EOFError:
            pass                                             # QEMU may hang up before replying
    finally:
        try:
            qmp.close()
        except EOFError:
            pass
    guest.child.expect(pexpect.EOF, timeout=30)
