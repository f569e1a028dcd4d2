"""The cffi kernels and their pure-Python twins are the same function (random inputs), and both are right
on real guests (normalise then localise gives the page back, Xen slots zeroed)."""

from __future__ import annotations

import os
import random
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstream.hv import abi, kernels, pagetables
from xenstream.hv.pagetables import P2MView, TranslationError, TranslationTables
from xenstream.hv.sim.builder import build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.xen import SimXen

PY = kernels.PYTHON_KERNELS

CFFI = kernels.load_compiled_kernels()

needs_cffi = pytest.mark.skipif(CFFI is None, reason="compiled kernel not built")
SETTINGS = settings(max_examples=60, deadline=None)


def test_backend_reports_what_is_loaded():
    forced = os.environ.get("XENSTREAM_KERNELS") == "python"
    assert kernels.BACKEND == ("cffi" if CFFI is not None and not forced else "python")


# -- a small random host: M2P, P2M (either width), pagetables full of good and bad entries -------

@st.composite
def hosts(draw):
    """Structure from hypothesis, bulk contents from a seeded generator (keeps examples small)."""
    width = draw(st.sampled_from([abi.WIDTH_32, abi.WIDTH_64]))
    levels = abi.LEVELS_FOR_WIDTH[width]
    nr = draw(st.integers(1, 1500))
    max_mfn = draw(st.integers(nr + 2, 5000))
    rng = random.Random(draw(st.integers(0, 2**32)))
    mfns = rng.sample(range(max_mfn), nr)
    p2m = [abi.INVALID_MFN if rng.random() < 0.1 else mfn for mfn in mfns]
    m2p = array("Q", [rng.choice([0, 7, abi.INVALID_MFN])]) * (max_mfn + 3)
    for pfn, mfn in enumerate(mfns):
        m2p[mfn] = pfn
    for _ in range(draw(st.integers(0, 5))):  # stale M2P entries
        m2p[rng.randrange(max_mfn)] = rng.randrange(nr + 3)
    fpp = abi.frames_per_page(width)
    fmt = "Q" if width == abi.WIDTH_64 else "I"
    inv = abi.INVALID_MFN_FOR_WIDTH[width]
    words = [inv if v == abi.INVALID_MFN else v for v in p2m]
    words += [inv] * (-len(words) % fpp)
    leaves = [array(fmt, words[k:k + fpp]) for k in range(0, len(words), fpp)]
    max_pfn = draw(st.integers(max(nr - 3, 0), nr + 3))
    compat = draw(st.sampled_from([mfns[0], max_mfn + 1]))
    tables = TranslationTables(levels=levels, m2p=memoryview(m2p).toreadonly(), max_mfn=max_mfn,
                               p2m=P2MView(width, leaves, fpp), max_pfn=max_pfn, compat_m2p_mfn0=compat)
    n_pages = draw(st.integers(1, 4))
    bad_rate = draw(st.sampled_from([0.0, 0.001, 0.01, 0.2]))
    frames_are_mfns = draw(st.booleans())  # normalise input, or localise input (frames are pfns)
    pse_rate = draw(st.sampled_from([0.0, 0.001, 0.05]))
    entries = []
    for _ in range(512 * n_pages):
        if rng.random() < 0.3:
            entries.append(rng.getrandbits(64) & ~1 if rng.random() < 0.5 else 0)
            continue
        good = rng.choice(mfns) if frames_are_mfns else rng.randrange(nr)
        frame = rng.randrange(max_mfn + 5) if rng.random() < bad_rate else good
        flags = rng.getrandbits(12) & ~abi.PTE_PSE | abi.PTE_PRESENT
        if rng.random() < pse_rate:
            flags |= abi.PTE_PSE
        entries.append((frame << 12) | flags | rng.choice([0, abi.PTE_NX, 0x7FF0 << 48]))
    if n_pages and rng.random() < 0.3:  # a PAE top L2 carrying Xen's compat M2P at 428
        entries[428] = (mfns[0] << 12) | abi.PTE_PRESENT | abi.PTE_PSE
    if rng.random() < 0.3:  # forward references for localise: frames that are pfns without a frame
        holes = [pfn for pfn, v in enumerate(p2m) if v == abi.INVALID_MFN]
        for k in range(min(len(holes), 5)):
            entries[rng.randrange(len(entries))] = (holes[k] << 12) | abi.PTE_PRESENT
    pages = bytearray(array("Q", entries).tobytes())
    page_levels = [rng.choice([1, 1, 2, 3, levels, 0, 5]) for _ in range(n_pages)]
    return tables, pages, page_levels


