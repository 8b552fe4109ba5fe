"""Scenarios: the YAML format (or Python dataclasses) describing a lab's VMs and test steps.

This is the public face; the work is split into small modules:
`yaml` (safe YAML with line numbers), `model` (plain dataclasses, constants),
`parse` (YAML -> dataclasses), `check` (field-level checks), `validate` (every semantic rule)
and `build` (validated scenarios made in Python).
The format is documented in docs/scenarios.md.
"""

from __future__ import annotations

from vmlab.scenario.model import (
    ACTION_TYPES,
    ACTIONS,
    DGRAM_ERROR,
    HOST_ROOTFS_WRITABLE,
    ROOTFS_KINDS,
    SOCKET_TYPES,
    TRANSPORTS,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_RESERVED,
    VMADDR_PORT_ANY,
    ExpectStep,
    FaultStep,
    GuestConnectStep,
    GuestListenStep,
    HostConnectStep,
    HostListenStep,
    HostRunStep,
    Location,
    Problem,
    QmpStep,
    RunStep,
    Scenario,
    ScenarioError,
    SleepStep,
    Step,
    StepParams,
    VmSpec,
    WaitForStep,
)
from vmlab.scenario.build import inline_scenario
from vmlab.scenario.parse import load_scenario, parse_memory, parse_scenario
from vmlab.scenario.validate import connect_cid_problem, guest_cid_problem, validate

__all__ = [
    "ACTION_TYPES", "ACTIONS", "DGRAM_ERROR", "HOST_ROOTFS_WRITABLE", "ROOTFS_KINDS", "SOCKET_TYPES",
    "TRANSPORTS",
    "VMADDR_CID_ANY", "VMADDR_CID_HOST", "VMADDR_CID_HYPERVISOR", "VMADDR_CID_RESERVED",
    "VMADDR_PORT_ANY",
    "ExpectStep", "FaultStep", "GuestConnectStep", "GuestListenStep", "HostConnectStep",
    "HostListenStep", "HostRunStep", "Location", "Problem", "QmpStep", "RunStep", "Scenario", "ScenarioError",
    "SleepStep", "Step", "StepParams", "VmSpec", "WaitForStep",
    "connect_cid_problem", "guest_cid_problem", "inline_scenario", "load_scenario", "parse_memory", "parse_scenario",
    "validate",
]
