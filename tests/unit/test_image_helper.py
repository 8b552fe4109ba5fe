"""The static guest helper, compiled by the image builder and run on the host."""
import json
import subprocess

import pytest

from vmlab.image import build_guest_helper
from vmlab.image.busybox import is_static_elf


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    return build_guest_helper(tmp_path_factory.mktemp("cache"))


def run(helper, *args):
    return subprocess.run([str(helper), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=20)


def test_is_static_and_cached(helper, tmp_path_factory):
    assert is_static_elf(helper)
    assert build_guest_helper(helper.parent.parent.parent) == helper


def test_help(helper):
    r = run(helper, "--help")
    assert r.returncode == 0
    assert "vmlab-guest listen PORT" in r.stdout and "connect CID PORT" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["bogus"], "unknown command"),
    ([], "missing command"),
    (["connect", "host"], "missing PORT"),
    (["connect", "3", "x"], "bad PORT"),
    (["listen", "5", "--chunk"], "needs a value"),
    (["listen", "5", "--send-bytes", "4"], "unknown option"),
    (["connect", "3", "5", "--recv-bytes", "1Q"], "bad --recv-bytes"),
])
def test_usage_errors_are_one_json_line(helper, args, needle):
    r = run(helper, *args)
    assert r.returncode == 2
    (line,) = r.stdout.splitlines()
    ev = json.loads(line)
    assert ev["event"] == "error" and ev["op"] == "usage" and needle in ev["error"]


def test_socket_errors_are_json_and_exit_1(helper):
    # Binding to a CID that is not ours fails on any host: EAFNOSUPPORT at socket()
    # without vsock support, EADDRNOTAVAIL at bind() with it.
    r = run(helper, "listen", "5", "--cid", "123456", "--once")
    assert r.returncode == 1
    ev = json.loads(r.stdout.splitlines()[-1])
    assert ev["event"] == "error" and ev["op"] in ("socket", "bind")
    assert ev["errno"] > 0 and ev["error"]


def test_info_reports_cid_or_error(helper):
    r = run(helper, "info")
    ev = json.loads(r.stdout.splitlines()[-1])
    if r.returncode == 0:
        assert ev["event"] == "info" and ev["cid"] > 2
    else:
        assert r.returncode == 1 and ev["event"] == "error" and ev["op"] in ("open", "ioctl", "info")
