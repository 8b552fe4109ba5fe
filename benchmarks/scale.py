#!/usr/bin/env python3
"""Scale: N real guests on one backend, VM<->VM in a ring, and many concurrent host connections.

    python benchmarks/scale.py [--vms 16] [--connections 1000] [--json]

Boots --vms guests in parallel (one vhost-user backend serves them all), has every guest i send a
message to guest (i+1) % N over vsock, then opens --connections concurrent guest->host connections
spread over the guests, all held open at once before any is closed. Prints boot time, the ring's
time, connections/s, the peak number of connections the backend held, and the backend's CPU time
and memory. Numbers only; correctness is checked on the way (every message and byte must arrive).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import cpu_seconds  # noqa: E402

from vmlab.guest import GuestHelper  # noqa: E402
from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402
from vmlab.vsock.host import host_listen  # noqa: E402


def rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return None


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=16)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--memory", type=int, default=160, help="MiB per guest (default 160)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    scenario = inline_scenario(vms=[VmSpec(name=f"v{i:02d}", memory_mib=args.memory) for i in range(args.vms)],
                               transport="vhost-user", name="scale")
    started = time.monotonic()
    with Lab(scenario, LabOptions(boot_timeout=900)) as lab:
        boot = time.monotonic() - started
        pid = lab.backend.pid
        ring_s = ring(lab)
        conns = concurrent_connections(lab, args.connections)
        result = {"vms": args.vms, "boot_seconds": round(boot, 1), "ring_seconds": round(ring_s, 2), **conns,
                  "backend_cpu_seconds": cpu_seconds(pid), "backend_rss_mib": rss_mib(pid)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
