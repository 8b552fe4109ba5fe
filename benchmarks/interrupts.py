#!/usr/bin/env python3
"""SIGINT/SIGTERM at chosen moments of `vmlab run` and of a pytest-xdist run: nothing may be left.

    python3 benchmarks/interrupts.py [--count 20] [--phases build,boot,steps,teardown,pytest]
                                     [--budget SECONDS] [--seed 13]

Rounds cycle through the phases (build, steps, boot, teardown, pytest, build, ...). Each round
starts its command, watches for the phase's marker, then sends SIGINT to the process group (as
Ctrl-C does) or SIGTERM to the command's own process, at a random moment inside the phase:

- build:    `vmlab run` with a fresh, empty VMLAB_CACHE_DIR (the kernel comes from the usual
            cache via VMLAB_KERNEL), signalled 0..--build-window s after the build began
            (the cache dir appeared) while no initrd.img exists yet and no QEMU runs;
- boot:     once a QEMU of the run exists, 0..70 % of the last measured boot ("booted in
            N s" of an earlier round; --boot-window before the first) later;
- steps:    a scenario whose second step sleeps --sleep s; signalled inside that sleep
            (after the step-1 line, before the last step line);
- teardown: scenarios/hello.yaml, signalled the moment its last step line appears (the lab is
            closing; the summary line comes after the close);
- pytest:   `python3 -m pytest -n 2` of a two-test vmlab file (one VM per test), signalled
            0..1 x the last measured boot after the first QEMU appeared (boot or test).

The phase is recorded from what had happened when the signal was sent (output lines, QEMU
processes, cache files), so a round that missed its phase says so. After each round: qemu and
backend processes of this run, runtime dirs, Unix sockets, held CID leases (a private
VMLAB_CID_LOCK_DIR and XDG_RUNTIME_DIR make these countable). One line per round, then the
totals; exit 1 if anything was left or a command hung. --budget stops starting rounds once
that many seconds have passed (the summary says how many ran).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vmlab.leftovers import leftovers as found_leftovers, our_processes  # noqa: E402
PHASES = ("build", "steps", "boot", "teardown", "pytest")  # steps first: it measures the boot

STEPS_SCENARIO = """\
name: interrupt-steps
vms:
  - name: guest
steps:
  - name: host server on port 9999
    host_listen: {{id: srv, port: 9999, cid: host, chunk: 64}}
  - name: a long step
    sleep: {sleep}
  - name: guest says hello
    guest_connect: {{id: cli, vm: guest, cid: host, port: 9999, send: "Hello, world!"}}
  - name: host received it
    expect: {{id: srv, message: "Hello, world!"}}
"""

PYTEST_FILE = '''\
"""Two tests, one VM each: under -n 2 both xdist workers boot a guest at once."""
import pytest


@pytest.mark.parametrize("n", [1, 2])
def test_guest_says_hello(lab, vsock_listen, guest, n):
    vm = lab.vms[0]
    with vsock_listen(vm, 9999) as server:
        client = guest(vm).connect(2, 9999, send="hello %d" % n)
        assert client.errors() == [], client.summary()
        with server.accept(timeout=60) as conn:
            assert conn.recv_all() == b"hello %d" % n
'''


def _default_sigint() -> None:
    """A shell's background job inherits SIGINT ignored, and Python keeps it so: undo that,
    or the Ctrl-C rounds would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def qemu_running(base: Path) -> bool:
    for pid in our_processes(base):
        try:
            if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def leftovers(base: Path, locks: Path) -> dict[str, int]:
    return {k: len(v) for k, v in found_leftovers(base, locks).items()}