def _run(fn, *args):
    try:
        return ("ok", fn(*args))
    except TranslationError as exc:
        return ("error", exc.reason, exc.index, exc.entry)


@needs_cffi
@SETTINGS
@given(hosts())
def test_normalise_kernel_matches_twin(host):
    tables, pages, levels = host
    py_pages, c_pages = bytearray(pages), bytearray(pages)
    py_status, c_status = bytearray(len(levels)), bytearray(len(levels))
    assert PY["normalise_pages"](tables, py_pages, levels, py_status) == \
        CFFI["normalise_pages"](tables, c_pages, levels, c_status)
    assert py_status == c_status
    assert py_pages == c_pages


@needs_cffi
@SETTINGS
@given(hosts())
def test_localise_kernel_matches_twin(host):
    tables, pages, levels = host
    py_pages, c_pages = bytearray(pages), bytearray(pages)
    py_missing, c_missing = array("Q", bytes(8 * 512 * len(levels))), array("Q", bytes(8 * 512 * len(levels)))
    assert _run(PY["localise_pages"], tables, py_pages, levels, py_missing) == \
        _run(CFFI["localise_pages"], tables, c_pages, levels, c_missing)
    assert py_missing == c_missing
    assert py_pages == c_pages


TYPE_CODES = st.integers(0, 15).map(lambda t: t << 28) | st.integers(0, 0xFFFF_FFFF)
PFNS = st.integers(0, 0x0FFF_FFFF) | st.integers(0, (1 << 64) - 1)


@needs_cffi
@SETTINGS
@given(st.lists(st.tuples(PFNS, TYPE_CODES), max_size=40))
def test_pack_words_kernel_matches_twin(entries):
    pfns = array("Q", [p for p, _ in entries])
    types = array("I", [t for _, t in entries])
    outs = [array("Q", bytes(8 * len(entries))) for _ in range(2)]
    assert _run(PY["pack_page_words"], pfns, types, outs[0]) == _run(CFFI["pack_page_words"], pfns, types, outs[1])


def test_word_translation_values():
    pfns = array("Q", [5, 0x0FFF_FFFF, 9])
    types = array("I", [abi.PFINFO_NOTAB, abi.PFINFO_XTAB, (abi.PAGETYPE_L2TAB | abi.PAGETYPE_LPINTAB) << 28])
    out = array("Q", bytes(24))
    assert kernels.pack_page_words(pfns, types, out) == 2
    assert list(out) == [5, (0xF << 60) | 0x0FFF_FFFF, (0xA << 60) | 9]
    with pytest.raises(TranslationError) as info:
        kernels.pack_page_words(array("Q", [1, 2]), array("I", [0, 0x5000_0000]), out)
    assert info.value.index == 1


# -- real guests -------------------------------------------------------------------------------

def _guest_tables(spec: str):
    """A suspended guest's pagetable pages (shared_info unmapped, as the suspend contract says)."""
    xen = SimXen(capacity_frames=1 << 14, seed=3)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    guest.suspend()
    table = guest.p2m_table()
    tables = TranslationTables(levels=built.layout.levels, m2p=xen.m2p_view(), max_mfn=xen.get_max_mfn(),
                               p2m=P2MView.contiguous(table), max_pfn=built.layout.nr_pages - 1,
                               compat_m2p_mfn0=xen.compat_m2p_first_mfn())
    refs = sorted(built.layout.tables, key=lambda r: r.pfn)
    pages = bytearray(b"".join(xen.map_foreign(built.domid, [table[r.pfn] for r in refs])))
    return xen, tables, refs, pages


