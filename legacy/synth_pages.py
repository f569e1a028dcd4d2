"""Plausible guest page contents, deterministic from a seed and cheap enough to fill a GiB in seconds.

A pool of distinct pages of several kinds (random, text, sparse, pointer tables, zero) is made once;
each PFN's content is a pool page chosen by a bijective hash of the PFN with the PFN stamped into its
first eight bytes, so no two non-zero pages are equal and general-purpose compressors find little.
"""

import random
import struct

from xenstream.hv.abi import PAGE_SIZE

POOL_PAGES = 1024
_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\n" * 5
_TEXT_TABLE = bytes(_PRINTABLE[b % len(_PRINTABLE)] for b in range(256))
# Fractions of the pool, in 1024ths, per kind; the rest is random.
_KIND_ZERO = 40
_KIND_TEXT = 220
_KIND_SPARSE = 200
_KIND_POINTERS = 180


class PagePool:
    """`fill(dest, offset, pfn)` writes PFN's page into a caller's buffer without allocating."""

    def __init__(self, seed: int, pool_pages: int = POOL_PAGES):
        rng = random.Random(seed)
        pool = bytearray(rng.randbytes(pool_pages * PAGE_SIZE))
        self._zero = bytearray(pool_pages)
        for index in range(pool_pages):
            start = index * PAGE_SIZE
            kind = (index * 1024) // pool_pages
            if kind < _KIND_ZERO:
                pool[start:start + PAGE_SIZE] = bytes(PAGE_SIZE)
                self._zero[index] = 1
            elif kind < _KIND_ZERO + _KIND_TEXT:
                pool[start:start + PAGE_SIZE] = pool[start:start + PAGE_SIZE].translate(_TEXT_TABLE)
            elif kind < _KIND_ZERO + _KIND_TEXT + _KIND_SPARSE:
                _make_sparse(pool, start, rng)
            elif kind < _KIND_ZERO + _KIND_TEXT + _KIND_SPARSE + _KIND_POINTERS:
                _make_pointer_table(pool, start, rng)
        self._pool = memoryview(bytes(pool))
        self._pool_pages = pool_pages
        self._multiplier = 0x9E3779B1 | 1

    def _index(self, pfn: int) -> int:
        return ((pfn * self._multiplier) >> 7) % self._pool_pages

    def fill(self, dest: bytearray | memoryview, offset: int, pfn: int, generation: int = 0) -> None:
        """Write the content PFN has after `generation` rounds of guest writes.

        Each round rewrites a few scattered words, as a running guest dirties a page, so successive
        generations of one PFN differ in a handful of words (what checkpoint compression feeds on).
        """
        index = self._index(pfn)
        start = index * PAGE_SIZE
        dest[offset:offset + PAGE_SIZE] = self._pool[start:start + PAGE_SIZE]
        if not self._zero[index]:
            dest[offset:offset + 8] = pfn.to_bytes(8, "little")
        for round_ in range(1, generation + 1):
            mix = (pfn * 0x2545F491 + round_ * 0x9E3779B9) & 0xFFFFFFFF
            first_word = 2 + mix % 1000
            words = range(first_word, first_word + 1 + (mix >> 24) % 20)
            struct.pack_into(f"<{len(words)}I", dest, offset + first_word * 4,
                             *((mix + word * 0x01000193) & 0xFFFFFFFF for word in words))

    def page(self, pfn: int, generation: int = 0) -> bytes:
        buf = bytearray(PAGE_SIZE)
        self.fill(buf, 0, pfn, generation)
        return bytes(buf)


def _make_sparse(pool: bytearray, start: int, rng: random.Random) -> None:
    """Mostly zero with scattered words: what kernel structures and slab pages look like."""
    words = memoryview(pool)[start:start + PAGE_SIZE].cast("I")
    keep = {rng.randrange(1024) for _ in range(100)}
    for i in range(1024):
        if i not in keep:
            words[i] = 0


def _make_pointer_table(pool: bytearray, start: int, rng: random.Random) -> None:
    """Kernel-address-like 64-bit values with small offsets: linked lists, page arrays."""
    base = 0xFFFF880000000000 + (rng.randrange(1 << 20) << 12)
    qwords = memoryview(pool)[start:start + PAGE_SIZE].cast("Q")
    for i in range(512):
        qwords[i] = base + (qwords[i] & 0xFFFF8) if qwords[i] & 3 else 0
