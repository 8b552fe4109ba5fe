"""pytest plugin: SIGTERM takes Ctrl-C's path, so fixtures (the labs) tear down.
Found by benchmarks/interrupts.py: a SIGTERM'd `pytest -n 2` left runtime dirs and sockets.
(No guest boots: a plain fixture stands in for the lab's teardown.)"""

import pytest


def test_sigterm_tears_fixtures_down_and_reports_an_interrupt(pytester: pytest.Pytester) -> None:
    marker = pytester.path / "torn-down"
    pytester.makepyfile(test_t=f"""
        import os, signal, time
        import pytest

        @pytest.fixture
        def resource():
            yield
            open({str(marker)!r}, "w").write("closed")

        def test_killed(resource):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert marker.read_text() == "closed"
