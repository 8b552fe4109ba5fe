"""pytest plugin (entry point `pytest11`): labs of real QEMU guests as fixtures.

Fixtures
  lab            a started Lab for the test (function scope); scenario from @pytest.mark.vmlab
  module_lab     one Lab shared by a module (scenario: module attribute VMLAB_SCENARIO or default)
  session_lab    one Lab shared by the whole session (fixture `vmlab_session_scenario`)
  vm             the first VM of `lab`
  vmlab_lab_factory  make_lab(scenario_or_path_or_vms, **options) -> started Lab, closed after the test
  vsock_listen   listen(port, vm=None, type="stream") -> host listener, either transport
  vsock_connect  connect(vm, port, type="stream") -> host connection, either transport
  guest          guest(vm) -> GuestHelper (the in-guest vmlab-guest helper)
  host_run       host_run(lab, argv | "shell cmd", background=False) -> HostProcess: a host AF_VSOCK
                 program run against the lab (under the vmlab exec shim on vhost-user)

Markers
  @pytest.mark.vmlab(scenario="x.yaml" | vms=[...] | vms=2, transport=..., kernel=..., rootfs=...)
  @pytest.mark.vmlab_nested  the test boots a nested lab (vmlab inside a rootfs: host guest, for the
                 kernel vhost transport on hosts without /dev/vhost-vsock): skipped unless
                 --vmlab-nested (or VMLAB_NESTED=1); run first, since it is the longest

Options
  --vmlab-transport, --vmlab-kernel, --vmlab-accel, --vmlab-keep-on-failure, --vmlab-artifacts DIR,
  --vmlab-nested
  --vmlab-seed N (fault RNG seed; printed in the header), --vmlab-repeat N (run each lab test N
  times, run i with seed N+i-1)
On failure the console tails, QMP events and backend log are attached to the report, and the full
logs are copied to the artifacts directory, with a bundle that `vmlab replay` reruns the test from
(vmlab.pytest_bundle).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vmlab.lab import Lab, LabOptions
from vmlab.proc import log_tail
from vmlab.scenario import Scenario, VmSpec, inline_scenario, load_scenario

_LABS_KEY = pytest.StashKey[list]()
_REPORTS_KEY = pytest.StashKey[dict]()
_SEED_KEY = pytest.StashKey[int]()
_STARTED_KEY = pytest.StashKey["weakref.WeakSet[Lab]"]()
LAB_FIXTURES = ("lab", "vm", "vmlab_lab_factory")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmlab", "vmlab: VM labs for AF_VSOCK tests")
    group.addoption("--vmlab-transport", choices=("auto", "vhost", "vhost-user"), default=None,
                    help="vsock transport for VMs whose scenario leaves it at auto (scenarios that pin one keep it)")
    group.addoption("--vmlab-kernel", default=None,
                    help="guest kernel for labs that do not pin one: a vmlinuz path, minimal (vmlab's minimal kernel), build:NAME, source:DIR or package:NAME")
    group.addoption("--vmlab-accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator (default auto)")
    group.addoption("--vmlab-keep-on-failure", action="store_true",
                    help="when a test fails, keep its lab up and wait for Enter before tearing it down (needs a TTY)")
    group.addoption("--vmlab-artifacts", default=None, metavar="DIR",
                    help="keep console, QMP, qemu and backend logs of failed tests under DIR/<test>/ "
                         "with bundle.tar.gz (`vmlab replay` reruns the test)")
    group.addoption("--vmlab-nested", action="store_true", default=None,
                    help="run tests marked vmlab_nested (vmlab inside a TCG guest: the kernel vhost "
                         "transport where the host has none; slow). Also VMLAB_NESTED=1")
    group.addoption("--vmlab-seed", type=int, default=None, metavar="N",
                    help="seed of the backend's random fault decisions (default: random, printed)")
    group.addoption("--vmlab-repeat", type=int, default=1, metavar="N",
                    help="run every test that uses a lab fixture N times (run i: seed N+i-1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vmlab(scenario=None, vms=None, **options): lab for the `lab` fixture")
    config.addinivalue_line("markers", "vmlab_nested: boots a nested lab (vmlab inside a guest); needs --vmlab-nested")
    seed = config.getoption("vmlab_seed")
    config.stash[_SEED_KEY] = seed if seed is not None else secrets.randbelow(2**32)
    _sigterm_as_interrupt(config)


_WORKER_PIDS: list[int] = []   # xdist workers this process started (pids checked before use)
XDIST_EXIT_TIMEOUT = 20.0   # > execnet's own 5 + 10 s in the worker before it gives up and _exits


def _sigterm_as_interrupt(config: pytest.Config) -> None:
    """SIGTERM (CI cancel, `kill`) takes Ctrl-C's path, so the labs' fixtures tear down: by
    default it ends pytest at once and leaves runtime dirs and sockets behind. Under xdist the
    controller forwards it to its workers as SIGINT at once (execnet alone would interrupt them
    only 5 s after the controller's teardown began, and kill them 5 s later: a worker still
    closing its lab lost its runtime dir) and gives them longer to finish. Only when nobody
    else has claimed SIGTERM; the old handler comes back at unconfigure."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _interrupt_workers(config)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    config.add_cleanup(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def _interrupt_workers(config: pytest.Config) -> None:
    """Controller side of SIGTERM: SIGINT to every xdist worker that is still our child, and a
    teardown deadline long enough for their labs to close."""
    for pid in _WORKER_PIDS:
        if _parent_of(pid) == os.getpid():      # not a recycled pid
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    dsession = config.pluginmanager.getplugin("dsession")
    nodemanager = getattr(dsession, "nodemanager", None)
    if nodemanager is not None and getattr(nodemanager, "EXIT_TIMEOUT", 0) < XDIST_EXIT_TIMEOUT:
        nodemanager.EXIT_TIMEOUT = XDIST_EXIT_TIMEOUT


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_newgateway(gateway: Any) -> None:
    """Remember each xdist worker's pid (controller), so SIGTERM can be forwarded to it."""
    try:
        _WORKER_PIDS.append(int(gateway._rinfo().pid))   # what xdist's own -v header asks
    except Exception:  # noqa: BLE001 - only the SIGTERM forwarding is lost
        pass


