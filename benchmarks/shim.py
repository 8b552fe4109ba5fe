#!/usr/bin/env python3
"""What the `vmlab exec` shim costs: host AF_VSOCK programs vs vmlab's own host API.

    python benchmarks/shim.py [--size MiB] [--runs N] [--json]

One vhost-user guest with bench-blast (blast.c, static). Both directions, each --runs times,
median reported, MB/s = 10^6 bytes/s:
  api   the host side is vmlab.vsock.host (Python, the hybrid Unix sockets directly), as in
        benchmarks/throughput.py's "vsock ... (blast)" rows
  shim  the host side is bench-blast itself (built dynamically) run under the vmlab exec shim:
        its AF_VSOCK socket is an AF_UNIX socket onto the same backend
The guest side is `bench-blast` both times; the ratio shim/api is printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import guest_events, machine_info, mbs, wait_guest_file  # noqa: E402
from throughput import BLAST_GUEST, BLAST_SRC, blast_g2h, blast_h2g, build_blast  # noqa: E402

from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402
from vmlab.shim import LabTarget  # noqa: E402
from vmlab.shim.process import HostProcess  # noqa: E402


def _done(text: str) -> dict:
    done = next((e for e in guest_events(text) if e.get("event") == "done"), None)
    if not done:
        raise RuntimeError(f"bench-blast did not finish: {text[-600:]!r}")
    return done


def shim_g2h(lab: Lab, host_blast: Path, nbytes: int, port: int, log: Path) -> dict:
    vm = lab.vm("bench")
    proc = HostProcess([str(host_blast), "recv", "vsock", str(port)], LabTarget.from_lab(lab), log).start()
    try:
        proc.wait_listening(port, 60)
        vm.check(f"bench-blast send vsock 2 {port} {nbytes}", timeout=600)
        proc.wait(600)
    finally:
        proc.close()
    done = _done(proc.output())
    assert done["bytes"] == nbytes, done
    return {"bytes": nbytes, "seconds": done["seconds"], "MBps": mbs(nbytes, done["seconds"])}


def shim_h2g(lab: Lab, host_blast: Path, nbytes: int, port: int, log: Path) -> dict:
    vm = lab.vm("bench")
    out_file = f"/tmp/bench-shim-{port}.out"
    vm.check(f"bench-blast recv vsock {port} > {out_file} 2>&1 &")
    wait_guest_file(vm, out_file, r'"listening"|"error"', 60)
    proc = HostProcess([str(host_blast), "send", "vsock", str(vm.cid), str(port), str(nbytes)],
                       LabTarget.from_lab(lab), log).start()
    try:
        proc.wait(600)
    finally:
        proc.close()
    done = _done(wait_guest_file(vm, out_file, r'"done"|"error"', 60))
    assert done["bytes"] == nbytes, done
    secs = _done(proc.output())["seconds"]
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="MiB per transfer (default 64)")
    ap.add_argument("--runs", type=int, default=3, help="transfers per direction and side (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    nbytes = args.size * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="vmlab-bench-shim-") as tmp_s:
        tmp = Path(tmp_s)
        static = build_blast(tmp)
        if static is None:
            print("no C compiler: nothing to measure", file=sys.stderr)
            return 1
        host_blast = tmp / "bench-blast-host"
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(host_blast), str(BLAST_SRC)], check=True)
        scenario = inline_scenario(vms=[VmSpec(name="bench", memory_mib=512, files={BLAST_GUEST: static})],
                                   transport="vhost-user", name="bench-shim")
        rows: dict[str, list[float]] = {}
        with Lab(scenario, LabOptions(transport="vhost-user")) as lab:
            info = machine_info(lab)
            port = 12000
            for i in range(args.runs):
                plan = [("guest->host api", lambda p: blast_g2h(lab, "bench", "vsock", nbytes, p)),
                        ("guest->host shim", lambda p: shim_g2h(lab, host_blast, nbytes, p, tmp / f"g{p}.log")),
                        ("host->guest api", lambda p: blast_h2g(lab, "bench", "vsock", nbytes, p)),
                        ("host->guest shim", lambda p: shim_h2g(lab, host_blast, nbytes, p, tmp / f"h{p}.log"))]
                for name, fn in plan:
                    port += 1
                    rows.setdefault(name, []).append(fn(port)["MBps"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {d: med[f"{d} shim"] / med[f"{d} api"] for d in ("guest->host", "host->guest")}
    if args.json:
        print(json.dumps({"machine": info, "size_mib": args.size, "runs": rows, "median_MBps": med,
                          "shim_over_api": ratios}, indent=2))
        return 0
    print(f"{args.size} MiB x {args.runs}, median MB/s (load before: {info.get('loadavg_before')})")
    for name, value in med.items():
        print(f"  {name:18} {value:8.1f}   runs: {', '.join(f'{x:.1f}' for x in rows[name])}")
    for d, r in ratios.items():
        print(f"  {d}: shim / api = {r:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
