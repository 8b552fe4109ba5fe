#!/usr/bin/env python3
"""vsock connection setup/teardown rate: open+close N connections, sequential and concurrent.

    python benchmarks/connections.py [--count 200] [--concurrent 50] [--json] [--transport T]

Boots one guest (`bench`) and measures, over vsock (vhost-user backend here, vhost where
/dev/vhost-vsock works):

  guest->host sequential  a guest shell loop runs `vmlab-guest connect 2 P` --count times, one
                          after another; each connects, closes; the host accepts, reads to EOF,
                          closes
  guest->host concurrent  --concurrent `vmlab-guest connect 2 P` started at once (`&`, `wait`)
  host->guest sequential  the host opens --count connections to a `vmlab-guest listen P` in the
                          guest, one after another; each: connect (CONNECT/OK handshake), half
                          close, wait for the guest's close

Timing is on the host: from the first accepted (or opened) connection to the last one closed,
connections/s = count / that time. The guest->host numbers include starting one vmlab-guest
process per connection inside a TCG guest; the "spawn only" line runs the same loop with
`vmlab-guest info` (no connection) so that part can be told apart.
Numbers from a run are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import cpu_seconds, machine_info, wait_guest_file  # noqa: E402

from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402
from vmlab.vsock.host import host_connect, host_listen  # noqa: E402


class Acceptor:
    """Accepts `count` connections on a host listener, each read to EOF and closed in its own thread."""

    def __init__(self, listener, count: int, timeout: float) -> None:
        self.listener, self.count, self.timeout = listener, count, timeout
        self.first: float | None = None
        self.last: float | None = None
        self.closed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> "Acceptor":
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.timeout
        for _ in range(self.count):
            try:
                conn = self.listener.accept(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - reported
                self.errors.append(f"accept: {e!r}")
                self._done.set()
                return
            if self.first is None:
                self.first = time.perf_counter()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        try:
            with conn:
                conn.settimeout(self.timeout)
                while conn.recv(4096):
                    pass
        except Exception as e:  # noqa: BLE001 - reported
            self.errors.append(f"conn: {e!r}")
        with self._lock:
            self.closed += 1
            self.last = time.perf_counter()
            if self.closed == self.count:
                self._done.set()

    def wait(self) -> None:
        self._done.wait(self.timeout)
        self._thread.join(1)


def _rate(count: int, first: float | None, last: float | None) -> dict:
    secs = (last or 0) - (first or 0)
    return {"count": count, "seconds": round(secs, 3),
            "conns_per_s": round(count / secs, 1) if secs > 0 else None,
            "ms_per_conn": round(1000 * secs / count, 2) if count else None}


def guest_to_host(lab: Lab, port: int, count: int, concurrent: bool, timeout: float) -> dict:
    vm = lab.vm("bench")
    backend = lab.backend.pid if lab.backend else None
    one = f"vmlab-guest connect 2 {port} --timeout 60 >/dev/null || echo FAIL"
    if concurrent:
        cmd = f"for i in $(seq {count}); do ( {one} ) & done; wait"
    else:
        cmd = f"for i in $(seq {count}); do {one}; done"
    with host_listen(port, vms=[vm.endpoint()]) as listener:
        acc = Acceptor(listener, count, timeout).start()
        cpu0 = cpu_seconds(backend)
        rc, out = vm.run(cmd, timeout=timeout)
        acc.wait()
        cpu1 = cpu_seconds(backend)
    failed = out.count("FAIL")
    if rc != 0 or failed or acc.errors or acc.closed != count:
        raise RuntimeError(f"guest->host: rc={rc}, {failed} guest failures, host closed "
                           f"{acc.closed}/{count}, errors {acc.errors[:3]}, guest: {out[-400:]!r}")
    r = _rate(count, acc.first, acc.last)
    if cpu0 is not None and cpu1 is not None:
        r["backend_cpu_ms_per_conn"] = round(1000 * (cpu1 - cpu0) / count, 2)
    return r


def spawn_only(lab: Lab, count: int, timeout: float) -> dict:
    """The same guest loop without connecting: `vmlab-guest info` (open /dev/vsock, one ioctl)."""
    vm = lab.vm("bench")
    t0 = time.perf_counter()
    vm.check("true")
    empty = time.perf_counter() - t0
    t0 = time.perf_counter()
    vm.check(f"for i in $(seq {count}); do vmlab-guest info >/dev/null || echo FAIL; done", timeout=timeout)
    secs = time.perf_counter() - t0 - empty
    return {"count": count, "seconds": round(secs, 3), "ms_per_spawn": round(1000 * secs / count, 2)}


def host_to_guest(lab: Lab, port: int, count: int, timeout: float) -> dict:
    vm = lab.vm("bench")
    backend = lab.backend.pid if lab.backend else None
    out_file = f"/tmp/bench-conn-{port}.out"
    vm.check(f"vmlab-guest listen {port} > {out_file} 2>&1 &")
    wait_guest_file(vm, out_file, r'"listening"', 60)
    ep = vm.endpoint()
    cpu0 = cpu_seconds(backend)
    first = time.perf_counter()
    try:
        for _ in range(count):
            with host_connect(vm.cid, port, endpoint=ep, timeout=30) as conn:
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):   # the guest closes after it saw our EOF
                    pass
        last = time.perf_counter()
    finally:
        vm.run("killall vmlab-guest", timeout=10)
    cpu1 = cpu_seconds(backend)
    r = _rate(count, first, last)
    if cpu0 is not None and cpu1 is not None:
        r["backend_cpu_ms_per_conn"] = round(1000 * (cpu1 - cpu0) / count, 2)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="sequential connections (default 200)")
    ap.add_argument("--concurrent", type=int, default=50, help="concurrent connections (default 50)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--transport", default=None, help="vsock transport: auto (default), vhost, vhost-user")
    args = ap.parse_args(argv)
    timeout = 600.0
    port = random.randint(20000, 60000)
    results: dict = {"count": args.count, "concurrent": args.concurrent}
    t0 = time.monotonic()
    with Lab(inline_scenario(vms=[VmSpec(name="bench")], name="bench-connections"),
             LabOptions(transport=args.transport)) as lab:
        results["machine"] = machine_info(lab)
        results["boot_s"] = round(time.monotonic() - t0, 1)
        res = results["results"] = {}
        res["guest->host sequential"] = guest_to_host(lab, port, args.count, False, timeout)
        res["guest->host concurrent"] = guest_to_host(lab, port + 1, args.concurrent, True, timeout)
        res["guest spawn only (no connection)"] = spawn_only(lab, args.count, timeout)
        res["host->guest sequential"] = host_to_guest(lab, port + 2, args.count, timeout)
        results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["total_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    m = results["machine"]
    print(f"{m['date']}  {m['cpus']} CPUs  accel {m['accel']}  vsock transport {m['transport']}")
    print(f"{'what':34s} {'count':>5s} {'seconds':>8s} {'conn/s':>8s} {'ms/conn':>8s} {'backend CPU ms/conn':>20s}")
    for name, r in res.items():
        ms = r.get("ms_per_conn", r.get("ms_per_spawn"))
        cps = r.get("conns_per_s")
        cpu = r.get("backend_cpu_ms_per_conn")
        print(f"{name:34s} {r['count']:5d} {r['seconds']:8.2f} {cps if cps is not None else '-':>8} "
              f"{ms:8.2f} {cpu if cpu is not None else '-':>20}")
    print(f"boot {results['boot_s']}s, total {results['total_s']}s, "
          f"load average before/after {m['loadavg_before']}/{m['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
