"""Leftover socket files: the backend replaces its own, a host listener never steals a live one."""

import socket

import pytest

from vmlab.vsock.unixsock import is_stale_socket, listen_unix


def test_a_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "s")
    listen_unix(path).close()          # closing leaves the file behind, as a crash would
    with listen_unix(path) as again:
        assert again.getsockname() == path


def test_a_regular_file_is_never_removed(tmp_path):
    path = tmp_path / "f"
    path.write_text("not a socket")
    with pytest.raises(OSError):
        listen_unix(str(path))
    assert path.read_text() == "not a socket"


def test_host_policy_keeps_a_live_listener_and_replaces_a_dead_one(tmp_path):
    path = str(tmp_path / "h")
    live = listen_unix(path, socket.SOCK_SEQPACKET)
    assert not is_stale_socket(path)
    with pytest.raises(OSError):
        listen_unix(path, replace=is_stale_socket)
    live.close()
    assert is_stale_socket(path)
    with listen_unix(path, replace=is_stale_socket) as replaced:
        assert replaced.getsockname() == path
