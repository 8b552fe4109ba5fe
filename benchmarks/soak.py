#!/usr/bin/env python3
"""Soak: --total MiB over --conns concurrent vsock connections, every connection's sha256 checked.

    python benchmarks/soak.py [--total 1024] [--conns 100] [--memory MiB] [--json]

Boots two guests (`a`, `b`) on one vhost-user backend and moves a quarter of --total in each of
four directions, --conns connections at once in each (sizes differ by at most one byte):

  guest->host  --conns `vmlab-guest connect 2 P --send-bytes N` in `a`; the host accepts them
               all at once and reads each to EOF
  host->guest  --conns `vmlab-guest listen P+i --once` in `a`; the host connects to all of them
               at once and sends N pattern bytes (vmlab.image.pattern) on each
  a->b, b->a   --conns listeners in one guest, --conns connects from the other

Every receiver (host or vmlab-guest) hashes what it got; the run fails unless each direction's
(bytes, sha256) list of senders and of receivers both equal the pattern's for the planned sizes:
0 bytes lost or corrupted. The backend's RSS (VmRSS, and RssAnon = its own heap, not the mapped
guest RAM) is printed after boot, at its peak during the transfers (sampled every 0.5 s) and at
the end. Time per direction is wall time from starting the senders until every receiver is done
(it includes starting --conns helper processes in a TCG guest); MB/s = 10^6 bytes/s. vmlab-guest
hashes every byte on the emulated CPU, which bounds these rates (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import guest_events, machine_info, mbs, rss_detail_mib  # noqa: E402

from vmlab.image.pattern import pattern_bytes, pattern_sha256  # noqa: E402
from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402
from vmlab.vsock.host import host_connect, host_listen  # noqa: E402

TIMEOUT = 1800.0


def plan(nbytes: int, conns: int) -> list[int]:
    """nbytes split over conns connections; the first (nbytes % conns) carry one byte more."""
    base, extra = divmod(nbytes, conns)
    return [base + (1 if i < extra else 0) for i in range(conns)]


def size_expr(sizes: list[int]) -> str:
    """Shell snippet setting $n to sizes[$i] (two distinct sizes at most, see plan())."""
    extra = sum(1 for s in sizes if s != sizes[-1])
    return f"n={sizes[-1]}; [ $i -lt {extra} ] && n={sizes[0]}; "


class RssSampler:
    """Peak VmRSS/RssAnon of one process, sampled in a thread until stop()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for key, value in rss_detail_mib(self.pid).items():
                self.peak[key] = max(self.peak.get(key, 0), value)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def _hash_to_eof(conn) -> tuple[int, str]:
    h, got = hashlib.sha256(), 0
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(view)
        if not n:
            return got, h.hexdigest()
        h.update(view[:n])
        got += n


def _guest_results(vm, logs: str, event: str) -> list[tuple[int, str]]:
    """(bytes, sha256) of every `event` line in the guest's log files; errors raise."""
    _, out = vm.run(f"grep -h -e '\"{event}\"' -e '\"error\"' {logs} 2>/dev/null; true", timeout=120)
    events = guest_events(out)
    errors = [e for e in events if e.get("event") == "error"]
    if errors:
        raise RuntimeError(f"{vm.name}: {len(errors)} helper errors, first: {errors[0]}")
    return [(e["bytes"], e["sha256"]) for e in events if e.get("event") == event]


def _wait_count(vm, logs: str, pattern: str, count: int, timeout: float) -> None:
    """Poll until `count` of the guest's log files contain `pattern` (or one has an error)."""
    deadline = time.monotonic() + timeout
    while True:
        _, out = vm.run(f"echo N=$(grep -l '{pattern}' {logs} 2>/dev/null | wc -l) "
                        f"E=$(grep -l '\"error\"' {logs} 2>/dev/null | wc -l)", timeout=60)
        n = e = 0
        for word in out.split():
            if word.startswith("N=") and word[2:].isdigit():
                n = int(word[2:])
            if word.startswith("E=") and word[2:].isdigit():
                e = int(word[2:])
        if n >= count or e:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.name}: only {n}/{count} of {logs} have {pattern!r} after {timeout}s")
        time.sleep(0.25)


