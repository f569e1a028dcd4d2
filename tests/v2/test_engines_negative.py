"""Every restore check of spec 5.11 (and 8.6): a clear error at the right offset, and no domain left behind."""

from __future__ import annotations

import struct

import pytest

from tests.v2 import engine_support as es
from xenstream.hv import abi
from xenstream.v2 import constants as C
from xenstream.v2.errors import MalformedStream, StreamError, TruncatedStream, UnsupportedStream
from xenstream.v2.restore import P2M_HOLE_ALLOWANCE, PvRestorer


@pytest.fixture(scope="module")
def src64() -> es.Source:
    return es.make_source("pv64:mem=1M,vcpus=2,seed=21")


@pytest.fixture(scope="module")
def src32() -> es.Source:
    return es.make_source("pv32:mem=1M,vcpus=1,seed=22")


def fails(src: es.Source, stream: bytes, error=MalformedStream, match: str | None = None, **kwargs) -> StreamError:
    xen = es.new_host(src.spec, seed=9)
    with pytest.raises(error, match=match) as caught:
        es.restore(stream, src.spec, xen=xen, **kwargs)
    assert not xen.domains, "the half-built domain was left behind"
    assert set(xen.machine.owner) <= {abi.DOMID_XEN, 0xFFFF}, "frames of the failed domain were not freed"
    assert caught.value.offset is not None
    return caught.value


def mutate(src: es.Source, change) -> bytes:
    headers, records = es.split(src.stream)
    headers = change(bytearray(headers), records) or headers
    return es.join(bytes(headers), records)


def record_offset(stream: bytes, index: int) -> int:
    _, records = es.split(stream)
    offset = es.HEADERS
    for record in records[:index]:
        offset += 8 + len(record.body) + (-len(record.body) & 7)
    return offset


# ------------------------------------------------------------------ headers and framing


@pytest.mark.parametrize("offset, value, error, match", [
    (0, b"\0", UnsupportedStream, "not a v2 stream"),
    (8, b"XENG", MalformedStream, "id"),
    (12, struct.pack(">I", 4), MalformedStream, "version"),
])
def test_bad_image_header(src64, offset, value, error, match):
    stream = bytearray(src64.stream)
    stream[offset:offset + len(value)] = value
    fails(src64, bytes(stream), error, match)


def test_big_endian_stream(src64):
    stream = bytearray(src64.stream)
    stream[16:18] = struct.pack(">H", C.IMAGE_OPTION_BIG_ENDIAN)
    fails(src64, bytes(stream), UnsupportedStream, "big-endian")


def test_hvm_stream_into_pv_domain(src64):
    stream = bytearray(src64.stream)
    stream[24:28] = struct.pack("<I", C.DOMAIN_TYPE_X86_HVM)
    assert fails(src64, bytes(stream), UnsupportedStream, "HVM").offset == 24


def test_page_size_not_4096(src64):
    stream = bytearray(src64.stream)
    stream[28:30] = struct.pack("<H", 13)
    fails(src64, bytes(stream), MalformedStream, "page_shift")


def test_record_over_128_mib(src64):
    headers, records = es.split(src64.stream)
    stream = headers + struct.pack("<II", C.REC_X86_PV_INFO, C.RECORD_LENGTH_MAX + 8)
    fails(src64, stream, MalformedStream, "limit")


@pytest.mark.parametrize("via_fd", [False, True], ids=["fed", "fd"])
@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.999])
def test_truncated_stream(src64, fraction, via_fd):
    cut = int(len(src64.stream) * fraction)
    fails(src64, src64.stream[:cut], TruncatedStream, via_fd=via_fd)


def test_errors_are_the_same_when_reading_an_fd(src64):
    table = next(t for t in src64.guest.layout.tables if t.level == 2)

    def change(headers, records):
        index, _, offset = es.locate_page(records, table.pfn)
        body = bytearray(records[index].body)
        struct.pack_into("<Q", body, offset + 8 * 3, ((src64.digest.p2m_size + 1) << 12) | abi.PTE_PRESENT)
        records[index].body = bytes(body)

    stream = mutate(src64, change)
    fed, read = fails(src64, stream), fails(src64, stream, via_fd=True)
    assert (str(fed), fed.offset) == (str(read), read.offset)
    assert f"pfn {table.pfn:#x}" in str(read) and "entry 3" in str(read)


