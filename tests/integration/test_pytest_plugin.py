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


def test_failed_test_leaves_a_bundle_that_replays_the_failure_elsewhere(pytester, tmp_path):
    """Issue 12: --vmlab-artifacts writes bundle.tar.gz for a failed test; `vmlab replay` of it,
    in another directory with the original files gone, reruns that test and fails the same way."""
    import json
    import tarfile

    pytester.makefile(".yaml", lab="name: msg-lab\nvms:\n  - name: box\n    files: {/root/msg: msg.txt}\n")
    (pytester.path / "msg.txt").write_text("actual\n")
    pytester.makepyfile(test_user="""
        import pytest

        @pytest.mark.vmlab("lab.yaml")
        def test_reads_the_message(vm):
            assert vm.run("cat /root/msg") == (0, "expected\\n"), "MSG-MISMATCH"

        def test_unrelated_passes():
            pass
    """)
    artifacts = tmp_path / "artifacts"
    result = pytester.runpytest_subprocess("--vmlab-artifacts", str(artifacts), "--vmlab-seed", "4242",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    bundles = list(artifacts.rglob("bundle.tar.gz"))
    assert len(bundles) == 1 and "test_reads_the_message" in bundles[0].parent.name, bundles
    with tarfile.open(bundles[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        manifest = json.load(tar.extractfile("bundle/manifest.json"))
        report = tar.extractfile("bundle/report.txt").read().decode()
        script = tar.extractfile("bundle/reproduce.sh").read().decode()
    assert {"manifest.json", "report.txt", "reproduce.sh", "test/test_user.py", "test/lab.yaml",
            "test/msg.txt", "logs/box.console.log", "logs/box.qmp.jsonl"} <= names, names
    if manifest["transport"] == "vhost-user":
        assert "logs/backend.log" in names, names
    assert manifest["runner"] == "pytest" and manifest["seed"] == 4242
    assert manifest["test"] == "test/test_user.py::test_reads_the_message"
    assert manifest["vmlab"] and manifest["qemu"].startswith("QEMU")
    assert len(manifest["kernel"]["sha256"]) == 64 and manifest["kernel"]["version"]
    assert "MSG-MISMATCH" in report and "MSG-MISMATCH" in manifest["failure"]
    assert "--vmlab-seed 4242" in script and "test/test_user.py::test_reads_the_message" in script
    for name in ("test_user.py", "lab.yaml", "msg.txt"):       # replay must not need the originals
        (pytester.path / name).unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    replay = subprocess.run([sys.executable, "-m", "vmlab", "replay", str(bundles[0])], cwd=elsewhere,
                            capture_output=True, text=True, timeout=600)
    out = replay.stdout + replay.stderr
    assert replay.returncode == 1, out                        # pytest: a test failed
    assert "test test/test_user.py::test_reads_the_message" in out and "seed 4242" in out
    assert "MSG-MISMATCH" in out and "1 failed" in out and "vmlab: fault seed 4242" in out
