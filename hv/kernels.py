"""The batch translation kernels, compiled (cffi) when available, else their pure-Python twins.

`BACKEND` says which: "cffi" or "python". Both expose the same functions with the same behaviour
(documented on the twins in xenstream.hv.pagetables):

    normalise_pages(tables, pages, levels, status) -> failed page count
    localise_pages(tables, pages, levels, missing) -> missing pfn count (0 = rewritten)
    pack_page_words(pfns, types, out) -> data-bearing count
    mark_pfns(pfns, low, marks) -> pfn count (marks[pfn - low] = 1)

Set XENSTREAM_KERNELS=python to force the twins (tests use both).
"""

from __future__ import annotations

import os
from array import array

from xenstream.hv import pagetables
from xenstream.hv.pagetables import P2MView, TranslationError, TranslationTables
from xenstream.hv.sim import hotpaths

PYTHON_KERNELS = {
    "normalise_pages": pagetables.python_normalise_pages,
    "localise_pages": pagetables.python_localise_pages,
    "pack_page_words": pagetables.python_pack_page_words,
    "take_l1_refs": hotpaths.python_take_l1_refs,
    "frame_slots": hotpaths.python_frame_slots,
    "slot_runs": hotpaths.python_slot_runs,
    "page_type_codes": hotpaths.python_page_type_codes,
    "mark_pfns": pagetables.python_mark_pfns,
}


def load_compiled_kernels() -> dict | None:
    """The cffi kernels by name, or None when `xenstream.hv._kernels` was not built."""
    try:
        from xenstream.hv._kernels import ffi, lib
    except ImportError:
        return None

    def as_u64(seq):
        return seq if isinstance(seq, array) and seq.typecode == "Q" else array("Q", seq)

    def as_u32(seq):
        return seq if isinstance(seq, array) and seq.typecode == "I" else array("I", seq)

    def native_tables(tables: TranslationTables):
        p2m = tables.p2m
        if p2m.native is None:
            keep = [ffi.from_buffer(leaf) for leaf in p2m.leaves]
            p2m.native = (ffi.new("const void *[]", keep or [ffi.NULL]), keep)
        m2p = ffi.from_buffer("uint64_t[]", tables.m2p)
        struct = ffi.new("xs_tables *", {
            "m2p": m2p, "m2p_len": len(tables.m2p), "max_mfn": tables.max_mfn,
            "leaves": p2m.native[0], "p2m_size": p2m.size, "leaf_shift": p2m.leaf_shift,
            "p2m_width": p2m.width, "max_pfn": tables.max_pfn, "levels": tables.levels,
            "compat_m2p_mfn0": tables.compat_m2p_mfn0 & 0xFFFF_FFFF_FFFF_FFFF,
        })
        return struct, m2p

    def pages_buffer(pages, count: int):
        # Checked before the view exists: a from_buffer view alive in a raising frame can end up in a
        # garbage-collected cycle with its exporter, and freeing the two in the wrong order crashes CPython.
        size = memoryview(pages).nbytes
        if size < count * 4096:
            raise ValueError(f"{count} pages need {count * 4096} bytes, buffer has {size}")
        return ffi.from_buffer("uint8_t[]", pages, require_writable=True)

    def normalise_pages(tables: TranslationTables, pages, levels, status: bytearray) -> int:
        levels = bytes(levels)
        if len(status) < len(levels):
            raise ValueError("status buffer shorter than the batch")
        struct, m2p = native_tables(tables)
        try:
            return lib.xs_normalise_pages(struct, pages_buffer(pages, len(levels)), levels, len(levels),
                                          ffi.from_buffer("uint8_t[]", status, require_writable=True))
        finally:
            ffi.release(m2p)

    def localise_pages(tables: TranslationTables, pages, levels, missing) -> int:
        levels = bytes(levels)
        if len(missing) < len(levels) * 512:
            raise ValueError("missing buffer needs room for 512 pfns per page")
        struct, m2p = native_tables(tables)
        err = ffi.new("int64_t[3]")
        out = ffi.from_buffer("uint64_t[]", missing, require_writable=True)
        try:
            result = lib.xs_localise_pages(struct, pages_buffer(pages, len(levels)), levels, len(levels), out, err)
        finally:
            # Released before anything is raised, for the reason given in pages_buffer.
            ffi.release(out)
            ffi.release(m2p)
        if result < 0:
            reason, page, entry = err[0], err[1], err[2]
            raise TranslationError(reason, f"page {page} entry {entry}: {_LOCALISE_REASONS[reason]}", page, entry)
        return result

    def pack_page_words(pfns, types, out) -> int:
        pfns, types = as_u64(pfns), as_u32(types)
        n = min(len(pfns), len(types))
        result = lib.xs_pack_page_words(ffi.from_buffer("uint64_t[]", pfns), ffi.from_buffer("uint32_t[]", types),
                                        n, ffi.from_buffer("uint64_t[]", out, require_writable=True))
        if result < 0:
            _reraise(-1 - result, pagetables.python_pack_page_words, pfns[-1 - result:-result],
                     types[-1 - result:-result], [0])
        return result

    def take_l1_refs(page, ext_of, max_mfn, owner, ptype, tcount, flags, domid, refused, writable_type,
                     special_flag, taken, taken_count) -> int:
        out = ffi.new("int64_t *")
        result = lib.xs_take_l1_refs(
            ffi.from_buffer("uint8_t[]", page), ffi.from_buffer("uint32_t[]", ext_of), max_mfn,
            ffi.from_buffer("uint16_t[]", owner), ffi.from_buffer("uint8_t[]", ptype, require_writable=True),
            ffi.from_buffer("uint32_t[]", tcount, require_writable=True), ffi.from_buffer("uint8_t[]", flags),
            domid, refused & 0xFFFF_FFFF_FFFF_FFFF, writable_type, special_flag,
            ffi.from_buffer("uint32_t[]", taken, require_writable=True), out)
        taken_count[0] = out[0]
        return result

    def frame_slots(mfns, ext_of, max_mfn, owner, ptype, tcount, domid, writable, writable_type, slots) -> int:
        mfns = as_u64(mfns)
        return lib.xs_frame_slots(ffi.from_buffer("uint64_t[]", mfns), len(mfns), ffi.from_buffer("uint32_t[]", ext_of),
                                  max_mfn, ffi.from_buffer("uint16_t[]", owner), ffi.from_buffer("uint8_t[]", ptype),
                                  ffi.from_buffer("uint32_t[]", tcount), domid, writable, writable_type,
                                  ffi.from_buffer("int64_t[]", slots, require_writable=True))

    def slot_runs(slots, starts, counts) -> int:
        return lib.xs_slot_runs(ffi.from_buffer("int64_t[]", slots), len(slots),
                                ffi.from_buffer("uint32_t[]", starts, require_writable=True),
                                ffi.from_buffer("uint32_t[]", counts, require_writable=True))

    def page_type_codes(mfns, ext_of, max_mfn, owner, ptype, tcount, flags, domid, type_levels, codes) -> None:
        mfns = as_u64(mfns)
        lib.xs_page_type_codes(ffi.from_buffer("uint64_t[]", mfns), len(mfns), ffi.from_buffer("uint32_t[]", ext_of),
                               max_mfn, ffi.from_buffer("uint16_t[]", owner), ffi.from_buffer("uint8_t[]", ptype),
                               ffi.from_buffer("uint32_t[]", tcount), ffi.from_buffer("uint8_t[]", flags), domid,
                               type_levels, ffi.from_buffer("uint32_t[]", codes, require_writable=True))

    def mark_pfns(pfns, low: int, marks) -> int:
        pfns = as_u64(pfns)
        if not pfns:
            return 0
        result = lib.xs_mark_pfns(ffi.from_buffer("uint64_t[]", pfns), len(pfns), low,
                                  ffi.from_buffer("uint8_t[]", marks, require_writable=True), len(marks))
        if result < 0:
            _reraise(-1 - result, pagetables.python_mark_pfns, pfns[-1 - result:-result], low, bytearray(len(marks)))
        return result

    return {
        "normalise_pages": normalise_pages,
        "localise_pages": localise_pages,
        "pack_page_words": pack_page_words,
        "take_l1_refs": take_l1_refs,
        "frame_slots": frame_slots,
        "slot_runs": slot_runs,
        "page_type_codes": page_type_codes,
        "mark_pfns": mark_pfns,
    }