def nested_enabled(config: pytest.Config) -> bool:
    """--vmlab-nested or VMLAB_NESTED=1; VMLAB_NESTED=0 switches nested tests off even with the flag."""
    env = os.environ.get("VMLAB_NESTED", "")
    if env == "0":
        return False
    return bool(config.getoption("vmlab_nested")) or env not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """vmlab_nested tests: skipped unless asked for; otherwise moved to the front, so under
    pytest-xdist the longest test starts first and the rest of the suite runs beside it."""
    nested = [item for item in items if item.get_closest_marker("vmlab_nested")]
    if not nested:
        return
    if not nested_enabled(config):
        skip = pytest.mark.skip(reason="nested lab: run with --vmlab-nested (or VMLAB_NESTED=1)")
        for item in nested:
            item.add_marker(skip)
        return
    rest = [item for item in items if not item.get_closest_marker("vmlab_nested")]
    items[:] = nested + rest


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """Backstop: close any lab still open once the fixtures have torn down. A second interrupt
    during teardown (execnet sends its own SIGINT to a worker that is slow to stop) ends the
    fixture finalizers early, and a module/session lab would keep its runtime dir."""
    try:
        yield
    finally:
        for lab in list(session.config.stash.get(_STARTED_KEY, ())):
            try:
                lab.close()                     # idempotent: a no-op for labs already closed
            except KeyboardInterrupt:
                pass


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.stash[_SEED_KEY]
    return f"vmlab: fault seed {seed} (rerun with --vmlab-seed {seed})"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """--vmlab-repeat N: tests using a lab fixture run N times, as [vmlab-run1] .. [vmlab-runN]."""
    n = metafunc.config.getoption("vmlab_repeat")
    if n > 1 and any(f in metafunc.fixturenames for f in LAB_FIXTURES):
        metafunc.fixturenames.append("vmlab_iteration")
        metafunc.parametrize("vmlab_iteration", range(1, n + 1),
                             ids=[f"vmlab-run{i}" for i in range(1, n + 1)], indirect=True)


