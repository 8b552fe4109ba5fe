"""The in-guest helper (`/bin/vmlab-guest`, images/guest/) driven over the serial console.

Helper processes run in the guest's background and log JSON lines to a file; `GuestProcess`
reads that file back over the console, so one console serves any number of guest endpoints.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import time
from typing import Any

from vmlab.endpoints import Endpoint
from vmlab.scenario import VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_PORT_ANY

GUEST_HELPER = "vmlab-guest"
"""Found on the guest's PATH: /bin/vmlab-guest in the busybox image, /run/vmlab/bin/vmlab-guest
with rootfs: host (the host's /bin is read-only)."""
POLL_INTERVAL = 0.25
_counter = itertools.count(1)


class GuestHelperError(RuntimeError):
    """The helper could not be started or did not do what was asked in time."""


class GuestProcess(Endpoint):
    """One background vmlab-guest process in a VM."""

    def __init__(self, id: str, kind: str, vm: Any) -> None:
        super().__init__(id=id, kind=kind, vm=vm.name)
        self.handle = vm
        self.log_path = f"/tmp/vmlab-ep-{re.sub(r'[^A-Za-z0-9_.-]', '_', id)}.jsonl"
        self.pid: int | None = None

    def start(self, argv: list[str]) -> "GuestProcess":
        cmd = " ".join(shlex.quote(a) for a in argv)
        rc, out = self.handle.run(f"{cmd} >{self.log_path} 2>&1 & echo PID=$!")
        match = re.search(r"PID=(\d+)", out)
        if rc != 0 or not match:
            raise GuestHelperError(f"{self.vm}: could not start `{cmd}`: exit {rc}: {out.strip()}")
        self.pid = int(match.group(1))
        return self

    def refresh(self) -> None:
        if self.finished:
            return
        # Liveness first, then the log: a helper that exits in between has then written all of it.
        _, out = self.handle.run(f"kill -0 {self.pid} 2>/dev/null; alive=$?; cat {self.log_path}; "
                                 f"[ $alive = 0 ] || echo '<<EXITED>>'")
        events = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    events.append({"event": "garbled", "line": line})
            elif line and line != "<<EXITED>>":
                events.append({"event": "output", "line": line})
        with self.cond:
            self.events = events
            if "<<EXITED>>" in out:
                self.events.append({"event": "exited"})
                self.finished = True
            self.cond.notify_all()

    def wait_change(self, timeout: float) -> None:
        time.sleep(min(timeout, POLL_INTERVAL))

    def wait_for(self, event: str, timeout: float = 30.0) -> "GuestProcess":
        """Poll until the helper reported `event` (or exited); raises with what it saw otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if self.has(event):
                return self
            if self.finished or time.monotonic() > deadline:
                raise GuestHelperError(f"{self.vm}/{self.id}: no {event!r} event "
                                       f"({'helper exited' if self.finished else f'after {timeout:g}s'}): {self.summary()}")
            self.wait_change(deadline - time.monotonic())

    def wait(self, timeout: float = 60.0) -> "GuestProcess":
        """Wait for the helper to exit."""
        return self.wait_for("exited", timeout)

    def stop(self) -> None:
        if self.pid and not self.finished:
            self.handle.run(f"kill {self.pid} 2>/dev/null; true")


def port_arg(port: int | str) -> str:
    return "any" if port in (VMADDR_PORT_ANY, -1, "any") else str(port)


def cid_arg(cid: int | str) -> str:
    if cid in (VMADDR_CID_ANY, -1, "any"):
        return "any"
    return "2" if cid in ("host", VMADDR_CID_HOST) else str(cid)


def listen_argv(port: int | str, *, cid: int | str = "any", type: str = "stream", once: bool = True,
                echo: bool = False, chunk: int | None = None, expect_bytes: int | None = None,
                send: str | None = None, no_read: bool = False, timeout: float | None = None) -> list[str]:
    argv = [GUEST_HELPER, "listen", port_arg(port), "--cid", cid_arg(cid)]
    argv += ["--send", send] if send is not None else []
    argv += ["--seqpacket"] if type == "seqpacket" else []
    argv += ["--once"] if once else []
    argv += ["--echo"] if echo else []
    argv += ["--chunk", str(chunk)] if chunk else []
    argv += ["--expect-bytes", str(expect_bytes)] if expect_bytes is not None else []
    argv += ["--no-read"] if no_read else []           # accept, then never read (a stalled peer)
    argv += ["--timeout", f"{timeout:g}"] if timeout is not None else []
    return argv


def flood_argv(cid: int | str, port: int | str, *, count: int = 1000, hold: float = 30.0,
               timeout: float = 10.0) -> list[str]:
    return [GUEST_HELPER, "flood", cid_arg(cid), port_arg(port), "--count", str(count),
            "--hold", f"{hold:g}", "--timeout", f"{timeout:g}"]


def connect_argv(cid: int | str, port: int | str, *, type: str = "stream", send: str | list[str] | None = None,
                 send_bytes: int | None = None, send_file: str | None = None, recv: bool = False,
                 recv_bytes: int | None = None, timeout: float = 30.0, chunk: int | None = None) -> list[str]:
    argv = [GUEST_HELPER, "connect", cid_arg(cid), port_arg(port)]
    argv += ["--seqpacket"] if type == "seqpacket" else []
    if send is not None:
        for message in [send] if isinstance(send, str) else send:
            argv += ["--send", message]
    elif send_bytes is not None:
        argv += ["--send-bytes", str(send_bytes)]
    elif send_file is not None:
        argv += ["--send-file", str(send_file)]
    argv += ["--recv"] if recv else []
    argv += ["--recv-bytes", str(recv_bytes)] if recv_bytes is not None else []
    if recv and recv_bytes is None:
        argv.append("--shutdown")  # half-close after sending, so the peer (e.g. an echo server) sees EOF
    argv += ["--chunk", str(chunk)] if chunk else []
    argv += ["--timeout", str(int(max(1, timeout)))]
    return argv


class GuestHelper:
    """`guest(vm).listen(5000)`, `guest(vm).connect(2, 9999, send="hi")`: vsock work inside a VM."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm

    def info(self) -> dict:
        rc, out = self.vm.run(f"{GUEST_HELPER} info")
        for line in out.splitlines():
            if line.startswith("{"):
                return json.loads(line)
        raise GuestHelperError(f"{self.vm.name}: vmlab-guest info printed nothing useful (exit {rc}): {out!r}")

    def listen(self, port: int | str, *, id: str | None = None, timeout: float = 30.0, **kwargs: Any) -> GuestProcess:
        """Start a listener in the background and return once it is listening."""
        proc = GuestProcess(id or f"listen-{next(_counter)}", "guest_listen", self.vm)
        proc.start(listen_argv(port, **kwargs))
        return proc.wait_for("listening", timeout)

    def flood(self, cid: int | str, port: int | str, *, id: str | None = None, count: int = 1000,
              hold: float = 30.0, timeout: float = 10.0) -> GuestProcess:
        """Open `count` connections at once and hold the ones that got through for `hold` s; returns
        once the `flood` event (attempted, connected, reset, timedout, other) is there."""
        proc = GuestProcess(id or f"flood-{next(_counter)}", "guest_flood", self.vm)
        proc.start(flood_argv(cid, port, count=count, hold=hold, timeout=timeout))
        return proc.wait_for("flood", timeout + 60 + count / 50)

    def connect(self, cid: int | str, port: int | str, *, id: str | None = None, wait: bool = True,
                timeout: float = 60.0, **kwargs: Any) -> GuestProcess:
        """Connect out (to the host, CID 2, or another VM's CID); waits for the helper to exit by default."""
        proc = GuestProcess(id or f"connect-{next(_counter)}", "guest_connect", self.vm)
        proc.start(connect_argv(cid, port, timeout=timeout, **kwargs))
        return proc.wait(timeout + 5) if wait else proc
