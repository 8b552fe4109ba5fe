"""Deliberately bad scenario files: each `# expect: text` comment marks one problem on that line.

A file passes when its problems are exactly the expected ones: every expectation is met on its
line, and nothing else is reported. `# warning: text` marks an expected warning the same way
(ScenarioError.warnings carries them even when the file has errors).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmlab.scenario import Problem, ScenarioError, load_scenario

BAD = Path(__file__).parent / "data" / "bad"
MARKER = re.compile(r"#\s*(expect|warning):\s*(.+?)\s*$")


def expectations(path: Path, kind: str) -> list[tuple[int, str]]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = MARKER.search(line)
        if m and m.group(1) == kind:
            out.append((number, m.group(2)))
    return out


def matches(problems: list[Problem], expected: list[tuple[int, str]], path: Path) -> None:
    unmatched = list(problems)
    for line, text in expected:
        hit = next((p for p in unmatched if p.line == line and text in p.message), None)
        assert hit is not None, f"{path.name}:{line}: no problem containing {text!r}; got:\n" + \
            "\n".join(map(str, problems))
        assert hit.file == str(path)
        unmatched.remove(hit)
    assert not unmatched, "unexpected problems:\n" + "\n".join(map(str, unmatched))


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.name)
def test_bad_file_reports_exactly_the_marked_problems(path: Path) -> None:
    expected = expectations(path, "expect")
    assert expected, "a bad file must mark its problems"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    matches(info.value.problems, expected, path)
    matches(info.value.warnings, expectations(path, "warning"), path)
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]