@pytest.mark.parametrize("spec", ["pv64:mem=6M,vcpus=2,seed=5", "pv32:mem=6M,vcpus=3,online=2,seed=6"])
@pytest.mark.parametrize("backend", ["python", "cffi"])
def test_normalise_then_localise_restores_guest_tables(spec, backend):
    impl = PY if backend == "python" else CFFI
    if impl is None:
        pytest.skip("compiled kernel not built")
    _, tables, refs, pages = _guest_tables(spec)
    levels = bytes(r.level for r in refs)
    original = array("Q", pages)
    status = bytearray(len(refs))
    assert impl["normalise_pages"](tables, pages, levels, status) == 0
    normalised = array("Q", pages)
    m2p = tables.m2p
    for i, ref in enumerate(refs):
        slots = pagetables.xen_slot_range(tables.levels, ref.level, original[i * 512:(i + 1) * 512],
                                          tables.compat_m2p_mfn0)
        for j in range(512):
            pte, out = original[i * 512 + j], normalised[i * 512 + j]
            if j in slots:
                assert out == 0
            elif pte & abi.PTE_PRESENT:
                assert out == abi.pte_with_frame(pte, m2p[abi.pte_frame(pte)])
            else:
                assert out == pte
    missing = array("Q", bytes(8 * 512 * len(refs)))
    assert impl["localise_pages"](tables, pages, levels, missing) == 0
    relocalised = array("Q", pages)
    for i, ref in enumerate(refs):
        slots = pagetables.xen_slot_range(tables.levels, ref.level, original[i * 512:(i + 1) * 512],
                                          tables.compat_m2p_mfn0)
        for j in range(512):
            expected = 0 if j in slots else original[i * 512 + j]
            assert relocalised[i * 512 + j] == expected, (ref, j)


def test_normalise_reports_foreign_frames_and_superpages():
    xen, tables, refs, pages = _guest_tables("pv64:mem=6M,seed=8")
    other = build_guest(xen, "pv64:mem=2M,seed=9")
    foreign = xen.owned_frames(other.domid)[0]
    l1 = next(i for i, r in enumerate(refs) if r.level == 1)
    l2 = next(i for i, r in enumerate(refs) if r.level == 2)
    words = memoryview(pages).cast("Q")
    words[l1 * 512 + 7] = (foreign << 12) | abi.PTE_PRESENT
    first_present = next(j for j in range(512) if words[l2 * 512 + j] & abi.PTE_PRESENT)
    words[l2 * 512 + first_present] |= abi.PTE_PSE
    del words
    levels = bytes(r.level for r in refs)
    status = bytearray(len(refs))
    assert kernels.normalise_pages(tables, pages, levels, status) == 2
    assert status[l1] == pagetables.NORMALISE_BAD_MFN
    assert status[l2] == pagetables.NORMALISE_SUPERPAGE
    assert kernels.normalise_pages(tables, bytearray(4096), b"\x04", bytearray(1)) == 0
    bad = bytearray(1)
    tables.levels = 3
    assert kernels.normalise_pages(tables, bytearray(4096), b"\x04", bad) == 1
    assert bad[0] == pagetables.NORMALISE_BAD_LEVEL


