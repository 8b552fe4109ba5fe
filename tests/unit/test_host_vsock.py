"""The vhost (AF_VSOCK) side of the host API, as far as it can run without a guest: binding.

AF_VSOCK ports are host-wide, so parallel labs must wait for each other's ports instead of
failing. Nothing here connects anywhere: it only binds and listens on the local vsock.
"""

import socket
import threading
import time

import pytest

from vmlab.vsock.host import HostEndpoint, host_listen

VHOST = HostEndpoint(transport="vhost", vm_name="x", cid=4321, uds_path=None)


@pytest.fixture(autouse=True)
def need_af_vsock():
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        probe.close()
    except OSError as exc:
        pytest.skip(f"this kernel cannot bind AF_VSOCK sockets: {exc}")


def test_busy_port_fails_at_once_without_busy_timeout():
    with host_listen(socket.VMADDR_PORT_ANY, vms=[VHOST]) as first:
        assert 0 < first.port < socket.VMADDR_PORT_ANY
        with pytest.raises(OSError) as info:
            host_listen(first.port, vms=[VHOST])
        assert info.value.errno == 98  # EADDRINUSE


def test_busy_port_is_waited_for_when_asked():
    first = host_listen(socket.VMADDR_PORT_ANY, vms=[VHOST])
    port = first.port
    threading.Timer(0.5, first.close).start()
    started = time.monotonic()
    with host_listen(port, vms=[VHOST], busy_timeout=20) as second:
        assert second.port == port
    assert time.monotonic() - started >= 0.4


def test_closed_listener_accept_raises_oserror():
    listener = host_listen(socket.VMADDR_PORT_ANY, vms=[VHOST])
    listener.close()
    with pytest.raises(OSError):
        listener.accept(timeout=0.1)
