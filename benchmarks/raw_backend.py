#!/usr/bin/env python3
"""Raw backend benchmark: the real backend process, a fake guest driving its rings directly.

    python benchmarks/raw_backend.py [--size MiB] [--runs N] [--rows g2h,h2g,v2v]
                                     [--paths accel,python] [--json]

No QEMU, no TCG: this process plays QEMU (vhost-user frontend, memfd guest RAM) and the Linux
virtio-vsock driver (4 KiB rx buffers, 64 KiB tx packets, indirect descriptors, EVENT_IDX,
credit) against `python -m vmlab.vsock.backend`, and the host application on the Unix sockets.
So the backend runs exactly its production path (device + router + connection + host socket)
and its CPU per GiB is measured with little noise (/proc/<pid>/schedstat, nanoseconds).

Rows: guest->host (g2h), host->guest (h2g), VM->VM (v2v, two fake guests on one backend).
`memcpy` is a plain copy of the same bytes in 64 KiB pieces in this process: the physical
limit of any path that has to move them at least once.

Paths: `accel` is the backend as shipped (the C accelerator, vsock/_accel.c, when it builds,
and uvloop's event loop), `python` the same backend in pure Python (VMLAB_NO_ACCEL=1,
VMLAB_NO_UVLOOP=1: asyncio's own loop). With both, one backend runs per path and the runs
alternate between them, so load changes hit both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _fakeguest import Driver, FakeGuest, Flow, GuestError  # noqa: E402

from vmlab.vsock.process import BackendProcess  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 1 << 20
ROWS = ("g2h", "h2g", "v2v")
PATHS = ("accel", "python")
ROW_NAMES = {"g2h": "guest->host", "h2g": "host->guest", "v2v": "VM->VM", "memcpy": "memcpy"}


def pattern(n: int = CHUNK) -> bytes:
    return bytes(range(256)) * (n // 256)


def task_cpu_ns(pid: int) -> int:
    """CPU time of a process's threads in ns (schedstat; every thread summed)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


