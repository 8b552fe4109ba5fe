"""The Python twin of vmlab-guest's --send-bytes pattern."""
import hashlib

from vmlab.image.pattern import pattern_bytes, pattern_sha256


def naive(offset: int, n: int) -> bytes:
    return bytes(i % 251 for i in range(offset, offset + n))


def test_pattern_bytes_matches_definition():
    for off, n in [(0, 0), (0, 1), (0, 251), (250, 3), (1000, 70000), (12345, 200000)]:
        assert pattern_bytes(off, n) == naive(off, n)


def test_pattern_sha256_matches_hashlib():
    for n in (0, 1, 251, 65536, 300001):
        assert pattern_sha256(n) == hashlib.sha256(naive(0, n)).hexdigest()
    assert pattern_sha256(1000, offset=77) == hashlib.sha256(naive(77, 1000)).hexdigest()


def test_known_digest_shared_with_the_c_helper():
    # Same value vmlab-guest printed for `connect ... --send-bytes 1M` in a guest.
    assert pattern_sha256(1 << 20) == \
        "631b84027d6b9e52b539c4e8373622d23032dfadc64d60af87339c9037e4f769"
