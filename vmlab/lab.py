"""A lab: the VMs of one scenario, their vsock backend, and their teardown.

`Lab` is the single owner of everything a scenario starts. Boot is parallel (each guest waits for
its own ready marker in a thread), forks all happen on the calling thread (see vmlab.proc), and
`close()` always runs — on success, on exceptions, on Ctrl-C, and on SIGTERM via the CLI — so no
qemu process, backend process, socket or runtime dir outlives the lab.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vmlab.qemu.argv import VSOCK_DEVICE_ID, VmConfig
from vmlab.qemu.machine import Machine
from vmlab.runtime import RuntimeDir
from vmlab.scenario import Scenario, VmSpec

log = logging.getLogger("vmlab.lab")

OPEN_LABS: "weakref.WeakSet[Lab]" = weakref.WeakSet()
"""Labs started and not yet closed in this process (leak checks, emergency cleanup)."""


class LabError(RuntimeError):
    """The lab could not be brought up; the message says which VM and why."""


@dataclass
class LabOptions:
    """Run-time choices that are not part of the scenario (CLI flags, pytest options)."""

    transport: str | None = None        # transport for VMs whose scenario says auto
    kernel: str | None = None           # overrides the kernel of VMs that do not pin one
    rootfs: str | None = None           # image | host, for VMs whose scenario does not say
    accel: str = "auto"                 # auto | kvm | tcg
    boot_timeout: float = 240.0
    artifacts_dir: Path | None = None   # logs are copied here on close (see keep_artifacts)
    keep_artifacts: str = "on-failure"  # always | on-failure | never
    pcap: Path | None = None            # vhost-user: capture every packet (LINKTYPE_VSOCK)
    qemu: str = "qemu-system-x86_64"
    progress: bool = False              # show image build progress
    seed: int = 0                       # fault RNG seed (vsock/faults.py), printed in reports
    gdb: bool = False                   # QEMU gdbstub on <run_dir>/<vm>.gdb (a Unix socket)
    pcap_required: bool = True          # False: a vhost lab that cannot capture runs without
    notices: list[str] = field(default_factory=list)


@dataclass
class VmHandle:
    """What tests see of one running VM."""

    spec: VmSpec
    cid: int | None
    transport: str | None
    machine: Machine
    uds_path: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def qmp(self):
        return self.machine.qmp

    @property
    def console(self):
        return self.machine.console

    @property
    def vsock_device_id(self) -> str:
        return VSOCK_DEVICE_ID

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest: (exit code, output)."""
        return self.machine.run(command, timeout)

    def check(self, command: str, timeout: float = 30.0) -> str:
        """Run a command that must succeed; return its output."""
        rc, out = self.run(command, timeout)
        if rc != 0:
            raise AssertionError(f"{self.name}: `{command}` exited {rc}:\n{out}")
        return out

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Wait for the guest to (re)boot to its shell, e.g. after system_reset."""
        self.machine.wait_ready(timeout)

    def endpoint(self):
        """The host-side address of this VM's vsock device (for vmlab.vsock.host)."""
        from vmlab.vsock.host import HostEndpoint
        return HostEndpoint(transport=self.transport, vm_name=self.name, cid=self.cid,
                            uds_path=str(self.uds_path) if self.uds_path else None)


