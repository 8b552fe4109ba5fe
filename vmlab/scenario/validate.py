"""Semantic checks of a Scenario: types, ranges, vsock addressing rules, references between steps.

Works the same on dataclasses parsed from YAML (problems point at FILE:LINE:COL) and on ones built
in Python (problems point at "<inline>" plus a path like `vms[1]`). Collects every problem, then
raises one ScenarioError.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

from vmlab.scenario.check import FieldChecker, describe, is_int, suggest
from vmlab.scenario.model import (
    ACTION_TYPES,
    ACTIONS,
    BACKGROUND_ACTIONS,
    DGRAM_ERROR,
    ENDPOINT_ACTIONS,
    LISTEN_ACTIONS,
    HOST_ROOTFS_WRITABLE,
    MIN_MEMORY_MIB,
    PRIVILEGED_PORT_LIMIT,
    ROOTFS_KINDS,
    SOCKET_TYPES,
    TRANSPORTS,
    U32_MAX,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_RESERVED,
    VMADDR_PORT_ANY,
    Location,
    Problem,
    Scenario,
    ScenarioError,
    Step,
    VmSpec,
    Where,
    sort_problems,
)

VM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCENARIO_NAME_RE = ID_RE
RESERVED_VM_NAMES = ("host", "any")  # they mean CIDs in `cid:` fields
DGRAM_NAMES = ("dgram", "datagram", "sock_dgram")
ERRNO_NAMES = tuple(sorted(set(errno.errorcode.values())))
EVENTS = ("listening", "connected", "accepted", "message", "sent", "received", "closed", "error", "exited")
_STREAM_EVENTS = ("message", "sent", "received", "closed", "error")
EVENTS_BY_ACTION = {  # what each endpoint reports (images/guest/README.md; host ones mirror it)
    "host_listen": ("listening", "accepted", *_STREAM_EVENTS),
    "guest_listen": ("listening", "accepted", *_STREAM_EVENTS, "exited"),
    "host_connect": ("connected", *_STREAM_EVENTS),
    "guest_connect": ("connected", *_STREAM_EVENTS, "exited"),
    "host_run": ("exited",),
}
QMP_COMMANDS = (
    "stop", "cont", "system_reset", "system_powerdown", "quit", "device_del", "query-status",
)
RUN_STATES = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo",
)
FAULT_KINDS = ("drop", "delay", "rst", "duplicate", "reorder", "credit_stall", "corrupt",
               "transport_reset")
FAULT_OPS = ("request", "response", "rst", "shutdown", "rw", "credit_update", "credit_request")
CORRUPT_FIELDS = ("type", "op", "dst_port", "src_port", "dst_cid", "src_cid")
_KIND_ONLY = {"delay_ms": "delay", "jitter_ms": "delay", "window": "reorder", "field": "corrupt",
              "stall_ms": "credit_stall"}
DIRECTIONS = ("tx", "rx", "both")
MAX_CPUS = 255
MAX_CHUNK = 1 << 20
VSOCK_DEVICE_RE = re.compile(r"vhost(-user)?-vsock")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


# ---- vsock addressing ------------------------------------------------------------------------

def guest_cid_problem(cid: int) -> str | None:
    """Why `cid` cannot be a guest's CID, or None. (Same rules as the kernel's vhost_vsock_set_cid.)"""
    if cid == -1 or cid == VMADDR_CID_ANY:
        return f"CID {cid} is VMADDR_CID_ANY (-1, 0xFFFFFFFF) and cannot be a guest's CID"
    if cid < 0:
        return f"CID {cid} is negative; CIDs are unsigned 32-bit numbers"
    if cid > U32_MAX:
        return f"CID {cid} does not fit in 32 bits"
    if cid == VMADDR_CID_HYPERVISOR:
        return "CID 0 is VMADDR_CID_HYPERVISOR (the hypervisor); guest CIDs start at 3"
    if cid == VMADDR_CID_RESERVED:
        return "CID 1 is VMADDR_CID_RESERVED and must not be used; guest CIDs start at 3"
    if cid == VMADDR_CID_HOST:
        return "CID 2 is VMADDR_CID_HOST (the host); guest CIDs start at 3"
    return None


def connect_cid_problem(cid: int) -> str | None:
    """Why a connect step cannot target `cid`, or None (2 = host and guest CIDs are fine)."""
    if cid == VMADDR_CID_ANY:
        return "cannot connect to VMADDR_CID_ANY (-1); name the host, a VM or a CID"
    if cid < 0:
        return f"CID {cid} is negative; CIDs are unsigned 32-bit numbers"
    if cid > U32_MAX:
        return f"CID {cid} does not fit in 32 bits"
    if cid == VMADDR_CID_HYPERVISOR:
        return "cannot connect to CID 0 (VMADDR_CID_HYPERVISOR): vmlab does not model the hypervisor"
    if cid == VMADDR_CID_RESERVED:
        return "cannot connect to CID 1 (VMADDR_CID_RESERVED): it must not be used"
    return None


MAX_SEND_MESSAGES = 64  # the guest helper's limit of repeated --send options


class _ScenarioChecks(FieldChecker):
    """The checks themselves, in file order: scenario keys, VMs, then steps."""

    current_step: Step | None = None

    def run(self) -> None:
        s = self.s
        if self.str_field(s, "name", "", required=True) and not SCENARIO_NAME_RE.fullmatch(s.name):
            self.error(s, "name", "", f"name: {s.name!r} is not a valid scenario name "
                       "(letters, digits, '_', '.', '-'; at most 64; starts with a letter or digit)")
        self.str_field(s, "description", "")
        self.choice_field(s, "transport", "", TRANSPORTS, required=True)
        self.number_field(s, "timeout", "", 0, positive=True, required=True)
        self.bool_field(s, "reuse", "")
        self.vms_by_name: dict[str, VmSpec] = {}
        if self.typed(s, "vms", "", isinstance(s.vms, list), "a list of VMs"):
            if not s.vms and not self.skip(s, "vms"):
                self.error(s, "vms", "", "vms: at least one VM is required")
            for i, vm in enumerate(s.vms):
                self.check_vm(i, vm)
        if self.typed(s, "steps", "", isinstance(s.steps, list), "a list of steps"):
            self.ids: dict[str, tuple[str, Location]] = {}
            self.pending_ids = self._all_ids()
            for i, step in enumerate(s.steps):
                self.check_step(i, step)

    # ---- VMs ------------------------------------------------------------------------------
    def label(self, obj: Any, default: str) -> str:
        where = getattr(obj, "where", None)
        return where.label if isinstance(where, Where) and where.label else default

    def check_vm(self, i: int, vm: Any) -> None:
        ctx = f"{self.label(vm, f'vms[{i}]')}: "
        if not isinstance(vm, VmSpec):
            self.problems.append(Location(self.file).problem(f"{ctx}expected a VmSpec, got {describe(vm)}"))
            return
        if self.str_field(vm, "name", ctx, required=True):
            ctx = f"vm '{vm.name}': "
            if not VM_NAME_RE.fullmatch(vm.name):
                self.error(vm, "name", ctx, f"name: {vm.name!r} is not a valid VM name: use "
                           "[a-z0-9][a-z0-9_-]{0,31} (lowercase letters, digits, '_' and '-', at most 32)")
            elif vm.name in RESERVED_VM_NAMES:
                self.error(vm, "name", ctx, f"name: '{vm.name}' is reserved (it means a CID in "
                           "`cid:` fields); choose another VM name")
            elif vm.name in self.vms_by_name:
                first = self.vms_by_name[vm.name]
                self.error(vm, "name", ctx, f"name: duplicate VM name '{vm.name}'"
                           + self.ref(self.at(first), "first defined at"))
            if vm.name not in self.vms_by_name:
                self.vms_by_name[vm.name] = vm  # even if invalid: references to it are not the problem
        if vm.cid is not None and self.typed(vm, "cid", ctx, is_int(vm.cid), "an integer CID (3 .. 0xFFFFFFFE)"):
            why = guest_cid_problem(vm.cid)
            if why:
                self.error(vm, "cid", ctx, f"cid: {why}")
            else:
                for other in self.s.vms[:i]:
                    if isinstance(other, VmSpec) and other.cid == vm.cid and is_int(other.cid):
                        self.error(vm, "cid", ctx, f"cid: CID {vm.cid} is already used by VM "
                                   f"'{other.name}'" + self.ref(self.at(other, "cid"), "at"))
                        break
        if self.int_field(vm, "memory_mib", ctx, 0, required=True) and vm.memory_mib < MIN_MEMORY_MIB:
            self.error(vm, "memory_mib", ctx, f"memory: {vm.memory_mib}M is too small; the minimum is "
                       f"{MIN_MEMORY_MIB}M")
        self.int_field(vm, "cpus", ctx, 1, MAX_CPUS, required=True)
        self.check_kernel(vm, ctx)
        self.path_field(vm, "initrd", ctx, "file")
        self.str_field(vm, "cmdline", ctx, required=True)
        self.choice_field(vm, "transport", ctx, TRANSPORTS, required=True)
        if self.str_field(vm, "group", ctx, required=True) and not VM_NAME_RE.fullmatch(vm.group):
            self.error(vm, "group", ctx, f"group: {vm.group!r} is not a valid group name "
                       "([a-z0-9][a-z0-9_-]{0,31})")
        self.check_files(vm, ctx)
        self.path_field(vm, "share", ctx, "dir")
        self.check_rootfs(vm, ctx)
        if self.bool_field(vm, "vsock", ctx) and not vm.vsock and is_int(vm.cid):
            self.warn(vm, "cid", ctx, "cid: ignored, the VM has no vsock device (vsock: false)")
        self.check_qemu_args(vm, ctx)

    def check_rootfs(self, vm: VmSpec, ctx: str) -> None:
        """rootfs: host needs vmlab's own initramfs (it mounts the host's /), and `files:` can only
        land where that guest can write."""
        if not self.choice_field(vm, "rootfs", ctx, ROOTFS_KINDS) or vm.rootfs != "host":
            return
        if vm.initrd is not None:
            self.error(vm, "initrd", ctx, "initrd: cannot be combined with rootfs: host (vmlab's own "
                       "initramfs mounts the host's root)")
        if vm.share is not None:
            self.error(vm, "share", ctx, "share: not available with rootfs: host; the host's files are "
                       "already visible (read-only) at their own paths")
        if not isinstance(vm.files, dict):
            return
        for guest in vm.files:
            if not isinstance(guest, str) or self.skip(vm, f"files[{guest}]"):
                continue
            if not any(guest == d or guest.startswith(d + "/") for d in HOST_ROOTFS_WRITABLE):
                self.error(vm, f"files[{guest}]", ctx, f"files: {guest} is on the host's read-only root; "
                           f"with rootfs: host files go under {', '.join(HOST_ROOTFS_WRITABLE)}")
    def check_kernel(self, vm: VmSpec, ctx: str) -> None:
        """A kernel path (vmlinuz or package root), or a reference (see vmlab.kernel.spec)."""
        from vmlab.kernel.spec import KernelRef

        ref = vm.kernel
        if not isinstance(ref, KernelRef):
            self.path_field(vm, "kernel", ctx, "any")
            return
        if self.skip(vm, "kernel"):
            return
        if ref.kind == "source" and not Path(ref.value).is_dir():
            self.error(vm, "kernel", ctx, f"kernel: source {ref.value} is not a directory")
        elif ref.kind in ("source", "minimal") and ref.config is not None and not Path(ref.config).is_file():
            self.error(vm, "kernel", ctx, f"kernel: config fragment {ref.config} does not exist")
        elif ref.kind == "package" and not ref.value.startswith("linux-image-"):
            self.error(vm, "kernel", ctx, f"kernel: package {ref.value!r} is not a kernel package "
                       "(expected linux-image-..., e.g. linux-image-6.1.0-57-amd64)")
        elif ref.kind == "build":
            from vmlab.kernel.store import StoreError, find
            try:
                find(ref.value)
            except StoreError as exc:
                self.error(vm, "kernel", ctx, f"kernel: {exc}")

    def check_files(self, vm: VmSpec, ctx: str) -> None:
        if not self.typed(vm, "files", ctx, isinstance(vm.files, dict),
                          "a mapping of guest path -> host path"):
            return
        for guest, host in vm.files.items():
            key = f"files[{guest}]"
            if self.skip(vm, key):
                continue
            if not isinstance(guest, str) or not guest.startswith("/") or guest.rstrip("/") == "":
                self.error(vm, key, ctx, f"files: guest path {guest!r} must be an absolute file path "
                           "like /root/repro")
                continue
            if ".." in guest.split("/"):
                self.error(vm, key, ctx, f"files: guest path {guest!r} must not contain '..'")
                continue
            self.path_field(vm, "files", ctx, "any", value=host, key=key)

    def check_qemu_args(self, vm: VmSpec, ctx: str) -> None:
        if not self.typed(vm, "qemu_args", ctx, isinstance(vm.qemu_args, list), "a list of strings"):
            return
        for j, arg in enumerate(vm.qemu_args):
            key = f"qemu_args[{j}]"
            if self.skip(vm, key):
                continue
            if not isinstance(arg, str):
                self.error(vm, key, ctx, f"{key}: expected a string, got {describe(arg)}")
            elif VSOCK_DEVICE_RE.search(arg):
                self.error(vm, key, ctx, f"qemu_args: {arg!r} adds a vsock device: only one vsock "
                           "device per VM is supported and vmlab adds it itself (use `vsock: false` "
                           "for a VM without one)")

    # ---- steps ----------------------------------------------------------------------------
    def _all_ids(self) -> dict[str, Location]:
        """Every endpoint id in the file, to tell 'defined later' from 'unknown'."""
        out: dict[str, Location] = {}
        for step in self.s.steps:
            if isinstance(step, Step) and step.action in ENDPOINT_ACTIONS + ("host_run",):
                pid = getattr(step.params, "id", None)
                if isinstance(pid, str):
                    out.setdefault(pid, self.at(step.params, "id"))
        return out

    def check_step(self, i: int, step: Any) -> None:
        label = self.label(step, f"steps[{i}]")
        ctx = f"{label}: "
        if not isinstance(step, Step):
            self.problems.append(Location(self.file).problem(f"{ctx}expected a Step, got {describe(step)}"))
            return
        action = step.action
        if not isinstance(action, str) or action not in ACTION_TYPES:
            self.error(step, None, ctx, f"unknown action '{action}'; expected one of "
                       f"{', '.join(ACTIONS)}{suggest(action, ACTIONS)}")
            return
        ctx = f"{label} ({action}): "
        p = step.params
        if type(p) is not ACTION_TYPES[action]:
            self.error(step, None, ctx, f"params must be a {ACTION_TYPES[action].__name__}, got "
                       f"{type(p).__name__}")
            return
        self.str_field(step, "name", ctx)
        self.number_field(step, "timeout", ctx, 0, positive=True, required=True)
        if self.bool_field(step, "background", ctx):
            if step.background and action not in BACKGROUND_ACTIONS:
                self.error(step, "background", ctx, f"background: {action} steps cannot run in the "
                           f"background (only {', '.join(BACKGROUND_ACTIONS)})")
            elif not step.background and action in LISTEN_ACTIONS and "background" in step.where.fields:
                self.error(step, "background", ctx, f"background: {action} always runs in the "
                           "background until the scenario ends; drop `background: false`")
        self.current_step = step
        getattr(self, "step_" + action)(p, ctx)
        self.current_step = None

    def vm_ref(self, obj: Any, fld: str, ctx: str, need_vsock: bool,
               required: bool = True) -> VmSpec | None:
        """The VmSpec a `vm:` field names (reporting unknown names), or None."""
        if not self.str_field(obj, fld, ctx, required):
            return None
        name = getattr(obj, fld)
        vm = self.vms_by_name.get(name)
        if vm is None:
            self.error(obj, fld, ctx, f"{fld}: unknown VM '{name}'; defined VMs: "
                       f"{', '.join(self.vms_by_name) or 'none'}{suggest(name, self.vms_by_name)}")
            return None
        if need_vsock and vm.vsock is False:
            self.error(obj, fld, ctx, f"{fld}: VM '{name}' has no vsock device (vsock: false)")
            return None
        return vm

    def new_id(self, obj: Any, ctx: str, action: str) -> None:
        if not self.str_field(obj, "id", ctx, required=True):
            return
        if not ID_RE.fullmatch(obj.id):
            self.error(obj, "id", ctx, f"id: {obj.id!r} is not a valid id (letters, digits, '_', '.', "
                       "'-'; at most 64)")
        if obj.id in self.ids:
            _, first = self.ids[obj.id]
            self.error(obj, "id", ctx, f"id: duplicate id '{obj.id}'" + self.ref(first, "first defined at"))
            return
        self.ids[obj.id] = (action, self.at(obj, "id"))

    def id_ref(self, obj: Any, ctx: str) -> str | None:
        """The action of the earlier step whose id `obj.id` names, or None (reported)."""
        if not self.str_field(obj, "id", ctx, required=True):
            return None
        if obj.id in self.ids:
            return self.ids[obj.id][0]
        later = self.pending_ids.get(obj.id)
        if later is not None:
            self.error(obj, "id", ctx, f"id: '{obj.id}' is defined by a later step{self.ref(later, 'at')}; "
                       "it must be defined by an earlier step")
        else:
            self.error(obj, "id", ctx, f"id: unknown id '{obj.id}'; ids are defined by host_listen, "
                       f"host_connect, guest_listen and guest_connect steps{suggest(obj.id, self.ids)}")
        return None

    def port(self, obj: Any, ctx: str, listener: bool) -> None:
        value = getattr(obj, "port", None)
        if value is None:
            self.required(obj, "port", ctx)
            return
        expected = "an integer 0..4294967294" + (" or 'any'" if listener else "")
        if not self.typed(obj, "port", ctx, is_int(value), expected):
            return
        if value == VMADDR_PORT_ANY:
            if not listener:
                self.error(obj, "port", ctx, "port: VMADDR_PORT_ANY (-1) only makes sense for "
                           "listeners; connect to a concrete port")
        elif value < 0:
            self.error(obj, "port", ctx, f"port: {value} is negative; ports are unsigned 32-bit "
                       "numbers (-1 means VMADDR_PORT_ANY)")
        elif value > U32_MAX:
            self.error(obj, "port", ctx, f"port: {value} does not fit in 32 bits")

    def sock_type(self, obj: Any, ctx: str) -> None:
        value = getattr(obj, "type", None)
        if isinstance(value, str) and value.strip().lower() in DGRAM_NAMES:
            if not self.skip(obj, "type"):
                self.error(obj, "type", ctx, f"type: {DGRAM_ERROR}")
            return
        self.choice_field(obj, "type", ctx, SOCKET_TYPES, required=True, what="socket type")

    def payload(self, obj: Any, ctx: str, host_file: bool) -> None:
        given = [f for f in ("send", "send_bytes", "send_file") if getattr(obj, f, None) is not None]
        if len(given) > 1:
            self.error(obj, given[1], ctx, f"{given[1]}: send, send_bytes and send_file are mutually "
                       f"exclusive (got {' and '.join(given)})")
        send = getattr(obj, "send", None)
        if send is not None:
            self.typed(obj, "send", ctx, isinstance(send, str) or (
                isinstance(send, list) and 0 < len(send) <= MAX_SEND_MESSAGES
                and all(isinstance(m, str) for m in send)),
                f"a string, or a list of 1 to {MAX_SEND_MESSAGES} strings (one send, or message, each)")
        self.int_field(obj, "send_bytes", ctx, 0)
        if host_file:
            self.path_field(obj, "send_file", ctx, "file")
        elif self.str_field(obj, "send_file", ctx) and not obj.send_file.startswith("/"):
            self.error(obj, "send_file", ctx, f"send_file: {obj.send_file!r} is a guest path and must "
                       "be absolute")
        self.bool_field(obj, "recv", ctx)
        self.int_field(obj, "recv_bytes", ctx, 0)
        self.errno_field(obj, "expect_error", ctx)

    def errno_field(self, obj: Any, fld: str, ctx: str) -> None:
        value = getattr(obj, fld, None)
        if value is None or not self.typed(obj, fld, ctx, isinstance(value, str),
                                           "an errno name like ECONNRESET"):
            return
        if value not in ERRNO_NAMES:
            self.error(obj, fld, ctx, f"{fld}: unknown errno name '{value}' (expected e.g. "
                       f"ECONNRESET, ECONNREFUSED, ETIMEDOUT){suggest(value.upper(), ERRNO_NAMES)}")

    def transport_note(self, obj: Any, ctx: str, vm: VmSpec, what: str, need: str) -> None:
        """`what` needs the vhost-user transport: error on vhost, warning on auto."""
        if vm.transport == "vhost":
            self.error(obj, "vm", ctx, f"vm: {what} {need}, but VM '{vm.name}' uses transport vhost")
        elif vm.transport == "auto":
            self.warn(obj, "vm", ctx, f"vm: {what} {need}; VM '{vm.name}' uses transport auto, which "
                      "picks vhost when /dev/vhost-vsock is usable (set transport: vhost-user)")

    # -- per action --
    def step_run(self, p: Any, ctx: str) -> None:
        self.vm_ref(p, "vm", ctx, need_vsock=False)
        self.str_field(p, "command", ctx, required=True)
        self.int_field(p, "expect_exit", ctx, 0, 255)
        self.str_field(p, "expect_output", ctx)
        self.regex_field(p, "expect_regex", ctx)

    def step_host_run(self, p: Any, ctx: str) -> None:
        cmd = p.command
        if cmd is None:
            self.required(p, "command", ctx)
        else:
            self.typed(p, "command", ctx, (isinstance(cmd, str) and cmd.strip() != "") or (
                isinstance(cmd, list) and bool(cmd) and all(isinstance(a, str) for a in cmd)),
                "a shell command string or a non-empty list of strings (argv)")
        if p.id is not None:
            self.new_id(p, ctx, "host_run")
        self.int_field(p, "expect_exit", ctx, 0, 255)
        self.str_field(p, "expect_output", ctx)
        self.regex_field(p, "expect_regex", ctx)
        self.regex_field(p, "ready_output", ctx)
        if p.ready_port is not None:
            self.int_field(p, "ready_port", ctx, 0, U32_MAX - 1)
        if p.env is not None:
            self.typed(p, "env", ctx, isinstance(p.env, dict) and all(
                isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in p.env.items()),
                "a mapping of variable names to strings")
        self.str_field(p, "cwd", ctx)
        background = self.current_step is not None and self.current_step.background
        if not background and (p.ready_port is not None or p.ready_output is not None):
            field = "ready_port" if p.ready_port is not None else "ready_output"
            self.error(p, field, ctx, f"{field}: readiness only applies to `background: true` "
                       "(a foreground host_run waits for the program to exit)")
        if background and p.id is None:
            self.warn(p, None, ctx, "a background host_run without an id: nothing can wait for its "
                      "exit, so its expect_* fields are never checked")

    def step_host_listen(self, p: Any, ctx: str) -> None:
        self.new_id(p, ctx, "host_listen")
        self.port(p, ctx, listener=True)
        if is_int(p.port) and p.port < PRIVILEGED_PORT_LIMIT and not self.skip(p, "port"):
            self.warn(p, "port", ctx, f"port: {p.port} is privileged (< {PRIVILEGED_PORT_LIMIT}): "
                      "binding it on the host needs root or CAP_NET_BIND_SERVICE")
        if p.cid is None:
            self.required(p, "cid", ctx)
        elif not self.skip(p, "cid") and (not is_int(p.cid) or p.cid not in (VMADDR_CID_HOST, VMADDR_CID_ANY)):
            self.error(p, "cid", ctx, f"cid: a host listener binds host (2) or any (-1), got "
                       f"{describe(p.cid)}")
        elif p.cid == VMADDR_CID_ANY and not self.skip(p, "cid"):
            self.warn(p, "cid", ctx, "cid: binding VMADDR_CID_ANY on the host is known not to work "
                      "everywhere (it reliably works inside VMs); cid: host (2) is the portable choice")
        self.sock_type(p, ctx)
        self.vm_ref(p, "vm", ctx, need_vsock=True, required=False)
        self.int_field(p, "chunk", ctx, 1, MAX_CHUNK, required=True)
        self.bool_field(p, "echo", ctx)
        self.int_field(p, "accept", ctx, 1, required=True)

    def step_host_connect(self, p: Any, ctx: str) -> None:
        self.new_id(p, ctx, "host_connect")
        self.vm_ref(p, "vm", ctx, need_vsock=True)
        self.port(p, ctx, listener=False)
        self.sock_type(p, ctx)
        self.payload(p, ctx, host_file=True)

    def step_guest_listen(self, p: Any, ctx: str) -> None:
        self.new_id(p, ctx, "guest_listen")
        vm = self.vm_ref(p, "vm", ctx, need_vsock=True)
        self.port(p, ctx, listener=True)
        if p.cid is None:
            self.required(p, "cid", ctx)
        elif not self.skip(p, "cid") and p.cid != VMADDR_CID_ANY:
            if not self.typed(p, "cid", ctx, is_int(p.cid), "'any' or the guest's own CID"):
                pass
            elif guest_cid_problem(p.cid):
                self.error(p, "cid", ctx, f"cid: a guest binds any (-1) or its own CID: "
                           f"{guest_cid_problem(p.cid)}")
            elif vm is not None and is_int(vm.cid) and vm.cid != p.cid:
                self.error(p, "cid", ctx, f"cid: VM '{vm.name}' has CID {vm.cid}; a guest can bind "
                           "only its own CID or any")
        self.sock_type(p, ctx)
        self.bool_field(p, "echo", ctx)
        self.bool_field(p, "once", ctx)
        self.int_field(p, "chunk", ctx, 1, MAX_CHUNK)
        self.int_field(p, "expect_bytes", ctx, 0)

    def step_guest_connect(self, p: Any, ctx: str) -> None:
        self.new_id(p, ctx, "guest_connect")
        src = self.vm_ref(p, "vm", ctx, need_vsock=True)
        self.port(p, ctx, listener=False)
        self.sock_type(p, ctx)
        self.payload(p, ctx, host_file=False)
        target = self.connect_target(p, ctx)
        if src is not None and target is not None:
            self.vm_to_vm(p, ctx, src, target)

    def connect_target(self, p: Any, ctx: str) -> VmSpec | None:
        """Check guest_connect's cid; returns the target VM when the cid names/pins one."""
        cid = p.cid
        if cid is None:
            self.required(p, "cid", ctx)
            return None
        if self.skip(p, "cid"):
            return None
        if isinstance(cid, str):
            vm = self.vms_by_name.get(cid)
            if vm is None:
                choices = ["host", *self.vms_by_name]
                self.error(p, "cid", ctx, f"cid: '{cid}' is neither host, a CID nor a VM name; "
                           f"defined VMs: {', '.join(self.vms_by_name) or 'none'}{suggest(cid, choices)}")
                return None
            if vm.vsock is False:
                self.error(p, "cid", ctx, f"cid: VM '{cid}' has no vsock device (vsock: false)")
                return None
            return vm
        if not self.typed(p, "cid", ctx, is_int(cid), "an integer CID, host, or a VM name"):
            return None
        why = connect_cid_problem(cid)
        if why:
            self.error(p, "cid", ctx, f"cid: {why}")
            return None
        for vm in self.vms_by_name.values():
            if vm.cid == cid and is_int(vm.cid):
                return vm
        return None

    def vm_to_vm(self, p: Any, ctx: str, src: VmSpec, dst: VmSpec) -> None:
        """VM<->VM needs both VMs on the vhost-user backend, in the same routing group."""
        if src is dst:
            return
        if p.expect_error is not None:
            return  # the step is testing that it fails
        transports = {src.transport, dst.transport}
        if transports == {"vhost", "vhost-user"}:
            self.error(p, "cid", ctx, f"cid: VM '{src.name}' (transport {src.transport}) cannot reach "
                       f"VM '{dst.name}' (transport {dst.transport}): VMs on different transports "
                       "do not see each other")
        elif "vhost" in transports:
            self.error(p, "cid", ctx, "cid: VM<->VM vsock does not work over the vhost transport "
                       "(the kernel drops guest-to-guest packets); use transport: vhost-user, or set "
                       "expect_error to test the failure")
        elif "auto" in transports:
            self.warn(p, "cid", ctx, "cid: VM<->VM vsock needs the vhost-user transport; with "
                      "transport auto vmlab may pick vhost, where guest-to-guest packets are dropped")
        if transports <= {"vhost-user", "auto"} and src.group != dst.group:
            self.error(p, "cid", ctx, f"cid: VM '{src.name}' (group {src.group}) cannot reach VM "
                       f"'{dst.name}' (group {dst.group}): the backend routes only within a group")

    def step_expect(self, p: Any, ctx: str) -> None:
        if self.id_ref(p, ctx) == "host_run":
            self.error(p, "id", ctx, f"id: '{p.id}' is a host_run program, not a vsock endpoint; its "
                       "exit and output are checked by its expect_* fields (for a background one at "
                       "`wait_for: {id, event: exited}`)")
        checks = [f for f in ("message", "messages", "bytes", "sha256", "error")
                  if getattr(p, f, None) is not None]
        if not checks and not any(f in p.where.reported for f in ("message", "messages", "bytes", "sha256", "error")):
            self.error(p, None, ctx, "nothing to check: give message, messages, bytes, sha256 or error")
        if p.message is not None and p.messages is not None:
            self.error(p, "messages", ctx, "messages: message and messages are mutually exclusive")
        self.str_field(p, "message", ctx)
        if p.messages is not None and self.typed(
                p, "messages", ctx, isinstance(p.messages, list)
                and all(isinstance(m, str) for m in p.messages), "a list of strings"):
            if not p.messages:
                self.error(p, "messages", ctx, "messages: the list is empty")
        self.int_field(p, "bytes", ctx, 0)
        if self.str_field(p, "sha256", ctx) and p.sha256 != "pattern" and not SHA256_RE.fullmatch(p.sha256):
            self.error(p, "sha256", ctx, "sha256: expected 64 hex digits or 'pattern' (the sha256 of "
                       "the send_bytes pattern)")
        self.errno_field(p, "error", ctx)
        self.number_field(p, "timeout", ctx, 0, positive=True)

    def step_wait_for(self, p: Any, ctx: str) -> None:
        console = p.vm is not None or p.console is not None
        event = p.id is not None or p.event is not None
        if console and event:
            self.error(p, None, ctx, "use either {vm, console} or {id, event}, not both")
            return
        if not console and not event:
            self.error(p, None, ctx, "nothing to wait for: give {vm, console: regex} or {id, event}")
            return
        if console:
            self.vm_ref(p, "vm", ctx, need_vsock=False)
            self.regex_field(p, "console", ctx, required=True)
            return
        action = self.id_ref(p, ctx)
        if self.choice_field(p, "event", ctx, EVENTS, required=True) and action is not None:
            allowed = EVENTS_BY_ACTION[action]
            if p.event not in allowed:
                self.error(p, "event", ctx, f"event: '{p.event}' does not happen to {action} "
                           f"'{p.id}'; it has {', '.join(allowed)}")

    def step_qmp(self, p: Any, ctx: str) -> None:
        vm = self.vm_ref(p, "vm", ctx, need_vsock=False)
        ok = self.choice_field(p, "command", ctx, QMP_COMMANDS, required=True, what="QMP command")
        if ok and p.command == "device_del":
            if p.device is None:
                self.error(p, None, ctx, "device_del needs `device: vsock`")
            elif self.str_field(p, "device", ctx) and p.device != "vsock":
                self.error(p, "device", ctx, f"device: only the vsock device can be removed "
                           f"(device: vsock), got {p.device!r}")
            elif vm is not None and vm.vsock is False:
                self.error(p, "vm", ctx, f"vm: VM '{vm.name}' has no vsock device to remove")
        elif ok and p.device is not None:
            self.error(p, "device", ctx, "device: only used with command device_del")
        self.choice_field(p, "expect_status", ctx, RUN_STATES, what="run state")

    def step_fault(self, p: Any, ctx: str) -> None:
        vm = self.vm_ref(p, "vm", ctx, need_vsock=True)
        if vm is not None:
            self.transport_note(p, ctx, vm, "fault injection", "happens in the vhost-user backend")
        kind_ok = self.choice_field(p, "kind", ctx, FAULT_KINDS, required=True, what="fault kind")
        self.number_field(p, "probability", ctx, 0, 1, required=True)
        if kind_ok and p.kind == "delay":
            self.int_field(p, "delay_ms", ctx, 0, required=True)
        if kind_ok and p.kind == "credit_stall":
            self.int_field(p, "stall_ms", ctx, 1, required=True)
        for fld, kind in _KIND_ONLY.items():
            if kind_ok and p.kind != kind and getattr(p, fld) is not None:
                self.error(p, fld, ctx, f"{fld}: only used with kind: {kind}")
        self.int_field(p, "jitter_ms", ctx, 0)
        self.int_field(p, "window", ctx, 2, 64)
        self.choice_field(p, "field", ctx, CORRUPT_FIELDS, what="header field")
        if isinstance(p.op, str):
            p.op = p.op.lower()
        self.choice_field(p, "op", ctx, FAULT_OPS, what="vsock op")
        self.int_field(p, "port", ctx, 0, 0xFFFFFFFE)
        self.int_field(p, "after", ctx, 0)
        self.int_field(p, "count", ctx, 1)
        self.choice_field(p, "direction", ctx, DIRECTIONS, required=True)
        self.number_field(p, "duration", ctx, 0, positive=True)

    def step_sleep(self, p: Any, ctx: str) -> None:
        self.number_field(p, "seconds", ctx, 0, required=True)


def check(scenario: Scenario) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings) of a scenario; never raises for bad content."""
    checker = _ScenarioChecks(scenario)
    checker.run()
    return checker.problems, checker.warnings


def validate(scenario: Scenario) -> None:
    """Check `scenario`, store its warnings in `scenario.warnings`, raise ScenarioError on problems."""
    problems, warnings = check(scenario)
    scenario.warnings = sort_problems(warnings)
    if problems:
        raise ScenarioError(problems, warnings)
