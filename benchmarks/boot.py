"""Boot time to the guest's ready marker: bare QEMU vs vmlab, stock vs minimal kernel.

For each kernel (the stock distribution kernel and vmlab's minimal build), in one run:
  bare     qemu-system-x86_64 -kernel K -initrd I with vmlab's machine options, serial on a pipe,
           from fork to the VMLAB-READY line (no vsock device, no QMP, no vmlab code at all);
  lab      vmlab.lab.Lab(...).start() for one VM with its vsock device (vhost-user backend
           process, QMP, console, shell handshake): from the call to a guest that answers;
  run      the whole `vmlab run` command for a one-step scenario (`true`), python start-up,
           boot, step, teardown included.
overhead = lab / bare - 1 (the issue's target: <= 10%). Medians of --runs runs; the load average
is printed because other processes on the machine change TCG boot times a lot, and CPU seconds
(qemu's, and vmlab's own: this process + the backend) are printed next to the wall times: on a
busy machine they show what the boot costs when it does not have to wait for a CPU.

    python benchmarks/boot.py [--runs N] [--minimal build:NAME] [--json]
    python benchmarks/boot.py --explore     # one option changed at a time, bare qemu, minimal kernel
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import cpu_seconds  # noqa: E402
from vmlab.image import ensure_image  # noqa: E402
from vmlab.kernel import store  # noqa: E402
from vmlab.kernel.spec import resolve  # noqa: E402
from vmlab.lab import Lab, LabOptions  # noqa: E402
from vmlab.qemu.argv import VmConfig, accel_args, kernel_cmdline, memory_args  # noqa: E402
from vmlab.scenario import VmSpec, inline_scenario  # noqa: E402

MARKER = b"VMLAB-READY"


def bare_boot(kernel: Path, initrd: Path, timeout: float = 300, machine: str = "pc", memory_mib: int = 256,
              cmdline: str = "") -> tuple[float, float]:
    """(wall seconds from fork to the ready marker on the serial port, qemu CPU seconds by then)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = VmConfig(name="bench", kernel=kernel, initrd=initrd, qmp_socket=Path(tmp) / "q",
                       serial_socket=Path(tmp) / "s", console_log=Path(tmp) / "c", transport=None,
                       machine=machine, memory_mib=memory_mib, cmdline=cmdline)
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
                *accel_args(cfg), *memory_args(cfg), "-smp", "1", "-kernel", str(kernel),
                "-initrd", str(initrd), "-append", kernel_cmdline(cfg), "-serial", "stdio"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        seen = b""
        try:
            assert proc.stdout is not None
            while MARKER not in seen:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"qemu exited before the ready marker: {seen[-500:]!r}")
                seen = seen[-4096:] + chunk
                if time.monotonic() - start > timeout:
                    raise TimeoutError("no ready marker")
            return time.monotonic() - start, cpu_seconds(proc.pid) or 0.0
        finally:
            proc.kill()
            proc.wait()


def lab_boot(kernel_ref: str) -> tuple[float, float, float]:
    """Lab.start() of one VM with a vsock device (image already cached): (wall seconds,
    qemu CPU seconds, vmlab CPU seconds = this process + the backend process)."""
    start, cpu0 = time.monotonic(), time.process_time()
    lab = Lab(inline_scenario(vms=[VmSpec(name="bench", cid=3)], name="bench-boot"),
              LabOptions(kernel=kernel_ref, accel="tcg"))
    try:
        lab.start()
        wall = time.monotonic() - start
        qemu = cpu_seconds(lab.vm("bench").machine.pid) or 0.0
        ours = time.process_time() - cpu0 + (cpu_seconds(lab.backend.pid) or 0.0 if lab.backend else 0.0)
        return wall, qemu, ours
    finally:
        lab.close()


def run_command(kernel_ref: str, scenario: Path) -> float:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vmlab", "run", str(scenario), "--kernel", kernel_ref,
                        "--accel", "tcg"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"vmlab run failed:\n{r.stdout}\n{r.stderr}")
    return time.monotonic() - start


