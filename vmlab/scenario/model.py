"""The scenario data model: constants, problems, and one dataclass per VM, step action and scenario.

Everything here is plain data. Parsing lives in `parse`, checks in `validate`;
`vmlab.scenario` is the public face that re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

# AF_VSOCK addressing (linux/vm_sockets.h). CIDs and ports are 32-bit; -1 is the "any" wildcard.
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_RESERVED = 1
VMADDR_CID_HOST = 2
U32_MAX = 0xFFFFFFFF
FIRST_GUEST_CID = 3
PRIVILEGED_PORT_LIMIT = 1024  # ports below this need root / CAP_NET_BIND_SERVICE to bind

TRANSPORTS = ("auto", "vhost", "vhost-user")
ROOTFS_KINDS = ("image", "host")  # image: vmlab's busybox initramfs; host: the host's / read-only
HOST_ROOTFS_WRITABLE = ("/etc", "/root", "/tmp", "/run", "/var/tmp", "/var/log")
"""Where a `rootfs: host` guest can write (tmpfs or an overlay in guest RAM); `files:` go there."""
SOCKET_TYPES = ("stream", "seqpacket")
DGRAM_ERROR = (
    "SOCK_DGRAM is not supported: virtio-vsock has no datagram sockets in stock kernels; "
    "use stream or seqpacket"
)
MIN_MEMORY_MIB = 64
DEFAULT_MEMORY_MIB = 256
DEFAULT_STEP_TIMEOUT = 30.0
DEFAULT_SCENARIO_TIMEOUT = 300.0


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth warning about) in a scenario, with where it is. line 0 = no position."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        if self.line > 0:
            return f"{self.file}:{self.line}:{self.column}: {self.message}"
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class Location:
    """Where a mapping, key or value was written (1-based), so later checks can point at it."""

    file: str
    line: int = 0
    column: int = 0

    def problem(self, message: str) -> Problem:
        return Problem(self.file, self.line, self.column, message)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}" if self.line > 0 else self.file


def sort_problems(problems: Sequence[Problem]) -> list[Problem]:
    """Duplicates dropped, then in file order (stable for problems without a position)."""
    unique: list[Problem] = []
    for p in problems:
        if p not in unique:
            unique.append(p)
    return sorted(unique, key=lambda p: (p.file, p.line, p.column))


class ScenarioError(Exception):
    """All problems of one scenario at once, sorted by position; str() lists one per line.

    `warnings` carries what validation would have put in `Scenario.warnings`, so a caller can
    still show them next to the errors.
    """

    def __init__(self, problems: Sequence[Problem], warnings: Sequence[Problem] = ()) -> None:
        self.problems: list[Problem] = sort_problems(problems)
        self.warnings: list[Problem] = sort_problems(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class Where:
    """Bookkeeping from the parser: per-field locations and what it already reported.

    `fields` maps a field name (or "files[/guest/path]", "qemu_args[2]") to where its value was
    written; `reported` names fields the parser already complained about (validate skips them);
    `ctx` overrides the message prefix of a field inherited from elsewhere (e.g. `defaults:`);
    `label` is the object's position in the file ("steps[4]") when list indices would mislead.
    """

    fields: dict[str, Location] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    ctx: dict[str, str] = field(default_factory=dict)
    label: str | None = None


def _meta() -> Any:
    return field(default=None, compare=False)


def _where() -> Any:
    return field(default_factory=Where, repr=False, compare=False)


@dataclass
class VmSpec:
    """One guest. cid None means "allocate at run time"; vsock False means no vsock device at all."""

    name: str
    cid: int | None = None
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    kernel: Any = None              # Path, or a vmlab.kernel.spec.KernelRef (build:/source:/package:)
    initrd: Path | None = None
    cmdline: str = ""
    transport: str = "auto"
    group: str = "default"
    files: dict[str, Path] = field(default_factory=dict)  # guest path -> host path
    share: Path | None = None
    rootfs: str | None = None  # None: the run-time choice (--rootfs), else "image"
    vsock: bool = True
    qemu_args: list[str] = field(default_factory=list)
    location: Location | None = _meta()
    where: Where = _where()


def _norm_port(value: Any) -> Any:
    if value == -1 and not isinstance(value, bool) or value == "any":
        return VMADDR_PORT_ANY
    return value


def _norm_cid(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if value == -1 or value == "any":
        return VMADDR_CID_ANY
    if value == "host":
        return VMADDR_CID_HOST
    return value


def _norm_type(value: Any) -> Any:
    if isinstance(value, str):
        low = value.strip().lower()
        return {"sock_stream": "stream", "sock_seqpacket": "seqpacket"}.get(low, low)
    return value


@dataclass
class RunStep:
    """Run a shell command on a guest's serial console and check its exit code / output."""

    vm: str
    command: str
    expect_exit: int | None = 0  # None: any exit code
    expect_output: str | None = None  # substring
    expect_regex: str | None = None  # re.search
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        if self.expect_exit == "any":
            self.expect_exit = None


