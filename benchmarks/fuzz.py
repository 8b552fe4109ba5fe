#!/usr/bin/env python3
"""Fuzz the backend's guest-facing parsers with hypothesis: >= 100,000 cases, figures printed.

    python3 benchmarks/fuzz.py [--cases N] [--seed S] [--jobs J] [--only TARGET ...]

Runs the targets of tests/fuzz/fuzz_targets.py (virtqueue walker, vhost-user session, device data
path, router, rx fill in Python vs C) with the given total split by weight; prints cases, time
and outcome counters per target. Exit status 1 if any property broke (the failing case is printed by hypothesis).
Shrinking is off (a failure is reported as found); re-run it in tests/fuzz to shrink.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "fuzz")]

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import fuzz_targets  # noqa: E402

# share of the cases per target: the cheap, dense parsers get more
WEIGHTS = {"virtqueue": 0.30, "vhost_user": 0.20, "router": 0.25, "device": 0.10, "rx_fill": 0.10,
           "relay": 0.05}


def run_target(name: str, n: int, rng_seed: int) -> tuple[int, float, str | None, dict]:
    strategy, target = fuzz_targets.TARGETS[name]
    start = time.perf_counter()
    fuzz_targets.OUTCOMES.clear()           # a worker process may run several targets
    count = [0]

    @seed(rng_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        count[0] += 1
        if count[0] % 1000 == 0:
            print(f"  ... {name}: {count[0]} cases, {time.perf_counter() - start:.0f} s",
                  flush=True)
        target(case)

    error = None
    try:
        run()
    except Exception as exc:                    # a property broke: report it, go on
        error = f"{type(exc).__name__}: {exc}"
    return count[0], time.perf_counter() - start, error, dict(fuzz_targets.OUTCOMES)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--cases", type=int, default=100_000, help="total cases (default 100000)")
    ap.add_argument("--seed", type=int, default=13, help="hypothesis seed (default 13)")
    ap.add_argument("--only", nargs="*", choices=sorted(WEIGHTS), help="run only these targets")
    ap.add_argument("--jobs", type=int, default=1, help="targets run in parallel processes")
    args = ap.parse_args()
    names = args.only or list(WEIGHTS)
    total_w = sum(WEIGHTS[n] for n in names)
    print(f"fuzz: {args.cases} cases, seed {args.seed}, {platform.node()} "
          f"({platform.machine()}, python {platform.python_version()}), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    all_cases, all_time, failed = 0, 0.0, []
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {name: pool.submit(run_target, name,
                                     max(1, round(args.cases * WEIGHTS[name] / total_w)),
                                     args.seed) for name in names}
        results = {}
        for fut in concurrent.futures.as_completed(futures.values()):
            name = next(n for n, f in futures.items() if f is fut)
            results[name] = fut.result()
            cases, secs, error, _ = results[name]
            print(f"  ... {name} done: {cases} cases in {secs:.1f} s", flush=True)
    print("per target:")
    for name in names:
        cases, secs, error, got = results[name]
        for key, value in got.items():
            outcomes[key] = outcomes.get(key, 0) + value
        all_cases += cases
        all_time += secs
        status = "ok" if error is None else f"FAILED: {error.splitlines()[0][:200]}"
        print(f"  {name:<11} {cases:>7} cases  {secs:8.1f} s  {cases / secs:7.0f}/s  {status}",
              flush=True)
        if error is not None:
            failed.append((name, error))
    print(f"total: {all_cases} cases, {all_time:.1f} s of target time "
          f"({time.perf_counter() - started:.1f} s wall, {args.jobs} jobs), "
          f"{len(failed)} targets failed")
    print("outcomes:")
    for key, value in sorted(outcomes.items()):
        print(f"  {key:<34} {value}")
    for name, error in failed:
        print(f"\n--- {name} ---\n{error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
