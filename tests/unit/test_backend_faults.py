"""The backend's control requests for faults, seeds and captures (no guests needed)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmlab.vsock.backend import Backend, ConfigError, parse_config
from vmlab.vsock.packet import Header, Op, Type


@pytest.fixture
def backend(tmp_path: Path):
    cfg = parse_config({"vms": [{"name": "a", "cid": 3, "socket": str(tmp_path / "a.vu"),
                                 "uds_path": str(tmp_path / "a.vsock")}],
                        "log": str(tmp_path / "backend.log"), "seed": 11})
    loop = asyncio.new_event_loop()
    b = Backend(cfg, loop)
    yield b
    b.stop_pcap()
    loop.close()


def test_seed_comes_from_the_config_and_a_new_seed_clears_the_rules(backend) -> None:
    assert backend.router.faults.seed == 11
    r = backend.handle({"cmd": "fault", "kind": "drop", "probability": 0.5, "key": "s1"})
    assert r == {"ok": True, "rules": 1, "key": "s1"}
    assert backend.handle({"cmd": "faults"})["faults"][0]["kind"] == "drop"
    assert backend.handle({"cmd": "seed", "seed": 12}) == {"ok": True, "seed": 12}
    assert backend.handle({"cmd": "faults"}) == {"ok": True, "seed": 12, "faults": []}
    assert backend.handle({"cmd": "seed", "seed": -1})["ok"] is False


def test_bad_fault_requests_are_refused_with_the_reason(backend) -> None:
    r = backend.control.dispatch(b'{"cmd": "fault", "kind": "corrupt", "field": "len"}')
    assert r["ok"] is False and "cannot be corrupted" in r["error"]
    assert "unknown vm" in backend.handle({"cmd": "fault", "vm": "zz", "kind": "drop"})["error"]


def test_config_seed_must_be_a_non_negative_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seed"):
        parse_config({"vms": [{"name": "a", "cid": 3, "socket": str(tmp_path / "a.vu"),
                               "uds_path": str(tmp_path / "a.vsock")}], "seed": "x"})


def test_two_captures_at_once_and_a_vanished_reader_ends_only_its_own(backend, tmp_path) -> None:
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    one = backend.handle({"cmd": "pcap", "path": str(tmp_path / "one.pcap")})["id"]
    two = backend.handle({"cmd": "pcap", "path": str(fifo)})["id"]
    assert one != two and backend.router.capture is not None
    h = Header(3, 2, 1025, 9999, 0, Type.STREAM, Op.REQUEST)
    backend.router.capture(h, [])
    os.close(rd)                                   # the live reader goes away
    backend.router.capture(h, [])                  # EPIPE: that capture ends, quietly
    assert list(backend.pcaps) == [one]
    backend.router.capture(h, [])
    assert backend.pcaps[one].packets == 3
    assert backend.handle({"cmd": "pcap", "id": one}) == {"ok": True, "stopped": 1}
    assert backend.router.capture is None
