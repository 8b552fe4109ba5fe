"""The pytest plugin as users get it: loaded from the pytest11 entry point, run in a subprocess."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_options_are_registered_without_any_conftest(pytester):
    result = pytester.runpytest_subprocess("--help")
    for option in ("--vmlab-transport", "--vmlab-kernel", "--vmlab-keep-on-failure", "--vmlab-artifacts"):
        result.stdout.fnmatch_lines([f"*{option}*"])


def test_failure_report_carries_console_and_qmp_logs_and_keeps_artifacts(pytester, tmp_path):
    pytester.makepyfile(test_user="""
        def test_fails(vm):
            vm.run("echo about-to-fail")
            vm.qmp.stop(); vm.qmp.cont()
            assert vm.run("echo nope")[1] == "yes\\n"

        def test_passes(vm):
            assert vm.run("echo fine") == (0, "fine\\n")
    """)
    artifacts = tmp_path / "artifacts"
    result = pytester.runpytest_subprocess("--vmlab-artifacts", str(artifacts), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*vmlab vm0 console*", "*VMLAB-READY*", "*vmlab vm0 qmp*", "*STOP*"])
    kept = sorted(p.name for p in artifacts.rglob("*") if p.is_file())
    assert "vm0.console.log" in kept and "vm0.qmp.jsonl" in kept, kept
    dirs = {p.parent.name for p in artifacts.rglob("vm0.console.log")}
    assert len(dirs) == 1 and "test_fails" in dirs.pop()   # only the failed test's logs are kept


def test_xdist_workers_get_distinct_cids(pytester, tmp_path):
    out = tmp_path / "cids"
    out.mkdir()
    pytester.makepyfile(test_par=f"""
        import os, pytest

        @pytest.mark.parametrize("n", [1, 2, 3, 4])
        def test_lab(lab, n):
            vm = lab.vms[0]
            with open(os.path.join({str(out)!r}, f"{{n}}-{{os.getpid()}}"), "w") as f:
                f.write(str(vm.cid))
            assert vm.run("true")[0] == 0
    """)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    files = list(out.iterdir())
    assert len({f.name.split("-")[1] for f in files}) == 2, "both xdist workers should have run labs"
    cids = [int(f.read_text()) for f in files]
    assert all(c > 2 for c in cids)


def test_two_vmlab_runs_at_once_get_distinct_cids(tmp_path):
    scenario = tmp_path / "unpinned.yaml"
    scenario.write_text("vms:\n  - {name: u}\nsteps:\n  - run: {vm: u, command: 'sleep 3'}\n")
    procs = [subprocess.Popen([sys.executable, "-m", "vmlab", "run", str(scenario)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    cids = [int(re.search(r"u \(cid (\d+)", o).group(1)) for o in outputs]
    assert cids[0] != cids[1], outputs


def test_module_and_session_labs_boot_once(pytester):
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(scope="session")
        def vmlab_session_scenario():
            return [{"name": "shared"}]
    """)
    pytester.makepyfile(test_scopes="""
        PIDS = []
        VMLAB_SCENARIO = 1

        def test_one(session_lab, module_lab):
            PIDS.append((session_lab.vms[0].machine.pid, module_lab.vms[0].machine.pid))
            assert session_lab.vms[0].name == "shared" and module_lab.vms[0].name == "vm0"

        def test_two(session_lab, module_lab):
            PIDS.append((session_lab.vms[0].machine.pid, module_lab.vms[0].machine.pid))
            assert PIDS[0] == PIDS[1] and PIDS[0][0] != PIDS[0][1]
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_keep_on_failure_without_a_terminal_says_so_and_tears_down(pytester):
    pytester.makepyfile(test_keep="""
        def test_fails(vm):
            assert vm.run("echo 1")[1] == "2\\n"
    """)
    result = pytester.runpytest_subprocess("--vmlab-keep-on-failure", "-p", "no:cacheprovider", "-s")
    result.assert_outcomes(failed=1)
    result.stderr.fnmatch_lines(["*--vmlab-keep-on-failure needs a terminal*"])
