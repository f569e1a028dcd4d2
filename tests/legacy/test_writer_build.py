"""The stream builder: its streams follow the saver's rules (spec Appendix A) and describe consistent guests."""

import importlib.util
import struct

import attrs
import pytest

from tests.conftest import REPO
from xenstream.hv.abi import PAGE_SIZE
from xenstream.legacy import events as ev
from xenstream.legacy.build import BuildOptions, PhysmapSpec, build_events, build_stream

XTAB = 0xF0000000
NOTAB, L1, L2, L3, L4, PIN = 0x0, 0x1, 0x2, 0x3, 0x4, 0x8
PRESENT, RW, USER, ACCESSED = 0x1, 0x2, 0x4, 0x20


def _events(**kwargs):
    return list(build_events(BuildOptions(**kwargs)))


def _checkpoints(events):
    """Split wire events into checkpoints at each EndOfBody's tail end (the next body's first event)."""
    groups, current, seen_end = [], [], False
    tail_types = (ev.UnmappedPfns, ev.VcpuBasic, ev.VcpuExtended, ev.VcpuXsave, ev.SharedInfo, ev.HvmMagicPfns,
                  ev.HvmContext, ev.DeviceModelRecord, ev.DeviceModelData, ev.DeviceModelEnd)
    for event in events:
        if seen_end and not isinstance(event, tail_types):
            groups.append(current)
            current, seen_end = [], False
        current.append(event)
        seen_end = seen_end or isinstance(event, ev.EndOfBody)
    groups.append(current)
    return groups


def _pages_of(batches):
    """pfn -> (type nibble, page bytes) for the data pages of uncompressed batches, last one wins."""
    pages = {}
    for batch in batches:
        index = 0
        for entry in batch.entries:
            page_type = entry >> 28
            if page_type in (0xD, 0xE, 0xF):
                continue
            pages[entry & 0x0FFFFFFF] = (page_type, bytes(batch.payload[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]))
            index += 1
    return pages


PV_SHAPES = [dict(width=64), dict(width=32), dict(width=64, guest_width=32), dict(width=32, guest_width=64)]


