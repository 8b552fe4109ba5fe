#!/usr/bin/env python3
"""vsock vs TCP (QEMU user networking) throughput, guest->host, host->guest and VM->VM.

    python benchmarks/throughput.py [--size MiB] [--runs N] [--json] [--transport T] [--no-tcp]
                                    [--no-blast] [--no-v2v]

Boots one lab with guests of the same image: `bench` with vmlab's vsock device (vhost-user
backend here, vhost where /dev/vhost-vsock works), `peer` with one too (the VM->VM row's
receiver) and `tcp` with no vsock but a virtio-net NIC on QEMU's user networking (slirp),
port-forwarded from 127.0.0.1. Only loopback is used on the host.

Measured (each --runs times, interleaved, median reported; every number is from the receiving side):
  vsock g2h  guest `vmlab-guest connect 2 P --send-bytes N`; the host times first byte -> EOF
  vsock h2g  guest `vmlab-guest listen P --once --expect-bytes N`; the host times from its first
             write until the guest closed the connection (i.e. after the guest read all N bytes)
  tcp g2h    guest `nc -l -p P < file` (busybox nc, file in tmpfs) and, as a second number,
             busybox `httpd` serving that file (sendfile); the host connects via the hostfwd
  tcp h2g    guest `nc -l -p P > /dev/null`; the host times first write -> guest closed
  (blast)    the same both ways and on both transports with bench-blast (blast.c, compiled here
             and added to the guests): plain 64 KiB writes/reads, no hashing. vmlab-guest hashes
             every byte, so the blast rows are the ones that compare transports.
  v2v blast  `bench-blast send vsock <peer's CID>` in bench, `bench-blast recv` in peer: the
             receiving guest times its first byte -> EOF (no host end sees these bytes); the
             sender's own time and the host's time around the send command are printed as
             cross-checks. qemu CPU: both guests' qemu. vhost-user only (--no-v2v skips it)
Context line: busybox sha256sum over the same size inside the vsock guest (vmlab-guest hashes
every byte it sends or receives, on the same emulated vCPU; nc does not).
Also: the vhost-user backend process's CPU time (utime+stime from /proc/<pid>/stat) per GiB
moved, and each qemu's CPU time per GiB. MB/s means 10^6 bytes per second.
Numbers from a run are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import cpu_seconds, free_tcp_port, guest_events, machine_info, mbs, wait_guest_file  # noqa: E402

from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402
from vmlab.scenario.model import DEFAULT_MEMORY_MIB  # noqa: E402
from vmlab.vsock.host import host_connect, host_listen  # noqa: E402

CHUNK = 1 << 20
TIMEOUT_MIN = 120.0


def _timeout(nbytes: int) -> float:
    return max(TIMEOUT_MIN, nbytes / 1e6)  # allow down to 1 MB/s before giving up


def _drain(sock, nbytes: int | None) -> tuple[int, float, float]:
    """Read until EOF (or nbytes); return (bytes, first-byte time, last-byte time)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got, first = 0, None
    while nbytes is None or got < nbytes:
        n = sock.recv_into(view)
        if not n:
            break
        if first is None:
            first = time.perf_counter()
        got += n
    return got, first or time.perf_counter(), time.perf_counter()