def test_stream_without_end(src64):
    headers, records = es.split(src64.stream)
    fails(src64, es.join(headers, records[:-1]), TruncatedStream)


@pytest.mark.parametrize("rtype, match", [
    (0x13, "unknown mandatory"),
    (C.REC_HVM_CONTEXT, "not valid in a PV stream"),
    (C.REC_HVM_PARAMS, "not valid in a PV stream"),
    (C.REC_TOOLSTACK, "not valid in a PV stream"),
    (C.REC_CHECKPOINT_DIRTY_PFN_LIST, "not valid in a PV stream"),
])
def test_unknown_or_foreign_record(src64, rtype, match):
    bodies = {C.REC_HVM_PARAMS: struct.pack("<II", 0, 0), C.REC_CHECKPOINT_DIRTY_PFN_LIST: b"",
              C.REC_HVM_CONTEXT: b"\1"}

    def change(headers, records):
        records.insert(es.find(records, C.REC_X86_TSC_INFO), es.Record(rtype, bodies.get(rtype, b"x")))

    fails(src64, mutate(src64, change), MalformedStream, match)


def test_unknown_optional_record_is_skipped(src64):
    def change(headers, records):
        records.insert(3, es.Record(C.OPTIONAL_RECORD_BIT | 0x77, b"ignored"))

    xen, result = es.restore(mutate(src64, change), src64.spec)
    assert result.max_pfn + 1 == src64.digest.p2m_size


# ------------------------------------------------------------------ static records and order


def test_page_data_before_static_data_end(src64):
    def change(headers, records):
        page = records.pop(es.find(records, C.REC_PAGE_DATA))
        records.insert(es.find(records, C.REC_STATIC_DATA_END), page)

    fails(src64, mutate(src64, change), MalformedStream, "PAGE_DATA: received before STATIC_DATA_END")


def test_p2m_frames_before_static_data_end(src64):
    def change(headers, records):
        del records[es.find(records, C.REC_STATIC_DATA_END)]

    fails(src64, mutate(src64, change), MalformedStream, "X86_PV_P2M_FRAMES: received before STATIC_DATA_END")


def test_p2m_frames_before_pv_info(src64):
    def change(headers, records):
        del records[es.find(records, C.REC_X86_PV_INFO)]

    fails(src64, mutate(src64, change), MalformedStream, "X86_PV_P2M_FRAMES: received before X86_PV_INFO")


def test_page_data_before_p2m_frames(src64):
    def change(headers, records):
        frames = records.pop(es.find(records, C.REC_X86_PV_P2M_FRAMES))
        records.insert(es.find(records, C.REC_X86_TSC_INFO), frames)

    fails(src64, mutate(src64, change), MalformedStream, "before X86_PV_P2M_FRAMES")


def test_shared_info_before_pv_info(src64):
    def change(headers, records):
        shared = records.pop(es.find(records, C.REC_SHARED_INFO))
        records.insert(0, shared)

    stream = mutate(src64, change)
    error = fails(src64, stream, MalformedStream, "SHARED_INFO: received before X86_PV_INFO")
    assert error.offset == record_offset(stream, 0)


@pytest.mark.parametrize("rtype, match", [(C.REC_X86_PV_INFO, "already received"),
                                          (C.REC_STATIC_DATA_END, "already received")])
def test_second_static_record(src64, rtype, match):
    def change(headers, records):
        index = es.find(records, rtype)
        records.insert(index + 1, es.Record(rtype, records[index].body))

    fails(src64, mutate(src64, change), MalformedStream, match)


def test_checkpoint_in_a_plain_stream(src64):
    def change(headers, records):
        records.insert(len(records) - 1, es.Record(C.REC_CHECKPOINT, b""))

    fails(src64, mutate(src64, change), MalformedStream, "CHECKPOINT in a plain")


