"""The `vmlab` command line: run, validate, check, image build/status, console, ls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import sys
import termios
import time
import tty
from pathlib import Path

from vmlab import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM/SIGHUP take the same orderly teardown path as Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def _err(msg: str) -> None:
    print(f"vmlab: {msg}", file=sys.stderr, flush=True)


# -- run -------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from vmlab.lab import Lab, LabOptions
    from vmlab.report import step_line, summary_line, write_junit
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

    options = LabOptions(transport=args.transport, kernel=args.kernel, accel=args.accel, rootfs=args.rootfs,
                         artifacts_dir=Path(args.artifacts) if args.artifacts else None,
                         keep_artifacts="always" if args.artifacts else "never",
                         pcap=Path(args.pcap).resolve() if args.pcap else None,
                         progress=sys.stderr.isatty(), boot_timeout=args.boot_timeout)
    started = time.monotonic()
    results = []
    setup_error = None
    lab = Lab(scenario, options)
    try:
        print(f"scenario {scenario.name}: {len(scenario.vms)} VM(s), {len(scenario.steps)} step(s)", flush=True)
        try:
            lab.start()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, then torn down below
            setup_error = f"{type(exc).__name__}: {exc}"
        for notice in options.notices:
            print(f"note: {notice}", flush=True)
        if setup_error is None:
            booted = ", ".join(f"{vm.name} (cid {vm.cid}, {vm.transport or 'no vsock'})" for vm in lab.vms)
            print(f"booted in {time.monotonic() - started:.1f}s: {booted}; accel {lab.accel}", flush=True)
            counter = iter(range(1, 10**6))
            results = lab.run_steps(reporter=lambda r: print(step_line(next(counter), r), flush=True))
            if args.keep:
                _keep_alive(lab)
        else:
            print(f"lab setup failed:\n{setup_error}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the lab down", file=sys.stderr, flush=True)
        lab.failed = True
        return 130
    finally:
        lab.close()
        if options.artifacts_dir and options.artifacts_dir.exists():
            print(f"artifacts: {options.artifacts_dir}", flush=True)
        if options.pcap and options.pcap.exists():
            print(f"capture: {options.pcap} (open with wireshark or `tshark -r`)", flush=True)
    elapsed = time.monotonic() - started
    kernel_errors = lab.kernel_errors()
    for name, lines in kernel_errors.items():
        print(f"guest kernel error on {name}: {lines[0]}", file=sys.stderr)
    print(summary_line(results, elapsed) if setup_error is None else "FAILED: the lab did not come up (see above)", flush=True)
    if args.junit_xml:
        write_junit(Path(args.junit_xml), scenario.name, results, elapsed, setup_error=setup_error)
    ok = setup_error is None and results is not None and all(r.ok for r in results) and not kernel_errors
    return EXIT_OK if ok else (EXIT_SETUP if setup_error else EXIT_FAILED)


def _keep_alive(lab) -> None:
    """Leave the VMs up for debugging until Ctrl-C; consoles are released for `vmlab console`."""
    lab.release_consoles()
    print(f"\nlab {lab.lab_id} is up; Ctrl-C here tears it down.", flush=True)
    for vm in lab.vms:
        extra = f", host side {vm.uds_path}" if vm.uds_path else ""
        print(f"  {vm.name}: cid {vm.cid}; console: vmlab console {vm.name} --lab {lab.lab_id}; "
              f"qmp: {vm.machine.config.qmp_socket}{extra}", flush=True)
    while any(vm.machine.alive() for vm in lab.vms):
        time.sleep(0.5)
    print("all VMs have exited", flush=True)


# -- validate / check / image --------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from vmlab.scenario import ScenarioError, load_scenario

    status = EXIT_OK
    for path in args.scenarios:
        try:
            scenario = load_scenario(path)
        except ScenarioError as exc:
            print(str(exc), file=sys.stderr)
            status = EXIT_USAGE
            continue
        except OSError as exc:
            _err(f"cannot read {path}: {exc}")
            status = EXIT_USAGE
            continue
        for warning in scenario.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{path}: ok ({len(scenario.vms)} VM(s), {len(scenario.steps)} step(s))")
    return status


def cmd_check(args: argparse.Namespace) -> int:
    from vmlab import hostcheck
    from vmlab.image import image_status

    report = hostcheck.check_host(image_status=lambda: image_status(kernel=args.kernel))
    print(hostcheck.to_json(report) if args.json else hostcheck.render_text(report))
    return EXIT_OK if report.transports and report.qemu_path else EXIT_FAILED


def cmd_image_build(args: argparse.Namespace) -> int:
    from vmlab.image import ensure_image

    try:
        image = ensure_image(kernel=args.kernel, progress=True, force=args.force)
    except Exception as exc:  # noqa: BLE001 - every builder error is a clear message for the user
        _err(f"image build failed: {exc}")
        return EXIT_SETUP
    print(f"kernel: {image.kernel}\ninitrd: {image.initrd}\nkernel version: {image.kernel_version}")
    return EXIT_OK


def cmd_image_status(args: argparse.Namespace) -> int:
    from vmlab.image import image_status

    print(json.dumps(image_status(kernel=args.kernel), indent=2, default=str))
    return EXIT_OK


# -- console / ls ----------------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    from vmlab.runtime import running_labs

    labs = running_labs()
    if not labs:
        print("no running labs")
    for lab in labs:
        vms = ", ".join(f"{n} (cid {v['cid']})" for n, v in lab["vms"].items())
        print(f"{Path(lab['run_dir']).name}: {lab['scenario']} pid {lab['pid']}: {vms}")
    return EXIT_OK


def cmd_console(args: argparse.Namespace) -> int:
    from vmlab.runtime import running_labs

    labs = [lab for lab in running_labs() if args.vm in lab["vms"]
            and (args.lab is None or Path(lab["run_dir"]).name == args.lab)]
    if not labs:
        _err(f"no running lab has a VM {args.vm!r} (start one with `vmlab run SCENARIO --keep`; `vmlab ls` lists them)")
        return EXIT_USAGE
    if len(labs) > 1:
        _err(f"several labs have a VM {args.vm!r}; pick one with --lab: " + ", ".join(Path(l["run_dir"]).name for l in labs))
        return EXIT_USAGE
    path = labs[0]["vms"][args.vm]["serial"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        _err(f"cannot attach to {args.vm}'s console at {path}: {exc} (is another console attached?)")
        return EXIT_SETUP
    print(f"attached to {args.vm}; press Ctrl-] to detach", file=sys.stderr, flush=True)
    _relay(sock)
    return EXIT_OK


def _relay(sock: socket.socket) -> None:
    """Raw terminal <-> serial socket until Ctrl-] or the socket closes."""
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        sock.sendall(b"\n")
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or b"\x1d" in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
        print("\ndetached", file=sys.stderr)


# -- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmlab",
        description="VM lab orchestrator and test harness for Linux AF_VSOCK (QEMU + vhost-vsock / vhost-user-vsock).",
    )
    parser.add_argument("--version", action="version", version=f"vmlab {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="boot a scenario's VMs, run its steps, tear down",
                         description="Boot every VM of SCENARIO in parallel, run its steps, print one line per "
                                     "step and a summary. Exit 0 only when every step passed.",
                         epilog="exit status: 0 all steps passed; 1 a step failed or a guest kernel oopsed; "
                                "2 invalid scenario; 3 the lab did not come up; 130 interrupted (Ctrl-C, SIGTERM). "
                                "Everything the run started is torn down in every case.")
    run.add_argument("scenario", help="scenario YAML file (see docs/scenarios.md)")
    run.add_argument("--transport", choices=("auto", "vhost", "vhost-user"), default=None,
                     help="vsock transport for VMs the scenario leaves at auto (a transport the scenario "
                          "pins is kept)")
    run.add_argument("--kernel", default=None, help="guest kernel (vmlinuz) for VMs that do not pin one")
    run.add_argument("--rootfs", choices=("image", "host"), default=None,
                     help="root filesystem for VMs the scenario leaves open: image (vmlab's busybox initramfs, "
                          "the default) or host (the host's / read-only over virtio-9p, tmpfs/overlays for writes)")
    run.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                     help="auto uses KVM only where it really works, else TCG")
    run.add_argument("--keep", action="store_true",
                     help="after the steps, keep the VMs up (until Ctrl-C) and print how to reach their consoles")
    run.add_argument("--artifacts", metavar="DIR", help="keep console, QMP, qemu and backend logs in DIR")
    run.add_argument("--junit-xml", metavar="FILE", help="write a JUnit XML report (one test case per step)")
    run.add_argument("--pcap", metavar="FILE", help="vhost-user: capture every vsock packet (Wireshark LINKTYPE_VSOCK)")
    run.add_argument("--boot-timeout", type=float, default=240.0, metavar="SEC", help="per-VM boot timeout (default 240)")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check scenario files without booting anything")
    val.add_argument("scenarios", nargs="+", metavar="SCENARIO")
    val.set_defaults(func=cmd_validate)

    check = sub.add_parser("check", help="host readiness: qemu, usable KVM, /dev/vhost-vsock, transports, image",
                           description="Report whether this host can run vmlab labs and which transports it offers.")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--kernel", default=None, help="report the image status for this kernel")
    check.set_defaults(func=cmd_check)

    image = sub.add_parser("image", help="guest image (kernel + initramfs) management")
    image_sub = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND")
    build = image_sub.add_parser("build", help="fetch the kernel and build the cached initramfs",
                                 description="Resolve the guest kernel (--kernel, $VMLAB_KERNEL, the distribution's "
                                             "kernel package, host /boot) and build the initramfs into the cache.")
    build.add_argument("--kernel", default=None, help="path to a vmlinuz to use instead of the default")
    build.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    build.set_defaults(func=cmd_image_build)
    status = image_sub.add_parser("status", help="which kernel would be used and whether the cache is current")
    status.add_argument("--kernel", default=None)
    status.set_defaults(func=cmd_image_status)
    image.set_defaults(func=lambda a: (image.print_help(), EXIT_USAGE)[1])

    console = sub.add_parser("console", help="attach to a kept VM's serial console (Ctrl-] detaches)")
    console.add_argument("vm", help="VM name")
    console.add_argument("--lab", default=None, help="lab id (from `vmlab ls`) when several labs run")
    console.set_defaults(func=cmd_console)

    ls = sub.add_parser("ls", help="list running labs")
    ls.set_defaults(func=cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _install_signal_handlers()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