@pytest.fixture
def vmlab_iteration(request: pytest.FixtureRequest) -> int:
    """Which run of --vmlab-repeat this is (1 without repeating)."""
    return getattr(request, "param", 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    item.stash.setdefault(_REPORTS_KEY, {})[report.when] = report
    if report.failed and report.when in ("setup", "call"):
        for lab in item.stash.get(_LABS_KEY, []):
            for title, text in lab_log_sections(lab):
                report.sections.append((title, text))


def lab_log_sections(lab: Lab) -> list[tuple[str, str]]:
    """Tails of each VM's console and QMP log and of the backend log, for a failure report."""
    sections = []
    if lab.runtime is None:
        return sections
    for vm in lab.vms:
        cfg = vm.machine.config
        sections.append((f"vmlab {vm.name} console", log_tail(Path(cfg.console_log), 60)))
        sections.append((f"vmlab {vm.name} qmp", log_tail(vm.machine.qmp_log, 20)))
        qemu = log_tail(vm.machine.qemu_log, 20)
        if qemu.strip():
            sections.append((f"vmlab {vm.name} qemu", qemu))
    backend = lab.run_dir / "backend.log"
    if backend.exists():
        sections.append(("vmlab backend", log_tail(backend, 40)))
    return [(t, s) for t, s in sections if s.strip()]


def _test_failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_REPORTS_KEY, {})
    return any(r.failed for r in reports.values())


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]


def _options(config: pytest.Config, artifacts_sub: str, iteration: int = 1,
             **overrides: Any) -> LabOptions:
    artifacts = config.getoption("vmlab_artifacts")
    opts = LabOptions(transport=config.getoption("vmlab_transport"), kernel=config.getoption("vmlab_kernel"),
                      accel=config.getoption("vmlab_accel"),
                      artifacts_dir=Path(artifacts) / artifacts_sub if artifacts else None,
                      keep_artifacts="on-failure",
                      seed=(config.stash[_SEED_KEY] + iteration - 1) % 2**32)
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise pytest.UsageError(f"vmlab: unknown lab option {key!r}")
        setattr(opts, key, value)
    return opts


def to_scenario(spec: Any = None, *, vms: Any = None, transport: str = "auto", name: str = "pytest",
                base: Path | None = None) -> Scenario:
    """A Scenario from a path, a Scenario, a VM count, or a list of VmSpec / dicts."""
    if isinstance(spec, Scenario):
        return spec
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_absolute() and base is not None and (base / path).exists():
            path = base / path
        return load_scenario(path)
    vms = spec if vms is None else vms
    if vms is None:
        vms = 1
    if isinstance(vms, int):
        vms = [VmSpec(name=f"vm{i}") for i in range(vms)]
    specs = [vm if isinstance(vm, VmSpec) else VmSpec(**vm) for vm in vms]
    return inline_scenario(vms=specs, transport=transport, name=name)


