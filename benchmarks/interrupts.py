#!/usr/bin/env python3
"""SIGINT/SIGTERM at random moments of `vmlab run`: nothing may be left behind.

    python3 benchmarks/interrupts.py [--count 20] [--scenario scenarios/hello.yaml]
                                     [--min-delay 0] [--max-delay 90] [--seed 13]

Each round starts `vmlab run SCENARIO`, waits a random time, then sends SIGINT to its process
group (as Ctrl-C does) or SIGTERM to vmlab, and checks after it exits: qemu/backend processes
of that run, runtime dirs, Unix sockets, held CID leases (a private VMLAB_CID_LOCK_DIR and
XDG_RUNTIME_DIR make these countable). Prints one line per round and the totals; exit 1 if
anything was left.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _default_sigint() -> None:
    """A shell's background job inherits SIGINT ignored, and Python keeps it so: undo that,
    or the Ctrl-C rounds would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def phase(out: str) -> str:
    """What vmlab was doing when the signal came, from what it had printed."""
    if "PASSED" in out or "FAILED" in out:
        return "finished"
    if "[ " in out:
        return "steps"
    if "booted in" in out:
        return "steps"
    if "scenario " in out:
        return "boot"
    return "startup"


def leftovers(base: Path, locks: Path) -> dict[str, int]:
    procs = 0
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(base) in text and ("qemu-system" in text or "vmlab.vsock" in text):
            procs += 1
    run_dirs = [p for p in (base / "vmlab").glob("*") if p.is_dir()] if (base / "vmlab").exists() else []
    sockets = sum(1 for p in base.rglob("*") if stat.S_ISSOCK(os.lstat(p).st_mode))
    held = 0
    for lock in locks.glob("*.lock"):
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                held += 1
    return {"processes": procs, "run_dirs": len(run_dirs), "sockets": sockets, "leases": held}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--scenario", default=str(ROOT / "scenarios" / "hello.yaml"))
    ap.add_argument("--min-delay", type=float, default=0.0, help="earliest signal moment (s)")
    ap.add_argument("--max-delay", type=float, default=90.0, help="latest signal moment (s)")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="vmlab-int-"))
    base, locks = tmp / "run", tmp / "cids"
    base.mkdir(mode=0o700)
    locks.mkdir()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(base), VMLAB_CID_LOCK_DIR=str(locks),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"interrupts: {args.count} rounds of `vmlab run {args.scenario}`, signal within "
          f"{args.min_delay:g}..{args.max_delay:g} s, seed {args.seed}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    totals = {"processes": 0, "run_dirs": 0, "sockets": 0, "leases": 0}
    phases: dict[str, int] = {}
    bad = 0
    for n in range(1, args.count + 1):
        out_path = tmp / f"round{n}.out"
        with open(out_path, "w") as out:
            p = subprocess.Popen([sys.executable, "-m", "vmlab", "run", args.scenario],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True, preexec_fn=_default_sigint)
        delay = rng.uniform(args.min_delay, args.max_delay)
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        try:
            p.wait(delay)
        except subprocess.TimeoutExpired:
            pass
        where = phase(out_path.read_text(errors="replace"))
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
        for k, v in left.items():
            totals[k] += v
        phases[where] = phases.get(where, 0) + 1
        status = "clean" if not any(left.values()) else f"LEFT {left}"
        if any(left.values()):
            bad += 1
        print(f"  round {n:2}: {signal.Signals(sig).name:<7} at {delay:5.1f} s ({where:<8}) "
              f"exit {rc:>3}  {status}", flush=True)
    print(f"total: {args.count} interrupts ({', '.join(f'{k} {v}' for k, v in sorted(phases.items()))}); "
          f"left behind: {totals['processes']} processes, {totals['run_dirs']} runtime dirs, "
          f"{totals['sockets']} sockets, {totals['leases']} CID leases; {bad} bad rounds")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