@dataclass
class HostListenStep:
    """A vsock server on the host. vm None: reachable from every VM."""

    id: str
    port: int  # VMADDR_PORT_ANY allowed
    cid: int = VMADDR_CID_HOST  # VMADDR_CID_HOST or VMADDR_CID_ANY
    type: str = "stream"
    vm: str | None = None
    chunk: int = 64  # recv() size
    echo: bool = False
    accept: int = 1  # connections to accept
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        self.port, self.cid, self.type = _norm_port(self.port), _norm_cid(self.cid), _norm_type(self.type)


@dataclass
class HostConnectStep:
    """The host connects to a VM's port. send/send_bytes/send_file are mutually exclusive."""

    id: str
    vm: str
    port: int
    type: str = "stream"
    send: str | list[str] | None = None  # a list: one send() each (one message each on seqpacket)
    send_bytes: int | None = None  # that many bytes of the deterministic vmlab pattern
    send_file: Path | None = None  # host path
    recv: bool = False
    recv_bytes: int | None = None  # implies recv
    expect_error: str | None = None  # errno name, e.g. "ECONNRESET"
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        self.port, self.type = _norm_port(self.port), _norm_type(self.type)


@dataclass
class GuestListenStep:
    """A server inside a guest (vmlab-guest helper, in the background)."""

    id: str
    vm: str
    port: int  # VMADDR_PORT_ANY allowed
    cid: int = VMADDR_CID_ANY  # or the guest's own CID
    type: str = "stream"
    echo: bool = False
    once: bool = True
    chunk: int | None = None
    expect_bytes: int | None = None
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        self.port, self.cid, self.type = _norm_port(self.port), _norm_cid(self.cid), _norm_type(self.type)


@dataclass
class GuestConnectStep:
    """A guest connects out. cid: an int, VMADDR_CID_HOST, or a VM name (resolved at run time)."""

    id: str
    vm: str
    cid: Union[int, str]
    port: int
    type: str = "stream"
    send: str | list[str] | None = None  # a list: one send() each (one message each on seqpacket)
    send_bytes: int | None = None
    send_file: str | None = None  # guest path
    recv: bool = False
    recv_bytes: int | None = None
    expect_error: str | None = None
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        self.port, self.cid, self.type = _norm_port(self.port), _norm_cid(self.cid), _norm_type(self.type)


@dataclass
class ExpectStep:
    """Check what endpoint `id` (an earlier step) received or saw. sha256 "pattern": of send_bytes."""

    id: str
    message: str | None = None
    messages: list[str] | None = None
    bytes: int | None = None
    sha256: str | None = None
    error: str | None = None
    timeout: float | None = None  # overrides the step timeout
    location: Location | None = _meta()
    where: Where = _where()


@dataclass
class WaitForStep:
    """Either {vm, console: regex} or {id, event}."""

    vm: str | None = None
    console: str | None = None
    id: str | None = None
    event: str | None = None
    location: Location | None = _meta()
    where: Where = _where()


@dataclass
class QmpStep:
    """A QMP command to one VM's QEMU."""

    vm: str
    command: str
    device: str | None = None  # device_del only: "vsock"
    expect_status: str | None = None
    location: Location | None = _meta()
    where: Where = _where()


@dataclass
class FaultStep:
    """Fault injection in the vhost-user backend's router for one VM (vsock/faults.py).

    Selectors: direction, op, port, then `after` (skip the first N selected packets) and
    `count` (act on at most M). Random choices come from the run's seed (`vmlab run --seed`)."""

    vm: str
    kind: str
    probability: float = 1.0
    delay_ms: int | None = None  # kind delay only (required there)
    jitter_ms: int | None = None  # kind delay: + uniform(0, jitter_ms), seeded
    direction: str = "both"
    duration: float | None = None  # seconds; None: until the scenario ends
    op: str | None = None  # request, response, rst, shutdown, rw, credit_update, credit_request
    port: int | None = None  # src or dst port
    after: int | None = None
    count: int | None = None
    window: int | None = None  # reorder: packets per reversed window (default 2)
    field: str | None = None  # corrupt: header field to flip bits in (default type)
    stall_ms: int | None = None  # credit_stall: how long credit is held back (required there)
    location: Location | None = _meta()
    where: Where = _where()


