"""Scenarios built in Python (tests, the pytest plugin, the Lab API) rather than read from YAML.

It lives outside `model` so the model stays plain data: building here means validating, with the
same rules and messages a YAML file gets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from vmlab.scenario.model import Scenario, Step, VmSpec
from vmlab.scenario.validate import validate


def inline_scenario(
    vms: list[VmSpec],
    steps: Sequence[Step] = (),
    transport: str = "auto",
    name: str = "inline",
) -> Scenario:
    """A validated scenario built in Python. VMs left at transport "auto" take `transport`."""
    vm_list = [
        replace(vm, transport=transport)
        if isinstance(vm, VmSpec) and vm.transport == "auto" and transport != "auto"
        else vm
        for vm in vms
    ]
    scenario = Scenario(name=name, transport=transport, vms=vm_list, steps=list(steps))
    validate(scenario)
    return scenario
