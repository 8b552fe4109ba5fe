"""Small helpers shared by the benchmark scripts (not part of vmlab's API)."""
from __future__ import annotations

import json
import os
import platform
import re
import socket
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a live process, from /proc/<pid>/stat (None if unknown/gone)."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after "pid (comm)": state is fields[0], utime is stat field 14 -> fields[11], stime fields[12]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_tcp_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (only loopback is ever used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guest_events(text: str) -> list[dict]:
    """The JSON lines vmlab-guest printed (anything else on the console is skipped)."""
    events = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def wait_guest_file(vm, path: str, pattern: str, timeout: float) -> str:
    """Poll a file in the guest until `pattern` (regex) shows up in it; return its content."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        rc, out = vm.run(f"cat {path} 2>/dev/null", timeout=30)
        if re.search(pattern, out):
            return out
        time.sleep(0.2)
    raise TimeoutError(f"{vm.name}: {pattern!r} not in {path} after {timeout}s: {out[-500:]!r}")


def machine_info(lab) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "accel": lab.accel,
        "transport": lab.vm("bench").transport if "bench" in [v.name for v in lab.vms] else lab.transport,
        "kernel": platform.release(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave other guests while ours wanted it (/proc/stat "steal", all
    CPUs): on a shared cloud VM the CPU seconds per GiB of a run rise with it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def mbs(nbytes: int, seconds: float) -> float:
    """MB/s, 1 MB = 10^6 bytes."""
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def rss_detail_mib(pid: int | None) -> dict:
    """VmRSS and its parts of one process, MiB, plus Pss. Guest RAM is a shared memfd: the pages
    the backend touched count in its RssShmem *and* in the guest's qemu, so VmRSS sums count them
    twice; Pss splits shared pages between the processes that map them (sums are real)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssShmem", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("Pss", "Pss_Shmem"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    except (OSError, TypeError):
        pass
    return out


def own_rss_mib(detail: dict) -> float | None:
    """A process's resident memory without the guest RAM it maps (RssAnon + RssFile)."""
    if "RssAnon" not in detail:
        return None
    return round(detail["RssAnon"] + detail.get("RssFile", 0), 1)