def _wait_for_user(config: pytest.Config, lab: Lab, test: str) -> None:
    """--vmlab-keep-on-failure: leave the failed lab up until the user presses Enter."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if not sys.stdin or not sys.stdin.isatty():
        sys.stderr.write(f"\nvmlab: {test} failed; --vmlab-keep-on-failure needs a terminal, tearing down\n")
        return
    lab.release_consoles()
    with capture.global_and_fixture_disabled() if capture else _null():
        print(f"\n\nvmlab: {test} failed; lab {lab.lab_id} is kept up:")
        for vm in lab.vms:
            print(f"  {vm.name}: cid {vm.cid}; vmlab console {vm.name} --lab {lab.lab_id}; qmp {vm.machine.config.qmp_socket}")
        input("press Enter to tear it down ")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _LabFactory:
    """Starts labs for one fixture scope and owns their teardown."""

    def __init__(self, config: pytest.Config, artifacts_sub: str, node: Any,
                 iteration: int = 1) -> None:
        self.config = config
        self.node = node
        self.artifacts_sub = artifacts_sub
        self.base = _node_base(node)
        self.iteration = iteration
        self.labs: list[Lab] = []

    def __call__(self, spec: Any = None, *, vms: Any = None, transport: str | None = None, **options: Any) -> Lab:
        # transport= pins the lab's VMs (e.g. vhost-user for VM<->VM); --vmlab-transport decides the rest
        scenario = to_scenario(spec, vms=vms, transport=transport or "auto", base=self.base)
        suffix = f"-{len(self.labs)}" if self.labs else ""
        lab = Lab(scenario, _options(self.config, self.artifacts_sub + suffix, self.iteration,
                                     **options))
        self.labs.append(lab)
        self.config.stash.setdefault(_STARTED_KEY, weakref.WeakSet()).add(lab)
        lab.start()  # a lab that fails to start is still in self.labs, so close() tears it down
        return lab

    def close(self, failed: bool, test: str = "") -> None:
        """Close every lab; a Ctrl-C/SIGTERM meanwhile is raised only after the last one."""
        interrupted: BaseException | None = None
        for lab in self.labs:
            try:
                if failed:
                    lab.failed = True
                    if self.config.getoption("vmlab_keep_on_failure"):
                        _wait_for_user(self.config, lab, test)
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
            try:
                lab.close()
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
            if failed and lab.options.artifacts_dir is not None:
                _bundle(lab, self.node, self.iteration)
        self.labs.clear()
        if interrupted is not None:
            raise interrupted


def _bundle(lab: Lab, node: Any, iteration: int) -> None:
    """A `vmlab replay` bundle of a failed test's lab: the test file, its scenario, seed, logs,
    report (vmlab.pytest_bundle); replay reruns the test with pytest."""
    from vmlab.bundle import BundleError, copy_logs
    from vmlab.pytest_bundle import PytestRecord, write_pytest_bundle

    path = getattr(node, "path", None)
    if path is None or not Path(path).is_file():
        sys.stderr.write(f"vmlab: no bundle for {node.nodeid or 'the session lab'}: "
                         "it has no test file to replay\n")
        return
    art = Path(lab.options.artifacts_dir)
    config = node.config
    kernel = next((Path(vm.machine.config.kernel) for vm in lab.vms), None)
    rec = PytestRecord(test_file=Path(path), node=node.nodeid.partition("::")[2],
                       seed=config.stash[_SEED_KEY], repeat=config.getoption("vmlab_repeat"),
                       transport=lab.transport, accel=lab.options.accel, kernel=kernel,
                       report=_failure_text(node), argv=list(config.invocation_params.args),
                       logs=copy_logs(art), scenario=lab.scenario)
    try:
        dest = write_pytest_bundle(art / "bundle.tar.gz", rec)
    except BundleError as exc:
        sys.stderr.write(f"vmlab: {exc}\n")
        return
    sys.stderr.write(f"vmlab: bundle {dest} (rerun with `vmlab replay {dest}`)\n")


def _failure_text(node: Any) -> str:
    """pytest's report of the failed phases of a test (for a module lab: its failed count)."""
    reports = node.stash.get(_REPORTS_KEY, {}) if hasattr(node, "stash") else {}
    texts = [f"{node.nodeid} {when} failed:\n{r.longreprtext}\n" for when, r in reports.items()
             if r.failed]
    return "".join(texts) or f"{node.nodeid}: {node.session.testsfailed} test(s) failed\n"


def _node_base(node: Any) -> Path | None:
    """Where a node's relative scenario paths start: its file's directory (the session: rootdir)."""
    if isinstance(node, pytest.Session):
        return Path(str(node.config.rootpath))
    path = getattr(node, "path", None)
    return Path(path).parent if path else None


@pytest.fixture
def vmlab_lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """make_lab(scenario path | Scenario | n_vms | [VmSpec/dict], **LabOptions) -> a started Lab."""
    factory = _LabFactory(request.config, _safe_name(request.node.nodeid), request.node,
                          request.getfixturevalue("vmlab_iteration"))
    request.node.stash[_LABS_KEY] = factory.labs  # so failure reports can attach these labs' logs
    yield factory
    factory.close(_test_failed(request.node), request.node.nodeid)