def explore(kernel: Path, initrd: Path, runs: int) -> list[tuple[str, float, float]]:
    """Bare boots of one kernel with one thing changed at a time: where does the time go?"""
    import zlib

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "initrd.cpio"
        # the base archive is one gzip member plus zero padding (and maybe a user archive after it)
        raw.write_bytes(zlib.decompressobj(wbits=31).decompress(initrd.read_bytes()))
        variants = [("vmlab's options (pc, 256M)", {}), ("-machine q35", {"machine": "q35"}),
                    ("-m 128M", {"memory_mib": 128}), ("cmdline quiet", {"cmdline": "quiet"}),
                    ("uncompressed initramfs", {"initrd": raw})]
        out = []
        for label, kw in variants:
            rd = kw.pop("initrd", initrd)
            got = [bare_boot(kernel, rd, **kw) for _ in range(runs)]
            out.append((label, statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)))
        return out


def default_minimal() -> str | None:
    """`kernel: minimal` as it is now (vmlab's config, no fragment), if it is built."""
    from vmlab.kernel.build import cached_minimal

    build = cached_minimal()
    return f"build:{build.meta.name}" if build is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--minimal", default=None, help="minimal kernel reference (default: vmlab's minimal kernel, `minimal`)")
    ap.add_argument("--stock", default=None, help="stock kernel (default: the distribution's, as the image uses)")
    ap.add_argument("--no-stock", action="store_true", help="measure the minimal kernel only")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--explore", action="store_true",
                    help="instead: bare boots of the minimal kernel with one option changed at a time")
    args = ap.parse_args()
    if args.explore:
        ref = args.minimal or default_minimal()
        if ref is None:
            print("no minimal kernel build (vmlab kernel build)", file=sys.stderr)
            return 1
        image = ensure_image(kernel=resolve(ref).path)
        print(f"bare qemu to ready marker, {ref}, median of {args.runs}; load {os.getloadavg()[0]:.1f}")
        for label, wall, cpu in explore(image.kernel, image.initrd, args.runs):
            print(f"  {label:30s} {wall:6.2f}s wall  {cpu:6.2f}s qemu cpu")
        return 0

    kernels: list[tuple[str, str]] = [] if args.no_stock else [("stock", args.stock or str(ensure_image().kernel))]
    minimal = args.minimal or default_minimal()
    if minimal:
        kernels.append(("minimal", minimal))
    else:
        print("no minimal kernel build found (vmlab kernel build); measuring the stock kernel only", file=sys.stderr)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        scen = Path(tmp) / "boot.yaml"
        scen.write_text("name: boot\nvms:\n  - name: bench\n    cid: 3\nsteps:\n  - run: {vm: bench, command: 'true'}\n")
        for label, ref in kernels:
            resolved = resolve(ref)
            image = ensure_image(kernel=resolved.path)
            lab_boot(ref)  # warm the caches (initramfs for this kernel, page cache)
            bare, labs, runs = [], [], []
            for _ in range(args.runs):  # interleaved, so load changes hit all three alike
                bare.append(bare_boot(image.kernel, image.initrd))
                labs.append(lab_boot(ref))
                runs.append(run_command(ref, scen))
            med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
            rows.append({"kernel": label, "describe": resolved.description,
                         "initrd_kb": image.initrd.stat().st_size // 1024,
                         "bare_s": med(bare, 0), "bare_qemu_cpu": med(bare, 1),
                         "lab_s": med(labs, 0), "lab_qemu_cpu": med(labs, 1), "lab_vmlab_cpu": med(labs, 2),
                         "run_s": statistics.median(runs), "bare_all": bare, "lab_all": labs, "run_all": runs,
                         "overhead": med(labs, 0) / med(bare, 0) - 1})
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "runs": args.runs}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return 0
    print(f"boot to ready marker under TCG, median of {args.runs}; {info['date']}, {info['cpus']} CPUs, "
          f"load {info['loadavg_before']} -> {info['loadavg_after']}")
    print(f"{'kernel':8s} {'initrd':>8s} {'bare qemu':>10s} {'(cpu)':>7s} {'vmlab Lab':>10s} {'(qemu cpu)':>10s} "
          f"{'(vmlab cpu)':>11s} {'vmlab run':>10s} {'overhead':>9s}")
    for r in rows:
        print(f"{r['kernel']:8s} {r['initrd_kb']:>6d}kB {r['bare_s']:>9.2f}s {r['bare_qemu_cpu']:>6.2f}s "
              f"{r['lab_s']:>9.2f}s {r['lab_qemu_cpu']:>9.2f}s {r['lab_vmlab_cpu']:>10.2f}s "
              f"{r['run_s']:>9.2f}s {r['overhead'] * 100:>8.1f}%")
    for r in rows:
        print(f"  {r['kernel']}: {r['describe']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
