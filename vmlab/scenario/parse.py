"""YAML text -> Scenario dataclasses, keeping a location for every value.

This layer only knows the file's *shape*: unknown keys, one action per step, memory sizes, paths
relative to the scenario file, the `vsock:` forms. Everything about values (types, ranges, vsock
rules, references) is `validate`'s job, so Python-built scenarios get the same checks.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from vmlab.scenario.model import (
    ACTION_TYPES,
    ACTIONS,
    DEFAULT_MEMORY_MIB,
    DEFAULT_SCENARIO_TIMEOUT,
    DEFAULT_STEP_TIMEOUT,
    META_FIELDS,
    STEP_COMMON_KEYS,
    Location,
    Problem,
    Scenario,
    ScenarioError,
    Step,
    VmSpec,
    Where,
    sort_problems,
)
from vmlab.scenario.check import describe, suggest
from vmlab.scenario.validate import check
from vmlab.scenario.yaml import MAP, SCALAR, SEQ, Node, YamlSyntaxError, compose

TOP_KEYS = ("name", "description", "transport", "defaults", "timeout", "reuse", "vms", "steps")
DEFAULT_KEYS = ("memory", "cpus", "kernel", "initrd", "cmdline", "rootfs")
VM_KEYS = ("name", "cid", "memory", "cpus", "kernel", "initrd", "cmdline", "transport", "group",
           "files", "share", "rootfs", "vsock", "qemu_args")
PATH_KEYS = ("kernel", "initrd", "share")
HOST_PATH_PARAMS = {("host_connect", "send_file")}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([MG])(?:i?B)?\s*", re.IGNORECASE)


def parse_memory(value: Any) -> int | None:
    """MiB from an int (MiB) or a size string like '256M', '1G', '512MiB'; None if unreadable."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            return int(m.group(1)) * (1024 if m.group(2).upper() == "G" else 1)
    return None


def _fields_of(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in META_FIELDS)