def _send_and_wait_close(sock, nbytes: int) -> tuple[float, float]:
    """Send nbytes, half-close, wait for the peer to close; return (start, end)."""
    data = bytes(CHUNK)
    view = memoryview(data)
    start = time.perf_counter()
    left = nbytes
    while left:
        n = min(left, CHUNK)
        sock.sendall(view[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(4096):
        pass
    return start, time.perf_counter()


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop()."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.before: dict[str, float | None] = {}

    def __enter__(self) -> "CpuMeter":
        self.before = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.used: dict[str, float] = {}
        return self

    def __exit__(self, *exc) -> None:
        for k, p in self.pids.items():
            after, before = cpu_seconds(p), self.before.get(k)
            if after is not None and before is not None:
                self.used[k] = after - before


# -- vsock --------------------------------------------------------------------------------------
def vsock_g2h(lab: Lab, nbytes: int, port: int) -> dict:
    vm = lab.vm("bench")
    result: dict = {}

    def reader(listener) -> None:
        try:
            conn = listener.accept(timeout=60)
            with conn:
                conn.settimeout(_timeout(nbytes))
                result["bytes"], result["first"], result["last"] = _drain(conn, None)
        except BaseException as e:  # reported by the caller
            result["error"] = repr(e)

    with host_listen(port, vms=[vm.endpoint()]) as listener:
        t = threading.Thread(target=reader, args=(listener,), daemon=True)
        with CpuMeter(_pids(lab, vm)) as cpu:
            t.start()
            rc, out = vm.run(f"vmlab-guest connect 2 {port} --send-bytes {nbytes} --shutdown",
                             timeout=_timeout(nbytes))
            t.join(_timeout(nbytes))
    if rc != 0 or "error" in result or result.get("bytes") != nbytes:
        raise RuntimeError(f"vsock g2h failed: rc={rc} host={result} guest={out[-600:]!r}")
    sent = next((e for e in guest_events(out) if e.get("event") == "sent"), {})
    secs = result["last"] - result["first"]
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": cpu.used,
            "guest_sender_seconds": sent.get("seconds")}


def vsock_h2g(lab: Lab, nbytes: int, port: int) -> dict:
    vm = lab.vm("bench")
    out_file = f"/tmp/bench-l-{port}.out"
    vm.check(f"vmlab-guest listen {port} --once --expect-bytes {nbytes} --timeout 600 "
             f"> {out_file} 2>&1 &")
    wait_guest_file(vm, out_file, r'"listening"', 60)
    with CpuMeter(_pids(lab, vm)) as cpu:
        conn = host_connect(vm.cid, port, endpoint=vm.endpoint(), timeout=_timeout(nbytes))
        with conn:
            start, end = _send_and_wait_close(conn, nbytes)
    out = wait_guest_file(vm, out_file, r'"closed"|"error"', 60)
    received = next((e for e in guest_events(out) if e.get("event") == "received"), None)
    if not received or received.get("bytes") != nbytes:
        raise RuntimeError(f"vsock h2g failed: guest said {out[-600:]!r}")
    secs = end - start
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": cpu.used,
            "guest_receiver_MBps": received.get("mbps", 0) / 8}


# -- bench-blast: the same no-frills tool on both transports ----------------------------------------
BLAST_SRC = Path(__file__).resolve().parent / "blast.c"
BLAST_GUEST = "/bin/bench-blast"


