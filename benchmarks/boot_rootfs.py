#!/usr/bin/env python3
"""Boot-to-ready time: vmlab's busybox image against a `rootfs: host` guest.

    python benchmarks/boot_rootfs.py [--runs 3] [--json] [--memory 256]

Each run boots one guest of each kind, one after the other (interleaved, so a change in machine
load hits both alike), and times `Lab.start()`: image lookup (cached), qemu start, firmware,
kernel, the init (for rootfs host: 9p mount, overlays, switch_root) up to VMLAB-READY and the
console set up. Then, in the same guest, the first commands a user runs:

  image   `vmlab-guest info` (the static helper in the initramfs)
  host    `python3 -c pass` twice (cold, then with 9p's page cache warm),
          `python3 -c 'import socket; socket.AF_VSOCK'` and `socat -V`

Medians are printed with the ratio host/image. Numbers from a run are recorded in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info  # noqa: E402

from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402

COMMANDS = {
    "image": [("vmlab-guest info", "vmlab-guest info")],
    "host": [("python3 -c pass (cold)", "python3 -c pass"),
             ("python3 -c pass (warm)", "python3 -c pass"),
             ("python3 import socket", "python3 -c 'import socket; socket.AF_VSOCK'"),
             ("socat -V", "socat -V >/dev/null")],
}


def one_boot(rootfs: str, memory: int) -> tuple[dict, dict]:
    t0 = time.monotonic()
    with Lab(inline_scenario(vms=[VmSpec(name="bench", rootfs=rootfs, memory_mib=memory)],
                             name=f"bench-boot-{rootfs}"), LabOptions(boot_timeout=900)) as lab:
        boot = time.monotonic() - t0
        info = machine_info(lab)
        times = {"boot-to-ready": boot}
        for label, command in COMMANDS[rootfs]:
            t = time.monotonic()
            lab.vm("bench").check(command, timeout=600)
            times[label] = time.monotonic() - t
    return times, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="boots of each kind (default 3)")
    ap.add_argument("--memory", type=int, default=256, help="guest memory in MiB (default 256)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    samples: dict[str, dict[str, list[float]]] = {"image": {}, "host": {}}
    info: dict = {}
    for run in range(args.runs):
        for rootfs in ("image", "host"):
            times, info = one_boot(rootfs, args.memory)
            for key, value in times.items():
                samples[rootfs].setdefault(key, []).append(round(value, 2))
            if not args.json:
                print(f"run {run + 1}/{args.runs} rootfs {rootfs}: "
                      + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), file=sys.stderr, flush=True)
    medians = {kind: {k: round(statistics.median(v), 2) for k, v in rows.items()} for kind, rows in samples.items()}
    ratio = round(medians["host"]["boot-to-ready"] / medians["image"]["boot-to-ready"], 2)
    result = {"runs": args.runs, "memory_mib": args.memory, "machine": info, "samples": samples,
              "median": medians, "boot_ratio_host_over_image": ratio,
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{info.get('date')}  {info.get('cpus')} CPUs  accel {info.get('accel')}  "
          f"{args.runs} run(s), {args.memory} MiB, median seconds")
    print(f"{'rootfs':8s} {'what':26s} {'median s':>9s}  samples")
    for kind in ("image", "host"):
        for key, values in samples[kind].items():
            print(f"{kind:8s} {key:26s} {medians[kind][key]:9.2f}  {values}")
    print(f"boot-to-ready host/image: {ratio}x; load average before {info.get('loadavg_before')}, "
          f"after {result['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