def real_kernel() -> str | None:
    """The unpacked kernel package of the usual cache, so build rounds rebuild only the image."""
    env = os.environ.get("VMLAB_KERNEL")
    if env:
        return env
    from vmlab.image.cache import cache_root
    found = sorted((p for p in (cache_root() / "kernels").glob("linux-image-*")
                    if (p / ".complete").exists()), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


class Watch:
    """The command's output and state, polled; the phase name at any moment."""

    def __init__(self, kind: str, out: Path, base: Path, cache: Path | None, last_step: int):
        self.kind, self.out, self.base, self.cache, self.last_step = kind, out, base, cache, last_step

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def image_built(self) -> bool:
        return self.cache is not None and any((self.cache / "images").glob("*/initrd.img"))

    def phase(self, p: subprocess.Popen) -> str:
        if p.poll() is not None:
            return "finished"
        out = self.text()
        if self.kind == "pytest":
            done = out.count(" PASSED") + out.count(" FAILED") + out.count(" ERROR")
            if not qemu_running(self.base):
                return "pytest-start" if done == 0 else "pytest-teardown"
            return "pytest-boot/test" if done == 0 else "pytest-2nd-test"
        if "PASSED:" in out or "FAILED:" in out:
            return "finished"
        if f"[{self.last_step:2d}]" in out:
            return "teardown"
        if "booted in" in out:
            return "steps"
        if qemu_running(self.base):
            return "boot"
        if self.cache is not None and self.cache.exists():
            return "setup" if self.image_built() else "build"
        return "startup"


def wait_for(p: subprocess.Popen, cond, timeout: float) -> bool:
    """Poll every 20 ms until cond() or the command exits / the timeout passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if p.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list, cycled in order")
    ap.add_argument("--budget", type=float, default=0.0, help="start no round after this many s (0: no limit)")
    ap.add_argument("--build-window", type=float, default=0.6,
                    help="signal within s after the build began (it takes ~1 s on an idle machine)")
    ap.add_argument("--boot-window", type=float, default=3.0,
                    help="boot window (s) until a round has measured the boot")
    ap.add_argument("--sleep", type=float, default=15.0, help="the steps scenario's long step (s)")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    kinds = [k.strip() for k in args.phases.split(",") if k.strip()]
    bad_kinds = [k for k in kinds if k not in PHASES]
    if bad_kinds or not kinds:
        ap.error(f"--phases: unknown {bad_kinds}; choose from {','.join(PHASES)}")
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="vmlab-int-"))
    base, locks = tmp / "run", tmp / "cids"
    base.mkdir(mode=0o700)
    locks.mkdir()
    steps_yaml = tmp / "steps.yaml"
    steps_yaml.write_text(STEPS_SCENARIO.format(sleep=args.sleep))
    (tmp / "pyt").mkdir()
    (tmp / "pyt" / "test_interrupted.py").write_text(PYTEST_FILE)
    kernel = real_kernel() if "build" in kinds else None
    env = dict(os.environ, XDG_RUNTIME_DIR=str(base), VMLAB_CID_LOCK_DIR=str(locks),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    print(f"interrupts: {args.count} rounds over {','.join(kinds)}, seed {args.seed}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    totals = {"processes": 0, "run_dirs": 0, "sockets": 0, "leases": 0}
    phases: dict[str, int] = {}
    missed, bad, ran = 0, 0, 0
    boot_s = args.boot_window / 0.7
    for n in range(1, args.count + 1):
        if args.budget and time.monotonic() - started > args.budget:
            print(f"  budget of {args.budget:g} s used: stopping after {ran} rounds", flush=True)
            break
        kind = kinds[(n - 1) % len(kinds)]
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        out_path = tmp / f"round{n}.out"
        renv, cache, last_step = dict(env), None, 3
        if kind == "pytest":
            cmd = [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider",
                   "--rootdir", str(tmp / "pyt"), str(tmp / "pyt" / "test_interrupted.py")]
        else:
            scen = steps_yaml if kind == "steps" else ROOT / "scenarios" / "hello.yaml"
            last_step = 4 if kind == "steps" else 3
            cmd = [sys.executable, "-m", "vmlab", "run", str(scen)]
            if kind == "build":
                cache = tmp / f"cache{n}"
                renv["VMLAB_CACHE_DIR"] = str(cache)
                if kernel:
                    renv["VMLAB_KERNEL"] = kernel
        w = Watch(kind, out_path, base, cache, last_step)
        t0 = time.monotonic()
        with open(out_path, "w") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=renv,
                                 cwd=tmp / "pyt" if kind == "pytest" else ROOT,
                                 start_new_session=True, preexec_fn=_default_sigint)
        # wait for the phase's marker, then a random moment inside the phase
        if kind == "build":
            wait_for(p, lambda: cache.exists(), 120)
            delay = rng.uniform(0, args.build_window)
            wait_for(p, lambda: w.phase(p) != "build", delay)
        elif kind in ("boot", "pytest"):
            wait_for(p, lambda: qemu_running(base), 600)
            delay = rng.uniform(0, boot_s * (0.7 if kind == "boot" else 1.0))
            wait_for(p, lambda: "booted in" in w.text() if kind == "boot" else False, delay)
        elif kind == "steps":
            wait_for(p, lambda: "[ 1]" in w.text(), 600)
            wait_for(p, lambda: f"[{last_step:2d}]" in w.text(), rng.uniform(0, args.sleep * 0.8))
        else:
            wait_for(p, lambda: f"[{last_step:2d}]" in w.text(), 600)
        where = w.phase(p)
        at = time.monotonic() - t0
        text = w.text()
        if p.poll() is None:
            if sig == signal.SIGINT:
                os.killpg(p.pid, signal.SIGINT)       # Ctrl-C: the whole foreground group
            else:
                p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
            where += " (HUNG: killed)"
            bad += 1
        time.sleep(0.5)
        left = leftovers(base, locks)
        if cache is not None and cache.exists():  # half-written cache files (temp + rename)
            left["cache_tmp"] = sum(1 for q in cache.rglob(".*") if q.is_file() and "locks" not in q.parts)
        for pid in our_processes(base):        # never leave a QEMU behind, even on a leak
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ran += 1
        booted = re.search(r"booted in ([0-9.]+)s", text + w.text())
        if booted:
            boot_s = float(booted.group(1))
        for k, v in left.items():
            totals[k] = totals.get(k, 0) + v
        hit = where == kind or (kind == "pytest" and where.startswith("pytest-")
                                and where != "pytest-start")
        if not hit:
            missed += 1
        phases[where] = phases.get(where, 0) + 1
        status = "clean" if not any(left.values()) else f"LEFT {left}"
        if any(left.values()):
            bad += 1
        print(f"  round {n:2}: {kind:<8} {signal.Signals(sig).name:<7} at {at:6.1f} s, hit "
              f"{where:<16}{'' if hit else ' (MISSED)'} exit {rc:>4}, {time.monotonic() - t0:5.1f} s  "
              f"{status}", flush=True)
    print(f"total: {ran} interrupts ({', '.join(f'{k} {v}' for k, v in sorted(phases.items()))}; "
          f"{missed} missed their phase) in {time.monotonic() - started:.0f} s; left behind: "
          f"{totals['processes']} processes, {totals['run_dirs']} runtime dirs, "
          f"{totals['sockets']} sockets, {totals['leases']} CID leases, "
          f"{totals.get('cache_tmp', 0)} half-written cache files; {bad} bad rounds; "
          f"logs in {tmp}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