@pytest.mark.parametrize("pair", [(8, 3), (4, 4), (2, 2)])
def test_invalid_width_levels(src64, pair):
    def change(headers, records):
        records[es.find(records, C.REC_X86_PV_INFO)].body = bytes(pair) + bytes(6)

    fails(src64, mutate(src64, change), MalformedStream, "width/levels")


def test_p2m_frames_bad_geometry(src64):
    def change(headers, records):
        index = es.find(records, C.REC_X86_PV_P2M_FRAMES)
        records[index].body = records[index].body + struct.pack("<Q", 0)

    fails(src64, mutate(src64, change), MalformedStream, "frames for pfns")


def test_p2m_frames_start_after_end(src64):
    def change(headers, records):
        index = es.find(records, C.REC_X86_PV_P2M_FRAMES)
        records[index].body = struct.pack("<II", 5, 4) + records[index].body[8:]

    fails(src64, mutate(src64, change), MalformedStream, "start pfn")


# ------------------------------------------------------------------ PAGE_DATA


def test_page_data_count_zero(src64):
    def change(headers, records):
        records[es.find(records, C.REC_PAGE_DATA)].body = struct.pack("<II", 0, 0)

    fails(src64, mutate(src64, change), MalformedStream, "count is 0")


def test_page_data_size_mismatch(src64):
    def change(headers, records):
        index = es.find(records, C.REC_PAGE_DATA)
        records[index].body = records[index].body[:-abi.PAGE_SIZE]

    fails(src64, mutate(src64, change), MalformedStream, "PAGE_DATA length")


@pytest.mark.parametrize("bad_type", [0x5, 0x8])
def test_page_data_unknown_type(src64, bad_type):
    def change(headers, records):
        index = es.find(records, C.REC_PAGE_DATA)
        records[index].body = es.set_page_entry(records[index].body, 0, 0, bad_type)

    fails(src64, mutate(src64, change), MalformedStream, "page type")


def test_pfn_beyond_max_pfn(src64):
    max_pfn = src64.digest.p2m_size - 1

    def change(headers, records):
        index = es.find(records, C.REC_PAGE_DATA, -1)
        pfns, types = es.page_data_entries(records[index].body)
        records[index].body = es.set_page_entry(records[index].body, len(pfns) - 1, max_pfn + 1, types[-1])

    fails(src64, mutate(src64, change), MalformedStream, "out of range")


def test_pte_naming_pfn_beyond_max_pfn(src64):
    table = next(t for t in src64.guest.layout.tables if t.level == 1)
    max_pfn = src64.digest.p2m_size - 1

    def change(headers, records):
        index, _, offset = es.locate_page(records, table.pfn)
        body = bytearray(records[index].body)
        struct.pack_into("<Q", body, offset + 8 * 7, ((max_pfn + 5) << 12) | abi.PTE_PRESENT)
        records[index].body = bytes(body)

    error = fails(src64, mutate(src64, change), MalformedStream, f"pfn {table.pfn:#x}")
    assert "entry 7" in str(error)


def test_same_pfn_twice_is_allowed_last_wins(src64):
    pfn = src64.guest.layout.kernel_pfns - 1

    def change(headers, records):
        index, _, offset = es.locate_page(records, pfn)
        page = bytes(range(256)) * 16
        records.insert(es.find(records, C.REC_X86_TSC_INFO),
                       es.Record(C.REC_PAGE_DATA, struct.pack("<IIQ", 1, 0, pfn) + page))

    xen, result = es.restore(mutate(src64, change), src64.spec)
    assert bytes(xen.machine.frame(result.p2m[pfn])) == bytes(range(256)) * 16
    assert result.pages_populated == src64.digest.p2m_size


