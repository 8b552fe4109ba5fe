"""The vmlab_nested marker: skipped unless asked for, run first when asked for."""

from __future__ import annotations

import pytest

TESTS = """
import pytest

def test_plain():
    pass

@pytest.mark.vmlab_nested
def test_nested():
    pass
"""


def test_nested_tests_are_skipped_by_default(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.delenv("VMLAB_NESTED", raising=False)
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*run with --vmlab-nested (or VMLAB_NESTED=1)*"])


def test_nested_tests_run_first_when_enabled(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.delenv("VMLAB_NESTED", raising=False)
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("-v", "--vmlab-nested")
    result.assert_outcomes(passed=2)
    lines = [l for l in result.stdout.lines if "PASSED" in l]
    assert "test_nested" in lines[0] and "test_plain" in lines[1]
    monkeypatch.setenv("VMLAB_NESTED", "0")
    pytester.runpytest("--vmlab-nested").assert_outcomes(passed=1, skipped=1)
