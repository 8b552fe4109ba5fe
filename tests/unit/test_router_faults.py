"""Seeded fault rules and the fault kinds, on the router with fake devices; capture-once."""

from __future__ import annotations

import socket

import pytest

from tests.unit.test_router import FakeDevice, lab, spin, tx  # noqa: F401  (lab is a fixture)
from vmlab.vsock.faults import FaultInjector, FaultRule
from vmlab.vsock.packet import Header, Op, Type
from vmlab.vsock.router import Router


def rule(**req) -> FaultRule:
    return FaultInjector.parse(req)


def decisions(seed: int, n: int = 200, **req) -> list[bool]:
    inj = FaultInjector(seed=seed)
    inj.add(rule(**req))
    h = Header(3, 2, 1000, 80, 0, Type.STREAM, Op.RW)
    return [inj.check("tx", "a", h) is not None for _ in range(n)]


def test_same_seed_same_decisions_other_seed_other_decisions() -> None:
    a = decisions(7, kind="drop", probability=0.3)
    assert a == decisions(7, kind="drop", probability=0.3)
    assert a != decisions(8, kind="drop", probability=0.3)
    assert 20 < sum(a) < 100                       # it is a probability, roughly


def test_decisions_do_not_depend_on_unrelated_traffic() -> None:
    """A rule draws only for the packets it selects: other ports in between change nothing."""
    inj = FaultInjector(seed=5)
    inj.add(rule(kind="drop", port=80, probability=0.5))
    mine = Header(3, 2, 1000, 80, 0, Type.STREAM, Op.RW)
    other = Header(3, 2, 1001, 81, 0, Type.STREAM, Op.RW)
    got = []
    for i in range(100):
        for _ in range(i % 3):
            assert inj.check("tx", "a", other) is None
        got.append(inj.check("tx", "a", mine) is not None)
    assert got == decisions(5, n=100, kind="drop", port=80, probability=0.5)


def test_two_rules_have_separate_streams_and_delay_jitter_is_seeded() -> None:
    def jitters(seed: int) -> list[float]:
        inj = FaultInjector(seed=seed)
        inj.add(rule(kind="drop", op="REQUEST", probability=0.5))
        r = inj.add(rule(kind="delay", delay_ms=10, jitter_ms=50))
        return [r.next_delay() for _ in range(5)]
    assert jitters(1) == jitters(1) and jitters(1) != jitters(2)
    assert all(0.010 <= d <= 0.060 for d in jitters(3))


def test_after_and_count_select_by_packet_count() -> None:
    got = decisions(0, n=10, kind="drop", after=3, count=2)
    assert got == [False] * 3 + [True] * 2 + [False] * 5


@pytest.mark.parametrize("req, words", [
    ({"kind": "teleport"}, "unknown fault kind"),
    ({"kind": "delay"}, "needs delay"),
    ({"kind": "corrupt", "field": "len"}, "cannot be corrupted"),
    ({"kind": "credit_stall"}, "needs stall"),
    ({"kind": "drop", "probability": 2}, "probability"),
    ({"kind": "drop", "op": "NOPE"}, "unknown vsock op"),
    ({"kind": "reorder", "window": 1}, "window"),
    ({"kind": "drop", "direction": "up"}, "direction"),
    ({"kind": "drop", "after": -1}, "after"),
])
def test_bad_rules_say_what_is_wrong(req, words) -> None:
    with pytest.raises(ValueError, match=words):
        FaultInjector.parse(req)


def connect_a_to_b(router: Router, a: FakeDevice, b: FakeDevice) -> None:
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    tx(router, b, Op.RESPONSE, 80, 3, 1000)
    a.take(), b.take()


def test_duplicate_delivers_twice_and_counts_hits(lab) -> None:
    loop, router, a, b, *_ = lab
    connect_a_to_b(router, a, b)
    router.faults.add(rule(kind="duplicate", op="RW", count=1))
    tx(router, a, Op.RW, 1000, 4, 80, b"once")
    tx(router, a, Op.RW, 1000, 4, 80, b"twice?")
    assert [d for h, d in b.take()] == [b"once", b"once", b"twice?"]
    assert router.snapshot()["faults"][0]["hits"] == 1


