"""Optional rich progress output for slow image steps (download, unpack, build)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Reporter:
    """Shows a spinner per step and a line when it finishes; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._console = None
        if enabled:
            from rich.console import Console
            self._console = Console(stderr=True)

    def note(self, text: str) -> None:
        if self._console is not None:
            self._console.print(f"[dim]·[/dim] {text}")

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        if self._console is None:
            yield
            return
        start = time.monotonic()
        with self._console.status(text):
            yield
        self._console.print(f"[green]✓[/green] {text} [dim]({time.monotonic() - start:.1f}s)[/dim]")