class Lab:
    """Boot a scenario's VMs, give access to them, and tear everything down on close()."""

    def __init__(self, scenario: Scenario, options: LabOptions | None = None, **overrides: Any) -> None:
        self.scenario = scenario
        self.options = options or LabOptions()
        for key, value in overrides.items():
            setattr(self.options, key, value)
        self.runtime: RuntimeDir | None = None
        self.backend = None
        self.accel = "tcg"
        self.failed = False
        self._vms: dict[str, VmHandle] = {}
        self._leases: list[Any] = []
        self._closed = False
        self.kernels: dict[str, str] = {}  # VM name -> exact kernel description (version, commit, config)
        self._endpoints: list[Any] = []  # host listeners/connections opened by steps, closed with the lab
        self._vsockmon: Any = None       # --pcap on the vhost transport (vmlab.vsockmon)
        self._lock = threading.Lock()

    # -- context manager ----------------------------------------------------------------
    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.failed = True
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.failed = True
        self.close()

    # -- accessors ------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        assert self.runtime is not None, "lab not started"
        return self.runtime.path

    @property
    def lab_id(self) -> str:
        return self.runtime.lab_id if self.runtime else ""

    @property
    def host_ns(self) -> str:
        """Namespace of the lab-wide host listeners (abstract Unix names) `vmlab exec` binds:
        short (abstract names have 107 bytes) and unique per runtime dir."""
        import hashlib
        return f"vmlab:{self.lab_id}:{hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:12]}"

    @property
    def vms(self) -> list[VmHandle]:
        return list(self._vms.values())

    def vm(self, name: str) -> VmHandle:
        try:
            return self._vms[name]
        except KeyError:
            raise KeyError(f"no VM {name!r} in this lab (VMs: {', '.join(self._vms) or 'none'})") from None

    @property
    def transport(self) -> str | None:
        """The lab's transport when all VMs share one (the usual case)."""
        kinds = {vm.transport for vm in self._vms.values() if vm.transport}
        return kinds.pop() if len(kinds) == 1 else None

    def track(self, endpoint: Any) -> Any:
        """Close `endpoint` (anything with .close()) when the lab closes."""
        with self._lock:
            self._endpoints.append(endpoint)
        return endpoint

    # -- bring-up -------------------------------------------------------------------------
    def start(self) -> None:
        from vmlab import hostcheck

        opts = self.options
        OPEN_LABS.add(self)
        self.accel, notice = hostcheck.choose_accel(opts.accel)
        if notice:
            opts.notices.append(notice)
            log.info(notice)
        self.runtime = RuntimeDir.create()
        transports = self._resolve_transports()
        cids = self._assign_cids(transports)
        if any(t == "vhost-user" for t in transports.values()):
            self._start_backend(transports, cids)  # starts up while the images are prepared
        if opts.pcap and any(t == "vhost" for t in transports.values()):
            try:
                self._start_vsockmon(opts.pcap)
            except LabError as exc:
                if opts.pcap_required:
                    raise
                opts.notices.append(f"no capture: {exc}")
        configs = self._vm_configs(transports, cids)
        if self.backend is not None:
            self.backend.wait_ready()
        self._write_state()
        machines = []
        for spec in self.scenario.vms:
            cfg = configs[spec.name]
            machine = Machine(cfg, self.run_dir, qemu=opts.qemu)
            uds = self.run_dir / f"{spec.name}.vsock" if transports[spec.name] == "vhost-user" else None
            self._vms[spec.name] = VmHandle(spec, cids.get(spec.name), transports[spec.name], machine, uds)
            machine.spawn()  # forks here, on this thread; all start loading at once
            machines.append(machine)
        self._write_state()
        self._boot_all(machines)

    def _resolve_transports(self) -> dict[str, str | None]:
        from vmlab import hostcheck

        resolved: dict[str, str | None] = {}
        cache: dict[str, str] = {}
        for spec in self.scenario.vms:
            if not spec.vsock:
                resolved[spec.name] = None
                continue
            # A transport the scenario pins (e.g. vhost-user for VM<->VM or faults) is kept; the
            # run-time option (--transport / --vmlab-transport) decides for VMs left at auto.
            pinned = spec.transport if spec.transport not in (None, "auto") else None
            wanted = pinned or self.options.transport or "auto"
            if wanted not in cache:
                cache[wanted], notice = hostcheck.resolve_transport(wanted)
                if notice and notice not in self.options.notices:
                    self.options.notices.append(notice)
            resolved[spec.name] = cache[wanted]
        return resolved

    def _assign_cids(self, transports: dict[str, str | None]) -> dict[str, int]:
        """Pinned CIDs are kept; the others come from the host-wide allocator, so two labs at once
        (two `vmlab run`, pytest-xdist workers) never share one. Pinned vhost CIDs are leased too,
        since the kernel's CID space is host-global; pinned vhost-user CIDs live only inside this
        lab's backend and need no lease."""
        from vmlab.cids import CidAllocator

        cids: dict[str, int] = {}
        allocator = CidAllocator()
        owner = f"vmlab lab {self.lab_id} ({self.scenario.name})"
        wanted = [spec for spec in self.scenario.vms if transports[spec.name] is not None]
        pinned = {spec.cid for spec in wanted if spec.cid is not None}
        for spec in wanted:
            if spec.cid is None:
                continue
            if transports[spec.name] == "vhost":
                self._leases.append(allocator.lease(spec.cid, owner))
            cids[spec.name] = spec.cid
        for spec in wanted:
            if spec.cid is not None:
                continue
            lease = allocator.allocate(1, owner)[0]
            while lease.cid in pinned:  # a CID this lab pins is taken, even if no other lab holds it
                self._leases.append(lease)
                lease = allocator.allocate(1, owner)[0]
            self._leases.append(lease)
            cids[spec.name] = lease.cid
        return cids

    def rootfs_of(self, spec: VmSpec) -> str:
        """The VM's root: the scenario's `rootfs:`, else the run-time option, else the image."""
        return spec.rootfs or self.options.rootfs or "image"

    def _image(self, spec: VmSpec) -> tuple[Path, Path, Path | None]:
        """(kernel, initrd, the kernel's module tree on the host or None)."""
        from vmlab.image import ensure_image
        from vmlab.kernel.spec import describe_path, resolve

        ref = spec.kernel or self.options.kernel
        kernel, description = None, None
        if ref is not None:
            # a path, build:<name>, source:<dir> (built on demand) or package:<name>
            resolved = resolve(ref, progress=self.options.progress)
            kernel, description = resolved.path, resolved.description
        if self.rootfs_of(spec) == "host":
            from vmlab import hostroot

            why = hostroot.unsupported(spec)
            if why:
                raise LabError(f"VM {spec.name!r} with rootfs host: {why}")
            env_file = self.run_dir / f"{spec.name}.host.env"
            env_file.write_text(hostroot.host_env())
            files = hostroot.guest_files(spec.files, env_file)
            image = ensure_image(kernel=kernel, extra_files=files, progress=self.options.progress)
            self.kernels[spec.name] = description or describe_path(image.kernel)
            return image.kernel, image.initrd, image.modules_dir
        if spec.initrd is not None:
            if kernel is None:
                kpath = ensure_image(progress=self.options.progress).kernel
            else:
                from vmlab.image.kernel import from_path
                kpath = from_path(Path(kernel), "kernel").vmlinuz  # a package root -> its vmlinuz
            self.kernels[spec.name] = description or describe_path(kpath)
            return kpath, spec.initrd, None
        image = ensure_image(kernel=kernel, extra_files=spec.files or None, progress=self.options.progress)
        self.kernels[spec.name] = description or describe_path(image.kernel)
        return image.kernel, image.initrd, None

    def _vm_configs(self, transports: dict[str, str | None], cids: dict[str, int]) -> dict[str, VmConfig]:
        configs = {}
        from vmlab import hostroot

        for spec in self.scenario.vms:
            kernel, initrd, modules = self._image(spec)
            rootfs = self.rootfs_of(spec)
            name = spec.name
            configs[name] = VmConfig(
                name=name, kernel=kernel, initrd=initrd,
                qmp_socket=self.run_dir / f"{name}.qmp", serial_socket=self.run_dir / f"{name}.serial",
                console_log=self.run_dir / f"{name}.console.log",
                cid=cids.get(name), transport=transports[name],
                vhost_user_socket=self.run_dir / f"{name}.vu" if transports[name] == "vhost-user" else None,
                memory_mib=spec.memory_mib, cpus=spec.cpus, accel=self.accel, cmdline=spec.cmdline,
                share_dir=spec.share,
                extra_args=list(spec.qemu_args) + self._tool_args(name) + self._gdb_args(name),
                lab_id=self.lab_id,
                rootfs=rootfs, host_modules=modules if rootfs == "host" else None,
                overlays=hostroot.overlay_dirs() if rootfs == "host" else [],
                host_paths=hostroot.masked_host_paths() if rootfs == "host" else [],
            )
        return configs

    def _tool_args(self, name: str) -> list[str]:
        """A second QMP monitor for `vmlab qmp` (the lab keeps the first one connected)."""
        path = self.run_dir / f"{name}.qmp-tools"
        return ["-chardev", f"socket,id=qmptools,path={path},server=on,wait=off",
                "-mon", "chardev=qmptools,mode=control"]

    def _gdb_args(self, name: str) -> list[str]:
        """`--gdb`: QEMU's gdbstub on a Unix socket in the run dir (no TCP port to collide)."""
        if not self.options.gdb:
            return []
        path = self.run_dir / f"{name}.gdb"
        return ["-chardev", f"socket,id=gdb0,path={path},server=on,wait=off", "-gdb", "chardev:gdb0"]

    def _start_vsockmon(self, pcap: Path) -> None:
        from vmlab.vsockmon import VsockmonCapture, VsockmonError

        if any(t == "vhost-user" for t in self._resolve_transports().values()):
            raise LabError("--pcap with VMs on both transports: the backend and vsockmon would "
                           "both write the capture; pick one transport")
        cap = VsockmonCapture(pcap)
        try:
            cap.start(self.run_dir / "vsockmon.log")
        except VsockmonError as exc:
            raise LabError(str(exc)) from None
        self._vsockmon = cap

    def _start_backend(self, transports: dict[str, str | None], cids: dict[str, int]) -> None:
        from vmlab.vsock.process import BackendProcess

        config = {
            "vms": [
                {"name": spec.name, "cid": cids[spec.name], "socket": str(self.run_dir / f"{spec.name}.vu"),
                 "uds_path": str(self.run_dir / f"{spec.name}.vsock"), "group": spec.group}
                for spec in self.scenario.vms if transports[spec.name] == "vhost-user"
            ],
            "pcap": str(self.options.pcap) if self.options.pcap else None,
            "log": str(self.run_dir / "backend.log"),
            "host_ns": self.host_ns,
            "seed": self.options.seed,
        }
        self.backend = BackendProcess(config, self.run_dir)
        self.backend.spawn()

    def _boot_all(self, machines: list[Machine]) -> None:
        """Connect to every guest and wait for it, in parallel; the first failure is raised after
        all have settled. Each QEMU waits for its console before it boots, so connecting one
        after another would start the last guest a QEMU start-up per guest late.

        On Ctrl-C/SIGTERM the machines are shut down first, which ends the waiting threads (their
        consoles see EOF) instead of letting them sit out the boot timeout.
        """
        timeout = self.options.boot_timeout
        pool = ThreadPoolExecutor(max_workers=max(1, len(machines)), thread_name_prefix="boot")
        futures = [pool.submit(self._connect_and_wait, m, timeout) for m in machines]
        try:
            wait(futures)
        except BaseException:
            for machine in machines:
                machine.shutdown()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        failures = [f.exception() for f in futures if f.exception() is not None]
        if failures:
            raise LabError(f"{len(failures)} of {len(machines)} VM(s) failed to boot:\n" + "\n\n".join(map(str, failures)))

    @staticmethod
    def _connect_and_wait(machine: Machine, timeout: float) -> None:
        machine.connect()
        machine.wait_ready(timeout)

    def _write_state(self) -> None:
        assert self.runtime is not None
        self.runtime.write_state({
            "pid": os.getpid(),
            "scenario": self.scenario.name,
            "source": str(self.scenario.source) if self.scenario.source else None,
            "started": time.time(),
            "host_ns": self.host_ns,
            "vms": {
                name: {"cid": vm.cid, "transport": vm.transport,
                       "serial": str(vm.machine.config.serial_socket),
                       "qmp": str(vm.machine.config.qmp_socket),
                       "qmp_tools": str(self.run_dir / f"{name}.qmp-tools"),
                       "uds_path": str(vm.uds_path) if vm.uds_path else None,
                       "pid": vm.machine.pid}
                for name, vm in self._vms.items()
            },
        })

    # -- running ---------------------------------------------------------------------------
    def run_steps(self, steps=None, reporter=None):
        """Run the scenario's steps (or the given ones); returns a list of vmlab.step_runner.StepResult."""
        from vmlab.step_runner import StepRunner

        results = StepRunner(self, reporter=reporter).run(self.scenario.steps if steps is None else steps)
        if any(not r.ok for r in results):
            self.failed = True
        return results

    def next_run(self, seed: int) -> None:
        """Make the booted lab ready to run the steps again (`vmlab run --repeat` with
        `reuse: true`): host endpoints of the last run closed, faults cleared, a new seed."""
        with self._lock:
            endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            try:
                endpoint.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %r", endpoint)
        self.options.seed = seed
        self.failed = False
        if self.backend is not None:
            reply = self.backend.control({"cmd": "seed", "seed": seed})
            if not reply.get("ok"):
                raise LabError(f"backend refused the new seed: {reply}")

    def fault_report(self) -> list[dict]:
        """The backend's fault rules with their hit counters ([] without a backend)."""
        if self.backend is None:
            return []
        try:
            reply = self.backend.control({"cmd": "faults"}, timeout=5)
        except Exception:  # noqa: BLE001 - a report must not fail the run
            return []
        return list(reply.get("faults", []))

    def pids(self) -> list[int]:
        """Process ids this lab owns (qemu per VM, the backend)."""
        pids = [vm.machine.pid for vm in self._vms.values() if vm.machine.pid]
        backend_pid = getattr(getattr(self.backend, "proc", None), "pid", None) or getattr(self.backend, "pid", None)
        return pids + ([backend_pid] if backend_pid else [])

    def kernel_errors(self) -> dict[str, list[str]]:
        """Kernel oops/panic/BUG lines seen on each VM's console so far."""
        return {name: vm.console.kernel_errors for name, vm in self._vms.items() if vm.console.kernel_errors}

    def release_consoles(self) -> None:
        """Let `vmlab console` attach: QEMU's serial socket takes one client at a time."""
        for vm in self._vms.values():
            vm.console.close()

    def artifacts(self) -> Iterator[Path]:
        """The log files worth keeping: consoles, QMP event logs, qemu stderr, backend log, pcap."""
        if self.runtime is None or not self.run_dir.exists():
            return iter(())
        patterns = ("*.console.log", "*.qmp.jsonl", "*.qemu.log", "backend.log", "*.pcap", "*.guest.log",
                    "host-run-*.log")
        return (p for pattern in patterns for p in sorted(self.run_dir.glob(pattern)))

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Tear everything down. Idempotent; safe to call from any state; raises nothing but a
        Ctrl-C/SIGTERM that arrives meanwhile, and that only once every stage has run (an
        interrupt must not skip the lease release or the runtime dir removal)."""
        if self._closed:
            return
        self._closed = True
        OPEN_LABS.discard(self)
        interrupted: BaseException | None = None
        for stage in (self._close_endpoints, self._halt_machines, self._stop_helpers,
                      self._release_leases, self._finish_close):
            try:
                stage()
            except KeyboardInterrupt as exc:  # teardown goes on; the interrupt is raised after
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def _close_endpoints(self) -> None:
        with self._lock:
            endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            try:
                endpoint.close()
            except Exception:  # noqa: BLE001 - teardown goes on
                log.exception("closing %r", endpoint)

    def _halt_machines(self) -> None:
        machines = [vm.machine for vm in self._vms.values()]
        if machines:
            with ThreadPoolExecutor(max_workers=len(machines), thread_name_prefix="halt") as pool:
                list(pool.map(lambda m: m.shutdown(), machines))

    def _stop_helpers(self) -> None:
        if self._vsockmon is not None:
            try:
                self._vsockmon.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping the vsockmon capture")
        if self.backend is not None:
            try:
                self.backend.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping the vsock backend")

    def _release_leases(self) -> None:
        while self._leases:
            lease = self._leases.pop()
            try:
                lease.release()
            except Exception:  # noqa: BLE001
                log.exception("releasing %r", lease)

    def _finish_close(self) -> None:
        if any(self.kernel_errors().values()):
            self.failed = True
        self._save_artifacts()
        if self.runtime is not None:
            self.runtime.remove()

    def _save_artifacts(self) -> None:
        opts = self.options
        if opts.artifacts_dir is None or opts.keep_artifacts == "never":
            return
        if opts.keep_artifacts == "on-failure" and not self.failed:
            return
        dest = Path(opts.artifacts_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for path in self.artifacts():
            try:
                shutil.copy2(path, dest / path.name)
            except OSError:
                log.exception("copying artifact %s", path)
        self.artifacts_saved = dest
