"""The raw backend benchmark's fake guest against the real backend process: every byte arrives,
in order, in all three directions (guest->host, host->guest, VM->VM). This is the data path the
benchmark measures, so it must be right before its numbers mean anything."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import raw_backend  # noqa: E402

MiB = 1 << 20


@pytest.mark.parametrize("path", raw_backend.PATHS)
@pytest.mark.parametrize("row", raw_backend.ROWS)
def test_every_byte_arrives(tmp_path, row, path):
    """Both paths of the real backend: as shipped (C accelerator, uvloop) and pure Python
    (asyncio's own event loop)."""
    from vmlab.vsock import accel
    with raw_backend.RawLab(tmp_path, path=path) as lab:
        assert lab.rx_accel() == (path == "accel" and accel.buildable())
        assert lab.loop_kind() == ("uvloop" if path == "accel" else "asyncio")
        for size in (1, 3 * MiB + 12345):          # odd sizes: partial packets and buffers
            res = getattr(lab, row)(size, verify=True)
            assert res["bytes"] == size and res["sha256_ok"], res
            assert res["driver_stalls"] == 0, res    # no lost interrupt or kick (EVENT_IDX)
        stats = lab.backend.control({"cmd": "stats"})
        assert stats["stats"].get("errors", 0) == 0
        assert stats["stats"].get("malformed", 0) == 0
        assert all(vm["device"]["errors"] == 0 for vm in stats["vms"].values())
        if row == "v2v":        # all but the handshake and close of the two connections
            relayed = stats["stats"]["relayed"]     # take the router's one-step relay
            assert stats["stats"]["relayed_fast"] >= relayed - 2 * 5, stats
            batched = stats["stats"].get("relayed_batch", 0)    # the C relay: accel only
            if lab.rx_accel():      # most: the first one-step relay of a connection names
                assert batched >= relayed // 2, stats       # the peer; a full ring falls back
            else:
                assert batched == 0, stats
        if row == "g2h":        # a connection's data after its first packet: one sendmsg
            batched = stats["stats"].get("host_batch", 0)    # per run of chains (C); not
            if lab.rx_accel():                               # while data waits for the host
                assert batched > 0, stats
            else:
                assert batched == 0, stats
        if row == "h2g":        # the guest's credit updates take Router._host_credit
            assert stats["stats"]["host_credit"] > 0, stats
        if row == "g2h":        # the backend's credit updates go straight into rx buffers
            assert stats["stats"].get("control_fast", 0) > 0, stats
        if row != "g2h":        # stream data and the VM->VM relay go through rx_fill
            filled = sum(vm["device"]["rx_filled"] for vm in stats["vms"].values())
            assert filled * 4096 >= 3 * MiB, filled
