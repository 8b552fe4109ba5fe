"""The host_run scenario step: parsing and validation (running it is tests/integration)."""
from __future__ import annotations

import pytest

from vmlab.scenario import HostRunStep, ScenarioError, parse_scenario

HEAD = "name: t\nvms:\n  - name: g\nsteps:\n"


def problems(steps: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(HEAD + steps, "t.yaml")
    return str(info.value)


def test_parses_foreground_and_background() -> None:
    s = parse_scenario(HEAD + (
        "  - host_run: {command: 'echo hi', expect_output: hi}\n"
        "  - host_run: {id: srv, command: [python3, srv.py], ready_port: 9999, expect_exit: any,\n"
        "               env: {A: 1}}\n"
        "    background: true\n"
        "  - wait_for: {id: srv, event: exited}\n"), "t.yaml")
    fg, bg, wait = s.steps
    assert isinstance(fg.params, HostRunStep) and fg.params.command == "echo hi" and not fg.background
    assert bg.background and bg.params.command == ["python3", "srv.py"] and bg.params.ready_port == 9999
    assert bg.params.expect_exit is None and bg.id == "srv"
    assert fg.name == "host_run: echo hi"


def test_bad_host_run_steps_are_reported_with_lines() -> None:
    text = problems("  - host_run: {command: []}\n"
                    "  - host_run: {command: 'x', ready_port: 9999}\n"
                    "  - host_run: {command: 'x', expect_exit: 300, expect_regex: '('}\n"
                    "  - host_run: {expect_output: x}\n")
    assert "t.yaml:5" in text and "a shell command string or a non-empty list" in text
    assert "t.yaml:6" in text and "readiness only applies to `background: true`" in text
    assert "expect_exit: 300 is out of range" in text
    assert "expect_regex" in text
    assert "'command' is required" in text


def test_wait_for_and_expect_on_a_host_run_id() -> None:
    text = problems("  - host_run: {id: p, command: 'x'}\n    background: true\n"
                    "  - wait_for: {id: p, event: accepted}\n"
                    "  - expect: {id: p, message: hi}\n")
    assert "'accepted' does not happen to host_run 'p'" in text
    assert "is a host_run program, not a vsock endpoint" in text