def test_reorder_reverses_a_window_and_a_partial_window_times_out(lab) -> None:
    loop, router, a, b, *_ = lab
    connect_a_to_b(router, a, b)
    router.faults.add(rule(kind="reorder", op="RW", window=3, count=5, delay_ms=50))
    for word in (b"1", b"2", b"3", b"4", b"5", b"6"):
        tx(router, a, Op.RW, 1000, 4, 80, word)
    assert [d for h, d in b.take()] == [b"3", b"2", b"1", b"6"]     # 4, 5 held
    spin(loop, lambda: len(b.got) == 2)
    assert [d for h, d in b.take()] == [b"5", b"4"]


def test_corrupt_type_towards_the_host_side_is_rejected_with_rst(lab) -> None:
    loop, router, a, *_ = lab
    router.faults.add(rule(kind="corrupt", field="type", op="REQUEST", count=1))
    tx(router, a, Op.REQUEST, 1000, 2, 7777)
    assert [(h.op, h.dst_port) for h, _ in a.take()] == [(Op.RST, 1000)]
    assert router.stats["bad_type"] == 1 and router.stats["fault_corrupt"] == 1


def test_corrupt_towards_a_guest_changes_only_that_field(lab) -> None:
    loop, router, a, b, *_ = lab
    router.faults.add(rule(kind="corrupt", field="op", direction="rx", vm="b"))
    tx(router, a, Op.REQUEST, 1000, 4, 80)
    (h, _), = b.take()
    assert h.op == Op.REQUEST ^ 0x80 and (h.src_cid, h.dst_port, h.type) == (3, 80, Type.STREAM)


def test_credit_stall_zeroes_buf_alloc_holds_updates_then_gives_real_credit(lab) -> None:
    loop, router, a, b, *_ = lab
    router.faults.add(rule(kind="credit_stall", vm="a", direction="tx", port=80, stall_ms=100))
    tx(router, a, Op.REQUEST, 1000, 4, 80, buf_alloc=65536)
    tx(router, a, Op.CREDIT_UPDATE, 1000, 4, 80, buf_alloc=65536, fwd_cnt=10)
    got = b.take()
    assert [(h.op, h.buf_alloc) for h, _ in got] == [(Op.REQUEST, 0)]   # update held back
    spin(loop, lambda: bool(b.got))
    assert [(h.op, h.buf_alloc, h.fwd_cnt) for h, _ in b.take()] == [(Op.CREDIT_UPDATE, 65536, 10)]
    tx(router, a, Op.CREDIT_UPDATE, 1000, 4, 80, buf_alloc=65536, fwd_cnt=20)
    assert [h.fwd_cnt for h, _ in b.take()] == [20]                    # stalls once


def test_host_data_faults_go_the_queued_way(lab) -> None:
    """Host data already read into a guest buffer is copied out for duplicate/delay."""
    loop, router, a, b, c, tmp = lab
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp / "a.vsock_7"))
    srv.listen()
    tx(router, a, Op.REQUEST, 1025, 2, 7)
    host, _ = srv.accept()
    a.take()
    router.faults.add(rule(kind="duplicate", vm="a", direction="rx", op="RW", count=1))
    host.sendall(b"echo")
    spin(loop, lambda: len(a.got) >= 2)
    assert [d for h, d in a.take() if h.op == Op.RW] == [b"echo", b"echo"]
    router.faults.rules[:] = [rule(kind="delay", vm="a", direction="rx", op="RW", delay_ms=30)]
    host.sendall(b"later")
    spin(loop, lambda: bool(a.got))
    assert [d for h, d in a.take() if h.op == Op.RW] == [b"later"]
    assert router.stats["fault_delay"] == 1
    host.close(); srv.close()


def test_vm_to_vm_packet_is_captured_once_even_when_split(lab) -> None:
    loop, router, a, b, *_ = lab
    b.free = [b.free[0].__class__(1024) for _ in range(16)]    # small rx buffers: splits
    seen = []
    router.capture = lambda h, p: seen.append((h.op, h.src_cid, h.len, sum(len(v) for v in p)))
    connect_a_to_b(router, a, b)
    tx(router, a, Op.RW, 1000, 4, 80, bytes(5000))
    assert len([h for h, _ in b.take() if h.op == Op.RW]) == 5 and router.stats["split"] == 4
    assert seen == [(Op.REQUEST, 3, 0, 0), (Op.RESPONSE, 4, 0, 0), (Op.RW, 3, 5000, 5000)]
