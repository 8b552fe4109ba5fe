"""The backend's control socket: JSON lines over a Unix stream socket, served by the event loop.

One request per line, one JSON reply per line; the handler never raises into the loop (errors
come back as {"ok": false, "error": ...}), so a bad request cannot take the backend down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any, Callable

from vmlab.vsock.unixsock import listen_unix

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, loop: asyncio.AbstractEventLoop, path: str,
                 handler: Callable[[dict], dict]) -> None:
        self.loop = loop
        self.path = path
        self.handler = handler
        self.sock: socket.socket | None = None
        self.clients: dict[socket.socket, bytearray] = {}

    def start(self) -> None:
        s = listen_unix(self.path, backlog=16)     # 0600, leftover socket replaced, no symlink
        self.sock = s
        self.loop.add_reader(s.fileno(), self._accept)

    def close(self) -> None:
        for c in list(self.clients):
            self._drop(c)
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            c, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        c.setblocking(False)
        self.clients[c] = bytearray()
        self.loop.add_reader(c.fileno(), self._read, c)

    def _drop(self, c: socket.socket) -> None:
        self.clients.pop(c, None)
        try:
            self.loop.remove_reader(c.fileno())
        except (ValueError, OSError):
            pass
        c.close()

    def _read(self, c: socket.socket) -> None:
        try:
            data = c.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._drop(c)
        if not data:
            return self._drop(c)
        buf = self.clients[c]
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self.dispatch(line)
            try:
                c.setblocking(True)           # replies are small; the client is waiting
                c.settimeout(2)
                c.sendall(json.dumps(reply, default=str).encode() + b"\n")
                c.setblocking(False)
            except OSError:
                return self._drop(c)
        if len(buf) > MAX_REQUEST:
            self._drop(c)

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
            return self.handler(req)
        except Exception as e:                # never into the loop
            log.warning("control request %r failed: %s", line[:200], e)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
