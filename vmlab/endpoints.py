"""What a vsock endpoint saw, in one vocabulary for host and guest, listener and connector.

The vocabulary is the guest helper's JSON lines (images/guest/README.md): listening, accepted,
connected, message, sent, received, closed, error; plus `exited` when a guest helper process ends.
Scenario `expect` steps and pytest tests check these events, whichever side produced them.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from typing import Any


def errno_name(num: Any) -> str:
    """111 -> 'ECONNREFUSED' (guest and host are both Linux, so the numbers agree)."""
    try:
        return errno.errorcode.get(int(num), str(num))
    except (TypeError, ValueError):
        return str(num)


@dataclass
class Endpoint:
    """One vsock endpoint and its events; thread-safe so host workers can record while tests wait."""

    id: str
    kind: str                       # host_listen | host_connect | guest_listen | guest_connect
    vm: str | None
    events: list[dict] = field(default_factory=list)
    finished: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def record(self, event: dict) -> None:
        with self.cond:
            self.events.append(event)
            if event.get("event") in ("error", "exited"):
                self.finished = True
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def refresh(self) -> None:
        """Pull new events; host endpoints are live, guest ones read their log over the console."""

    def wait_change(self, timeout: float) -> None:
        """Sleep until a new event arrives or `timeout` passes."""
        with self.cond:
            self.cond.wait(timeout)

    def received_data(self) -> str:
        return "".join(e.get("data", "") for e in self.events if e.get("event") == "message")

    def messages(self) -> list[str]:
        return [e.get("data", "") for e in self.events if e.get("event") == "message"]

    def _last(self, name: str) -> dict | None:
        found = [e for e in self.events if e.get("event") == name]
        return found[-1] if found else None

    def received_bytes(self) -> int | None:
        """Bytes received over all of this endpoint's connections (None before any finished)."""
        done = [int(e["bytes"]) for e in self.events if e.get("event") == "received"]
        return sum(done) if done else None

    def sha256(self) -> str | None:
        done = self._last("received")
        return done.get("sha256") if done else None

    def sent(self) -> dict | None:
        return self._last("sent")

    def errors(self) -> list[str]:
        return [e.get("errno_name") or errno_name(e.get("errno")) for e in self.events if e.get("event") == "error"]

    def has(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events)

    def summary(self) -> str:
        parts = []
        for e in self.events[-6:]:
            kind = e.get("event")
            if kind == "message":
                parts.append(f"message {e.get('data', '')!r}")
            elif kind == "received":
                parts.append(f"received {e.get('bytes')} bytes sha256={str(e.get('sha256'))[:16]}")
            elif kind == "error":
                parts.append(f"error in {e.get('op')}: {e.get('errno_name') or errno_name(e.get('errno'))} {e.get('error', '')}".rstrip())
            elif kind == "output":
                parts.append(f"output {e.get('line')!r}")
            else:
                parts.append(str(kind))
        return "; ".join(parts) or "no events yet"