def build_blast(out_dir: Path) -> Path | None:
    """Compile blast.c (static) for the guests; None (rows skipped) without a C compiler."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None
    out = out_dir / "bench-blast"
    subprocess.run([cc, "-O2", "-static", "-s", "-Wall", "-o", str(out), str(BLAST_SRC)], check=True)
    return out


class _TcpListener:
    """127.0.0.1:port, with the accept(timeout) of vmlab's HostListener."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))

    def accept(self, timeout: float):
        self.sock.settimeout(timeout)
        return self.sock.accept()[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def blast_g2h(lab: Lab, vm_name: str, family: str, nbytes: int, port: int) -> dict:
    vm = lab.vm(vm_name)
    result: dict = {}

    def reader(listener) -> None:
        try:
            conn = listener.accept(timeout=60)
            with conn:
                conn.settimeout(_timeout(nbytes))
                result["bytes"], result["first"], result["last"] = _drain(conn, None)
        except BaseException as e:  # reported by the caller
            result["error"] = repr(e)

    if family == "vsock":
        listener, addr = host_listen(port, vms=[vm.endpoint()]), "2"
    else:  # slirp: the guest's 10.0.2.2 is the host's 127.0.0.1
        listener, addr = _TcpListener(port), "10.0.2.2"
    with listener:
        t = threading.Thread(target=reader, args=(listener,), daemon=True)
        with CpuMeter(_pids(lab, vm)) as cpu:
            t.start()
            rc, out = vm.run(f"bench-blast send {family} {addr} {port} {nbytes}", timeout=_timeout(nbytes))
            t.join(_timeout(nbytes))
    if rc != 0 or "error" in result or result.get("bytes") != nbytes:
        raise RuntimeError(f"blast {family} g2h failed: rc={rc} host={result} guest={out[-600:]!r}")
    secs = result["last"] - result["first"]
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": cpu.used}


def _blast_recv_start(vm, family: str, port: int) -> str:
    """Start `bench-blast recv` in the background in `vm`; return its output file once it listens
    (so the sender never races the listen)."""
    out_file = f"/tmp/bench-blast-{port}.out"
    vm.check(f"bench-blast recv {family} {port} > {out_file} 2>&1 &")
    wait_guest_file(vm, out_file, r'"listening"|"error"', 60)
    return out_file


def _blast_recv_done(vm, out_file: str, nbytes: int, what: str) -> dict:
    """The receiver's `done` event (bytes, its own first byte -> EOF seconds); raises unless it
    got exactly nbytes, so a short transfer never becomes a fast one."""
    out = wait_guest_file(vm, out_file, r'"done"|"error"', 60)
    done = next((e for e in guest_events(out) if e.get("event") == "done"), None)
    if not done or done.get("bytes") != nbytes:
        raise RuntimeError(f"blast {what} failed: receiver said {out[-600:]!r}")
    return done


def blast_h2g(lab: Lab, vm_name: str, family: str, nbytes: int, port: int) -> dict:
    vm = lab.vm(vm_name)
    out_file = _blast_recv_start(vm, family, port)
    with CpuMeter(_pids(lab, vm)) as cpu:
        if family == "vsock":
            conn = host_connect(vm.cid, port, endpoint=vm.endpoint(), timeout=_timeout(nbytes))
        else:  # the hostfwd port forwards 127.0.0.1:port to the guest's port
            conn = socket.create_connection(("127.0.0.1", port), timeout=_timeout(nbytes))
        with conn:
            start, end = _send_and_wait_close(conn, nbytes)
    _blast_recv_done(vm, out_file, nbytes, f"{family} h2g")
    secs = end - start
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": cpu.used}


def blast_v2v(lab: Lab, nbytes: int, port: int) -> dict:
    """VM -> VM through the backend's router: bench-blast in `bench` sends to `peer`'s CID.

    No host end sees the bytes, so the receiving guest times them: bench-blast recv's first
    byte -> EOF on the peer's CLOCK_MONOTONIC, the same span the host times for guest->host.
    The host's time around the sender's command (agent round trip and exec included) and the
    sender's connect -> peer-closed time are kept as cross-checks of that guest clock.
    qemu CPU is both guests' qemu processes summed (both vCPUs do the work of one transfer)."""
    src, dst = lab.vm("bench"), lab.vm("peer")
    out_file = _blast_recv_start(dst, "vsock", port)
    with CpuMeter({**_pids(lab, src), "qemu_peer": dst.machine.pid}) as cpu:
        t0 = time.perf_counter()
        rc, out = src.run(f"bench-blast send vsock {dst.cid} {port} {nbytes}", timeout=_timeout(nbytes))
        host_secs = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"blast v2v failed: sender rc={rc} said {out[-600:]!r}")
    done = _blast_recv_done(dst, out_file, nbytes, "v2v")
    sent = next((e for e in guest_events(out) if e.get("event") == "done"), {})
    used = dict(cpu.used)
    peer = used.pop("qemu_peer", None)
    if "qemu" in used and peer is not None:
        used["qemu"] += peer
    else:                                   # half of the qemu CPU would look like a saving
        used.pop("qemu", None)
    secs = done["seconds"]
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": used,
            "sender_MBps": mbs(nbytes, sent["seconds"]) if sent.get("seconds") else None,
            "host_command_MBps": mbs(nbytes, host_secs)}


SHA256_MAX = 64 << 20      # the guest's tmpfs holds half its RAM: hash at most this much


def guest_sha256(lab: Lab, nbytes: int) -> dict:
    """Context: vmlab-guest hashes (SHA-256) every byte it sends or receives, on the same TCG vCPU;
    this is how fast busybox sha256sum hashes a tmpfs file (of the transfer size, at most
    SHA256_MAX) in that guest."""
    vm = lab.vm("bench")
    nbytes = min(nbytes, SHA256_MAX)
    vm.check(f"head -c {nbytes} /dev/zero > /tmp/bench-hash", timeout=300)
    t0 = time.perf_counter()
    vm.check("true")
    empty = time.perf_counter() - t0
    t0 = time.perf_counter()
    vm.check("sha256sum /tmp/bench-hash", timeout=_timeout(nbytes))
    secs = time.perf_counter() - t0 - empty
    vm.check("rm -f /tmp/bench-hash")
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": {}}