class _Parser:
    """Builds dataclasses from nodes; problems found on the way go to `self.problems`."""

    def __init__(self, filename: str, base_dir: Path) -> None:
        self.file = filename
        self.base = base_dir
        self.problems: list[Problem] = []

    def loc(self, node: Node) -> Location:
        return Location(self.file, node.line, node.column)

    def problem(self, node: Node, message: str) -> None:
        self.problems.append(self.loc(node).problem(message))

    def keys(self, node: Node, allowed: Sequence[str], ctx: str) -> dict[str, Node]:
        """The known entries of a mapping; unknown keys are reported with a suggestion."""
        out: dict[str, Node] = {}
        for key, value in node.value.items():
            if key in allowed:
                out[key] = value
            else:
                hint = suggest(key, allowed)
                listing = "" if hint else f"; known keys: {', '.join(allowed)}"
                self.problem(node.keys[key], f"{ctx}unknown key '{key}'{hint}{listing}")
        return out

    def where(self, entries: dict[str, Node], rename: dict[str, str] | None = None) -> Where:
        rename = rename or {}
        return Where(fields={rename.get(k, k): self.loc(v) for k, v in entries.items()})

    def kernel(self, node: Node, where: Where, ctx: str) -> Any:
        """kernel: a path (relative to the scenario), minimal, build:<name>, source:<dir>, package:<name>,
        or a mapping {source: DIR, config: FRAGMENT} / {package: NAME} / {build: NAME}."""
        from vmlab.kernel.spec import MINIMAL, KernelRefError, parse_ref

        value = node.value if node.kind == SCALAR else node.plain()
        if isinstance(value, str) and ":" not in value.split("/", 1)[0] and value != MINIMAL:
            return self.path(node, where, "kernel", ctx)  # a plain path, as before
        if not isinstance(value, (str, dict)):
            return value  # validate names the expected type
        try:
            ref = parse_ref(value, self.base)
        except KernelRefError as exc:
            self.problem(node, f"{ctx}{exc}")
            where.reported.add("kernel")
            return None
        return Path(os.path.normpath(ref.value)) if ref.kind == "path" else ref

    def path(self, node: Node, where: Where, fld: str, ctx: str) -> Any:
        """A host path relative to the scenario file, made absolute; non-strings pass through."""
        value = node.value if node.kind == SCALAR else node.plain()
        if not isinstance(value, str):
            return value  # validate names the expected type
        if not value.strip():
            self.problem(node, f"{ctx}{fld}: empty path")
            where.reported.add(fld)
            return None
        return Path(os.path.normpath(self.base / os.path.expanduser(value)))

    # ---- top level ----------------------------------------------------------------------------
    def scenario(self, root: Node, default_name: str) -> Scenario:
        top = self.keys(root, TOP_KEYS, "")
        where = self.where(top)
        kw: dict[str, Any] = {"name": default_name}
        for key in ("name", "description", "transport", "timeout", "reuse"):
            if key in top:
                kw[key] = top[key].plain()
        kw.setdefault("description", "")
        kw.setdefault("transport", "auto")
        kw.setdefault("timeout", DEFAULT_SCENARIO_TIMEOUT)
        defaults = self.defaults(top.get("defaults"))
        vms: Any = []
        if "vms" not in top:
            self.problem(root, "'vms' is required: a list of VMs")
            where.reported.add("vms")
        elif top["vms"].kind != SEQ:
            self.problem(top["vms"], f"vms: expected a list of VMs, got {top['vms'].kind_name()}")
            where.reported.add("vms")
        else:
            transport_loc = where.fields.get("transport")
            vms = [vm for i, item in enumerate(top["vms"].value)
                   if (vm := self.vm(i, item, defaults, kw["transport"], transport_loc)) is not None]
            if not top["vms"].value:
                self.problem(top["vms"], "vms: at least one VM is required")
                where.reported.add("vms")
        steps: list[Step] = []
        if "steps" in top:
            node = top["steps"]
            if node.kind == SEQ:
                steps = [s for i, item in enumerate(node.value) if (s := self.step(i, item)) is not None]
            elif not (node.kind == SCALAR and node.value is None):
                self.problem(node, f"steps: expected a list of steps, got {node.kind_name()}")
        return Scenario(vms=vms, steps=steps, location=self.loc(root), where=where, **kw)

    def defaults(self, node: Node | None) -> dict[str, tuple[Any, Location]]:
        """defaults: {memory, cpus, kernel, initrd, cmdline}, converted once, with their locations."""
        if node is None or (node.kind == SCALAR and node.value is None):
            return {}
        if node.kind != MAP:
            self.problem(node, f"defaults: expected a mapping, got {node.kind_name()}")
            return {}
        out: dict[str, tuple[Any, Location]] = {}
        scratch = Where()
        for key, value in self.keys(node, DEFAULT_KEYS, "defaults: ").items():
            if key == "memory":
                mib = self.memory(value, "defaults: ")
                if mib is None:
                    continue
                out["memory_mib"] = (mib, self.loc(value))
            elif key == "kernel":
                out[key] = (self.kernel(value, scratch, "defaults: "), self.loc(value))
            elif key in PATH_KEYS:
                out[key] = (self.path(value, scratch, key, "defaults: "), self.loc(value))
            else:
                out[key] = (value.plain(), self.loc(value))
        return out

    def memory(self, node: Node, ctx: str) -> int | None:
        mib = parse_memory(node.plain())
        if mib is None:
            self.problem(node, f"{ctx}memory: expected MiB as an integer or a size like '256M' or "
                         f"'1G', got {describe(node.plain())}")
        return mib

    # ---- VMs ----------------------------------------------------------------------------------
    def vm(self, i: int, node: Node, defaults: dict[str, tuple[Any, Location]], transport: Any,
           transport_loc: Location | None) -> VmSpec | None:
        ctx = f"vms[{i}]: "
        if node.kind != MAP:
            self.problem(node, f"{ctx}expected a mapping describing a VM, got {node.kind_name()}")
            return None
        entries = self.keys(node, VM_KEYS, ctx)
        name = entries["name"].plain() if "name" in entries else None
        if isinstance(name, str):
            ctx = f"vm '{name}': "
        where = self.where(entries, {"memory": "memory_mib"})
        where.label = f"vms[{i}]"
        kw: dict[str, Any] = {"name": name}
        for key, value in entries.items():
            if key == "memory":
                kw["memory_mib"] = self.memory(value, ctx)
                if kw["memory_mib"] is None:
                    where.reported.add("memory_mib")
            elif key == "kernel":
                kw[key] = self.kernel(value, where, ctx)
            elif key in PATH_KEYS:
                kw[key] = self.path(value, where, key, ctx)
            elif key == "files":
                kw["files"] = self.files(value, where, ctx)
            elif key == "vsock":
                kw["vsock"] = self.vsock(value, where, ctx)
            elif key == "qemu_args":
                kw["qemu_args"] = self.qemu_args(value, where)
            elif key != "name":
                kw[key] = value.plain()
        for key, (value, loc) in defaults.items():
            if key not in kw:
                kw[key] = value
                where.fields[key] = loc
                where.ctx[key] = "defaults: "
        if "transport" not in kw:
            kw["transport"] = transport
            if transport_loc is not None:
                where.fields["transport"] = transport_loc
            where.ctx["transport"] = ""
        kw.setdefault("memory_mib", DEFAULT_MEMORY_MIB)
        if kw.get("memory_mib") is None:
            kw["memory_mib"] = DEFAULT_MEMORY_MIB
        return VmSpec(location=self.loc(node), where=where, **kw)

    def files(self, node: Node, where: Where, ctx: str) -> Any:
        if node.kind != MAP:
            return node.plain()  # validate reports the type
        out: dict[str, Any] = {}
        for guest, host in node.value.items():
            key = f"files[{guest}]"
            where.fields[key] = self.loc(host)
            out[guest] = self.path(host, where, key, ctx)
        return out

    def vsock(self, node: Node, where: Where, ctx: str) -> Any:
        """`vsock:` is {} / null / true / false, or a list with exactly one entry."""
        if node.kind == SCALAR and node.value is None:
            return True
        if node.kind == SCALAR:
            return node.value  # bools pass; validate names the type of anything else
        entries = [node] if node.kind == MAP else node.value
        if node.kind == SEQ and len(entries) != 1:
            where.reported.add("vsock")
            if not entries:
                self.problem(node, f"{ctx}vsock: an empty list adds no device; write `vsock: false` "
                             "for a VM without vsock")
            else:
                self.problem(entries[1], f"{ctx}vsock: only one vsock device per VM is supported "
                             f"({len(entries)} given)")
            return True
        entry = entries[0]
        if entry.kind == MAP:
            self.keys(entry, (), f"{ctx}vsock: ")  # no device options yet: every key is unknown
            return True
        if entry.kind == SCALAR and entry.value is None:
            return True
        self.problem(entry, f"{ctx}vsock: expected {{}}, false, or a list with one mapping, got "
                     f"{describe(entry.plain())}")
        where.reported.add("vsock")
        return True

    def qemu_args(self, node: Node, where: Where) -> Any:
        if node.kind == SCALAR and isinstance(node.value, str):
            return shlex.split(node.value)  # convenience: one shell-quoted string
        if node.kind != SEQ:
            return node.plain()
        for j, item in enumerate(node.value):
            where.fields[f"qemu_args[{j}]"] = self.loc(item)
        return [item.plain() for item in node.value]

    # ---- steps --------------------------------------------------------------------------------
    def step(self, i: int, node: Node) -> Step | None:
        ctx = f"steps[{i}]: "
        if node.kind != MAP:
            self.problem(node, f"{ctx}a step is a mapping with one action key ({', '.join(ACTIONS)}), "
                         f"got {node.kind_name()}")
            return None
        entries = self.keys(node, ACTIONS + STEP_COMMON_KEYS, ctx)
        actions = [k for k in entries if k in ACTION_TYPES]
        if not actions:
            if len(entries) == len(node.value):  # no unknown key already explained it
                self.problem(node, f"{ctx}no action; a step needs exactly one of {', '.join(ACTIONS)}")
            return None
        if len(actions) > 1:
            self.problem(node.keys[actions[1]], f"{ctx}a step has exactly one action, found "
                         f"{' and '.join(actions)}; split it into separate steps")
            return None
        action = actions[0]
        ctx = f"steps[{i}] ({action}): "
        common = {k: v for k, v in entries.items() if k in STEP_COMMON_KEYS}
        params = self.params(action, entries[action], ctx)
        if params is None:
            return None
        kw: dict[str, Any] = {k: v.plain() for k, v in common.items()}
        kw.setdefault("timeout", DEFAULT_STEP_TIMEOUT)
        kw.setdefault("background", False)
        if kw.get("name") is None:
            kw["name"] = ""
        where = self.where(common)
        where.label = f"steps[{i}]"
        return Step(action=action, params=params, location=self.loc(node), where=where, **kw)

    def params(self, action: str, node: Node, ctx: str) -> Any:
        cls = ACTION_TYPES[action]
        if action == "sleep":
            if node.kind != SCALAR:
                self.problem(node, f"{ctx}sleep takes a number of seconds (e.g. `sleep: 2`), got "
                             f"{node.kind_name()}")
                return None
            return cls(seconds=node.value, location=self.loc(node),
                       where=Where(fields={"seconds": self.loc(node)}))
        if node.kind == SCALAR and node.value is None:
            node = Node(MAP, {}, node.line, node.column)
        if node.kind != MAP:
            self.problem(node, f"{ctx}expected a mapping of {action} fields, got "
                         f"{describe(node.plain())}")
            return None
        names = _fields_of(cls)
        entries = self.keys(node, names, ctx)
        where = self.where(entries)
        kw: dict[str, Any] = {}
        for key, value in entries.items():
            if (action, key) in HOST_PATH_PARAMS:
                kw[key] = self.path(value, where, key, ctx)
            else:
                kw[key] = value.plain()
        for f in fields(cls):
            if f.name in META_FIELDS or f.name in kw:
                continue
            if f.default is MISSING and f.default_factory is MISSING:  # required field
                kw[f.name] = None
        return cls(location=self.loc(node), where=where, **kw)


