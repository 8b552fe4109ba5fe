"""Repository-wide test setup: every test must leave no qemu or backend process of ours behind."""

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def _our_children() -> dict[int, str]:
    """Live child processes of this pytest process that are qemu or vmlab backends."""
    found = {}
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] != me or fields[0] == "Z":
                continue
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if "qemu-system" in cmdline or "vmlab.vsock" in cmdline:
            found[int(stat.parent.name)] = cmdline[:160]
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fails the test that leaves a qemu/backend child running outside a still-open lab."""
    yield
    from vmlab.lab import OPEN_LABS

    owned = {pid for lab in list(OPEN_LABS) for pid in lab.pids()}
    leaked = {pid: cmd for pid, cmd in _our_children().items() if pid not in owned}
    for pid in leaked:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not leaked, f"processes left behind: {leaked}"


def pytest_terminal_summary(terminalreporter):
    """Print the timings slow tests record (`record_property("vmlab_timing", ...)`), also under xdist."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            lines += [f"{report.nodeid}: {value}" for name, value in getattr(report, "user_properties", ())
                      if name == "vmlab_timing"]
    if lines:
        terminalreporter.section("vmlab timings")
        for line in lines:
            terminalreporter.write_line(line)