@pytest.mark.parametrize("shape", PV_SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_pv_guest_is_consistent(shape):
    events = _events(pages=40, vcpus=3, holes=4, seed=11, **shape)
    guest_width = (shape.get("guest_width") or shape["width"]) // 8
    p2m_size = next(e.p2m_size for e in events if isinstance(e, ev.P2mSize))
    ext = next(e for e in events if isinstance(e, ev.ExtendedInfo))
    assert ext.total == sum(8 + len(b.data) for b in ext.blocks)
    assert [b.block_id for b in ext.blocks] == [b"vcpu", b"extv", b"xcnt"]
    assert ext.guest_width == guest_width
    batches = [e for e in events if isinstance(e, ev.PageBatch)]
    pages = _pages_of(batches)
    unmapped = next(e.pfns for e in events if isinstance(e, ev.UnmappedPfns))
    assert list(unmapped) == sorted(unmapped) and len(unmapped) == 4
    assert set(pages) == set(range(p2m_size)) - set(unmapped)

    # p2m frame list: ceil(p2m_size / FPP) NOTAB pages holding the guest's p2m (MFNs, invalid for holes)
    frames = next(e.frames for e in events if isinstance(e, ev.P2mFrames))
    fpp = PAGE_SIZE // guest_width
    assert len(frames) == -(-p2m_size // fpp)
    assert all(pages[f][0] == NOTAB for f in frames)
    p2m = struct.unpack(f"<{fpp}{'Q' if guest_width == 8 else 'I'}", pages[frames[0]][1])
    invalid = (1 << (8 * guest_width)) - 1
    assert [pfn for pfn in range(p2m_size) if p2m[pfn] == invalid] == list(unmapped)
    assert len({p2m[pfn] for pfn in range(p2m_size) if p2m[pfn] != invalid}) == p2m_size - len(unmapped)

    # page tables: canonical, every present entry below p2m_size, a tree from the pinned top levels
    tables = {pfn: (t, struct.unpack("<512Q", data)) for pfn, (t, data) in pages.items() if t & 0x7}
    frame_mask = 0x000FFFFFFFFFF000 if guest_width == 8 else 0x00000FFFFFFFF000
    reached = set()
    tops = [pfn for pfn, (t, _) in tables.items() if t & PIN]
    assert all(tables[pfn][0] & 0x7 == (L4 if guest_width == 8 else L3) for pfn in tops)

    def walk(pfn, level):
        reached.add(pfn)
        assert tables[pfn][0] & 0x7 == level
        for slot, pte in enumerate(tables[pfn][1]):
            if not pte & PRESENT:
                continue
            target = (pte & frame_mask) >> 12
            if level == L2 and guest_width == 4 and slot >= 428:
                assert target == 0 and shape["width"] == 64  # zapped compat M2P slot, 64-bit tools only
                continue
            assert target < p2m_size and target not in unmapped
            if level > L1:
                walk(target, level - 1)

    for top in tops:
        walk(top, tables[top][0] & 0x7)
    assert reached == set(tables)
    for pfn in tops:
        entries = tables[pfn][1]
        if guest_width == 8:
            assert not any(entries[256:272])
        else:
            assert not any(entries[4:])
            assert all(pte & (RW | USER | ACCESSED) == 0 for pte in entries[:4])

    # VCPU contexts: VCPU 0's EDX/RDX = start-info PFN (NOTAB), CR3 = a pinned top-level table, GDT NOTAB
    vcpu_info = [e for e in events if isinstance(e, ev.VcpuInfo)][-1]
    basics = [e for e in events if isinstance(e, ev.VcpuBasic)]
    assert [b.vcpu_id for b in basics] == list(vcpu_info.online) == [0, 1, 2]
    for basic in basics:
        ctx = basic.data
        if guest_width == 8:
            (rdx,) = struct.unpack_from("<Q", ctx, 0x268)
            (gdt,) = struct.unpack_from("<Q", ctx, 0x12E0)
            cr1, _, cr3 = struct.unpack_from("<QQQ", ctx, 0x1380)
            cr3_pfn = cr3 >> 12
            assert cr1 & 1 and (cr1 >> 12) in tops
        else:
            (rdx,) = struct.unpack_from("<I", ctx, 0x20C)
            (gdt,) = struct.unpack_from("<I", ctx, 0xA50)
            (cr3,) = struct.unpack_from("<I", ctx, 0xAA8)
            cr3_pfn = ((cr3 >> 12) | (cr3 << 20)) & 0xFFFFFFFF
        assert cr3_pfn in tops
        assert pages[gdt][0] == NOTAB
        if basic.vcpu_id == 0:
            start_info = pages[rdx]
            assert start_info[0] == NOTAB and start_info[1].startswith(b"xen-3.0-x86_")
            fmt, at = ("<Q", (0x38, 0x48)) if guest_width == 8 else ("<I", (0x2C, 0x34))
            for offset in at:
                (frame,) = struct.unpack_from(fmt, start_info[1], offset)
                assert frame < p2m_size and pages[frame][0] == NOTAB
    shared = next(e.data for e in events if isinstance(e, ev.SharedInfo))
    assert struct.unpack_from("<Q", shared, 0xC18 if guest_width == 8 else 0x910)[0] & (
        (1 << (8 * guest_width)) - 1) == 0
    xsaves = [e for e in events if isinstance(e, ev.VcpuXsave)]
    xcnt = ext.xsave_record_size
    assert all(16 + len(x.data) == xcnt and x.size == len(x.data) for x in xsaves)


@pytest.mark.parametrize("guest", ["pv", "hvm"])
def test_batches_follow_the_saver_rules(guest):
    events = _events(guest=guest, pages=1500, holes=40, seed=3, live_iterations=2)
    batches = [e for e in events if isinstance(e, ev.PageBatch)]
    for batch in batches:
        pfns = [entry & 0x0FFFFFFF for entry in batch.entries if entry != XTAB]
        assert 1 <= batch.count <= 1024
        assert pfns == sorted(set(pfns))
        assert any(entry != XTAB for entry in batch.entries)
        assert all(entry >> 32 == 0 for entry in batch.entries)
    if guest == "hvm":
        first_pass = batches[:2]
        assert [b.entries[0] & 0x0FFFFFFF for b in first_pass] == [0, 1024]
        assert first_pass[0].count == 1024
        assert list(first_pass[0].entries).count(XTAB) > 0


def test_chunk_order_of_a_non_live_hvm_save():
    events = _events(guest="hvm", seed=5, x87_fip_width=8, tmem=True)
    wire = [type(e).__name__ if not isinstance(e, ev.HvmParam) else e.chunk_id for e in events if e.WIRE]
    body_end = wire.index("EndOfBody")
    assert wire[:3] == ["P2mSize", "TmemHeader", "TmemPool"]
    assert wire.index("TscInfo") < wire.index("PageBatch")
    assert wire[wire.index("VcpuInfo") + 1:body_end] == [-14, -3, -4, -8, -10, -19, -20, -21, "Toolstack",
                                                           "LastCheckpoint"]
    assert wire[body_end + 1:] == ["HvmMagicPfns", "HvmContext", "DeviceModelRecord0002", "DeviceModelData"]


def test_live_save_puts_tmem_extra_and_tsc_before_the_final_iteration():
    wire = [type(e).__name__ for e in _events(seed=5, tmem=True, live_iterations=3) if e.WIRE]
    tsc = wire.index("TscInfo")
    assert wire[tsc - 4:tsc] == ["TmemExtraStart", "TmemInvalidation", "TmemInvalidation", "TmemExtraEnd"]
    assert "PageBatch" in wire[:tsc] and "PageBatch" in wire[tsc:]


def test_remus_checkpoints_repeat_body_and_tail():
    events = _events(guest="hvm", seed=9, checkpoints=3, vcpus=2)
    wire = [e for e in events if e.WIRE]
    groups = _checkpoints(wire)
    assert len(groups) == 3
    assert not any(isinstance(e, ev.LastCheckpoint) for e in wire)
    for group in groups[1:]:
        names = [type(e).__name__ for e in group]
        assert "TscInfo" not in names and "P2mSize" not in names
        assert names[-4:] == ["HvmMagicPfns", "HvmContext", "DeviceModelRecord0002", "DeviceModelData"]
        assert "VcpuInfo" in names and "Toolstack" in names


def _decode_page(data: bytes, pos: int, previous: bytes | None) -> tuple[bytes, int]:
    """A decoder written from spec 6.3 alone."""
    marker = data[pos]
    if marker == 0x00:
        return previous, pos + 1
    if marker == 0x80:
        return data[pos + 1:pos + 1 + PAGE_SIZE], pos + 1 + PAGE_SIZE
    page, offset = bytearray(previous), 0
    while offset < PAGE_SIZE:
        marker = data[pos]
        pos += 1
        length = (marker & 0x7F) * 4
        assert length
        if not marker & 0x80:
            page[offset:offset + length] = data[pos:pos + length]
            pos += length
        offset += length
    assert offset == PAGE_SIZE
    return bytes(page), pos


@pytest.mark.parametrize("guest", ["pv", "hvm"])
def test_compressed_checkpoints_decode_to_the_uncompressed_twin(guest):
    options = BuildOptions(guest=guest, pages=200, seed=21, checkpoints=4, compression=True)
    compressed = list(build_events(options))
    plain = list(build_events(attrs.evolve(options, compression=False)))
    compressed_groups, plain_groups = _checkpoints(compressed), _checkpoints(plain)
    assert any(isinstance(e, ev.EnableCompression) for e in compressed_groups[0])
    state = _pages_of(e for e in plain_groups[0] if isinstance(e, ev.PageBatch))
    assert state == _pages_of(e for e in compressed_groups[0] if isinstance(e, ev.PageBatch))
    encodings = set()
    for c_group, p_group in zip(compressed_groups[1:], plain_groups[1:]):
        batches = [e for e in c_group if isinstance(e, ev.PageBatch)]
        assert all(b.compressed and b.payload is None for b in batches)
        stream = b"".join(bytes(e.data) for e in c_group if isinstance(e, ev.CompressedData))
        pos = 0
        for batch in batches:
            for entry in batch.entries:
                if entry >> 28 in (0xD, 0xE, 0xF):
                    continue
                pfn = entry & 0x0FFFFFFF
                encodings.add(stream[pos] if stream[pos] in (0, 0x80) else "delta")
                page, pos = _decode_page(stream, pos, state.get(pfn, (0, None))[1])
                state[pfn] = (entry >> 28, page)
        assert pos == len(stream)
        expected = _pages_of(e for e in p_group if isinstance(e, ev.PageBatch))
        assert all(state[pfn] == value for pfn, value in expected.items())
        assert [type(e) for e in c_group if not isinstance(e, (ev.PageBatch, ev.CompressedData))] == [
            type(e) for e in p_group if not isinstance(e, ev.PageBatch)]
    assert encodings == {0x00, 0x80, "delta"}


def test_toolstack_blob_matches_appendix_b():
    vga = PhysmapSpec(0xF0000000, 0xF0000000, 0x800000, b"vga")
    for width, length in ((64, 44), (32, 40)):
        data = build_stream(BuildOptions(guest="hvm", width=width, physmap=(vga,), seed=1))
        header = struct.pack("<iI", -18, length) + struct.pack("<IIQQQI", 1, 1, 0xF0000000, 0xF0000000, 0x800000, 4)
        at = data.index(header)
        assert data[at + len(header):at + len(header) + 4] == b"vga\0"
        if width == 64:
            assert data[at + len(header) + 4:at + len(header) + 8] == bytes(4)


def test_builder_is_deterministic_and_seed_sensitive():
    options = BuildOptions(guest="pv", pages=64, checkpoints=2, compression=True, seed=4)
    assert build_stream(options) == build_stream(options)
    assert build_stream(options) != build_stream(attrs.evolve(options, seed=5))


def test_page_contents_are_not_trivially_compressible():
    import zlib

    data = build_stream(BuildOptions(guest="hvm", pages=600, seed=2))
    assert len(zlib.compress(data, 6)) > len(data) // 2


def test_reused_buffers_write_the_same_bytes():
    options = BuildOptions(guest="pv", pages=3000, seed=8, live_iterations=2)
    kept = bytearray()

    class Sink:
        write = kept.extend

    from xenstream.legacy.writer import LegacyWriter

    writer = LegacyWriter(Sink(), width=64)
    for event in build_events(options):
        writer.write(event)
    assert bytes(kept) == build_stream(options)


@pytest.mark.parametrize("bad", [dict(compression=True), dict(width=16), dict(guest="arm"),
                                 dict(guest="hvm", checkpoints=2, device_model="QemuDeviceModelRecord"),
                                 dict(wrapper="zip"), dict(checkpoints=0), dict(vcpus=3, max_vcpus=2)])
def test_impossible_options_rejected(bad):
    with pytest.raises(ValueError):
        BuildOptions(**bad)


def test_committed_samples_are_what_make_samples_builds():
    spec = importlib.util.spec_from_file_location("v1_make_samples", REPO / "samples" / "v1" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0


def test_xen_40_streams_lack_the_later_elements():
    hvm = _events(guest="hvm", seed=2, xen_version=(4, 0), toolstack=False, tmem=True,
                  device_model="QemuDeviceModelRecord")
    assert not any(isinstance(e, (ev.LastCheckpoint, ev.Toolstack)) for e in hvm)
    assert {e.chunk_id for e in hvm if isinstance(e, ev.HvmParam)} == {-3, -4}
    header = next(e for e in hvm if isinstance(e, ev.TmemHeader))
    assert header.version == 0 and header.oid_words == 1
    assert all(len(e.oid) == 1 for e in hvm if isinstance(e, (ev.TmemPage, ev.TmemInvalidation)))
    pv = _events(seed=2, xen_version=(4, 0), toolstack=False, xsave=False)
    assert not any(isinstance(e, ev.LastCheckpoint) for e in pv)
    extended = next(e.data for e in pv if isinstance(e, ev.VcpuExtended))
    assert struct.unpack_from("<I", extended, 4)[0] == 32 and any(extended[32:])
    modern = next(e.data for e in _events(seed=2) if isinstance(e, ev.VcpuExtended))
    assert struct.unpack_from("<I", modern, 4)[0] == 56 and not any(modern[56:])


@pytest.mark.parametrize(("version", "feature"), [((4, 0), dict(xsave=True, toolstack=False)),
                                                  ((4, 1), dict(toolstack=True)),
                                                  ((4, 2), dict(broken_pages=1, toolstack=False)),
                                                  ((4, 4), dict(wrapper="xl")),
                                                  ((4, 4), dict(guest="hvm", x87_fip_width=4))])
def test_features_a_version_lacks_are_rejected(version, feature):
    with pytest.raises(ValueError, match="savers wrote no"):
        BuildOptions(xen_version=version, **feature)


def test_live_hvm_first_pass_sends_redirtied_pages_as_xalloc():
    events = _events(guest="hvm", pages=300, seed=6, live_iterations=2)
    batches = [e for e in events if isinstance(e, ev.PageBatch)]
    first_pass = [b for b in batches if b.entries[0] & 0x0FFFFFFF == 0][0]
    xalloc = {entry & 0x0FFFFFFF for entry in first_pass.entries if entry >> 28 == 0xE}
    assert xalloc
    later = set().union(*({entry & 0x0FFFFFFF for entry in b.entries if entry >> 28 == 0} for b in batches[1:]))
    assert xalloc <= later
    for options in (dict(guest="pv", live_iterations=2), dict(guest="hvm", live_iterations=2, xen_version=(4, 1),
                                                              toolstack=False)):
        assert not any(entry >> 28 == 0xE for e in _events(seed=6, **options) if isinstance(e, ev.PageBatch)
                       for entry in e.entries)
