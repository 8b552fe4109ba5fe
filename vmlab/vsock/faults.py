"""Fault rules for the router: which packets a fault selects and what it decides, reproducibly.

Every random choice (``probability``, delay ``jitter``) comes from a per-rule RNG stream seeded by
``(seed, rule key)``: a rule draws only for the packets its selectors match, in their order, so
its decisions do not depend on unrelated traffic or on timing. Same seed + same scenario ->
same decisions. What a decision *does* to a packet is the router's job (vsock/router.py).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from vmlab.vsock.packet import Header, Op

KINDS = ("drop", "delay", "rst", "duplicate", "reorder", "credit_stall", "corrupt")
DIRECTIONS = ("tx", "rx", "both")

# header fields `corrupt` may flip, with the default bit mask: each gives a value the receiver
# must reject (unknown type/op -> RST or drop, port/CID nobody has -> RST, spoofed src -> drop)
CORRUPT_FIELDS: dict[str, int] = {
    "type": 0x4000, "op": 0x80, "dst_port": 0x40000000, "src_port": 0x40000000,
    "dst_cid": 0x40000000, "src_cid": 0x40000000,
}
_U32 = ("dst_port", "src_port")
_U64 = ("dst_cid", "src_cid")

DEFAULT_REORDER_WINDOW = 2
DEFAULT_REORDER_TIMEOUT = 1.0       # a window that does not fill is released after this (s)


def stream_seed(seed: int, key: str) -> str:
    """The RNG seed of one rule: str seeds are hashed with SHA-512 by random, stable everywhere."""
    return f"vmlab-fault:{seed}:{key}"


@dataclass(eq=False)
class FaultRule:
    """One fault. Selectors: vm, direction ("tx" = from a guest, "rx" = to a guest), op, port
    (src or dst), then ``after`` (skip the first N selected packets) and ``count`` (act on at
    most M). ``hits`` counts the packets the fault acted on."""

    kind: str
    vm: str | None = None
    direction: str = "both"
    op: int | None = None
    port: int | None = None
    after: int = 0
    count: int | None = None
    probability: float = 1.0
    delay: float = 0.0                  # delay: seconds; reorder: window timeout
    jitter: float = 0.0                 # delay: + uniform(0, jitter) seconds from the rule's RNG
    window: int = DEFAULT_REORDER_WINDOW
    field: str = "type"                 # corrupt
    mask: int = 0
    stall: float = 0.0                  # credit_stall: seconds
    until: float | None = None          # time.monotonic() deadline; None = forever
    key: str = ""
    seed: int = 0
    seen: int = 0                       # packets the selectors matched
    hits: int = 0
    rng: random.Random = _field(default_factory=random.Random, repr=False)
    state: dict[str, Any] = _field(default_factory=dict, repr=False)   # the router's, per kind

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(stream_seed(seed, self.key))

    @property
    def exhausted(self) -> bool:
        if self.kind == "credit_stall":   # stalls once; `count` does not cut a stall short
            return bool(self.state.get("released")) or (
                self.until is not None and time.monotonic() > self.until)
        return (self.count is not None and self.hits >= self.count) or (
            self.until is not None and time.monotonic() > self.until)

    def selects(self, direction: str, vm: str, hdr: Header) -> bool:
        if self.direction != "both" and self.direction != direction:
            return False
        if self.vm is not None and self.vm != vm:
            return False
        if self.op is not None and self.op != hdr.op:
            return False
        if self.port is not None and self.port not in (hdr.src_port, hdr.dst_port):
            return False
        return True

    def decide(self, direction: str, vm: str, hdr: Header) -> bool:
        """Whether this rule acts on the packet; counts seen/hits, draws from the rule's RNG."""
        if self.exhausted or not self.selects(direction, vm, hdr):
            return False
        if "stall_end" in self.state:   # a stall in progress takes every selected packet
            if time.monotonic() >= self.state["stall_end"]:
                return False
            self.hits += 1
            return True
        self.seen += 1
        if self.seen <= self.after:
            return False
        if self.probability < 1.0 and self.rng.random() >= self.probability:
            return False
        self.hits += 1
        return True

    def next_delay(self) -> float:
        return self.delay + (self.rng.uniform(0.0, self.jitter) if self.jitter > 0 else 0.0)

    def corrupted(self, hdr: Header) -> Header:
        mask = self.mask or CORRUPT_FIELDS[self.field]
        return hdr.copy(**{self.field: getattr(hdr, self.field) ^ mask})

    def report(self) -> dict[str, Any]:
        out = {"kind": self.kind, "key": self.key, "vm": self.vm, "direction": self.direction,
               "op": Op(self.op).name if self.op in Op._value2member_map_ else self.op,
               "port": self.port, "after": self.after, "count": self.count,
               "probability": self.probability, "seen": self.seen, "hits": self.hits}
        if self.kind == "delay":
            out.update(delay=self.delay, jitter=self.jitter)
        elif self.kind == "reorder":
            out.update(window=self.window)
        elif self.kind == "corrupt":
            out.update(field=self.field, mask=self.mask or CORRUPT_FIELDS[self.field])
        elif self.kind == "credit_stall":
            out.update(stall=self.stall)
        return out


