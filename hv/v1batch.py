"""Compiled checks of v1 page batches for the converter's hot path, kept free of heavy imports.

Per 4 MiB batch the converter validates the pfn_type array (legacy/walk.py) and builds the v2 PAGE_DATA
words (convert/transform.py). Their pure-Python versions, in those modules, are the twins: they run when
the compiled module is absent (or XENSTREAM_KERNELS=python), and whenever a function here answers None,
which it does for any bad batch, so that one place names every fault. tests/hv/test_v1batch.py holds
the two to the same results on random batches. This module imports the cffi extension alone (not
xenstream.hv.kernels, which brings the simulator): `convert-legacy-stream` start-up stays light.
"""

from __future__ import annotations

import os

try:
    if os.environ.get("XENSTREAM_KERNELS") == "python":
        raise ImportError("pure-Python kernels requested")
    from xenstream.hv._kernels import ffi as _ffi
    from xenstream.hv._kernels import lib as _lib
except ImportError:
    _lib = None

COMPILED = _lib is not None


def check_legacy_batch(raw, entry_size: int, p2m_size: int) -> int | None:
    """The number of data-bearing entries in the v1 pfn_type array `raw` (entries of `entry_size` bytes),
    or None: no compiled module, or some entry is bad (the caller's checks say which)."""
    if _lib is None:
        return None
    raw = memoryview(raw).cast("B")
    n = len(raw) // entry_size
    result = _lib.xs_check_legacy_batch(_ffi.from_buffer("uint8_t[]", raw), entry_size, n, p2m_size,
                                        _ffi.new("uint64_t[]", max(n, 1)))
    return None if result < 0 else result


def legacy_batch_words(raw, entry_size: int) -> bytearray | None:
    """The v2 PAGE_DATA pfn words (little-endian u64) for the v1 pfn_type array `raw`, or None: no
    compiled module, or a pfn repeats."""
    if _lib is None:
        return None
    raw = memoryview(raw).cast("B")
    n = len(raw) // entry_size
    words = bytearray(8 * n)
    result = _lib.xs_legacy_batch_words(_ffi.from_buffer("uint8_t[]", raw), entry_size, n,
                                        _ffi.from_buffer("uint64_t[]", words, require_writable=True),
                                        _ffi.new("uint64_t[]", max(n, 1)))
    if result < 0:
        return None
    del words[8 * result:]
    return words
