"""Listening Unix sockets for the backend and the host API, with one rule for leftover files.

A socket file left by a crashed run would make bind() fail with EADDRINUSE. Each caller says
which leftovers are its to replace: the backend owns the paths in its private run dir (any socket
file there is stale), while a host listener must never steal a path another live listener uses.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Callable


def is_socket_file(path: str) -> bool:
    """There is a Unix socket file (not a regular file or directory) at `path`."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def is_stale_socket(path: str) -> bool:
    """A socket file nobody listens on any more (probed with a stream and a seqpacket connect)."""
    if not is_socket_file(path):
        return False
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
                return False
            except ConnectionRefusedError:
                continue
            except OSError as e:
                if e.errno == errno.EPROTOTYPE:
                    continue
                return False
    return True


def listen_unix(path: str, kind: int = socket.SOCK_STREAM, backlog: int = 128,
                replace: Callable[[str], bool] = is_socket_file) -> socket.socket:
    """A non-blocking, close-on-exec listening socket at `path`, mode 0600; a leftover file at
    `path` is removed first when `replace(path)` says so. A symlink there is refused: someone
    planted it (bind never follows one, but nothing here should look as if it did)."""
    if os.path.islink(path):
        raise OSError(errno.ELOOP, f"refusing to listen at {path}: it is a symlink")
    if replace(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        os.chmod(path, 0o600)               # only our user (QEMU, tests) may connect
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s