@needs_cffi
@SETTINGS
@given(st.integers(0, 2**32), st.sampled_from([0.0, 0.01, 0.3]))
def test_l1_validation_kernel_matches_twin(seed, bad_rate):
    from xenstream.hv.sim import hotpaths

    rng = random.Random(seed)
    slots = 2048
    ext_of = array("I", [0]) * 64
    for extent, machine_extent in enumerate(rng.sample(range(1, 64), slots // 512)):
        ext_of[machine_extent] = extent + 1
    mfns = [(e << 9) | k for e in range(64) if ext_of[e] for k in range(512)]
    owner = array("H", [rng.choice([1, 1, 1, 2]) for _ in range(slots)])
    ptype = bytearray(rng.choice([0, 0, 6, 6, 1, 7]) for _ in range(slots))
    tcount = array("I", [rng.choice([0, 0, 1, 3]) for _ in range(slots)])
    flags = bytearray(rng.choice([0, 0, 0, 8]) for _ in range(slots))
    entries = []
    for _ in range(512):
        frame = rng.randrange(64 << 9) if rng.random() < bad_rate else rng.choice(mfns)
        flag_bits = rng.choice([0, 1, 3, 3, 0x63, 0x163]) | (0x80 if rng.random() < bad_rate / 4 else 0)
        entries.append((frame << 12) | flag_bits)
    page = array("Q", entries).tobytes()
    refused = ~(0x1FF | 0xE00 | abi.PTE_FRAME_MASK) & ((1 << 64) - 1)
    results = []
    for impl in (PY["take_l1_refs"], CFFI["take_l1_refs"]):
        state = (bytearray(ptype), array("I", tcount), array("I", bytes(4 * 512)), [0])
        result = impl(page, ext_of, 64 << 9, owner, state[0], state[1], flags, 1, refused, 6, 8, state[2], state[3])
        results.append((result, bytes(state[0]), state[1].tobytes(), state[2][:state[3][0]].tobytes(), state[3][0]))
    assert results[0] == results[1]


@needs_cffi
@SETTINGS
@given(st.integers(0, 2**32), st.booleans())
def test_frame_lookup_and_type_query_kernels_match_twins(seed, writable):
    rng = random.Random(seed)
    slots = 2048
    ext_of = array("I", [0]) * 64
    for extent, machine_extent in enumerate(rng.sample(range(1, 64), slots // 512)):
        ext_of[machine_extent] = extent + 1
    owner = array("H", [rng.choice([1, 1, 2, 0xFFFF]) for _ in range(slots)])
    ptype = bytearray(rng.randrange(8) for _ in range(slots))
    tcount = array("I", [rng.choice([0, 0, 1, 2]) for _ in range(slots)])
    flags = bytearray(rng.randrange(16) for _ in range(slots))
    mfns = array("Q", [rng.choice([rng.randrange(64 << 9), rng.randrange(1 << 64), abi.INVALID_MFN])
                       for _ in range(rng.randrange(1, 300))])
    levels = bytes([0, 1, 2, 3, 4, 2, 0, 0])
    results = []
    for impl in (PY, CFFI):
        out = array("q", bytes(8 * len(mfns)))
        mapped = impl["frame_slots"](mfns, ext_of, 64 << 9, owner, ptype, tcount, 1, int(writable), 6, out)
        codes = array("I", bytes(4 * len(mfns)))
        impl["page_type_codes"](mfns, ext_of, 64 << 9, owner, ptype, tcount, flags, 1, levels, codes)
        results.append((mapped, out, codes))
    assert results[0] == results[1]


@needs_cffi
@SETTINGS
@given(pfns=st.lists(st.integers(0, 300) | st.integers(0, (1 << 64) - 1), max_size=200), low=st.integers(0, 100),
       size=st.integers(0, 300))
def test_mark_pfns_kernel_matches_twin(pfns, low, size):
    results = []
    for impl in (PY, CFFI):
        marks = bytearray(size)
        try:
            outcome = impl["mark_pfns"](array("Q", pfns), low, marks)
        except TranslationError as exc:
            outcome = ("error", exc.index, str(exc))
        results.append((outcome, bytes(marks)))
    assert results[0] == results[1]
    outcome, marks = results[0]
    inside = [p for p in pfns if low <= p < low + size]
    if outcome == len(pfns):
        assert marks == bytes(int(i + low in set(pfns)) for i in range(size))
    else:
        assert outcome[1] == next(i for i, p in enumerate(pfns) if not low <= p < low + size)
        assert len(inside) < len(pfns)


@needs_cffi
@SETTINGS
@given(st.lists(st.integers(-1, 40) | st.integers(-1, 1 << 40), max_size=80))
def test_slot_runs_kernel_matches_twin(slots):
    slots = array("q", sorted(slots) if len(slots) % 2 else slots)
    results = []
    for impl in (PY, CFFI):
        starts, counts = array("I", bytes(4 * len(slots))), array("I", bytes(4 * len(slots)))
        runs = impl["slot_runs"](slots, starts, counts)
        results.append((runs, starts[:runs], counts[:runs]))
    assert results[0] == results[1]
    runs, starts, counts = results[0]
    covered = [i for first, count in zip(starts, counts) for i in range(first, first + count)]
    assert covered == [i for i, s in enumerate(slots) if s >= 0]
