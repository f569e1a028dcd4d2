"""The sending side of Remus checkpoint compression (spec section 6), as Xen 4.5's saver does it.

Each page becomes FULL (0x80 + 4096 bytes), EMPTY (0x00) or a delta of alternating copy/skip runs of
32-bit words (at most 127 words a run), compared with the sender's cached copy of that PFN.
The cache is an LRU of 8192 pages that starts empty when compression starts; page-table pages are
always sent FULL and dropped from the cache.
"""

from collections import OrderedDict

from xenstream.hv.abi import PAGE_SIZE

MARKER_EMPTY = 0x00
MARKER_FULL = 0x80
SKIP_FLAG = 0x80
MAX_RUN_WORDS = 0x7F
WORDS_PER_PAGE = PAGE_SIZE // 4
SENDER_CACHE_PAGES = 8192


def encode_delta(new: bytes, old: bytes) -> bytes:
    """Encode `new` against `old` (both 4096 bytes) the way xc_compression.c's compress_page does."""
    if new == old:
        return bytes([MARKER_EMPTY])
    new_words = memoryview(new).cast("I")
    old_words = memoryview(old).cast("I")
    out = bytearray()
    start = 0
    while start < WORDS_PER_PAGE:
        copying = new_words[start] != old_words[start]
        end = start + 1
        limit = min(start + MAX_RUN_WORDS, WORDS_PER_PAGE)
        while end < limit and (new_words[end] != old_words[end]) == copying:
            end += 1
        run = end - start
        if copying:
            out.append(run)
            out += new[start * 4:end * 4]
        else:
            out.append(SKIP_FLAG | run)
        start = end
    return bytes(out)


class DeltaEncoder:
    """The sender's compression context: an LRU cache of the pages it last sent, keyed by PFN."""

    def __init__(self, cache_pages: int = SENDER_CACHE_PAGES):
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._capacity = cache_pages

    def encode(self, pfn: int, page: bytes, *, pagetable: bool) -> bytes:
        """The encoding of one page; updates the cache as the saver does."""
        page = bytes(page)
        if pagetable:
            self._cache.pop(pfn, None)
            return bytes([MARKER_FULL]) + page
        cached = self._cache.get(pfn)
        if cached is None:
            if len(self._cache) >= self._capacity:
                self._cache.popitem(last=False)
            self._cache[pfn] = page
            return bytes([MARKER_FULL]) + page
        self._cache.move_to_end(pfn)
        self._cache[pfn] = page
        return encode_delta(page, cached)
