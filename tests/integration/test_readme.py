"""The README stays true: its pytest example passes as written, its commands are what CI runs."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def shell_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", README, re.S)]


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_test_one():
    setup, tests = shell_blocks()[:2]
    assert setup == "scripts/install-deps && vmlab run scenarios/hello.yaml"
    test_command = tests.split("&&")[-1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/install-deps" in ci
    assert re.search(rf"^exec {re.escape(test_command)}$", ci, re.M), (test_command, ci)


@pytest.mark.integration
def test_readme_pytest_example_passes_as_written(pytester):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    pytester.makepyfile(test_readme_example=block)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
