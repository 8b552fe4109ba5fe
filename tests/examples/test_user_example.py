"""Written the way a vmlab user writes tests: only the plugin's fixtures, no vmlab imports.

Most tests share one lab of two guests (module_lab + VMLAB_SCENARIO), so they cost one boot.
Run them on either transport: `pytest --vmlab-transport vhost-user|vhost`; the VM<->VM test pins
vhost-user, which is the transport that can route between guests.
"""

import pytest

pytestmark = pytest.mark.integration

VMLAB_SCENARIO = [{"name": "a"}, {"name": "b"}]   # CIDs come from the host-wide allocator


def test_guest_to_host(module_lab, vsock_listen, guest):
    a = module_lab.vm("a")
    with vsock_listen(a, 9999) as server:
        client = guest(a).connect(2, 9999, send="Hello, world!")
        assert client.errors() == [], client.summary()
        with server.accept(timeout=30) as conn:
            assert conn.recv_all() == b"Hello, world!"


def test_host_to_guest(module_lab, vsock_connect, guest):
    b = module_lab.vm("b")
    server = guest(b).listen(5000, chunk=64)
    with vsock_connect(b, 5000) as conn:
        conn.sendall(b"Hello, guest!")
    server.wait(timeout=30)
    assert server.received_data() == "Hello, guest!"
    assert server.received_bytes() == 13


@pytest.mark.vmlab(vms=[{"name": "a"}, {"name": "b"}], transport="vhost-user")
def test_vm_to_vm(lab, guest):
    # VM<->VM needs vmlab's backend: the kernel's vhost-vsock does not route between guests.
    a, b = lab.vm("a"), lab.vm("b")
    assert a.cid != b.cid and a.cid > 2 and b.cid > 2
    server = guest(a).listen(5001, chunk=64)
    client = guest(b).connect(a.cid, 5001, send="from b to a")
    assert client.errors() == [], client.summary()
    server.wait(timeout=30)
    assert server.messages() == ["from b to a"]


def test_guest_knows_its_cid(module_lab, guest):
    for vm in module_lab.vms:
        assert guest(vm).info()["cid"] == vm.cid


@pytest.mark.vmlab(vms=[{"name": "solo", "memory_mib": 192}])
def test_marker_lab_and_vm_fixture(lab, vm):
    assert vm.name == "solo" and lab.vms == [vm]
    assert vm.check("grep MemTotal /proc/meminfo").split()[1].isdigit()
    assert vm.qmp.status() == "running"
