"""Walking the tmem chunks (spec 7), which have no length field: to skip one you must parse it.

Both walks are generators in the walker's protocol (they yield demands and events). Bounds: pool ids
below max_pools (itself at most TMEM_MAX_POOLS), page sizes of at most 4096 << TMEM_MAX_PAGE_ORDER;
counts only drive loops, they size no allocation.
"""

from __future__ import annotations

import struct

from xenstream.legacy.buffer import InputBuffer
from xenstream.legacy.demand import Read
from xenstream.legacy.errors import MalformedStream, UnsupportedStream
from xenstream.legacy.events import (
    TmemEnd,
    TmemExtraEnd,
    TmemExtraStart,
    TmemHeader,
    TmemInvalidation,
    TmemPage,
    TmemPool,
    TmemPoolPagesEnd,
)

TMEM_MAX_POOLS = 1024
TMEM_MAX_PAGE_ORDER = 4
_SEPARATOR = 0xFFFFFFFF
_OID_WORD_END = 0xFFFFFFFFFFFFFFFF
_HEADER = struct.Struct("<7I")
_POOL = struct.Struct("<II16s")
_U32 = struct.Struct("<I")
OID_WORDS_BY_VERSION = {0: 1, 1: 3}  # Xen 4.0: one u64 object id; 4.1+: three


def walk_tmem(buffer: InputBuffer, offset: int):
    """The TMEM chunk after its id (at `offset`); returns the object-id width in u64 words."""
    raw = yield Read(_HEADER.size, "the TMEM header")
    version, max_pools, separator, client_flags, weight, cap, separator2 = _HEADER.unpack(raw)
    if separator != _SEPARATOR or separator2 != _SEPARATOR:
        raise MalformedStream("TMEM header separators are not 0xffffffff", offset + 4)
    if version not in OID_WORDS_BY_VERSION:
        raise UnsupportedStream(f"tmem save format version {version} (known: 0, 1)", offset + 4)
    if max_pools > TMEM_MAX_POOLS:
        raise MalformedStream(f"TMEM max_pools {max_pools} beyond sane bounds ({TMEM_MAX_POOLS})", offset + 8)
    oid_words = OID_WORDS_BY_VERSION[version]
    oid_format = struct.Struct(f"<{oid_words}Q")
    yield TmemHeader(version, max_pools, client_flags, weight, cap, offset=offset)
    while True:
        at = buffer.offset
        (pool_id,) = _U32.unpack((yield Read(4, "a tmem pool id")))
        if pool_id == _SEPARATOR:
            yield TmemEnd(offset=at)
            return oid_words
        if pool_id >= max_pools:
            raise MalformedStream(f"tmem pool id {pool_id} is not below max_pools {max_pools}", at)
        pool_flags, n_pages, uuid = _POOL.unpack((yield Read(_POOL.size, "a tmem pool record")))
        order = (pool_flags >> 4) & 0xF
        if order > TMEM_MAX_PAGE_ORDER:
            raise MalformedStream(f"tmem pool {pool_id} page size 4096 << {order} beyond sane bounds", at + 4)
        pool = TmemPool(pool_id, pool_flags, n_pages, uuid, offset=at)
        yield pool
        for _ in range(n_pages):
            at = buffer.offset
            oid = oid_format.unpack((yield Read(oid_format.size, "a tmem object id")))
            if all(word == _OID_WORD_END for word in oid):
                yield TmemPoolPagesEnd(pool_id, offset=at)
                break
            (index,) = _U32.unpack((yield Read(4, "a tmem page index")))
            data = yield Read(pool.page_size, "a tmem page")
            yield TmemPage(pool_id, oid, index, data, offset=at)


def walk_tmem_extra(buffer: InputBuffer, offset: int, oid_words: int):
    """The TMEM_EXTRA chunk after its id (at `offset`): invalidations up to the 0xffffffff terminator."""
    entry = struct.Struct(f"<{oid_words}QI")
    yield TmemExtraStart(offset=offset)
    while True:
        at = buffer.offset
        (pool_id,) = _U32.unpack((yield Read(4, "a TMEM_EXTRA pool id")))
        if pool_id == _SEPARATOR:
            yield TmemExtraEnd(offset=at)
            return
        if pool_id >= TMEM_MAX_POOLS:
            raise MalformedStream(f"TMEM_EXTRA pool id {pool_id} beyond sane bounds", at)
        *oid, index = entry.unpack((yield Read(entry.size, "a TMEM_EXTRA entry")))
        yield TmemInvalidation(pool_id, tuple(oid), index, offset=at)
