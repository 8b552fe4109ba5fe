"""The `vmlab` command line: run, replay, validate, check, image build/status, kernel build/ls/rm,
bisect, console, ls, exec, qmp, exec-guest, capture."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import termios
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

def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _output_problem(args: argparse.Namespace) -> str | None:
    """Checked before anything boots: output paths that could never be written (a run must not
    fail at its very end, or leave its capture nowhere)."""
    for opt, value in (("--junit-xml", args.junit_xml), ("--pcap", args.pcap)):
        if not value:
            continue
        path = Path(value)
        if path.is_dir():
            return f"{opt} {value}: is a directory, expected a file name"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"{opt} {value}: cannot create its directory: {exc.strerror or exc}"
        if not os.access(path.parent, os.W_OK):
            return f"{opt} {value}: directory {path.parent} is not writable"
    if args.artifacts:
        path = Path(args.artifacts)
        if path.exists() and not path.is_dir():
            return f"--artifacts {args.artifacts}: exists and is not a directory"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"--artifacts {args.artifacts}: cannot create it: {exc.strerror or exc}"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    problem = _output_problem(args)
    if problem is not None:
        _err(problem)
        return EXIT_USAGE
    from vmlab.run_command import cmd_run as run
    return run(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from vmlab.run_command import cmd_replay as replay
    return replay(args)


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


# -- kernel ----------------------------------------------------------------------------------------

def cmd_kernel_build(args: argparse.Namespace) -> int:
    from vmlab.kernel import BuildError, BuildRequest, ConfigError, SourceError, build_kernel

    req = BuildRequest(src=Path(args.src) if args.src else None,
                       fragment=Path(args.config) if args.config else None, jobs=args.jobs,
                       force=args.force, name=args.name, build_cmd=args.build_cmd)
    started = time.monotonic()
    try:
        build = build_kernel(req, progress=sys.stderr.isatty() or args.progress)
    except (BuildError, ConfigError, SourceError) as exc:
        _err(f"kernel build failed: {exc}")
        return EXIT_FAILED if isinstance(exc, BuildError) else EXIT_USAGE
    except KeyboardInterrupt:
        _err("kernel build interrupted")
        return 130
    m = build.meta
    print(f"{'reused' if build.reused else 'built'} build:{m.name} ({m.describe()})"
          + (f" in {time.monotonic() - started:.1f}s" if build.reused else f" in {m.seconds:.0f}s with -j{m.jobs}"))
    print(f"kernel: {build.kernel}")
    return EXIT_OK


def cmd_kernel_ls(args: argparse.Namespace) -> int:
    from vmlab.kernel import store

    builds = store.all_builds()
    if args.json:
        from dataclasses import asdict
        print(json.dumps([{**asdict(b.meta), "path": str(b.kernel)} for b in builds], indent=1))
        return EXIT_OK
    if not builds:
        print(f"no kernel builds in {store.builds_dir()} (make one with `vmlab kernel build`)")
        return EXIT_OK
    for b in builds:
        m = b.meta
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.built))
        print(f"build:{m.name}  {m.version}  {when}  {b.size() / 1e6:.1f} MB  {m.describe()}")
    return EXIT_OK


def cmd_kernel_rm(args: argparse.Namespace) -> int:
    from vmlab.kernel import StoreError, store

    status = EXIT_OK
    for ref in args.builds:
        try:
            b = store.find(ref[len("build:"):] if ref.startswith("build:") else ref)
        except StoreError as exc:
            _err(str(exc))
            status = EXIT_USAGE
            continue
        store.remove(b)
        print(f"removed build:{b.meta.name} ({b.path})")
    return status


def cmd_bisect(args: argparse.Namespace) -> int:
    from vmlab.kernel.bisect import BisectError, BisectOptions, run_bisect

    if args.scenario and args.scenario[0] == "--":
        args.scenario = args.scenario[1:]
    if not args.scenario:
        _err("bisect needs a scenario after --: vmlab bisect GOOD BAD -- SCENARIO [vmlab run options]")
        return EXIT_USAGE
    opts = BisectOptions(good=args.good, bad=args.bad, scenario=Path(args.scenario[0]),
                         run_args=list(args.scenario[1:]), src=Path(args.src), repeat=args.repeat,
                         build_cmd=args.build_cmd, config=Path(args.config) if args.config else None,
                         jobs=args.jobs, logs=Path(args.logs) if args.logs else None)
    try:
        result = run_bisect(opts, out=lambda line: print(line, flush=True))
    except BisectError as exc:
        _err(f"bisect: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("bisect interrupted; the tree was reset (git bisect reset)")
        return 130
    return EXIT_OK if result.first_bad else EXIT_FAILED


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


def _pick_lab(lab_id: str | None) -> dict | None:
    from vmlab.runtime import running_labs

    labs = running_labs()
    if lab_id is not None:
        match = [lab for lab in labs if Path(lab["run_dir"]).name == lab_id]
        if not match:
            _err(f"no running lab {lab_id!r}" + (f" (running: {', '.join(Path(l['run_dir']).name for l in labs)})"
                                                  if labs else " (start one with `vmlab run SCENARIO --keep`)"))
            return None
        return match[0]
    if not labs:
        _err("no running lab (start one with `vmlab run SCENARIO --keep`)")
        return None
    if len(labs) > 1:
        _err("several labs are running; pick one with --lab: " + ", ".join(Path(l["run_dir"]).name for l in labs))
        return None
    return labs[0]


def cmd_exec(args: argparse.Namespace) -> int:
    from vmlab.shim import LabTarget, ShimError, check_program, shim_env

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _err("exec: no program given (vmlab exec [--lab ID] -- PROGRAM ARGS...)")
        return EXIT_USAGE
    state = _pick_lab(args.lab)
    if state is None:
        return EXIT_USAGE
    target = LabTarget.from_state(state)
    try:
        exe = check_program(argv[0], target)
        env = shim_env(target)
    except ShimError as exc:
        _err(f"exec: {exc}")
        return EXIT_USAGE
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(exe, argv, env)
    except OSError as exc:
        _err(f"exec: cannot run {exe}: {exc}")
        return 126
def cmd_qmp(args: argparse.Namespace) -> int:
    from vmlab.attach import AttachError, find_vm, qmp_command

    try:
        arguments = json.loads(args.arguments) if args.arguments else None
        if arguments is not None and not isinstance(arguments, dict):
            raise ValueError("must be a JSON object")
    except ValueError as exc:
        _err(f"ARGS-JSON {args.arguments!r}: {exc}")
        return EXIT_USAGE
    try:
        vm = find_vm(args.vm, args.lab)
        result = qmp_command(vm.get("qmp_tools") or "", args.command, arguments)
    except AttachError as exc:
        _err(str(exc))
        return EXIT_FAILED
    print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_exec_guest(args: argparse.Namespace) -> int:
    from vmlab.attach import AttachError, exec_guest, find_vm

    # REMAINDER also swallows options given after VM (`exec-guest a --lab X -- cmd`): take them back
    rest = list(args.cmd or [])
    if "--" in rest:
        head, command = rest[:rest.index("--")], rest[rest.index("--") + 1:]
        while head:
            opt = head.pop(0)
            key, _, value = opt.partition("=")
            if key not in ("--lab", "--timeout") or (not value and not head):
                _err(f"exec-guest: unexpected {opt!r} before --")
                return EXIT_USAGE
            value = value or head.pop(0)
            if key == "--lab":
                args.lab = value
            else:
                try:
                    args.timeout = float(value)
                except ValueError:
                    _err(f"exec-guest: --timeout {value!r} is not a number")
                    return EXIT_USAGE
    else:
        command = rest
    if not command:
        _err("exec-guest: give the command after --, e.g. `vmlab exec-guest a -- uname -r`")
        return EXIT_USAGE
    try:
        vm = find_vm(args.vm, args.lab)
        rc, out = exec_guest(vm["serial"], " ".join(command), args.timeout)
    except AttachError as exc:
        _err(str(exc))
        return EXIT_SETUP
    sys.stdout.write(out)
    sys.stdout.flush()
    return rc


def cmd_capture(args: argparse.Namespace) -> int:
    from vmlab.attach import AttachError, capture, find_lab

    if args.write is None and sys.stdout.isatty():
        _err("capture: stdout is a terminal; pipe it (`| wireshark -k -i -`) or use -w FILE")
        return EXIT_USAGE
    try:
        lab = find_lab(args.lab)
        print(f"capturing lab {Path(lab['run_dir']).name} ({lab['scenario']}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        capture(lab, sys.stdout.fileno(), Path(args.write) if args.write else None)
    except AttachError as exc:
        _err(str(exc))
        return EXIT_FAILED
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
    run.add_argument("--rootfs", choices=("image", "host"), default=None,
                     help="root filesystem for VMs the scenario leaves open: image (vmlab's busybox initramfs, "
                          "the default) or host (the host's / read-only over virtio-9p, tmpfs/overlays for writes)")
    run.add_argument("--kernel", default=None,
                     help="guest kernel for VMs that do not pin one: a vmlinuz path, minimal (vmlab's minimal kernel), build:NAME (vmlab kernel ls), "
                          "source:DIR (built on demand) or package:linux-image-...")
    run.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                     help="auto uses KVM only where it really works, else TCG")
    run.add_argument("--keep", action="store_true",
                     help="after the steps, keep the VMs up (until Ctrl-C) and print how to reach their consoles")
    run.add_argument("--artifacts", metavar="DIR", help="keep console, QMP, qemu and backend logs in DIR")
    run.add_argument("--junit-xml", metavar="FILE", help="write a JUnit XML report (one test case per step)")
    run.add_argument("--pcap", metavar="FILE",
                     help="capture every vsock packet once (Wireshark LINKTYPE_VSOCK): vhost-user in "
                          "the backend, vhost on a vsockmon link (needs root and the vsockmon module); "
                          "FILE may be a FIFO, or - for stdout (the report then goes to stderr): "
                          "`vmlab run S --pcap - | wireshark -k -i -`")
    run.add_argument("--boot-timeout", type=_positive_seconds, default=240.0, metavar="SEC", help="per-VM boot timeout (default 240)")
    rep = run.add_argument_group("reproducing (docs/reproducing.md)")
    rep.add_argument("--seed", type=int, default=None, metavar="N",
                     help="seed of every random fault decision (default: a random one, printed); "
                          "run i of a repeat uses N+i-1")
    rep.add_argument("--repeat", type=int, default=None, metavar="N", help="run the scenario N times")
    rep.add_argument("--until-fail", action="store_true",
                     help="run until a run fails (at most --max runs), then stop")
    rep.add_argument("--max", type=int, default=100, metavar="N", help="--until-fail: at most N runs (default 100)")
    rep.add_argument("--fresh", action="store_true",
                     help="boot fresh VMs for every run even when the scenario says `reuse: true`")
    rep.add_argument("--bundle", metavar="FILE.tar.gz",
                     help="write a bundle (scenario, seed, versions, logs, pcap, reproduce.sh) of the "
                          "first failing run, or the last run when all pass")
    rep.add_argument("--bundle-on-failure", metavar="FILE.tar.gz",
                     help="like --bundle, but only when a run failed")
    rep.add_argument("--bundle-kernel", action="store_true", help="put the guest kernel itself into the bundle")
    rep.add_argument("--gdb", action="store_true",
                     help="QEMU gdbstub per VM on a Unix socket; prints the gdb line to attach")
    run.set_defaults(func=cmd_run)

    replay = sub.add_parser("replay", help="rerun a bundle made by `vmlab run --bundle` or the pytest plugin",
                            description="Unpack FILE.tar.gz and rerun its scenario with its seed, "
                                        "transport and (if bundled) kernel; exits like `vmlab run`. "
                                        "A bundle from the pytest plugin (--vmlab-artifacts) reruns "
                                        "its failed test with pytest (same seed, transport, accel); "
                                        "exits like pytest.")
    replay.add_argument("bundle", metavar="FILE.tar.gz")
    replay.add_argument("--dir", default=None, help="unpack here and keep it (default: a temp dir, removed)")
    replay.add_argument("extra", nargs=argparse.REMAINDER, help="more `vmlab run` (pytest bundle: pytest) options after --")
    replay.set_defaults(func=cmd_replay)

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

    kernel = sub.add_parser("kernel", help="guest kernels built from source: build, ls, rm")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", metavar="KERNEL_COMMAND")
    kb = kernel_sub.add_parser(
        "build", help="build a bootable, module-free guest kernel from a Linux source tree",
        description="Build a guest kernel: tinyconfig + the options vmlab needs built in (virtio-pci, "
                    "vsock + virtio transport + loopback + vsockmon, 9p, virtiofs, virtio-net, ACPI "
                    "power button, PCI hotplug, ...) + your fragment. Without SRC, the distribution's "
                    "linux-source package is downloaded and unpacked into the cache. Builds are cached "
                    "by source content (git commit + diff, package version or tree hash) and config.",
        epilog="The kernel is then usable as build:<name> (scenario `kernel:`, `vmlab run --kernel`). "
               "See docs/kernels.md.")
    kb.add_argument("src", nargs="?", default=None, help="Linux source tree (default: the distribution's linux-source)")
    kb.add_argument("--config", metavar="FRAGMENT", help="extra Kconfig fragment (e.g. CONFIG_KASAN=y); it wins "
                    "over vmlab's options, but those must stay =y")
    kb.add_argument("--jobs", "-j", type=int, default=None, metavar="N", help="make -jN (default: CPU count)")
    kb.add_argument("--force", action="store_true", help="rebuild even when the same build is cached")
    kb.add_argument("--name", default=None, help="name of the build (default: <tree>-<commit>-<key>)")
    kb.add_argument("--build-cmd", default=None, metavar="CMD",
                    help="your own build recipe, run in SRC with $VMLAB_KERNEL_OUT: it must leave a bzImage, "
                         "vmlinuz* or boot/vmlinuz-* (+ lib/modules) there")
    kb.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    kb.set_defaults(func=cmd_kernel_build)
    kl = kernel_sub.add_parser("ls", help="list cached kernel builds")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_kernel_ls)
    kr = kernel_sub.add_parser("rm", help="remove cached kernel builds")
    kr.add_argument("builds", nargs="+", metavar="NAME", help="build name (or build:NAME, or a key prefix)")
    kr.set_defaults(func=cmd_kernel_rm)
    kernel.set_defaults(func=lambda a: (kernel.print_help(), EXIT_USAGE)[1])

    bis = sub.add_parser(
        "bisect", help="find the kernel commit that breaks a scenario (git bisect run + build + vmlab run)",
        usage="vmlab bisect [options] GOOD BAD -- SCENARIO [vmlab run options]",
        description="In a kernel git tree: git bisect between GOOD and BAD, building each commit "
                    "(vmlab kernel build, or --build-cmd) and running SCENARIO on it. A build failure "
                    "skips the commit (exit 125), a failing or non-booting scenario marks it bad, a pass good.",
        epilog="exit status: 0 a first bad commit was found; 1 bisect ended without one; 2 usage error. "
               "Logs of every step (build log, run artifacts) are kept under --logs.")
    bis.add_argument("good", metavar="GOOD", help="a commit where the scenario passes")
    bis.add_argument("bad", metavar="BAD", help="a commit where it fails")
    bis.add_argument("scenario", nargs=argparse.REMAINDER, metavar="-- SCENARIO",
                     help="scenario file, then options passed to `vmlab run`")
    bis.add_argument("--src", default=".", help="the kernel git tree (default: current directory)")
    bis.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run the scenario N times per commit; bad if any run fails (flaky bugs)")
    bis.add_argument("--build-cmd", default=None, metavar="CMD", help="build recipe instead of vmlab's (see kernel build)")
    bis.add_argument("--config", metavar="FRAGMENT", help="Kconfig fragment for every build")
    bis.add_argument("--jobs", "-j", type=int, default=None, metavar="N")
    bis.add_argument("--logs", metavar="DIR", help="where each step's logs go (default: ./vmlab-bisect-<time>)")
    bis.set_defaults(func=cmd_bisect)

    console = sub.add_parser("console", help="attach to a kept VM's serial console (Ctrl-] detaches)")
    console.add_argument("vm", help="VM name")
    console.add_argument("--lab", default=None, help="lab id (from `vmlab ls`) when several labs run")
    console.set_defaults(func=cmd_console)

    qmp = sub.add_parser("qmp", help="send a QMP command to a kept VM's QEMU",
                         description="e.g. `vmlab qmp a query-status`, "
                                     "`vmlab qmp a human-monitor-command '{\"command-line\": \"info qtree\"}'`")
    qmp.add_argument("vm", help="VM name")
    qmp.add_argument("command", help="QMP command (query-status, stop, cont, system_reset, ...)")
    qmp.add_argument("arguments", nargs="?", default=None, metavar="ARGS-JSON", help="its arguments, a JSON object")
    qmp.add_argument("--lab", default=None, help="lab id (from `vmlab ls`) when several labs run")
    qmp.set_defaults(func=cmd_qmp)

    ex = sub.add_parser("exec-guest", help="run a shell command in a kept VM (exit status is the command's)",
                        description="e.g. `vmlab exec-guest a -- cat /proc/net/vsock`; runs over the serial "
                                    "console, so not while `vmlab console` is attached to that VM.")
    ex.add_argument("vm", help="VM name")
    ex.add_argument("--lab", default=None, help="lab id (from `vmlab ls`) when several labs run")
    ex.add_argument("--timeout", type=float, default=60.0, metavar="SEC", help="default 60")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command")
    ex.set_defaults(func=cmd_exec_guest)

    cap = sub.add_parser("capture", help="live pcap of a kept lab's vsock traffic (vhost-user backend)",
                         description="Attach a capture to the backend of a lab kept by `vmlab run --keep`: "
                                     "`vmlab capture --lab ID | wireshark -k -i -`, or -w FILE.")
    cap.add_argument("--lab", default=None, help="lab id (from `vmlab ls`); default: the only running lab")
    cap.add_argument("-w", "--write", default=None, metavar="FILE", help="write FILE instead of stdout")
    cap.set_defaults(func=cmd_capture)

    ls = sub.add_parser("ls", help="list running labs")
    ls.set_defaults(func=cmd_ls)

    ex = sub.add_parser(
        "exec", help="run a host AF_VSOCK program against a running lab's guests",
        usage="vmlab exec [-h] [--lab ID] -- PROGRAM [ARGS...]",
        description="Run PROGRAM so that its AF_VSOCK sockets reach the lab's guests. On the vhost-user "
                    "transport an LD_PRELOAD library (compiled on first use, cached) maps them onto the lab's "
                    "backend: listen() on a port gets guest connections from every VM of the lab, connect() "
                    "reaches any of its guests by CID. On the vhost transport PROGRAM runs unchanged (the "
                    "kernel's AF_VSOCK). Statically linked programs cannot be shimmed and are refused.",
        epilog="exit status: PROGRAM's own; 2 no such lab, no program, or a static binary on vhost-user; "
               "126 PROGRAM could not be executed. See docs/exec.md.")
    ex.add_argument("--lab", default=None, help="lab id (from `vmlab ls`); default: the only running lab")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                    help="the program and its arguments")
    ex.set_defaults(func=cmd_exec)
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