_LOCALISE_REASONS = {
    pagetables.LOCALISE_PFN_RANGE: "pfn beyond max_pfn",
    pagetables.LOCALISE_BAD_MFN: "mfn not in the pseudo-physical map",
    pagetables.LOCALISE_BAD_LEVEL: "not a table level",
}


def _reraise(index: int, twin, *args) -> None:
    """Let the twin explain the one offending element, then report it at its batch index."""
    try:
        twin(*args)
    except TranslationError as exc:
        raise TranslationError(exc.reason, f"entry {index}: {str(exc).partition(': ')[2]}", index, exc.entry) from None
    raise AssertionError("kernel and twin disagree")


_CFFI = None if os.environ.get("XENSTREAM_KERNELS") == "python" else load_compiled_kernels()
BACKEND = "cffi" if _CFFI is not None else "python"
_SELECTED = _CFFI if _CFFI is not None else PYTHON_KERNELS

normalise_pages = _SELECTED["normalise_pages"]
localise_pages = _SELECTED["localise_pages"]
pack_page_words = _SELECTED["pack_page_words"]
# The simulator's own loops (xenstream.hv.sim.hotpaths): L1 validation, frame lookup, page-type query.
take_l1_refs = _SELECTED["take_l1_refs"]
frame_slots = _SELECTED["frame_slots"]
slot_runs = _SELECTED["slot_runs"]
page_type_codes = _SELECTED["page_type_codes"]
mark_pfns = _SELECTED["mark_pfns"]

__all__ = ["BACKEND", "PYTHON_KERNELS", "load_compiled_kernels", "P2MView", "TranslationError", "TranslationTables", "normalise_pages",
           "localise_pages", "pack_page_words", "take_l1_refs", "frame_slots", "slot_runs", "page_type_codes", "mark_pfns"]
