"""A host <-> guest stream connection survives a QMP stop/cont (as with kernel vhost-vsock),
while a guest reset (QMP system_reset) still resets it and new connections work afterwards.

Uses only the public lab API; on the vhost-user transport the backend's counters also show
that stop/cont did not reset anything.
"""
from __future__ import annotations

import hashlib
import socket
import time

import pytest

from vmlab.guest import GuestHelper
from vmlab.lab import Lab
from vmlab.scenario import VmSpec, inline_scenario
from vmlab.vsock.host import host_connect

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab():
    with Lab(inline_scenario(vms=[VmSpec(name="g")], transport="vhost-user")) as lab:
        yield lab


def vm_resets(lab) -> int | None:
    if lab.backend is None:                    # kernel vhost-vsock: no backend to ask
        return None
    return lab.backend.control({"cmd": "stats"})["stats"].get("vm_resets", 0)


def wait_received(proc, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc.refresh()
        if proc.received_data() == text:
            return
        assert not proc.finished, proc.summary()
        assert proc.received_data() == text[:len(proc.received_data())], proc.received_data()
        assert time.monotonic() < deadline, f"guest got {proc.received_data()!r}, want {text!r}"
        time.sleep(0.25)


def test_stream_survives_stop_cont(lab):
    vm = lab.vm("g")
    resets = vm_resets(lab)
    listener = GuestHelper(vm).listen(5000, chunk=64, echo=True)
    conn = host_connect(vm.cid, 5000, endpoint=vm.endpoint(), timeout=30)
    conn.settimeout(60)
    try:
        before = b"before the pause|"
        during = b"".join(b"during the pause %04d|" % i for i in range(60))   # ~1.3 KiB
        after = b"after the resume|"
        conn.sendall(before)
        assert conn.recv_exact(len(before)) == before          # echoed: both rings work
        wait_received(listener, before.decode())

        mark = len(vm.qmp.events)
        vm.qmp.stop()
        vm.qmp.wait_event("STOP", timeout=10, since=mark)
        assert vm.qmp.status() == "paused"
        conn.sendall(during)                                   # queued while the VM is paused
        time.sleep(1)
        assert vm.qmp.status() == "paused"
        vm.qmp.cont()
        assert vm.qmp.status() == "running"
        conn.sendall(after)

        rest = during + after
        assert conn.recv_exact(len(rest)) == rest              # same connection, in order
        conn.shutdown_write()                                  # listener sees EOF and exits
        listener.wait(60)
        sent = before + rest
        assert listener.received_data() == sent.decode()
        assert listener.received_bytes() == len(sent)
        assert listener.sha256() == hashlib.sha256(sent).hexdigest()
        assert not listener.errors()
        assert conn.recv(1) == b""                             # the guest closed after EOF
    finally:
        conn.close()
        if vm.qmp.status() == "paused":                        # never leave the VM stopped
            vm.qmp.cont()
    if resets is not None:
        assert vm_resets(lab) == resets                        # stop/cont reset nothing


def test_system_reset_resets_the_connection_and_new_ones_work(lab):
    vm = lab.vm("g")
    resets = vm_resets(lab)
    GuestHelper(vm).listen(5001, echo=True)
    conn = host_connect(vm.cid, 5001, endpoint=vm.endpoint(), timeout=30)
    try:
        conn.settimeout(60)
        conn.sendall(b"ping")
        assert conn.recv_exact(4) == b"ping"
        mark = len(vm.qmp.events)
        vm.qmp.system_reset()
        vm.qmp.wait_event("RESET", timeout=10, since=mark)
        vm.wait_ready(240)
        # The old connection is gone: EOF or ECONNRESET, never a hang (timeout -> failure).
        try:
            assert conn.recv(100) == b""
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail("host side of the connection hangs after the guest reset")
    finally:
        conn.close()
    if resets is not None:
        assert vm_resets(lab) == resets + 1                    # exactly one device reset

    listener = GuestHelper(vm).listen(5002, echo=True)
    conn = host_connect(vm.cid, 5002, endpoint=vm.endpoint(), timeout=30)
    try:
        conn.settimeout(60)
        conn.sendall(b"after the reboot")
        assert conn.recv_exact(16) == b"after the reboot"
        conn.shutdown_write()
        listener.wait(60)
        assert listener.received_bytes() == 16 and not listener.errors()
    finally:
        conn.close()
