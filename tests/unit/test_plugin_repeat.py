"""pytest plugin: --vmlab-repeat runs lab tests N times with seeds N+i-1; --vmlab-seed is shown.
(The factory is requested but never called: no guest boots.)"""

import pytest


def test_repeat_parametrizes_lab_tests_and_seeds_follow_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_r="""
        from vmlab.lab import LabOptions
        from vmlab.pytest_plugin import _options

        def test_uses_a_lab(vmlab_lab_factory, vmlab_iteration, request):
            opts = _options(request.config, "x", vmlab_iteration)
            assert opts.seed == 40 + vmlab_iteration - 1

        def test_without_a_lab():
            pass
    """)
    result = pytester.runpytest_subprocess("--vmlab-repeat", "3", "--vmlab-seed", "40", "-v",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*vmlab: fault seed 40 (rerun with --vmlab-seed 40)*",
                                 "*test_uses_a_lab?vmlab-run1? PASSED*",
                                 "*test_uses_a_lab?vmlab-run3? PASSED*"])
