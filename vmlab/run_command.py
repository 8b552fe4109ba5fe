"""`vmlab run`: one run, or many (--repeat N, --until-fail), with seeds, bundles and live pcap.

Iteration i (1-based) runs with seed ``base + i - 1``, so a failing iteration is rerun alone
with ``--seed`` (printed). With ``reuse: true`` in the scenario (and no ``--fresh``) the booted
VMs are kept between iterations: host endpoints are closed, faults cleared, the backend reseeded.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3


def _err(msg: str) -> None:
    print(f"vmlab: {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    iteration: int
    seed: int
    ok: bool
    seconds: float
    setup_error: str | None = None
    results: list = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    failure: str = ""
    kernel_errors: dict = field(default_factory=dict)
    transport: str | None = None
    kernels: dict = field(default_factory=dict)   # VM name -> exact kernel description


class Printer:
    """The report goes to stdout, or to stderr when stdout carries the pcap (`--pcap -`)."""

    def __init__(self, out: TextIO, echo: bool) -> None:
        self.out, self.echo = out, echo
        self.lines: list[str] = []

    def __call__(self, line: str, always: bool = False) -> None:
        self.lines.append(line)
        if self.echo or always:
            print(line, file=self.out, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from vmlab.lab import LabOptions
    from vmlab.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        _err(f"invalid scenario:\n{exc}")
        return EXIT_USAGE
    except OSError as exc:
        _err(f"cannot read scenario: {exc}")
        return EXIT_USAGE
    for warning in scenario.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    runs = args.repeat or (args.max if args.until_fail else 1)
    if runs < 1:
        _err("--repeat/--max: at least 1 run")
        return EXIT_USAGE
    repeating = runs > 1 or args.until_fail
    reuse = bool(scenario.reuse) and not args.fresh
    out: TextIO = sys.stdout
    pcap: Path | None = None
    if args.pcap == "-":
        if sys.stdout.isatty():
            _err("--pcap -: stdout is a terminal; pipe it (`| wireshark -k -i -`, `| tshark -r -`) "
                 "or give a file")
            return EXIT_USAGE
        if repeating and not reuse:
            _err("--pcap - streams one capture: use it with a single run or a `reuse: true` scenario")
            return EXIT_USAGE
        pcap = Path(f"/proc/{os.getpid()}/fd/1")   # the backend writes our stdout directly
        out = sys.stderr
        sys.stdout.flush()
        sys.stdout = sys.stderr                  # nothing else may write into the pcap stream
    elif args.pcap:
        pcap = Path(args.pcap).resolve()
    bundle = Path(args.bundle).resolve() if args.bundle else None
    want_bundle = bundle is not None or args.bundle_on_failure is not None
    work = Path(tempfile.mkdtemp(prefix="vmlab-run-")) if want_bundle else None
    auto_pcap = want_bundle and pcap is None       # a bundle carries the capture when it can
    base_seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    artifacts = Path(args.artifacts) if args.artifacts else None

    def options_for(i: int) -> LabOptions:
        art = None
        if work is not None:
            art = work / f"run-{i}"
        elif artifacts is not None:
            art = artifacts / f"run-{i}" if repeating else artifacts
        return LabOptions(transport=args.transport, kernel=args.kernel, accel=args.accel, rootfs=args.rootfs,
                          gdb=args.gdb,
                          artifacts_dir=art, keep_artifacts="always" if art else "never",
                          pcap=work / f"run-{i}.pcap" if auto_pcap and work else pcap,
                          pcap_required=not auto_pcap,
                          progress=sys.stderr.isatty(),
                          boot_timeout=args.boot_timeout, seed=(base_seed + i - 1) % 2**32)

    printer = Printer(out, echo=not repeating)
    print(f"scenario {scenario.name}: {len(scenario.vms)} VM(s), {len(scenario.steps)} step(s); "
          f"seed {base_seed}" + (f"; up to {runs} run(s){', reusing the VMs' if reuse else ''}"
                                 if repeating else ""), file=out, flush=True)
    outcomes: list[Outcome] = []
    lab = None
    started = time.monotonic()
    try:
        for i in range(1, runs + 1):
            opts = options_for(i)
            printer.lines = []
            if lab is not None and not reuse:
                lab = None
            outcome, lab = _run_one(scenario, opts, i, lab, reuse, printer, args,
                                    last=(i == runs))
            outcomes.append(outcome)
            if repeating:
                status = "PASS" if outcome.ok else "FAIL"
                print(f"run {i}/{runs}: {status} {outcome.seconds:6.1f}s  seed {outcome.seed}"
                      + (f"  -- {outcome.failure.splitlines()[0].strip()}" if outcome.failure
                         else ""), file=out, flush=True)
                if not outcome.ok:
                    for line in outcome.lines:
                        print("    " + line.replace("\n", "\n    "), file=out, flush=True)
            if not outcome.ok and outcome.setup_error is not None:
                break
            if not outcome.ok and args.until_fail:
                break
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the lab down", file=sys.stderr, flush=True)
        if lab is not None:
            lab.failed = True
            lab.close()
        return 130
    finally:
        if lab is not None:
            lab.close()
    elapsed = time.monotonic() - started
    failed = [o for o in outcomes if not o.ok]
    if repeating:
        per_run = elapsed / max(1, len(outcomes))
        first = (f"; first failing run {failed[0].iteration} (seed {failed[0].seed}: rerun it with "
                 f"`vmlab run {args.scenario} --seed {failed[0].seed}`)" if failed else "")
        print(f"{'FAILED' if failed else 'PASSED'}: {len(outcomes)} run(s), {len(failed)} failed"
              f"{first}; {per_run:.1f}s per run (first {outcomes[0].seconds:.1f}s) in {elapsed:.1f}s",
              file=out, flush=True)
    target = failed[0] if failed else outcomes[-1]
    if want_bundle and (bundle is not None or failed):
        dest = bundle if bundle is not None else Path(args.bundle_on_failure).resolve()
        _write_bundle(dest, scenario, args, target, base_seed, reuse, lab, work, pcap, out)
    if work is not None:
        from vmlab.bundle import remove_tree
        remove_tree(work)
    if args.junit_xml:
        from vmlab.report import write_junit
        write_junit(Path(args.junit_xml), scenario.name, target.results, target.seconds,
                    setup_error=target.setup_error,
                    properties={f"kernel.{name}": k for name, k in target.kernels.items()})
    if target.setup_error is not None:
        return EXIT_SETUP
    return EXIT_FAILED if failed else EXIT_OK


def _run_one(scenario, opts, i: int, lab, reuse: bool, printer: Printer, args,
             last: bool) -> tuple[Outcome, Any]:
    """One iteration; returns its outcome and the lab to reuse next (None when closed)."""
    from vmlab.lab import Lab
    from vmlab.report import step_line, summary_line

    started = time.monotonic()
    outcome = Outcome(i, opts.seed, False, 0.0)
    finished = False
    try:
        if lab is None:
            lab = Lab(scenario, opts)
            try:
                lab.start()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - reported, then torn down
                outcome.setup_error = f"{type(exc).__name__}: {exc}"
            for notice in opts.notices:
                printer(f"note: {notice}")
            if outcome.setup_error is None:
                booted = ", ".join(f"{vm.name} (cid {vm.cid}, {vm.transport or 'no vsock'})"
                                   for vm in lab.vms)
                printer(f"booted in {time.monotonic() - started:.1f}s: {booted}; accel {lab.accel}")
                for name, kernel in lab.kernels.items():
                    printer(f"kernel {name}: {kernel}")
                if args.gdb:
                    _print_gdb(lab, printer)
        else:
            lab.next_run(opts.seed)
        if outcome.setup_error is None:
            outcome.transport = lab.transport
            outcome.kernels = dict(lab.kernels)
            counter = iter(range(1, 10**6))
            outcome.results = lab.run_steps(
                reporter=lambda r: printer(step_line(next(counter), r)))
            for f in lab.fault_report():
                printer(f"fault {f['key']} {f['kind']} on {f.get('vm') or 'any VM'}: "
                        f"{f['hits']} hit(s), {f['seen']} packet(s) selected")
            outcome.kernel_errors = lab.kernel_errors()
            for name, lines in outcome.kernel_errors.items():
                printer(f"guest kernel error on {name}: {lines[0]}")
            failed = not all(r.ok for r in outcome.results) or bool(outcome.kernel_errors)
            if args.keep and (last or (failed and args.until_fail)):
                _keep_alive(lab)
        else:
            printer(f"lab setup failed:\n{outcome.setup_error}", always=True)
        outcome.ok = (outcome.setup_error is None and all(r.ok for r in outcome.results)
                      and not outcome.kernel_errors)
        bad = [(n, r) for n, r in enumerate(outcome.results, 1) if not r.ok and not r.skipped]
        if bad:
            outcome.failure = step_line(*bad[0])
        elif outcome.setup_error:
            outcome.failure = "lab setup failed: " + outcome.setup_error.splitlines()[0]
        elif outcome.kernel_errors:
            outcome.failure = "guest kernel error"
        finished = True
    finally:                             # an exception (Ctrl-C) always tears the lab down here
        close = lab is not None and (not finished or not reuse or last or (
            not outcome.ok and args.until_fail) or outcome.setup_error is not None)
        if close:
            lab.close()
    outcome.seconds = time.monotonic() - started
    if close:
        if opts.artifacts_dir and opts.artifacts_dir.exists() and not args.bundle \
                and args.bundle_on_failure is None:
            printer(f"artifacts: {opts.artifacts_dir}")
        if opts.pcap and opts.pcap.exists() and not str(opts.pcap).startswith("/proc/") \
                and not (args.bundle or args.bundle_on_failure):
            printer(f"capture: {opts.pcap} (open with wireshark or `tshark -r`)")
    printer(summary_line(outcome.results, outcome.seconds) if outcome.setup_error is None
            else "FAILED: the lab did not come up (see above)")
    outcome.lines = list(printer.lines)
    return outcome, (None if close else lab)


def _keep_alive(lab) -> None:
    """Leave the VMs up for debugging until Ctrl-C; consoles are released for `vmlab console`."""
    lab.release_consoles()
    print(f"\nlab {lab.lab_id} is up; Ctrl-C here tears it down.", flush=True)
    for vm in lab.vms:
        extra = f", host side {vm.uds_path}" if vm.uds_path else ""
        print(f"  {vm.name}: cid {vm.cid}; console: vmlab console {vm.name} --lab {lab.lab_id}; "
              f"vmlab qmp {vm.name} query-status --lab {lab.lab_id}; "
              f"vmlab exec-guest {vm.name} --lab {lab.lab_id} -- CMD{extra}", flush=True)
    if lab.backend is not None:
        print(f"  capture: vmlab capture --lab {lab.lab_id} | wireshark -k -i -", flush=True)
    while any(vm.machine.alive() for vm in lab.vms):
        time.sleep(0.5)
    print("all VMs have exited", flush=True)


def _print_gdb(lab, printer: Printer) -> None:
    for vm in lab.vms:
        sock = lab.run_dir / f"{vm.name}.gdb"
        if sock.exists():
            printer(f"gdb for {vm.name}: gdb -ex 'target remote {sock}' vmlinux  "
                    "(the guest kernel's vmlinux with debug info)")


def _write_bundle(dest: Path, scenario, args, target: Outcome, base_seed: int, reuse: bool,
                  lab, work: Path | None, pcap: Path | None, out: TextIO) -> None:
    from vmlab.bundle import BundleError, RunRecord, copy_logs, write_bundle

    logs: list[Path] = []
    if work is not None:   # reused VMs keep the logs of the run that booted them (run-1)
        dirs = [work / f"run-{i}" for i in range(target.iteration, 0, -1)]
        logs = copy_logs(next((d for d in dirs if d.is_dir()), work / "run-1"))
    if pcap is None and work is not None:         # the capture made for the bundle
        runs = [work / f"run-{target.iteration}.pcap", work / "run-1.pcap"]
        pcap = next((p for p in runs if p.exists()), None)
    if pcap is not None and pcap.exists() and not str(pcap).startswith("/proc/") \
            and pcap not in logs and pcap.name not in {p.name for p in logs}:
        logs.append(pcap)
    kernel = None
    try:
        from vmlab.image import ensure_image
        kernel = Path(args.kernel) if args.kernel else ensure_image().kernel
    except Exception:  # noqa: BLE001 - a bundle without a kernel identity is still useful
        pass
    transport = target.transport or args.transport or (
        scenario.transport if scenario.transport != "auto" else None)
    rec = RunRecord(scenario_path=Path(args.scenario), seed=target.seed, base_seed=base_seed,
                    iteration=target.iteration, reused=reuse, transport=transport,
                    accel=args.accel, kernel=kernel, ok=target.ok, failure=target.failure,
                    report="\n".join(target.lines) + "\n", argv=sys.argv[1:], logs=logs)
    try:
        write_bundle(dest, scenario, rec, include_kernel=args.bundle_kernel)
    except BundleError as exc:
        _err(str(exc))
        return
    print(f"bundle: {dest} (rerun with `vmlab replay {dest}`)", file=out, flush=True)


def cmd_replay(args: argparse.Namespace) -> int:
    """Unpack a bundle and rerun it: the same scenario, seed, transport (and kernel)."""
    from vmlab.bundle import BundleError, extract_bundle, remove_tree

    into = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="vmlab-replay-"))
    into.mkdir(parents=True, exist_ok=True)
    try:
        top, manifest = extract_bundle(Path(args.bundle), into)
    except BundleError as exc:
        _err(str(exc))
        return EXIT_USAGE
    pytest_run = manifest.get("runner") == "pytest"   # a pytest bundle reruns its test
    what = f"test {manifest.get('test')}" if pytest_run else f"scenario {manifest.get('scenario_name')}"
    print(f"replaying {args.bundle}: {what}, seed "
          f"{manifest.get('seed')}, recorded with vmlab {manifest.get('vmlab')}, "
          f"{manifest.get('qemu')}, kernel {manifest.get('kernel', {}).get('version')}", flush=True)
    if manifest.get("failure"):
        print(f"recorded failure: {manifest['failure'].splitlines()[0]}", flush=True)
    replay = list(manifest["replay_args"])
    for i, a in enumerate(replay):
        if a.startswith(("scenario/", "kernel/", "test/")):
            replay[i] = str(top / a)
    extra = [a for a in (args.extra or []) if a != "--"]
    argv = [sys.executable, *replay, *extra] if pytest_run else \
        [sys.executable, "-m", "vmlab", *replay, *extra]
    try:                                         # a fresh process, as on another machine
        return subprocess.call(argv, cwd=top)
    except KeyboardInterrupt:
        return 130
    finally:
        if not args.dir:
            remove_tree(into)
            print("(the bundle was unpacked in a temporary directory, now removed; "
                  "`vmlab replay --dir DIR` keeps it)", flush=True)
