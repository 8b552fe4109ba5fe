"""Synchronous QMP control of one QEMU, built on the asyncio `qemu.qmp` library.

`qemu.qmp.QMPClient` is asyncio-only; vmlab's lab, CLI and pytest fixtures are synchronous. A private
event loop in a daemon thread runs the client, collects every event into a JSON-lines log (the
"QMP log" kept as a test artifact) and lets callers wait for events with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Mapping

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

log = logging.getLogger("vmlab.qmp")


class QmpFailure(RuntimeError):
    """A QMP command failed, timed out, or QEMU was unreachable; the message says which and why."""


class Qmp:
    """One QMP connection. All methods block with a timeout and raise QmpFailure on trouble."""

    def __init__(self, socket_path: Path, log_path: Path, name: str = "vm") -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.name = name
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._client: QMPClient | None = None
        self._event_task: asyncio.Future | None = None
        self._logfile = open(log_path, "a", buffering=1)
        self._thread.start()

    # -- plumbing -------------------------------------------------------------------------
    def _call(self, coro, timeout: float, what: str) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise QmpFailure(f"{self.name}: QMP {what} timed out after {timeout:g}s") from None

    def _log(self, kind: str, payload: Any) -> None:
        if not self._logfile.closed:
            self._logfile.write(json.dumps({"t": round(time.time(), 6), kind: payload}) + "\n")

    async def _pump_events(self) -> None:
        assert self._client is not None
        async for event in self._client.events:
            record = dict(event)
            self._log("event", record)
            with self._cond:
                self.events.append(record)
                self._cond.notify_all()

    # -- connection -----------------------------------------------------------------------
    def connect(self, timeout: float = 10.0, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect and negotiate capabilities; retries until QEMU has created its socket."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not alive():
                raise QmpFailure(f"{self.name}: QEMU exited before QMP was reachable")
            if self.socket_path.exists():
                client = QMPClient(self.name)
                try:
                    self._call(client.connect(str(self.socket_path)), max(0.5, deadline - time.monotonic()), "connect")
                    self._client = client
                    self._event_task = asyncio.run_coroutine_threadsafe(self._pump_events(), self._loop)
                    self._log("connected", str(self.socket_path))
                    return
                except (ConnectError, OSError, QmpFailure) as exc:
                    last = exc
            time.sleep(0.01)
        raise QmpFailure(f"{self.name}: could not connect to QMP at {self.socket_path}: {last or 'socket never appeared'}")

    def close(self) -> None:
        """Disconnect and stop the loop thread; idempotent."""
        if self._client is not None:
            client, self._client = self._client, None
            try:
                self._call(client.disconnect(), 3.0, "disconnect")
            except Exception:  # noqa: BLE001 - QEMU gone already (EOFError etc.) is the usual case
                pass
        if self._event_task is not None:
            task, self._event_task = self._event_task, None
            task.cancel()
            try:
                self._call(asyncio.sleep(0), 1.0, "drain")  # lets the cancelled pump finish in its loop
            except QmpFailure:
                pass
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(3.0)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        self._logfile.close()

    # -- commands -------------------------------------------------------------------------
    def execute(self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command and return its result."""
        if self._client is None:
            raise QmpFailure(f"{self.name}: QMP is not connected (command {command!r})")
        self._log("command", {"execute": command, "arguments": dict(arguments or {})})
        try:
            result = self._call(self._client.execute(command, arguments), timeout, command)
        except ExecuteError as exc:
            self._log("error", {"execute": command, "error": str(exc)})
            raise QmpFailure(f"{self.name}: QMP {command} failed: {exc}") from None
        except QMPError as exc:
            self._log("error", {"execute": command, "error": repr(exc)})
            raise QmpFailure(f"{self.name}: QMP {command} failed: {exc!r} (did QEMU exit?)") from None
        self._log("return", {"execute": command, "return": result})
        return result

    def status(self) -> str:
        """The run state: 'running', 'paused', 'shutdown', ..."""
        return str(self.execute("query-status")["status"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def system_reset(self) -> None:
        self.execute("system_reset")

    def system_powerdown(self) -> None:
        self.execute("system_powerdown")

    def quit(self, timeout: float = 5.0) -> None:
        """Ask QEMU to exit; the connection dropping on the way is the expected outcome."""
        try:
            self.execute("quit", timeout=timeout)
        except QmpFailure:
            pass

    def device_del(self, device_id: str, timeout: float = 30.0) -> dict:
        """Hot-unplug a device and wait for its DEVICE_DELETED event (the guest must cooperate)."""
        mark = len(self.events)
        self.execute("device_del", {"id": device_id})
        return self.wait_event("DEVICE_DELETED", timeout,
                               lambda e: e.get("data", {}).get("device") == device_id, since=mark)

    def wait_event(self, name: str, timeout: float = 10.0,
                   match: Callable[[dict], bool] = lambda e: True, since: int = 0) -> dict:
        """The first event called `name` (after index `since`) that matches; raises on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if event.get("event") == name and match(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = ", ".join(e.get("event", "?") for e in self.events[since:]) or "none"
                    raise QmpFailure(f"{self.name}: no {name} event within {timeout:g}s (events seen: {seen})")
                self._cond.wait(remaining)