def _default_name(filename: str) -> str:
    stem = Path(filename).stem if filename and not filename.startswith("<") else "scenario"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._")
    return name or "scenario"


def parse_scenario(text: str, filename: str = "<string>", base_dir: Path | None = None) -> Scenario:
    """Parse and validate scenario YAML. Relative paths resolve against base_dir (default: cwd)."""
    base = Path(os.path.abspath(base_dir if base_dir is not None else os.getcwd()))
    try:
        root, issues = compose(text)
    except YamlSyntaxError as exc:
        raise ScenarioError([Problem(filename, exc.line, exc.column, exc.message)]) from None
    if root is None or (root.kind == SCALAR and root.value is None):
        raise ScenarioError([Problem(filename, 1, 1, "empty scenario: expected a mapping with at "
                                     "least a 'vms' list")])
    if root.kind != MAP:
        raise ScenarioError([Problem(filename, root.line, root.column, "the top level must be a "
                                     f"mapping (name, vms, steps, ...), got {describe(root.plain())}")])
    parser = _Parser(filename, base)
    parser.problems.extend(Problem(filename, i.line, i.column, i.message) for i in issues)
    scenario = parser.scenario(root, _default_name(filename))
    if not filename.startswith("<"):
        scenario.source = Path(os.path.abspath(filename))
    problems, warnings = check(scenario)
    scenario.warnings = sort_problems(warnings)
    if parser.problems or problems:
        raise ScenarioError(parser.problems + problems, warnings)
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; paths in it are relative to its directory."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ScenarioError([Problem(str(path), 0, 0, f"cannot read scenario: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError([Problem(str(path), 1, 1, f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    return parse_scenario(text, str(path), base_dir=path.parent)