def _start_listeners(vm, port: int, conns: int, tag: str) -> str:
    logs = f"/tmp/soak-{tag}-*.log"
    vm.check(f"rm -f {logs}; for i in $(seq 0 {conns - 1}); do vmlab-guest listen $(({port}+i)) "
             f"--once --timeout 600 >/tmp/soak-{tag}-$i.log 2>&1 & done; echo started", timeout=120)
    _wait_count(vm, logs, '"listening"', conns, 300)
    return logs


def _connect_loop(cid: int, port_expr: str, sizes: list[int], tag: str) -> str:
    return (f"rm -f /tmp/soak-{tag}-*.log; for i in $(seq 0 {len(sizes) - 1}); do {size_expr(sizes)}"
            f"vmlab-guest connect {cid} {port_expr} --send-bytes $n --shutdown --timeout 600 "
            f">/tmp/soak-{tag}-$i.log 2>&1 & done; wait; echo done")


def guest_to_host(lab: Lab, port: int, sizes: list[int]) -> tuple[float, list, list]:
    vm = lab.vm("a")
    received: list[tuple[int, str]] = []
    errors: list[str] = []

    def serve(conn) -> None:
        try:
            with conn:
                conn.settimeout(600)
                received.append(_hash_to_eof(conn))
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(repr(e))

    with host_listen(port, vms=[vm.endpoint()]) as listener:
        def accept_all() -> None:
            for _ in sizes:
                try:
                    conn = listener.accept(timeout=600)
                except Exception as e:  # noqa: BLE001 - reported
                    errors.append(f"accept: {e!r}")
                    return
                threads.append(threading.Thread(target=serve, args=(conn,), daemon=True))
                threads[-1].start()

        threads: list[threading.Thread] = []
        acceptor = threading.Thread(target=accept_all, daemon=True)
        t0 = time.perf_counter()
        acceptor.start()
        vm.check(_connect_loop(2, str(port), sizes, "g2h"), timeout=TIMEOUT)
        acceptor.join(TIMEOUT)
        for t in threads:
            t.join(TIMEOUT)
        secs = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"guest->host: {len(errors)} host errors, first: {errors[0]}")
    return secs, _guest_results(vm, "/tmp/soak-g2h-*.log", "sent"), received