# -- TCP over slirp -----------------------------------------------------------------------------
def _wait_tcp_listen(vm, port: int, timeout: float = 60) -> None:
    """Until something in the guest listens on TCP `port` (v4 or v6), from /proc/net/tcp*."""
    pat = f":{port:04X} [0-9A-F]*:0000 0A"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, _ = vm.run(f"cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q '{pat}'")
        if rc == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{vm.name}: nothing listens on TCP port {port} after {timeout}s")


def _wait_guest_idle(vm, timeout: float = 60) -> None:
    """Until the guest's nc/httpd of the last transfer are gone (then the port is free again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, _ = vm.run("pidof nc httpd")
        if rc != 0:
            return
        time.sleep(0.2)
    vm.run("killall nc httpd", timeout=10)


def tcp_guest_memory(size_mib: int) -> int:
    """MiB of RAM for the TCP guest: its tmpfs (half the RAM) holds the file nc and httpd serve,
    so a --size beyond the default guest's 128 MiB tmpfs gets a bigger guest, not an I/O error."""
    return max(DEFAULT_MEMORY_MIB, 2 * size_mib + 128)


def tcp_setup(lab: Lab, nbytes: int) -> None:
    vm = lab.vm("tcp")
    vm.check("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 "
             "&& ip route add default via 10.0.2.2")
    vm.check(f"mkdir -p /tmp/www && head -c {nbytes} /dev/zero > /tmp/www/blob", timeout=300)


def tcp_g2h(lab: Lab, nbytes: int, port: int, tool: str) -> dict:
    vm = lab.vm("tcp")
    if tool == "nc":
        vm.check(f"nc -l -p {port} < /tmp/www/blob > /dev/null 2>&1 &")
        request = b""
    else:  # busybox httpd, one request in the foreground mode, sendfile() from tmpfs
        vm.check(f"httpd -f -p {port} -h /tmp/www > /dev/null 2>&1 &")
        request = b"GET /blob HTTP/1.0\r\n\r\n"
    _wait_tcp_listen(vm, port)
    with CpuMeter(_pids(lab, vm)) as cpu:
        with socket.create_connection(("127.0.0.1", port), timeout=_timeout(nbytes)) as s:
            s.sendall(request)
            got, first, last = _drain(s, None)
    if tool == "httpd":
        vm.run("killall httpd", timeout=10)
    _wait_guest_idle(vm)
    if got < nbytes:  # httpd adds a few hundred bytes of response headers
        raise RuntimeError(f"tcp g2h ({tool}) got {got} of {nbytes} bytes")
    secs = last - first
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": cpu.used}


def tcp_h2g(lab: Lab, nbytes: int, port: int) -> dict:
    vm = lab.vm("tcp")
    # nc half-closes when its stdin ends; a stdin that never ends keeps the guest's side open
    # until nc has read everything and exits (the host waits for exactly that close)
    vm.check(f"sleep 3600 | nc -l -p {port} > /dev/null 2>&1 &")
    _wait_tcp_listen(vm, port)
    with CpuMeter(_pids(lab, vm)) as cpu:
        with socket.create_connection(("127.0.0.1", port), timeout=_timeout(nbytes)) as s:
            start, end = _send_and_wait_close(s, nbytes)
    _wait_guest_idle(vm)
    vm.run("killall sleep", timeout=10)
    secs = end - start
    return {"bytes": nbytes, "seconds": secs, "MBps": mbs(nbytes, secs), "cpu": cpu.used}


# -- driver -------------------------------------------------------------------------------------
def _pids(lab: Lab, vm) -> dict[str, int | None]:
    """The processes that move this VM's bytes: its qemu, and the backend for a vsock VM."""
    backend = lab.backend.pid if lab.backend and vm.transport == "vhost-user" else None
    return {"backend": backend, "qemu": vm.machine.pid}


