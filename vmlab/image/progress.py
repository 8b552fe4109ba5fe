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

    def note(self, text: str, style: str = "") -> None:
        """One informational line; ``text`` is plain (paths may contain '[')."""
        if self._console is not None:
            from rich.text import Text
            line = Text("· ", style="dim") + Text(text, style=style)
            self._console.print(line, soft_wrap=True, highlight=False)

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        if self._console is None:
            yield
            return
        start = time.monotonic()
        with self._console.status(text):
            yield
        self._console.print(f"[green]✓[/green] {text} [dim]({time.monotonic() - start:.1f}s)[/dim]")