def host_to_guest(lab: Lab, port: int, sizes: list[int]) -> tuple[float, list, list]:
    vm = lab.vm("a")
    logs = _start_listeners(vm, port, len(sizes), "h2g")
    data = pattern_bytes(0, max(sizes))
    sent: list[tuple[int, str]] = []
    errors: list[str] = []
    ep = vm.endpoint()

    def send(i: int, size: int) -> None:
        try:
            with host_connect(vm.cid, port + i, endpoint=ep, timeout=600) as conn:
                conn.sendall(memoryview(data)[:size])
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):   # the guest closes once it has read our EOF
                    pass
            sent.append((size, hashlib.sha256(memoryview(data)[:size]).hexdigest()))
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f"port {port + i}: {e!r}")

    threads = [threading.Thread(target=send, args=(i, s), daemon=True) for i, s in enumerate(sizes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    secs = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"host->guest: {len(errors)} host errors, first: {errors[0]}")
    _wait_count(vm, logs, '"closed"', len(sizes), 120)
    return secs, sent, _guest_results(vm, logs, "received")


def vm_to_vm(lab: Lab, src: str, dst: str, port: int, sizes: list[int]) -> tuple[float, list, list]:
    a, b = lab.vm(src), lab.vm(dst)
    tag = f"{src}2{dst}"
    logs = _start_listeners(b, port, len(sizes), tag + "-r")
    t0 = time.perf_counter()
    a.check(_connect_loop(b.cid, f"$(({port}+i))", sizes, tag + "-s"), timeout=TIMEOUT)
    sent = _guest_results(a, f"/tmp/soak-{tag}-s-*.log", "sent")   # raises on a sender's error
    _wait_count(b, logs, '"closed"', len(sizes), TIMEOUT)
    secs = time.perf_counter() - t0
    return secs, sent, _guest_results(b, logs, "received")


def check(name: str, sizes: list[int], sent: list, received: list) -> None:
    """Both sides saw exactly the pattern streams planned: no byte lost, added or changed."""
    sha = {n: pattern_sha256(n) for n in set(sizes)}
    want = sorted((n, sha[n]) for n in sizes)
    for side, got in (("senders", sent), ("receivers", received)):
        if sorted(got) != want:
            bad = len([g for g in got if g not in want]) + abs(len(want) - len(got))
            raise RuntimeError(f"{name}: {side} reported {len(got)} streams, {bad} not as planned "
                               f"({sum(n for n, _ in got)} of {sum(sizes)} bytes)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total", type=int, default=1024, help="MiB over all four directions (default 1024)")
    ap.add_argument("--conns", type=int, default=100, help="concurrent connections per direction (default 100)")
    ap.add_argument("--memory", type=int, default=256, help="MiB per guest (default 256)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if args.total < 1 or not 1 <= args.conns <= 1000:
        ap.error("--total must be >= 1 and --conns 1..1000")
    total = args.total << 20
    port = random.randint(20000, 50000)
    t0 = time.monotonic()
    scenario = inline_scenario(vms=[VmSpec(name="a", memory_mib=args.memory),
                                    VmSpec(name="b", memory_mib=args.memory)],
                               transport="vhost-user", name="soak")
    result: dict = {"total_bytes": total, "conns": args.conns}
    with Lab(scenario, LabOptions(boot_timeout=900)) as lab:
        result["machine"] = machine_info(lab)
        result["boot_s"] = round(time.monotonic() - t0, 1)
        pid = lab.backend.pid
        result["backend_rss_before_mib"] = rss_detail_mib(pid)
        sampler = RssSampler(pid).start()
        rows = result["directions"] = {}
        runs = [("guest->host", lambda s: guest_to_host(lab, port, s)),
                ("host->guest", lambda s: host_to_guest(lab, port + 1000, s)),
                ("a->b", lambda s: vm_to_vm(lab, "a", "b", port + 2000, s)),
                ("b->a", lambda s: vm_to_vm(lab, "b", "a", port + 3000, s))]
        for k, (name, run) in enumerate(runs):
            sizes = plan(total // 4 + (1 if k < total % 4 else 0), args.conns)
            secs, sent, received = run(sizes)
            check(name, sizes, sent, received)
            rows[name] = {"bytes": sum(sizes), "conns": len(sizes), "seconds": round(secs, 2),
                          "MBps": round(mbs(sum(sizes), secs), 1), "sha256_ok": len(sizes)}
        result["backend_rss_peak_mib"] = sampler.stop()
        result["backend_rss_after_mib"] = rss_detail_mib(pid)
        result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["machine"]
    print(f"{m['date']}  {m['host']}  {m['cpus']} CPUs  accel {m['accel']}  vsock transport vhost-user")
    print(f"{'direction':12s} {'MiB':>8s} {'conns':>6s} {'seconds':>8s} {'MB/s':>7s}  sha256")
    for name, r in rows.items():
        print(f"{name:12s} {r['bytes'] / 2**20:8.1f} {r['conns']:6d} {r['seconds']:8.2f} {r['MBps']:7.1f}  "
              f"{r['sha256_ok']}/{r['conns']} ok")
    moved = sum(r["bytes"] for r in rows.values())
    print(f"total {moved} bytes ({moved / 2**20:.1f} MiB), 0 lost or corrupted")

    def fmt(d: dict) -> str:
        return f"VmRSS {d.get('VmRSS')} MiB, RssAnon {d.get('RssAnon')} MiB"

    print(f"backend RSS: after boot {fmt(result['backend_rss_before_mib'])}; peak "
          f"{fmt(result['backend_rss_peak_mib'])}; after {fmt(result['backend_rss_after_mib'])}")
    print(f"boot {result['boot_s']} s, total {result['total_s']} s, "
          f"load average before/after {m['loadavg_before']}/{m['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