def test_forward_reference_is_populated_on_demand():
    """8.5: pagetables arriving before the pages they map; the targets are filled by their own records."""
    src = es.make_source("pv64:mem=5M,vcpus=1,seed=23")
    _, records = es.split(src.stream)
    first = records[es.find(records, C.REC_PAGE_DATA)]
    pfns, types = es.page_data_entries(first.body)
    later = set()
    offset = 8 + 8 * len(pfns)
    for page_type in types:
        if abi.pagetable_level(page_type) == 1:
            entries = struct.unpack_from("<512Q", first.body, offset)
            later |= {abi.pte_frame(e) for e in entries if e & abi.PTE_PRESENT} - set(pfns)
        offset += abi.PAGE_SIZE * abi.pagetype_has_data(page_type)
    assert later, "precondition: the first record's L1 tables map pfns of later records"
    xen, result = es.restore(src.stream, src.spec)
    es.assert_same_guest(src.digest, es.restored_digest(xen, result), es.exempt_pfns(src.guest))
    assert result.pages_populated == src.digest.p2m_size


# ------------------------------------------------------------------ vcpu and shared records


@pytest.mark.parametrize("rtype", [C.REC_X86_PV_VCPU_BASIC, C.REC_X86_PV_VCPU_EXTENDED])
def test_vcpu_id_out_of_range(src64, rtype):
    def change(headers, records):
        index = es.find(records, rtype)
        records[index].body = struct.pack("<II", 99, 0) + records[index].body[8:]

    fails(src64, mutate(src64, change), MalformedStream, "vcpu 99 out of range")


@pytest.mark.parametrize("rtype, body_size, match", [
    (C.REC_X86_PV_VCPU_BASIC, 2800, "expected 5168"),
    (C.REC_X86_PV_VCPU_EXTENDED, 129, "at most 128"),
    (C.REC_X86_PV_VCPU_XSAVE, 15, "at least 16"),
    (C.REC_X86_PV_VCPU_MSRS, 24, "multiple of 16"),
])
def test_vcpu_blob_sizes(src64, rtype, body_size, match):
    def change(headers, records):
        records.insert(len(records) - 1, es.Record(rtype, struct.pack("<II", 0, 0) + bytes(body_size)))

    fails(src64, mutate(src64, change), MalformedStream, match)


def test_empty_vcpu_blob_is_skipped(src64):
    def change(headers, records):
        records.insert(len(records) - 1, es.Record(C.REC_X86_PV_VCPU_XSAVE, struct.pack("<II", 200, 0)))

    es.restore(mutate(src64, change), src64.spec)


@pytest.mark.parametrize("rtype, body, match", [
    (C.REC_SHARED_INFO, bytes(4095), "SHARED_INFO"),
    (C.REC_X86_TSC_INFO, bytes(16), "X86_TSC_INFO"),
    (C.REC_X86_CPUID_POLICY, bytes(25), "X86_CPUID_POLICY"),
    (C.REC_X86_MSR_POLICY, bytes(8), "X86_MSR_POLICY"),
])
def test_fixed_size_records(src64, rtype, body, match):
    def change(headers, records):
        records[es.find(records, rtype)].body = body

    fails(src64, mutate(src64, change), MalformedStream, match)


def test_no_basic_record_for_vcpu0(src64):
    def change(headers, records):
        index = next(i for i, r in enumerate(records)
                     if r.type == C.REC_X86_PV_VCPU_BASIC and struct.unpack_from("<I", r.body)[0] == 0)
        del records[index]

    stream = mutate(src64, change)
    error = fails(src64, stream, MalformedStream, "no X86_PV_VCPU_BASIC record for vcpu 0")
    assert error.offset == record_offset(stream, len(es.split(stream)[1]) - 1)


# ------------------------------------------------------------------ completion checks


def patch_basic(src: es.Source, field: str, value: int, index: int = 0) -> bytes:
    offset, fmt = es.vcpu_basic_word(src.spec.width, field)

    def change(headers, records):
        i = es.find(records, C.REC_X86_PV_VCPU_BASIC)
        body = bytearray(records[i].body)
        struct.pack_into(fmt, body, offset + index * src.spec.width, value)
        records[i].body = bytes(body)

    return mutate(src, change)