@pytest.fixture
def lab(vmlab_lab_factory: Callable[..., Lab], request: pytest.FixtureRequest) -> Lab:
    """A lab for this test, from @pytest.mark.vmlab(...) or a single default VM."""
    marker = request.node.get_closest_marker("vmlab")
    kwargs = dict(marker.kwargs) if marker else {}
    args = marker.args if marker else ()
    scenario = kwargs.pop("scenario", args[0] if args else None)
    vms = kwargs.pop("vms", None)
    return vmlab_lab_factory(scenario, vms=vms, **kwargs)


@pytest.fixture
def vm(lab: Lab):
    """The first VM of `lab`."""
    return lab.vms[0]


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab for the whole module: scenario from the module's VMLAB_SCENARIO (path, count or VMs)."""
    spec = getattr(request.module, "VMLAB_SCENARIO", None)
    options = getattr(request.module, "VMLAB_OPTIONS", {})
    factory = _LabFactory(request.config, _safe_name(request.module.__name__), request.node)
    lab = factory(spec, **options)
    yield lab
    factory.close(request.session.testsfailed > 0, request.module.__name__)


@pytest.fixture(scope="session")
def vmlab_session_scenario() -> Any:
    """Override in a conftest to choose the session lab's scenario (path, count, or VMs)."""
    return 1


@pytest.fixture(scope="session")
def session_lab(request: pytest.FixtureRequest, vmlab_session_scenario: Any) -> Iterator[Lab]:
    """One lab for the whole session (boot once, test many times)."""
    factory = _LabFactory(request.config, "session", request.node)
    lab = factory(vmlab_session_scenario)
    yield lab
    factory.close(request.session.testsfailed > 0, "session")


@pytest.fixture
def vsock_listen(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """listen(lab_or_vm, port, type="stream") -> a host listener reachable from the VM(s)."""
    from vmlab.vsock.host import host_listen

    opened: list[Any] = []

    def listen(target: Any, port: int, type: str = "stream", busy_timeout: float = 60.0, **kwargs: Any):
        # busy_timeout: on the vhost transport ports are host-wide; wait for a parallel test's lab.
        vms = target.vms if isinstance(target, Lab) else [target]
        listener = host_listen(port, vms=[v.endpoint() for v in vms if v.transport], type=type,
                               busy_timeout=busy_timeout, **kwargs)
        opened.append(listener)
        return listener

    yield listen
    for listener in opened:
        listener.close()


@pytest.fixture
def vsock_connect(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """connect(vm, port, type="stream", timeout=10) -> a host connection to a guest listener."""
    from vmlab.vsock.host import host_connect

    opened: list[Any] = []

    def connect(target_vm: Any, port: int, type: str = "stream", timeout: float = 10.0):
        conn = host_connect(target_vm.cid, port, endpoint=target_vm.endpoint(), type=type, timeout=timeout)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        try:
            conn.close()
        except OSError:
            pass


@pytest.fixture
def guest() -> Callable[[Any], Any]:
    """guest(vm) -> GuestHelper: run the in-guest vmlab-guest helper (listen/connect/info)."""
    from vmlab.guest import GuestHelper

    return GuestHelper


@pytest.fixture
def host_run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """host_run(lab, argv_or_shell_command, background=False, timeout=60, env=None, cwd=None)
    -> vmlab.shim.process.HostProcess. A host program whose AF_VSOCK sockets reach the lab's
    guests (LD_PRELOAD shim on vhost-user, unchanged on vhost). Not background: waits for the exit
    (returncode, output()); background: returns at once (wait_listening(port), wait_for_output(rx),
    wait()). Every program still running is stopped after the test."""
    from vmlab.shim import LabTarget, command_argv
    from vmlab.shim.process import HostProcess

    started: list[HostProcess] = []

    def run(lab: Lab, command: Any, background: bool = False, timeout: float = 60.0,
            env: dict[str, str] | None = None, cwd: str | None = None) -> HostProcess:
        argv = command_argv(command)
        log = tmp_path / f"host-run-{len(started)}.log"
        proc = HostProcess(argv, LabTarget.from_lab(lab), log, env=env, cwd=cwd)
        started.append(proc)
        proc.start()
        if not background:
            proc.wait(timeout)
        return proc

    yield run
    for proc in started:
        proc.close()
