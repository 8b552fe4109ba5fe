"""Step results for people (one line per step, a summary) and for CI systems (JUnit XML)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from vmlab.step_runner import StepResult


def step_line(index: int, result: StepResult) -> str:
    """`[ 3] PASS  0.41s  expect srv — srv received 13 bytes: 'Hello, world!'`"""
    detail = result.detail.strip().splitlines()
    first = detail[0] if detail else ""
    line = f"[{index:2d}] {result.status:4s} {result.seconds:6.2f}s  {result.name}"
    if first:
        line += f"  -- {first}"
    if not result.ok and not result.skipped:
        if result.location:
            line += f"\n      at {result.location}"
        for extra in detail[1:]:
            line += f"\n      {extra}"
    return line


def summary_line(results: list[StepResult], seconds: float) -> str:
    passed = sum(r.ok for r in results)
    failed = sum(not r.ok and not r.skipped for r in results)
    skipped = sum(r.skipped for r in results)
    verdict = "PASSED" if failed == 0 and skipped == 0 else "FAILED"
    return f"{verdict}: {passed} passed, {failed} failed, {skipped} skipped in {seconds:.1f}s"


def write_junit(path: Path, suite: str, results: list[StepResult], seconds: float, *,
                setup_error: str | None = None, system_out: str = "",
                properties: dict[str, str] | None = None) -> None:
    """One <testsuite> with one <testcase> per step (plus a setup case when the lab did not boot).

    ``properties`` (e.g. kernel.<vm> -> the exact kernel) go into <properties>."""
    cases = ET.Element("testsuite", name=suite, tests=str(len(results) + (1 if setup_error else 0)),
                       failures=str(sum(not r.ok and not r.skipped for r in results) + (1 if setup_error else 0)),
                       skipped=str(sum(r.skipped for r in results)), time=f"{seconds:.3f}")
    if properties:
        props = ET.SubElement(cases, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", name=key, value=value)
    if setup_error:
        case = ET.SubElement(cases, "testcase", classname=suite, name="lab setup", time="0")
        ET.SubElement(case, "failure", message=setup_error.splitlines()[0] if setup_error else "").text = setup_error
    for i, r in enumerate(results, 1):
        case = ET.SubElement(cases, "testcase", classname=suite, name=f"{i:02d} {r.name}", time=f"{r.seconds:.3f}")
        if r.skipped:
            ET.SubElement(case, "skipped", message=r.detail)
        elif not r.ok:
            ET.SubElement(case, "failure", message=(r.detail.splitlines() or [""])[0]).text = (
                f"{r.location}\n{r.detail}" if r.location else r.detail)
    if system_out:
        ET.SubElement(cases, "system-out").text = system_out
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = ET.ElementTree(ET.Element("testsuites"))
    tree.getroot().append(cases)
    tree.write(path, encoding="utf-8", xml_declaration=True)
