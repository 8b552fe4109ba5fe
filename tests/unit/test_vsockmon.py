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
    assert c.preflight() == ["/usr/bin/dumpcap", "-q", "-i", "vmlabmon1", "-F", "pcap", "-w",
                             str(tmp_path / "c.pcap")]


def test_tshark_when_there_is_no_dumpcap(tmp_path: Path) -> None:
    c = cap(tmp_path, which=lambda n: None if n == "dumpcap" else f"/usr/bin/{n}")
    assert c.preflight()[0] == "/usr/bin/tshark"


@pytest.mark.parametrize("kw, words", [
    ({"euid": lambda: 1000}, "needs root"),
    ({"module_loaded": lambda: False}, "vsockmon kernel module"),
    ({"which": lambda n: None if n in ("dumpcap", "tshark") else n}, "dumpcap or tshark"),
    ({"which": lambda n: None if n == "ip" else n}, "iproute2"),
])
def test_clear_errors_where_it_cannot_work(tmp_path: Path, kw, words) -> None:
    with pytest.raises(VsockmonError, match=words):
        cap(tmp_path, **kw).preflight()


def test_a_module_that_loads_on_demand_is_fine(tmp_path: Path) -> None:
    assert cap(tmp_path, module_loaded=lambda: False, modprobe=lambda: True).preflight()


def test_stop_before_start_is_harmless(tmp_path: Path) -> None:
    cap(tmp_path).stop()