class RawLab:
    """One backend process with two fake guests (cids 3 and 4, one group)."""

    def __init__(self, tmp: Path, buf_alloc: int | None = None, callgrind: bool = False,
                 path: str = "accel") -> None:
        if path not in PATHS:
            raise ValueError(f"path {path!r}: choose from {PATHS}")
        self.tmp = tmp
        self.path = path
        self.callgrind = callgrind
        vms = [{"name": n, "cid": c, "socket": str(tmp / f"{n}.vu"),
                "uds_path": str(tmp / f"{n}.vsock"), "group": "default"}
               for n, c in (("a", 3), ("b", 4))]
        cfg: dict = {"vms": vms, "log_level": "WARNING"}
        if buf_alloc:
            cfg["buf_alloc"] = buf_alloc
        self.vms = vms
        self.backend = BackendProcess(cfg, tmp)
        if path == "python":
            self.backend.env_overrides["VMLAB_NO_ACCEL"] = "1"      # the pure-Python backend:
            self.backend.env_overrides["VMLAB_NO_UVLOOP"] = "1"     # no C of vmlab's, asyncio's loop
        if callgrind:   # instruction counts: repeatable where CPU seconds are not
            self.backend.command_prefix = [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.%p",
                "--dump-instr=no", "--dump-line=no", "--compress-strings=no"]
        self.guests: list[FakeGuest] = []
        self.next_port = 40000

    def __enter__(self) -> "RawLab":
        self.backend.start(timeout=600 if self.callgrind else 30)
        try:
            for vm in self.vms:
                g = FakeGuest(vm["cid"], vm["socket"])
                self.guests.append(g)
                g.setup()
            self.driver = Driver(self.guests)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            tail = self.backend.log_path.read_text()[-4000:] if self.backend.log_path.exists() else ""
            print(f"--- backend log (tail) ---\n{tail}", file=sys.stderr)
        for g in self.guests:
            g.close()
        self.backend.stop()

    def rx_accel(self) -> bool:
        """Whether the backend's devices really run the C accelerator."""
        vms = self.backend.control({"cmd": "stats"}).get("vms", {})
        return all(vm.get("rx_accel") for vm in vms.values())

    def loop_kind(self) -> str:
        """The backend's event loop: "uvloop" or "asyncio"."""
        return self.backend.control({"cmd": "stats"}).get("loop", "")

    def port(self) -> int:
        self.next_port += 1
        return self.next_port

    @property
    def pid(self) -> int:
        assert self.backend.pid is not None
        return self.backend.pid

    # -- rows ------------------------------------------------------------------------------
    def g2h(self, nbytes: int, verify: bool = False) -> dict:
        a = self.guests[0]
        port = self.port()
        path = self.vms[0]["uds_path"] + f"_{port}"
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        got = [0]
        digest = hashlib.sha256() if verify else None
        done = threading.Event()

        def reader() -> None:
            conn, _ = lsock.accept()
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while got[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                if digest is not None:
                    digest.update(view[:n])
                got[0] += n
            done.set()
            conn.close()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            flow = a.connect(2, port, self.port())
            self.driver.send(a, flow, nbytes)
            res = self._timed(lambda: done.is_set(), nbytes)
        finally:
            lsock.close()
            os.unlink(path)
        t.join(10)
        if got[0] != nbytes:
            raise GuestError(f"g2h: host got {got[0]} of {nbytes} bytes")
        if digest is not None:
            res["sha256_ok"] = digest.digest() == _expected_tx_digest(nbytes)
        self._close(a, flow)
        return res

    def h2g(self, nbytes: int, verify: bool = False) -> dict:
        a = self.guests[0]
        a.verify = verify
        port = self.port()
        a.listening.add(port)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.vms[0]["uds_path"])
        s.sendall(f"CONNECT {port}\n".encode())
        ok = b""
        while True:       # the driver must answer the REQUEST before OK comes
            self.driver.step(timeout_ms=50)
            s.setblocking(False)
            try:
                ok += s.recv(64)
            except BlockingIOError:
                pass
            s.setblocking(True)
            if ok.endswith(b"\n"):
                break
        if not ok.startswith(b"OK "):
            raise GuestError(f"h2g: handshake answered {ok!r}")
        flow = next(f for f in a.flows.values() if f.local[1] == port)
        data = pattern()

        def writer() -> None:
            left = nbytes
            while left > 0:
                n = min(left, len(data))
                s.sendall(data[:n])
                left -= n

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        res = self._timed(lambda: flow.rx_bytes >= nbytes, nbytes)
        t.join(10)
        if flow.rx_bytes != nbytes:
            raise GuestError(f"h2g: guest got {flow.rx_bytes} of {nbytes} bytes")
        if flow.digest is not None:
            res["sha256_ok"] = flow.digest.digest() == _expected_h2g_digest(nbytes)
        s.close()
        self.driver.run(lambda: flow.closed, timeout=30)   # SHUTDOWN from the host close
        a.send_ctrl(flow, 3)                                # RST, as Linux answers
        self.driver.step(timeout_ms=10)
        del a.flows[(flow.peer[0], flow.peer[1], flow.local[1])]
        a.listening.discard(port)
        a.verify = False
        return res

    def v2v(self, nbytes: int, verify: bool = False) -> dict:
        a, b = self.guests
        b.verify = verify
        port = self.port()
        b.listening.add(port)
        flow = a.connect(b.cid, port, self.port())
        self.driver.run(lambda: flow.established, timeout=10)
        rflow = next(f for f in b.flows.values() if f.local[1] == port)
        self.driver.send(a, flow, nbytes)
        res = self._timed(lambda: rflow.rx_bytes >= nbytes, nbytes)
        if rflow.rx_bytes != nbytes:
            raise GuestError(f"v2v: peer got {rflow.rx_bytes} of {nbytes} bytes")
        if rflow.digest is not None:
            res["sha256_ok"] = rflow.digest.digest() == _expected_tx_digest(nbytes)
        self._close(a, flow)
        self.driver.run(lambda: rflow.closed, timeout=10)
        del b.flows[(rflow.peer[0], rflow.peer[1], rflow.local[1])]
        b.listening.discard(port)
        b.verify = False
        return res

    def _close(self, g: FakeGuest, flow: Flow) -> None:
        g.send_ctrl(flow, 3)                                # RST: done with it
        self.driver.data_flows[g].remove(flow)
        self.driver.want.pop(flow, None)
        self.driver.step(timeout_ms=10)
        del g.flows[(flow.peer[0], flow.peer[1], flow.local[1])]

    def _timed(self, done, nbytes: int) -> dict:
        stats0 = self._dev_stats()
        cpu0, own0, t0 = task_cpu_ns(self.pid), time.process_time(), time.monotonic()
        waits0, stalls0 = self.driver.waits, self.driver.stalls
        kicks0 = sum(g.kicks for g in self.guests)
        if self.callgrind:
            self._callgrind("-z")
        self.driver.run(done, timeout=600)
        wall = time.monotonic() - t0
        cpu = (task_cpu_ns(self.pid) - cpu0) / 1e9
        own = time.process_time() - own0
        gib = nbytes / GiB
        extra = {}
        if self.callgrind:
            extra["backend_instructions_per_mib"] = round(self._callgrind_dump() / (nbytes / MiB))
        stats1 = self._dev_stats()
        out = {"bytes": nbytes, "seconds": round(wall, 3), "gib_s": round(gib / wall, 3),
               "backend_cpu_s": round(cpu, 3), "backend_cpu_s_per_gib": round(cpu / gib, 3),
               "driver_cpu_s_per_gib": round(own / gib, 3),
               "guest_kicks": sum(g.kicks for g in self.guests) - kicks0,
               "driver_stalls": self.driver.stalls - stalls0,
               "driver_waits": self.driver.waits - waits0, **extra}
        for key in ("interrupts", "kicks", "rx_packets", "tx_packets"):
            out[f"backend_{key}"] = stats1.get(key, 0) - stats0.get(key, 0)
        return out

    def _callgrind(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def _callgrind_dump(self) -> int:
        """Dump the counters since the last zero; returns the instructions (Ir) in the dump."""
        before = set(self.tmp.glob("callgrind.*"))
        self._callgrind("-d")
        for _ in range(600):
            new = set(self.tmp.glob("callgrind.*")) - before
            for path in new:
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith(("summary:", "totals:")):
                        path.unlink()
                        return int(line.split()[1])
            time.sleep(0.1)
        raise GuestError("no callgrind dump appeared")

    def _dev_stats(self) -> dict:
        reply = self.backend.control({"cmd": "stats"})
        total: dict = {}
        for vm in reply.get("vms", {}).values():
            for k, v in (vm.get("device") or {}).items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
        return total


def _expected_tx_digest(nbytes: int) -> bytes:
    """What the fake guest sends: its 64 KiB tx pattern (bytes 0..255 repeated), nbytes of it."""
    return _expected_h2g_digest(nbytes)


def _expected_h2g_digest(nbytes: int) -> bytes:
    h = hashlib.sha256()
    data = pattern()
    left = nbytes
    while left > 0:
        n = min(left, len(data))
        h.update(data[:n])
        left -= n
    return h.digest()


def memcpy_row(nbytes: int) -> dict:
    src = memoryview(pattern())
    dst_raw = bytearray(16 * MiB)
    dst = memoryview(dst_raw)
    piece = 64 * 1024
    t0, c0 = time.monotonic(), time.process_time()
    left, off = nbytes, 0
    while left > 0:
        s = (off % CHUNK)
        d = off % (16 * MiB)
        dst[d:d + piece] = src[s:s + piece]
        off += piece
        left -= piece
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    gib = nbytes / GiB
    return {"bytes": nbytes, "seconds": round(wall, 3), "gib_s": round(gib / wall, 3),
            "cpu_s_per_gib": round(cpu / gib, 3)}


def run(size_mib: int, runs: int, rows: list[str], verify: bool = False,
        callgrind: bool = False, paths: tuple[str, ...] = ("accel",)) -> dict:
    """Every row `runs` times per path (interleaved: run 1 of every row on every path, then
    run 2...); median per row. `rows` is the first path's table, `paths` has them all."""
    nbytes = size_mib * MiB
    results: dict[str, dict[str, list[dict]]] = {p: {r: [] for r in rows} for p in paths}
    accel_on: dict[str, bool] = {}
    load0 = os.getloadavg()
    with contextlib.ExitStack() as stack:
        labs = {}
        for p in paths:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"vmlab-raw-{p}-")))
            labs[p] = stack.enter_context(RawLab(tmp, callgrind=callgrind, path=p))
            accel_on[p] = labs[p].rx_accel()
            for row in rows:                  # warm-up: connections, caches, page faults
                getattr(labs[p], row)(min(nbytes, 4 * MiB), verify)
        for _ in range(runs):
            for p, lab in labs.items():
                for row in rows:
                    results[p][row].append(getattr(lab, row)(nbytes, verify))
    memcpy = memcpy_row(nbytes)
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "cpus": os.cpu_count(), "size_mib": size_mib, "runs": runs,
           "loadavg_before": [round(x, 2) for x in load0],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "memcpy": memcpy, "rx_accel": accel_on, "paths": {}}
    for p in paths:
        table = out["paths"][p] = {}
        for row, res in results[p].items():
            med = sorted(res, key=lambda r: r["backend_cpu_s_per_gib"])[len(res) // 2]
            med = dict(med)
            med["gib_s_runs"] = [r["gib_s"] for r in res]
            med["backend_cpu_s_per_gib_runs"] = [r["backend_cpu_s_per_gib"] for r in res]
            med["vs_memcpy"] = round(med["gib_s"] / memcpy["gib_s"], 4)
            table[row] = med
    out["rows"] = out["paths"][paths[0]]
    return out


def print_table(res: dict) -> None:
    print(f"{'row':<14}{'path':<8}{'GiB/s':>8}{'backend CPU s/GiB':>19}{'driver CPU s/GiB':>18}"
          f"{'x memcpy':>10}{'irqs':>8}{'kicks':>8}  runs (backend CPU s/GiB)")
    paths = res["paths"]
    for row in next(iter(paths.values())):
        for p, table in paths.items():
            r = table[row]
            label = p if res["rx_accel"][p] or p == "python" else f"{p}(off)"
            print(f"{ROW_NAMES[row]:<14}{label:<8}{r['gib_s']:>8.3f}"
                  f"{r['backend_cpu_s_per_gib']:>19.3f}{r['driver_cpu_s_per_gib']:>18.3f}"
                  f"{r['vs_memcpy']:>10.4f}{r['backend_interrupts']:>8}{r['backend_kicks']:>8}  "
                  f"{r['backend_cpu_s_per_gib_runs']}")
            if "backend_instructions_per_mib" in r:
                print(f"{'':<22}backend instructions per MiB: "
                      f"{r['backend_instructions_per_mib']:,}")
    m = res["memcpy"]
    print(f"{'memcpy':<22}{m['gib_s']:>8.3f}{m['cpu_s_per_gib']:>19.3f}   (this process, 64 KiB pieces)")
    print(f"{res['size_mib']} MiB x {res['runs']}, load average before/after "
          f"{res['loadavg_before']}/{res['loadavg_after']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median; default 3)")
    parser.add_argument("--rows", default=",".join(ROWS), help="g2h,h2g,v2v (default all)")
    parser.add_argument("--paths", default="accel,python",
                        help="accel (the backend as shipped: C accelerator, uvloop), python "
                             "(VMLAB_NO_ACCEL=1 VMLAB_NO_UVLOOP=1) or both, "
                             "runs alternating (default accel,python)")
    parser.add_argument("--verify", action="store_true", help="sha256 every byte (costs the driver)")
    parser.add_argument("--callgrind", action="store_true",
                        help="run the backend under valgrind: instructions per MiB (slow, exact)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        parser.error(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    paths = tuple(p for p in args.paths.split(",") if p)
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths: choose from {', '.join(PATHS)}")
    res = run(args.size, args.runs, rows, args.verify, args.callgrind, paths)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