def _summary(runs: list[dict]) -> dict:
    moved = sum(r["bytes"] for r in runs)
    out = {"MBps": statistics.median(r["MBps"] for r in runs),
           "MBps_runs": [round(r["MBps"], 2) for r in runs],
           "bytes_per_run": runs[0]["bytes"]}
    for key in ("backend", "qemu"):
        used = [r["cpu"][key] for r in runs if key in r["cpu"]]
        if used:
            out[f"{key}_cpu_s_per_GiB"] = sum(used) / (moved / 2**30)
    for key in ("guest_receiver_MBps", "sender_MBps", "host_command_MBps"):  # cross-checks
        extra = [r[key] for r in runs if r.get(key)]
        if extra:
            out[key] = statistics.median(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="MiB per transfer (default 64)")
    ap.add_argument("--runs", type=int, default=3, help="transfers per direction (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--transport", default=None, help="vsock transport: auto (default), vhost, vhost-user")
    ap.add_argument("--no-tcp", action="store_true", help="skip the TCP (slirp) comparison guest")
    ap.add_argument("--no-blast", action="store_true", help="skip the bench-blast rows (blast.c)")
    ap.add_argument("--no-v2v", action="store_true",
                    help="skip the VM->VM blast row (and its second vsock guest)")
    args = ap.parse_args(argv)
    nbytes = args.size << 20
    tmp = Path(tempfile.mkdtemp(prefix="vmlab-bench-"))
    try:
        blast = None if args.no_blast else build_blast(tmp)
        files = {BLAST_GUEST: blast} if blast else {}
        results = _measure(args, nbytes, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = results["results"]

    def ratio(a: str, b: str) -> float | None:
        return res[a]["MBps"] / res[b]["MBps"] if a in res and b in res else None

    ratios = {
        "guest->host, vmlab-guest vs nc": ratio("vsock guest->host", "tcp guest->host (nc)"),
        "guest->host, vmlab-guest vs httpd": ratio("vsock guest->host", "tcp guest->host (httpd)"),
        "host->guest, vmlab-guest vs nc": ratio("vsock host->guest", "tcp host->guest (nc)"),
        "guest->host, bench-blast both": ratio("vsock guest->host (blast)", "tcp guest->host (blast)"),
        "host->guest, bench-blast both": ratio("vsock host->guest (blast)", "tcp host->guest (blast)"),
    }
    results["ratio_vsock_over_tcp"] = {k: v for k, v in ratios.items() if v is not None}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    return 0


def _measure(args, nbytes: int, files: dict) -> dict:
    tcp_port = free_tcp_port()          # hostfwd: host 127.0.0.1:tcp_port -> guest :tcp_port
    tcp_back = free_tcp_port()          # host listener the guest reaches as 10.0.2.2:tcp_back
    while tcp_back == tcp_port:
        tcp_back = free_tcp_port()
    vms = [VmSpec(name="bench", files=dict(files))]
    # VM->VM needs vmlab's backend (the kernel's vhost drops guest-to-guest packets, see
    # docs/scenarios.md), so no peer guest for --transport vhost; `auto` is checked after boot
    v2v = bool(files) and not args.no_v2v and args.transport != "vhost"
    if v2v:
        vms.append(VmSpec(name="peer", files=dict(files)))
    if not args.no_tcp:
        vms.append(VmSpec(name="tcp", vsock=False, cmdline="vmlab.modules=virtio_net", files=dict(files),
                          memory_mib=tcp_guest_memory(args.size),
                          qemu_args=["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{tcp_port}-:{tcp_port}",
                                     "-device", "virtio-net-pci,netdev=n0"]))
    port = random.randint(20000, 60000)
    results: dict = {"size_MiB": args.size, "runs": args.runs}
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    with Lab(inline_scenario(vms=vms, name="bench-throughput"),
             LabOptions(transport=args.transport)) as lab:
        results["machine"] = machine_info(lab)
        results["boot_s"] = round(time.monotonic() - t0, 1)
        log(f"booted in {results['boot_s']}s: accel {lab.accel}, vsock transport {lab.vm('bench').transport}")
        if not args.no_tcp:
            tcp_setup(lab, nbytes)
        plan = [("vsock guest->host", lambda i: vsock_g2h(lab, nbytes, port + 10 * i)),
                ("vsock host->guest", lambda i: vsock_h2g(lab, nbytes, port + 10 * i + 1))]
        if files:
            plan += [("vsock guest->host (blast)", lambda i: blast_g2h(lab, "bench", "vsock", nbytes, port + 10 * i + 2)),
                     ("vsock host->guest (blast)", lambda i: blast_h2g(lab, "bench", "vsock", nbytes, port + 10 * i + 3))]
        if v2v and {lab.vm(n).transport for n in ("bench", "peer")} != {"vhost-user"}:
            log("  vsock VM->VM (blast) skipped: needs the vhost-user transport in both guests")
            v2v = False
        if v2v:
            plan += [("vsock VM->VM (blast)", lambda i: blast_v2v(lab, nbytes, port + 10 * i + 4))]
        if not args.no_tcp:
            plan += [("tcp guest->host (nc)", lambda i: tcp_g2h(lab, nbytes, tcp_port, "nc")),
                     ("tcp guest->host (httpd)", lambda i: tcp_g2h(lab, nbytes, tcp_port, "httpd")),
                     ("tcp host->guest (nc)", lambda i: tcp_h2g(lab, nbytes, tcp_port))]
            if files:
                plan += [("tcp guest->host (blast)", lambda i: blast_g2h(lab, "tcp", "tcp", nbytes, tcp_back)),
                         ("tcp host->guest (blast)", lambda i: blast_h2g(lab, "tcp", "tcp", nbytes, tcp_port))]
        raw: dict[str, list[dict]] = {}
        for i in range(args.runs):          # interleaved, so load changes hit every transfer alike
            for name, fn in plan:
                r = fn(i)
                raw.setdefault(name, []).append(r)
                log(f"  {name:27s} run {i + 1}: {r['MBps']:8.2f} MB/s")
        r = guest_sha256(lab, nbytes)
        raw["guest sha256sum (context)"] = [r]
        log(f"  {'guest sha256sum (context)':27s}      : {r['MBps']:8.2f} MB/s")
        results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if lab.backend is not None and lab.vm("bench").transport == "vhost-user":
            vm = lab.backend.control({"cmd": "stats"})["vms"]["bench"]
            dev = vm.get("device") or {}
            results["backend_rx"] = {"rx_accel": vm.get("rx_accel"),
                                     "rx_packets": dev.get("rx_packets", 0),
                                     "rx_filled": dev.get("rx_filled", 0)}
    results["total_s"] = round(time.monotonic() - t0, 1)
    results["results"] = {name: _summary(runs) for name, runs in raw.items()}
    return results


def _print_table(results: dict) -> None:
    m = results["machine"]
    print(f"{m['date']}  {m['cpus']} CPUs  accel {m['accel']}  vsock transport {m['transport']}  "
          f"{results['size_MiB']} MiB x {results['runs']} runs (median)")
    print(f"{'transfer':27s} {'MB/s':>8s}  {'backend CPU s/GiB':>17s}  {'qemu CPU s/GiB':>14s}  runs")
    for name, r in results["results"].items():
        b = r.get("backend_cpu_s_per_GiB")
        q = r.get("qemu_cpu_s_per_GiB")
        print(f"{name:27s} {r['MBps']:8.2f}  {('%.1f' % b) if b is not None else '-':>17s}  "
              f"{('%.1f' % q) if q is not None else '-':>14s}  {r['MBps_runs']}")
    v2v = results["results"].get("vsock VM->VM (blast)", {})
    if "sender_MBps" in v2v:
        print(f"VM->VM cross-check (receiver's clock above): sender's connect -> close "
              f"{v2v['sender_MBps']:.2f} MB/s, host around the send command {v2v['host_command_MBps']:.2f} MB/s")
    for name, ratio in results.get("ratio_vsock_over_tcp", {}).items():
        print(f"vsock/TCP {name}: {ratio:.2f}x")
    rx = results.get("backend_rx")
    if rx:
        print(f"backend rx: C accelerator {'on' if rx['rx_accel'] else 'off'}, "
              f"{rx['rx_filled']} of {rx['rx_packets']} rx packets by rx_fill")
    print(f"boot {results['boot_s']}s, total {results['total_s']}s, "
          f"load average before/after {m['loadavg_before']}/{m['loadavg_after']}")


if __name__ == "__main__":
    sys.exit(main())
