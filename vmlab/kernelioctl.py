"""The host kernel's KVM and vhost-vsock ioctls: numbers and the small probes built on them.

Both `vmlab check` (hostcheck) and the CID allocator (cids) ask /dev/vhost-vsock questions; this
module is the one lower place that knows how, so neither has to import the other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Optional

# --- ioctl numbers (asm-generic/ioctl.h) -------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


_U64 = struct.calcsize("Q")
KVMIO = 0xAE
VHOST_VIRTIO = 0xAF
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, _U64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, _U64)

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
VIRTIO_VSOCK_F_SEQPACKET = 1

KVM_DEV = "/dev/kvm"
VHOST_VSOCK_DEV = "/dev/vhost-vsock"


def open_vhost_vsock() -> int:
    """A new /dev/vhost-vsock fd (O_RDWR, close-on-exec); raises OSError like os.open."""
    return os.open(VHOST_VSOCK_DEV, os.O_RDWR | os.O_CLOEXEC)


def vhost_vsock_features(fd: int) -> int:
    buf = fcntl.ioctl(fd, VHOST_GET_FEATURES, bytes(_U64))
    return struct.unpack("Q", buf)[0]


def probe_vhost_vsock_features() -> int:
    """Open /dev/vhost-vsock and ask for its features; OSError if either step fails."""
    fd = open_vhost_vsock()
    try:
        return vhost_vsock_features(fd)
    finally:
        os.close(fd)


def vhost_vsock_works() -> bool:
    try:
        probe_vhost_vsock_features()
    except OSError:
        return False
    return True


def kernel_cid_in_use(cid: int) -> Optional[str]:
    """Ask vhost-vsock whether a running VM owns `cid`; a reason string if so, else None."""
    try:
        fd = open_vhost_vsock()
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, VHOST_SET_OWNER)
        fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("Q", cid))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return "a VM outside vmlab (the vhost-vsock kernel driver reports EADDRINUSE)"
        return None
    finally:
        os.close(fd)
    return None