def test_start_info_pfn_out_of_range(src64):
    stream = patch_basic(src64, "rdx", src64.digest.p2m_size + 3)
    fails(src64, stream, MalformedStream, "start_info pfn .* out of range")


def test_start_info_not_notab(src64):
    table = src64.guest.layout.tables[0].pfn
    fails(src64, patch_basic(src64, "rdx", table), MalformedStream, "start_info pfn .* expected NOTAB")


def test_gdt_frame_not_notab(src64):
    table = src64.guest.layout.tables[0].pfn
    fails(src64, patch_basic(src64, "gdt_frames", table), MalformedStream, "GDT frame 0 pfn .* expected NOTAB")


def test_gdt_ents_too_large(src64):
    fails(src64, patch_basic(src64, "gdt_ents", abi.MAX_GDT_ENTS + 1), MalformedStream, "gdt_ents")


@pytest.mark.parametrize("fixture", ["src64", "src32"])
def test_cr3_not_a_top_level_table(request, fixture):
    src = request.getfixturevalue(fixture)
    layout = src.guest.layout
    value = abi.cr3_from_mfn(layout.start_info_pfn, src.spec.width)
    offset = abi.VCPU_CONTEXT_LAYOUTS[src.spec.width].ctrlreg_offset(3) - abi.VCPU_CONTEXT_LAYOUTS[src.spec.width].ctrlreg
    stream = patch_basic(src, "ctrlreg", value, offset // src.spec.width)
    fails(src, stream, MalformedStream, "cr3 pfn .* expected an L")


def test_cr1_not_an_l4(src64):
    layout = src64.guest.layout
    stream = patch_basic(src64, "ctrlreg", (layout.start_info_pfn << 12) | 1, 1)
    fails(src64, stream, MalformedStream, "cr1 pfn")


def test_p2m_frame_not_notab(src64):
    table = src64.guest.layout.tables[0].pfn

    def change(headers, records):
        index = es.find(records, C.REC_X86_PV_P2M_FRAMES)
        body = bytearray(records[index].body)
        struct.pack_into("<Q", body, 8, table)
        records[index].body = bytes(body)

    fails(src64, mutate(src64, change), MalformedStream, "P2M frame 0 pfn .* expected NOTAB")


def test_xalloc_start_info_fails_notab_check(src64):
    """5.9: an XALLOC page is populated without data and is not NOTAB."""
    pfn = src64.guest.layout.start_info_pfn

    def change(headers, records):
        index, entry, offset = es.locate_page(records, pfn)
        body = records[index].body
        records[index].body = es.set_page_entry(body[:offset] + body[offset + abi.PAGE_SIZE:], entry, pfn,
                                                abi.PAGETYPE_XALLOC)

    fails(src64, mutate(src64, change), MalformedStream, "type XALLOC, expected NOTAB")


def test_pin_refused_by_xen(src64):
    """A pinned table typed L1 that maps pagetables writable: Xen refuses the pin."""
    layout = src64.guest.layout
    roots = {r.kernel_root for r in layout.vcpus if r} | {r.user_root for r in layout.vcpus if r}
    victim = next(ref.pfn for ref in layout.pinned if ref.pfn not in roots)

    def change(headers, records):
        index, entry, _ = es.locate_page(records, victim)
        records[index].body = es.set_page_entry(records[index].body, entry, victim,
                                                abi.PAGETYPE_L1TAB | abi.PAGETYPE_LPINTAB)

    fails(src64, mutate(src64, change), MalformedStream, f"cannot pin L1 pagetable at pfn {victim:#x}")


def test_populate_failure_memory_limit(src64):
    fails(src64, src64.stream, MalformedStream, "cannot populate", max_pages=src64.spec.nr_pages // 2)


def test_restore_into_an_hvm_domain_is_refused(src64):
    xen = es.new_host(src64.spec)
    domid = xen.create_domain(max_vcpus=1, max_pages=16, hvm=True)
    with pytest.raises(UnsupportedStream, match="HVM"):
        PvRestorer(xen, domid)


def test_pv32_stream_switches_the_address_size(src32):
    xen, result = es.restore(src32.stream, src32.spec)
    assert xen.get_address_size(result.domid) == 32


def test_p2m_frames_beyond_what_the_domain_can_hold(src64):
    """No table is sized by an unchecked field: a huge end pfn is refused before anything is allocated."""
    def change(headers, records):
        index = es.find(records, C.REC_X86_PV_P2M_FRAMES)
        end = src64.spec.nr_pages + P2M_HOLE_ALLOWANCE
        frames = end // 512 + 1
        records[index].body = struct.pack("<II", 0, end) + bytes(8 * frames)

    fails(src64, mutate(src64, change), MalformedStream, "beyond what domain")


# ------------------------------------------------------------------ stream variants the restorer accepts


@pytest.mark.parametrize("via_fd", [False, True], ids=["fed", "fd"])
def test_verify_pass_compares_and_changes_nothing(src64, via_fd):
    """8.5: pages after VERIFY are compared, not written; a mismatch is counted and the guest keeps its page."""
    data_pfn = src64.guest.layout.kernel_pfns - 1

    def change(headers, records):
        full_pass = [r for r in records if r.type == C.REC_PAGE_DATA]
        tampered = es.Record(C.REC_PAGE_DATA, struct.pack("<IIQ", 1, 0, data_pfn) + b"tampered" * 512)
        at = es.find(records, C.REC_X86_TSC_INFO)
        records[at:at] = [es.Record(C.REC_VERIFY, b""), *full_pass, tampered]

    xen, result = es.restore(mutate(src64, change), src64.spec, via_fd=via_fd)
    assert result.verify_mismatches == 1
    es.assert_same_guest(src64.digest, es.restored_digest(xen, result), es.exempt_pfns(src64.guest))


def test_version_2_stream_infers_static_data_end(src64):
    def change(headers, records):
        headers[12:16] = struct.pack(">I", 2)
        records[:] = [r for r in records if r.type not in (C.REC_STATIC_DATA_END, C.REC_X86_CPUID_POLICY,
                                                         C.REC_X86_MSR_POLICY)]
        return headers

    xen, result = es.restore(mutate(src64, change), src64.spec)
    es.assert_same_guest(src64.digest, es.restored_digest(xen, result), es.exempt_pfns(src64.guest))
    assert xen.get_cpu_policy(result.domid) != src64.xen.get_cpu_policy(src64.guest.domid)


def test_xalloc_is_populated_without_data(src64):
    """5.9: XALLOC allocates the frame, carries no data; XTAB neither allocates nor writes."""
    layout = src64.guest.layout
    spare = layout.kernel_pfns - 1

    def change(headers, records):
        index, entry, offset = es.locate_page(records, spare)
        body = records[index].body
        records[index].body = es.set_page_entry(body[:offset] + body[offset + abi.PAGE_SIZE:], entry, spare,
                                                abi.PAGETYPE_XALLOC)

    xen, result = es.restore(mutate(src64, change), src64.spec)
    assert result.p2m[spare] != abi.INVALID_MFN
    assert result.pages_written == src64.digest.p2m_size - 1


def test_set_vcpu_context_refused_by_xen(src64):
    """A GDT frame that the guest also maps writable: the checks pass (NOTAB, consistent frame), Xen refuses."""
    layout = src64.guest.layout
    reserved = (layout.special_pfns | es.exempt_pfns(src64.guest) | set(layout.fl_pfns)
                | {layout.fll_pfn, layout.store_pfn})
    data_pfn = max(p.pfn for p in src64.digest.pages if p.type == "NOTAB" and p.pfn not in reserved
                   and p.pfn >= layout.kernel_pfns)  # ordinary memory: the direct map has it read-write
    stream = patch_basic(src64, "gdt_frames", data_pfn)
    error = fails(src64, stream, MalformedStream, "set vcpu0 context refused by the hypervisor")
    assert error.offset == record_offset(stream, len(es.split(stream)[1]) - 1)
