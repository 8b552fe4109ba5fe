#!/usr/bin/env python3
"""Every performance target of issue 14 in one table: raw backend, TCG throughput, scale.

    python benchmarks/report.py [--quick] [--json FILE] [--compare OLD.json] [--skip PART]

Runs raw_backend.py (no guest: backend CPU per GiB in three directions), throughput.py (TCG
guests: bench-blast guest->host and host->guest vs TCP/slirp, and VM->VM) and scale.py (N guests
booting in parallel vs one, RSS per idle VM, many concurrent connections), then prints one
table: each number, its target and
whether it is met. --json writes everything (raw results included) for a later --compare,
which adds the old value and the change. --quick (under ~3 minutes on a quiet 2-core machine):
smaller transfers, one run each, no connection storm. Numbers only: nothing here is a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _bench import steal_seconds  # noqa: E402

PARTS = ("raw", "throughput", "scale")
SETTLE_SECONDS = 5      # between parts: the last part's guests are gone before the next one times


def run_raw(quick: bool) -> dict:
    import raw_backend
    return raw_backend.run(32 if quick else 256, 1 if quick else 3, list(raw_backend.ROWS))


def run_throughput(quick: bool) -> dict:
    cmd = [sys.executable, str(HERE / "throughput.py"), "--json", "--transport", "vhost-user",
           "--size", "16" if quick else "64", "--runs", "1" if quick else "3"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, timeout=3600)
    return json.loads(out.stdout)


def run_scale(quick: bool) -> dict:
    import scale
    return scale.scale(vms=8, memory=scale.DEFAULT_MEMORY, connections=0 if quick else 1000,
                       do_ring=not quick, compare_one=True)


def _get(d: dict, *path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# (label, path into the results, target, "<=" or ">=", unit)
TARGETS = [
    ("raw backend CPU guest->host", ("raw", "rows", "g2h", "backend_cpu_s_per_gib"), 1.0, "<=", "s/GiB"),
    ("raw backend CPU host->guest", ("raw", "rows", "h2g", "backend_cpu_s_per_gib"), 1.0, "<=", "s/GiB"),
    ("raw backend CPU VM->VM", ("raw", "rows", "v2v", "backend_cpu_s_per_gib"), 1.0, "<=", "s/GiB"),
    ("raw guest->host", ("raw", "rows", "g2h", "gib_s"), None, "", "GiB/s"),
    ("raw host->guest", ("raw", "rows", "h2g", "gib_s"), None, "", "GiB/s"),
    ("raw VM->VM", ("raw", "rows", "v2v", "gib_s"), None, "", "GiB/s"),
    ("memcpy (same bytes)", ("raw", "memcpy", "gib_s"), None, "", "GiB/s"),
    ("TCG blast backend CPU guest->host",
     ("throughput", "results", "vsock guest->host (blast)", "backend_cpu_s_per_GiB"), 1.0, "<=", "s/GiB"),
    ("TCG blast backend CPU host->guest",
     ("throughput", "results", "vsock host->guest (blast)", "backend_cpu_s_per_GiB"), 1.0, "<=", "s/GiB"),
    ("TCG blast backend CPU VM->VM",
     ("throughput", "results", "vsock VM->VM (blast)", "backend_cpu_s_per_GiB"), 1.0, "<=", "s/GiB"),
    ("TCG blast guest->host", ("throughput", "results", "vsock guest->host (blast)", "MBps"), None, "", "MB/s"),
    ("TCG blast host->guest", ("throughput", "results", "vsock host->guest (blast)", "MBps"), None, "", "MB/s"),
    ("TCG blast VM->VM", ("throughput", "results", "vsock VM->VM (blast)", "MBps"), None, "", "MB/s"),
    ("blast guest->host vs TCP/slirp",
     ("throughput", "ratio_vsock_over_tcp", "guest->host, bench-blast both"), 7.0, ">=", "x"),
    ("blast host->guest vs TCP/slirp",
     ("throughput", "ratio_vsock_over_tcp", "host->guest, bench-blast both"), 1.5, ">=", "x"),
    ("boot 1 VM", ("scale", "boot_one_seconds"), None, "", "s"),
    ("boot 8 VMs in parallel", ("scale", "boot_seconds"), None, "", "s"),
    ("boot 8 VMs / boot 1 VM", ("scale", "boot_ratio_vs_one"), 4.5, "<=", "x"),
    ("RSS per idle VM (qemu + backend share)", ("scale", "rss_per_idle_vm_mib"), 150.0, "<=", "MiB"),
    ("PSS per idle VM (guest RAM counted once)", ("scale", "pss_per_idle_vm_mib"), None, "", "MiB"),
    ("backend RSS after 1000 connections held",
     ("scale", "backend_rss_mib_after_connections"), None, "", "MiB"),
    ("  of it not guest RAM (RssAnon+RssFile)",
     ("scale", "backend_own_rss_mib_after_connections"), 40.0, "<=", "MiB"),
]


def table(res: dict, old: dict | None) -> list[dict]:
    rows = []
    for label, path, target, op, unit in TARGETS:
        value = _get(res, *path)
        if value is None:
            continue
        met = None
        if target is not None:
            met = value <= target if op == "<=" else value >= target
        row = {"what": label, "value": value, "unit": unit, "target": target, "op": op, "met": met}
        if target:
            row["ratio_to_target"] = round(value / target, 2)
        if old is not None:
            prev = _get(old, *path)
            if prev is not None:
                row["old"] = prev
                row["change"] = round(value / prev, 2) if prev else None
        rows.append(row)
    return rows


def print_table(rows: list[dict], res: dict) -> None:
    has_old = any("old" in r for r in rows)
    head = f"{'what':<42}{'value':>10} {'unit':<6}{'target':>10}{'met':>6}"
    if has_old:
        head += f"{'old':>10}{'new/old':>9}"
    print(head)
    for r in rows:
        tgt = f"{r['op']}{r['target']:g}" if r["target"] is not None else "-"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        line = f"{r['what']:<42}{r['value']:>10.4g} {r['unit']:<6}{tgt:>10}{met:>6}"
        if has_old:
            prev = r.get("old")
            line += (f"{prev:>10.4g}" if isinstance(prev, (int, float)) else f"{'':>10}") + (
                f"{r['change']:>9}" if r.get("change") else f"{'':>9}")
        print(line)
    m = res["machine"]
    print(f"{m['date']}, {m['cpus']} cpus, load average before/after "
          f"{m['loadavg_before']}/{m['loadavg_after']}, {res['elapsed_seconds']} s"
          f"{' (--quick)' if res['quick'] else ''}; guest kernel {m.get('kernel', 'stock')}")
    if m.get("steal_percent") is not None:
        parts = ", ".join(f"{k} {v}%" for k, v in m.get("steal_percent_by_part", {}).items())
        print(f"CPU steal during the run: {m['steal_percent']}% of the CPUs' time ({parts}; the "
              "hypervisor running other guests: CPU seconds per GiB rise with it)")


def _steal_percent(before: float | None, seconds: float) -> float | None:
    """Steal since `before` (steal_seconds()) as a percentage of all CPUs' time."""
    after = steal_seconds()
    if before is None or after is None or seconds <= 0:
        return None
    return round(100 * (after - before) / (seconds * (os.cpu_count() or 1)), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small runs (< ~3 min on a quiet machine)")
    ap.add_argument("--json", metavar="FILE", help="write all results to FILE")
    ap.add_argument("--compare", metavar="OLD", help="an earlier --json file to compare with")
    ap.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out")
    ap.add_argument("--kernel", metavar="REF", help="guest kernel for the guest parts (e.g. minimal, "
                    "build:NAME, a path); default: $VMLAB_KERNEL, else the stock distribution kernel")
    args = ap.parse_args(argv)
    if args.kernel:                            # guests of this process and of throughput.py's
        from vmlab.kernel.spec import resolve
        os.environ["VMLAB_KERNEL"] = str(resolve(args.kernel).path)
    old = json.loads(Path(args.compare).read_text()) if args.compare else None
    started = time.monotonic()
    steal_before = steal_seconds()
    res: dict = {"quick": args.quick, "machine": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "kernel": os.environ.get("VMLAB_KERNEL") or "stock"}}
    first = True
    for part, fn in (("raw", run_raw), ("throughput", run_throughput), ("scale", run_scale)):
        if part in args.skip:
            continue
        if not first:
            time.sleep(SETTLE_SECONDS)
        first = False
        print(f"[report] {part} ...", file=sys.stderr, flush=True)
        part_started, part_steal = time.monotonic(), steal_seconds()
        try:
            res[part] = fn(args.quick)
        except Exception as e:                 # one part failing still reports the others
            res[part] = {"error": repr(e)}
            print(f"[report] {part} failed: {e!r}", file=sys.stderr, flush=True)
        pct = _steal_percent(part_steal, time.monotonic() - part_started)
        if pct is not None:
            res["machine"].setdefault("steal_percent_by_part", {})[part] = pct
    res["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["elapsed_seconds"] = round(time.monotonic() - started, 1)
    pct = _steal_percent(steal_before, res["elapsed_seconds"])
    if pct is not None:
        res["machine"]["steal_percent"] = pct
    res["table"] = table(res, old)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print_table(res["table"], res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
