"""The vhost transport's capture path (vsockmon link + dumpcap): commands and clear refusals.
The link itself needs root and the vsockmon module, which only guests have here."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmlab.vsockmon import VsockmonCapture, VsockmonError


def cap(tmp_path: Path, **kw) -> VsockmonCapture:
    base = dict(euid=lambda: 0, module_loaded=lambda: True, modprobe=lambda: False,
                which=lambda name: f"/usr/bin/{name}")
    base.update(kw)
    return VsockmonCapture(tmp_path / "c.pcap", link="vmlabmon1", **base)


def test_link_and_capture_commands(tmp_path: Path) -> None:
    c = cap(tmp_path)
    add, up, delete = c.link_commands()
    assert add == ["ip", "link", "add", "vmlabmon1", "type", "vsockmon"]
    assert up == ["ip", "link", "set", "vmlabmon1", "up"]
    assert delete == ["ip", "link", "del", "vmlabmon1"]
    assert c.preflight() == ["/usr/bin/dumpcap", "-q", "-i", "vmlabmon1", "-P", "-w",
                             str(tmp_path / "c.pcap")]


def test_the_capture_tools_accept_their_options(tmp_path: Path) -> None:
    """The real dumpcap and tshark parse the argv vmlab gives them (a wrong flag once meant
    an empty capture on the vhost transport): `-D` lists interfaces and exits, after parsing."""
    import shutil
    import subprocess

    for name in ("dumpcap", "tshark"):
        if shutil.which(name) is None:
            continue
        c = cap(tmp_path, which=lambda n, name=name: shutil.which(n) if n == name else None)
        argv = c.tool()
        assert argv[0] == shutil.which(name)
        r = subprocess.run(argv + ["-D"], capture_output=True, text=True, timeout=60)
        assert "invalid option" not in r.stderr and "unrecognized option" not in r.stderr, r.stderr


def test_tshark_when_there_is_no_dumpcap(tmp_path: Path) -> None:
    c = cap(tmp_path, which=lambda n: None if n == "dumpcap" else f"/usr/bin/{n}")
    assert c.preflight()[0] == "/usr/bin/tshark"


@pytest.mark.parametrize("kw, words", [
    ({"euid": lambda: 1000}, "needs root"),
    ({"which": lambda n: None if n in ("dumpcap", "tshark") else n}, "dumpcap or tshark"),
    ({"which": lambda n: None if n == "ip" else n}, "iproute2"),
])
def test_clear_errors_where_it_cannot_work(tmp_path: Path, kw, words) -> None:
    with pytest.raises(VsockmonError, match=words):
        cap(tmp_path, **kw).preflight()


def test_a_module_that_loads_on_demand_or_is_built_in_is_fine(tmp_path: Path) -> None:
    assert cap(tmp_path, module_loaded=lambda: False, modprobe=lambda: True).preflight()
    # built in (vmlab's minimal kernel): modprobe fails, /sys/module/vsockmon may be absent
    assert cap(tmp_path, module_loaded=lambda: False, modprobe=lambda: False).preflight()


def test_no_vsockmon_in_the_kernel_is_named_when_the_link_cannot_be_made(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("ip") is None or Path("/sys/module/vsockmon").exists():
        pytest.skip("needs iproute2 and a kernel without vsockmon (as this project's build hosts)")
    probe = subprocess.run(["ip", "link", "add", "vmlabprobe0", "type", "vsockmon"], capture_output=True)
    if probe.returncode == 0:
        subprocess.run(["ip", "link", "del", "vmlabprobe0"], capture_output=True)
        pytest.skip("this kernel has vsockmon")
    c = cap(tmp_path, module_loaded=lambda: False, euid=lambda: 0)
    with pytest.raises(VsockmonError, match="needs the vsockmon kernel module"):
        c.start(tmp_path / "dumpcap.log")
    assert c._proc is None and not c._link_made


def test_stop_before_start_is_harmless(tmp_path: Path) -> None:
    cap(tmp_path).stop()