def _num(req: dict, key: str, kind: type, lo: float, hi: float | None = None) -> Any:
    v = req.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise ValueError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{key}: {v!r} out of range {lo}..{hi if hi is not None else 'inf'}")
    return kind(v)


def _seconds(req: dict, key: str) -> float | None:
    s = _num(req, key, float, 0)
    ms = _num(req, key + "_ms", float, 0)
    if s is not None and ms is not None:
        raise ValueError(f"give {key} or {key}_ms, not both")
    return s if ms is None else ms / 1000.0


@dataclass
class FaultInjector:
    """The router's rules, in order; the first rule that acts on a packet wins."""

    rules: list[FaultRule] = _field(default_factory=list)
    seed: int = 0
    added: int = 0

    def check(self, direction: str, vm: str, hdr: Header,
              sender: str | None = None) -> FaultRule | None:
        """The rule that acts on this packet, if any. ``sender``: a relayed packet's source VM;
        a rule that already met the packet at the sender's tx does not see it again."""
        for r in self.rules:
            if sender is not None and r.selects("tx", sender, hdr):
                continue
            if r.decide(direction, vm, hdr):
                return r
        return None

    def add(self, rule: FaultRule) -> FaultRule:
        self.added += 1
        if not rule.key:
            rule.key = str(self.added)
        rule.reseed(self.seed)
        self.rules.append(rule)
        return rule

    def reseed(self, seed: int) -> None:
        """A new seed for every rule (e.g. the next iteration of a repeated run)."""
        self.seed = seed
        for r in self.rules:
            r.reseed(seed)

    def report(self) -> list[dict[str, Any]]:
        return [r.report() for r in self.rules]

    @staticmethod
    def parse(req: dict) -> FaultRule:
        """A rule from a control request: {"kind"|"action", "vm", "direction", "op", "port",
        "after", "count", "probability", "delay"|"delay_ms", "jitter"|"jitter_ms", "window",
        "field", "mask", "stall"|"stall_ms", "duration" (s, the rule's lifetime), "key"}."""
        kind = req.get("kind", req.get("action"))
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
        op = req.get("op")
        if isinstance(op, str):
            try:
                op = Op[op.upper()]
            except KeyError:
                raise ValueError(f"op: unknown vsock op {op!r}") from None
        elif op is not None:
            op = _num(req, "op", int, 0, 0xFFFF)
        direction = req.get("direction", req.get("dir")) or "both"
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: {direction!r} is not tx, rx or both")
        rule = FaultRule(kind=kind, vm=req.get("vm"), direction=direction, op=op,
                         port=_num(req, "port", int, 0, 0xFFFFFFFF),
                         after=_num(req, "after", int, 0) or 0,
                         count=_num(req, "count", int, 0),
                         key=str(req.get("key") or ""))
        prob = _num(req, "probability", float, 0.0, 1.0)
        rule.probability = 1.0 if prob is None else prob
        rule.delay = _seconds(req, "delay") or 0.0
        rule.jitter = _seconds(req, "jitter") or 0.0
        if kind == "delay" and rule.delay <= 0 and rule.jitter <= 0:
            raise ValueError("delay: needs delay (s) or delay_ms")
        if kind == "reorder":
            rule.window = _num(req, "window", int, 2, 64) or DEFAULT_REORDER_WINDOW
            rule.delay = rule.delay or DEFAULT_REORDER_TIMEOUT
        if kind == "corrupt":
            fld = req.get("field") or "type"
            if fld not in CORRUPT_FIELDS:
                raise ValueError(f"field: {fld!r} cannot be corrupted (one of "
                                 f"{', '.join(CORRUPT_FIELDS)})")
            rule.field = fld
            hi = 0xFFFF if fld in ("type", "op") else 0xFFFFFFFF
            rule.mask = _num(req, "mask", int, 1, hi) or 0
        if kind == "credit_stall":
            rule.stall = _seconds(req, "stall") or 0.0
            if rule.stall <= 0:
                raise ValueError("credit_stall: needs stall (s) or stall_ms, the time credit is held")
        duration = _num(req, "duration", float, 0)
        if duration is not None:
            rule.until = time.monotonic() + duration
        return rule
