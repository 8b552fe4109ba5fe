#!/usr/bin/env python3
"""Scale: N real guests on one backend, VM<->VM in a ring, and many concurrent host connections.

    python benchmarks/scale.py [--vms 16] [--connections 1000] [--memory MiB] [--compare-one]
                               [--no-ring] [--json]

Boots --vms guests in parallel (one vhost-user backend serves them all), has every guest i send a
message to guest (i+1) % N over vsock, then opens --connections concurrent guest->host connections
spread over the guests, all held open at once before any is closed. Prints boot time, the ring's
time, connections/s, the peak number of connections the backend held, and the backend's CPU time
and memory (RSS per idle VM: its qemu plus 1/N of the backend, a few seconds after boot; PSS,
which counts shared guest RAM once; the backend's own RSS, without the guest RAM it maps).
--compare-one boots a single VM first (3 times, median) and prints the N-VM parallel boot as a
multiple of it.
Numbers only; correctness is checked on the way (every message and byte must arrive).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import cpu_seconds, own_rss_mib, rss_detail_mib  # noqa: E402

from vmlab.guest import GuestHelper  # noqa: E402
from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402
from vmlab.vsock.host import host_listen  # noqa: E402

DEFAULT_MEMORY = 160
ONE_VM_BOOTS = 3                        # --compare-one: single boots, the median is the base


def ring(lab: Lab) -> float:
    """Every guest listens, then every guest sends to its neighbour; returns seconds for the sends."""
    vms = lab.vms
    servers = [GuestHelper(vm).listen(6000, chunk=256) for vm in vms]
    started = time.monotonic()
    for i, vm in enumerate(vms):
        nxt = vms[(i + 1) % len(vms)]
        client = GuestHelper(vm).connect(nxt.cid, 6000, send=f"ring {vm.name}->{nxt.name}")
        if client.errors():
            raise RuntimeError(f"{vm.name} -> {nxt.name}: {client.summary()}")
    elapsed = time.monotonic() - started
    for i, server in enumerate(servers):
        prev = vms[i - 1]
        server.wait(timeout=60)
        want = f"ring {prev.name}->{vms[i].name}"
        if server.received_data() != want:
            raise RuntimeError(f"{vms[i].name} got {server.received_data()!r}, wanted {want!r}")
    return elapsed


def concurrent_connections(lab: Lab, total: int) -> dict:
    """`total` guest->host connections open at the same time (each guest holds its share)."""
    vms = lab.vms
    per_vm = [total // len(vms) + (1 if i < total % len(vms) else 0) for i in range(len(vms))]
    accepted: list = []
    lock = threading.Lock()
    done = threading.Event()
    with host_listen(7000, vms=[vm.endpoint() for vm in vms]) as listener:
        def accept_all() -> None:
            while len(accepted) < total:
                conn = listener.accept(timeout=300)
                with lock:
                    accepted.append(conn)
            done.set()

        acceptor = threading.Thread(target=accept_all, daemon=True)
        acceptor.start()
        started = time.monotonic()
        for vm, count in zip(vms, per_vm):
            # Each client connects, sends one byte, then waits for the host to close: all stay open.
            vm.run(f"for i in $(seq 1 {count}); do vmlab-guest connect 2 7000 --send x --recv "
                   f">/tmp/c$i.log 2>&1 & done; echo started", timeout=300)
        if not done.wait(600):
            raise RuntimeError(f"only {len(accepted)} of {total} connections arrived")
        opened = time.monotonic() - started
        stats = lab.backend.control({"cmd": "stats"}) if lab.backend else {}
        held = stats.get("hybrid", {}).get("connections")
        for conn in accepted:
            if conn.recv(1) != b"x":
                raise RuntimeError("a connection lost its byte")
            conn.close()
    return {"connections": total, "open_seconds": round(opened, 2),
            "connections_per_s": round(total / opened, 1), "backend_held_at_peak": held}


def _scenario(n: int, memory: int):
    return inline_scenario(vms=[VmSpec(name=f"v{i:02d}", memory_mib=memory) for i in range(n)],
                           transport="vhost-user", name="scale")


def boot(n: int, memory: int, idle: float = 3.0, work=None) -> dict:
    """Boot n guests in parallel on one backend; boot time, then RSS per idle VM (its qemu plus
    its share of the backend) after `idle` seconds; `work(lab)` may add more numbers."""
    started = time.monotonic()
    with Lab(_scenario(n, memory), LabOptions(boot_timeout=900)) as lab:
        boot_s = time.monotonic() - started
        time.sleep(idle)
        qemu = [rss_detail_mib(vm.machine.pid) for vm in lab.vms]
        backend = rss_detail_mib(lab.backend.pid)
        per_vm = [q.get("VmRSS", 0) + backend.get("VmRSS", 0) / n for q in qemu]
        pss = sum(q.get("Pss", 0) for q in qemu) + backend.get("Pss", 0)
        out = {"vms": n, "memory_mib": memory, "boot_seconds": round(boot_s, 1),
               "rss_per_idle_vm_mib": round(sum(per_vm) / n, 1),
               "rss_per_idle_vm_max_mib": round(max(per_vm), 1),
               "pss_per_idle_vm_mib": round(pss / n, 1),
               "qemu_rss_mib": qemu[0], "backend_rss_mib_idle": backend.get("VmRSS"),
               "backend_own_rss_mib_idle": own_rss_mib(backend)}
        if work is not None:
            out.update(work(lab))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=16)
    parser.add_argument("--connections", type=int, default=1000,
                        help="concurrent guest->host connections (0: skip)")
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY,
                        help=f"MiB per guest (default {DEFAULT_MEMORY})")
    parser.add_argument("--compare-one", action="store_true",
                        help="boot 1 VM first (3 times, median): print the N-VM boot time as a "
                        "multiple of it")
    parser.add_argument("--no-ring", action="store_true", help="skip the VM->VM ring")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = scale(args.vms, args.memory, args.connections, not args.no_ring, args.compare_one)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


def scale(vms: int, memory: int, connections: int, do_ring: bool, compare_one: bool) -> dict:
    result: dict = {}
    if compare_one:                     # the median of 3 single boots: one is only ~2 s
        one = boot(1, memory)
        singles = [one["boot_seconds"]] + [boot(1, memory, idle=0)["boot_seconds"]
                                           for _ in range(ONE_VM_BOOTS - 1)]
        result["boot_one_seconds"] = statistics.median(singles)
        result["boot_one_seconds_runs"] = singles
        result["rss_one_vm_mib"] = one["rss_per_idle_vm_mib"]

    def work(lab: Lab) -> dict:
        pid = lab.backend.pid
        out: dict = {}
        if do_ring:
            out["ring_seconds"] = round(ring(lab), 2)
        if connections:
            out.update(concurrent_connections(lab, connections))
        out["backend_cpu_seconds"] = cpu_seconds(pid)
        detail = rss_detail_mib(pid)
        out["backend_rss_mib"] = detail.get("VmRSS")
        out["backend_rss_detail_mib"] = detail
        if connections:
            out["backend_rss_mib_after_connections"] = detail.get("VmRSS")
            out["backend_own_rss_mib_after_connections"] = own_rss_mib(detail)
        return out

    result.update(boot(vms, memory, work=work))
    if compare_one:
        result["boot_ratio_vs_one"] = round(result["boot_seconds"] / result["boot_one_seconds"], 2)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