@dataclass
class HostRunStep:
    """Run a host program against the lab (as `vmlab exec`): its AF_VSOCK sockets reach the
    guests on either transport. Foreground: wait for the exit and check it. Background: start,
    wait for readiness (ready_port / ready_output), and check the exit at a later
    `wait_for: {id, event: exited}`."""

    command: str | list[str]            # a string runs in `sh -c`; a list is argv
    id: str | None = None               # needed to wait_for a background program
    expect_exit: int | None = 0         # None / "any": any exit code
    expect_output: str | None = None    # substring of stdout+stderr
    expect_regex: str | None = None     # re.search, multiline
    ready_port: int | None = None       # background: until it listens on this vsock port
    ready_output: str | None = None     # background: until its output matches this regex
    env: dict[str, str] | None = None   # extra environment variables
    cwd: str | None = None              # default: the scenario file's directory
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        if self.expect_exit == "any":
            self.expect_exit = None


@dataclass
class SleepStep:
    seconds: float
    location: Location | None = _meta()
    where: Where = _where()


StepParams = Union[
    RunStep, HostListenStep, HostConnectStep, GuestListenStep, GuestConnectStep,
    ExpectStep, WaitForStep, QmpStep, FaultStep, HostRunStep, SleepStep,
]

ACTION_TYPES: dict[str, type] = {
    "run": RunStep,
    "host_listen": HostListenStep,
    "host_connect": HostConnectStep,
    "guest_listen": GuestListenStep,
    "guest_connect": GuestConnectStep,
    "expect": ExpectStep,
    "wait_for": WaitForStep,
    "qmp": QmpStep,
    "fault": FaultStep,
    "host_run": HostRunStep,
    "sleep": SleepStep,
}
ACTIONS = tuple(ACTION_TYPES)
ENDPOINT_ACTIONS = ("host_listen", "host_connect", "guest_listen", "guest_connect")
LISTEN_ACTIONS = ("host_listen", "guest_listen")
BACKGROUND_ACTIONS = ("run", "host_run", "host_connect", "guest_connect") + LISTEN_ACTIONS
STEP_COMMON_KEYS = ("name", "timeout", "background")
META_FIELDS = ("location", "where")


def action_of(params: Any) -> str | None:
    """The action name for a params dataclass instance (None if it is not one)."""
    for name, cls in ACTION_TYPES.items():
        if type(params) is cls:
            return name
    return None


def _describe(action: str, p: Any) -> str:
    """A short default step name, robust to half-valid params."""
    get = lambda k: getattr(p, k, None)  # noqa: E731
    if action == "sleep":
        return f"sleep {get('seconds')}"
    if action == "run":
        return f"run on {get('vm')}: {get('command')}"[:60]
    if action == "host_run":
        cmd = get("command")
        return f"host_run: {' '.join(map(str, cmd)) if isinstance(cmd, list) else cmd}"[:60]
    if action in ENDPOINT_ACTIONS:
        return f"{action} {get('id')}"
    if action == "expect":
        return f"expect {get('id')}"
    if action == "wait_for":
        return f"wait_for {get('id') or get('vm')}"
    if action in ("qmp", "fault"):
        return f"{action} {get('vm')}: {get('command') or get('kind')}"
    return action


@dataclass
class Step:
    """One step: an action name, its typed params, and the keys every step may have."""

    action: str
    params: Any  # StepParams
    name: str = ""
    timeout: float = DEFAULT_STEP_TIMEOUT
    background: bool = False
    location: Location | None = _meta()
    where: Where = _where()

    def __post_init__(self) -> None:
        if not self.name:
            self.name = _describe(self.action, self.params)

    @classmethod
    def of(cls, params: Any, **kw: Any) -> "Step":
        """Step.of(RunStep(vm="a", command="true")): the action comes from the params type."""
        return cls(action_of(params) or type(params).__name__, params, **kw)

    @property
    def id(self) -> str | None:
        """The endpoint id this step defines (endpoint actions and host_run)."""
        return getattr(self.params, "id", None) if self.action in ENDPOINT_ACTIONS + ("host_run",) else None


@dataclass
class Scenario:
    """A whole lab: VMs, steps, and warnings found while validating (e.g. privileged ports)."""

    name: str
    description: str = ""
    transport: str = "auto"
    vms: list[VmSpec] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    timeout: float = DEFAULT_SCENARIO_TIMEOUT
    reuse: bool = False  # `vmlab run --repeat`: run again on the booted VMs (unless --fresh)
    source: Path | None = None
    warnings: list[Problem] = field(default_factory=list)
    location: Location | None = _meta()
    where: Where = _where()

    def vm(self, name: str) -> VmSpec:
        for vm in self.vms:
            if vm.name == name:
                return vm
        known = ", ".join(v.name for v in self.vms) or "none"
        raise KeyError(f"no VM named {name!r} in scenario {self.name!r} (VMs: {known})")

    @property
    def file(self) -> str:
        """The name problems are reported under."""
        return str(self.source) if self.source is not None else "<inline>"
