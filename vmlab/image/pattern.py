"""The deterministic byte pattern of `vmlab-guest connect --send-bytes N`.

The byte at stream offset i is ``i % 251`` (a prime, so the pattern does not
line up with power-of-two chunk sizes and misplaced chunks are detected).
"""
from __future__ import annotations

import hashlib

MOD = 251
_BLOCK = bytes(range(MOD))
_BIG = _BLOCK * ((1 << 16) // MOD + 2)  # ~64 KiB + one block, so any phase fits a slice


def pattern_bytes(offset: int, n: int) -> bytes:
    """Bytes [offset, offset + n) of the pattern."""
    if offset < 0 or n < 0:
        raise ValueError("offset and n must be >= 0")
    start = offset % MOD
    if start + n <= len(_BIG):
        return _BIG[start:start + n]
    reps = (start + n) // MOD + 1
    return (_BLOCK * reps)[start:start + n]


def pattern_sha256(n: int, offset: int = 0) -> str:
    """SHA-256 hex digest of n pattern bytes, hashed in 64 KiB slices (no big buffer)."""
    h = hashlib.sha256()
    step = len(_BIG) - MOD
    pos = offset
    end = offset + n
    while pos < end:
        take = min(step, end - pos)
        h.update(pattern_bytes(pos, take))
        pos += take
    return h.hexdigest()
