"""The v2 HVM save and restore engines: the record sequence of spec 6.2, round trips (spec 8.2), the
libxl emulator records, and every refusal leaving no half-built domain."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.v2 import hvm_support as hs
from xenstream.hv import abi, hvm_context, hvm_params
from xenstream.v2 import constants as C
from xenstream.v2.errors import MalformedStream, StreamError, TruncatedStream, UnsupportedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxcRecord, LibxlRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.restore_hvm import HvmRestorer, restore_hvm_new_domain
from xenstream.v2.save import SaveError
from xenstream.v2.save_hvm import save_hvm
from xenstream.v2.snapshot_hvm import hvm_snapshot
from xenstream.v2.writer import V2Writer, encode_record

XTAB = abi.PAGETYPE_XTAB


def events(stream: bytes) -> list:
    reader = V2Reader(layer="auto")
    reader.feed(stream)
    reader.feed(b"")
    out = []
    while True:
        event = reader.next_event()
        assert event is not NEED_DATA
        out.append(event)
        if isinstance(event, EndOfStream):
            return out


def records(stream: bytes) -> list[tuple[str, int, object]]:
    return [("libxc" if isinstance(e, LibxcRecord) else "libxl", e.type, e) for e in events(stream)
            if isinstance(e, (LibxcRecord, LibxlRecord))]


@pytest.fixture(scope="module")
def source() -> hs.Saved:
    return hs.saved()


@pytest.fixture(scope="module")
def restored(source):
    return hs.restore(source.stream)


def test_record_sequence_is_xens(source):
    seq = records(source.stream)
    kinds = [(layer, rtype) for layer, rtype, _ in seq]
    pages = [k for k in kinds if k == ("libxc", C.REC_PAGE_DATA)]
    expected = ([("libxl", C.LIBXL_REC_LIBXC_CONTEXT), ("libxc", C.REC_X86_CPUID_POLICY), ("libxc", C.REC_X86_MSR_POLICY),
                 ("libxc", C.REC_STATIC_DATA_END)] + pages
                + [("libxc", C.REC_X86_TSC_INFO), ("libxc", C.REC_HVM_CONTEXT), ("libxc", C.REC_HVM_PARAMS),
                   ("libxc", C.REC_END), ("libxl", C.LIBXL_REC_EMULATOR_XENSTORE_DATA),
                   ("libxl", C.LIBXL_REC_EMULATOR_CONTEXT), ("libxl", C.LIBXL_REC_END)])
    assert kinds == expected
    header = [e for e in events(source.stream) if type(e).__name__ == "Header"]
    domain = header[-1].header
    assert domain.guest_type == C.DOMAIN_TYPE_X86_HVM
    assert header[-2].header.version == 3


def test_page_data_covers_every_gfn_once_raw(source):
    seen, data_pfns = [], []
    for layer, rtype, event in records(source.stream):
        if (layer, rtype) == ("libxc", C.REC_PAGE_DATA):
            pfns, types = event.body.pfns, event.body.types
            assert 1 <= len(pfns) <= 1024 and list(pfns) == sorted(pfns)
            assert set(types) <= {abi.PAGETYPE_NOTAB, XTAB}
            seen += pfns
            data_pfns += [p for p, t in zip(pfns, types) if t != XTAB]
    assert seen == list(range(source.digest.p2m_size))
    assert data_pfns == [page.pfn for page in source.digest.pages]


def test_params_record_holds_the_nonzero_migrated_params_in_xen_order(source):
    params = next(e.body.params for l, t, e in records(source.stream) if (l, t) == ("libxc", C.REC_HVM_PARAMS))
    xen, domid = source.xen, source.built.domid
    expected = [(i, xen.get_hvm_param(domid, i)) for i in hvm_params.MIGRATED if xen.get_hvm_param(domid, i)]
    assert list(params) == expected
    assert hvm_params.STORE_EVTCHN not in dict(params) and hvm_params.PAE_ENABLED not in dict(params)


def test_params_record_is_omitted_when_all_are_zero():
    xen, guest = hs.build("hvm:mem=1M,seed=3")
    xen.domains[guest.domid].hvm_params.clear()  # a domain nothing was ever set on (Xen refuses a zero VM86_TSS_SIZED)
    stream = hs.save_v2(xen, guest, libxl=False)
    assert ("libxc", C.REC_HVM_PARAMS) not in [(l, t) for l, t, _ in records(stream)]


def test_round_trip_restores_the_guest(source, restored):
    xen, result = restored
    digest = hvm_snapshot(xen, result.domid)
    cleared = {source.built.layout.special[i] for i in (3, 4, 5, 7)}  # bufioreq, store, ioreq, console
    before, after = source.digest.by_pfn(), digest.by_pfn()
    assert before.keys() == after.keys()
    assert [p for p in before if before[p] != after[p]] == sorted(p for p in cleared if before[p] != after[p])
    assert digest.context_sha256 == source.digest.context_sha256
    assert xen.get_hvm_context(result.domid) == source.xen.get_hvm_context(source.built.domid)
    assert digest.params == source.digest.params
    assert digest.vcpus_online == source.digest.vcpus_online
    assert (xen.get_hvm_param(result.domid, hvm_params.STORE_EVTCHN),
            xen.get_hvm_param(result.domid, hvm_params.CONSOLE_EVTCHN)) == (1, 2)
    assert xen.get_tsc_info(result.domid) == source.xen.get_tsc_info(source.built.domid)
    assert xen.get_cpu_policy(result.domid) == source.xen.get_cpu_policy(source.built.domid)


def test_special_pages_are_cleared_and_results_match_params(source, restored):
    xen, result = restored
    special = source.built.layout.special
    pages = dict(zip(special, xen.map_foreign(result.domid, list(special))))
    for index in (3, 4, 5):
        assert bytes(pages[special[index]]) == bytes(abi.PAGE_SIZE)
    console = bytearray(abi.PAGE_SIZE)
    console[abi.XENCONSOLE_CONNECTION_OFFSET] = abi.XENCONSOLE_DISCONNECTED
    assert bytes(pages[special[7]]) == bytes(console)
    assert result.store_gfn == xen.get_hvm_param(result.domid, hvm_params.STORE_PFN) == special[4]
    assert result.console_gfn == xen.get_hvm_param(result.domid, hvm_params.CONSOLE_PFN) == special[7]
    grant = xen.map_grant_frame(result.domid)
    assert struct.unpack_from("<HHI", grant, 8) == (abi.GTF_PERMIT_ACCESS, 0, special[4])


def test_emulator_records_come_back_to_the_caller(source, restored):
    _, result = restored
    assert result.emulator_id == C.EMULATOR_QEMU_UPSTREAM
    assert result.emulator_context == source.built.emulator.context
    assert list(result.xenstore) == source.built.emulator.xenstore_pairs()


def test_save_restore_save_gives_the_same_stream(source, restored):
    """The restorer clears the store, ioreq and buffered-ioreq pages and resets the console (Xen's
    restore does), so the second stream differs from the first in exactly those pages' payloads;
    from then on every hop is byte-identical."""
    xen, result = restored
    second = hs.resave(xen, result, source.built.emulator.physmap)
    first_records, second_records = records(source.stream), records(second)
    assert [(l, t) for l, t, _ in first_records] == [(l, t) for l, t, _ in second_records]
    differing = [e.body.pfns[0] for (l, t, e), (_, _, f) in zip(first_records, second_records)
                 if (l, t) == ("libxc", C.REC_PAGE_DATA) and e.body != f.body]
    assert differing == []
    xen3, result3 = hs.restore(second)
    assert hs.resave(xen3, result3, source.built.emulator.physmap) == second
    assert len(second) == len(source.stream)


def test_restore_from_an_fd_equals_restore_from_chunks(source, restored, tmp_path):
    path = tmp_path / "hvm.v2"
    path.write_bytes(source.stream)
    spec = hs.HvmGuestSpec.parse(hs.SPEC)
    xen = hs.host(spec)
    fd = os.open(path, os.O_RDONLY)
    try:
        result = restore_hvm_new_domain(xen, fd, initial=os.read(fd, 100), max_vcpus=3, max_pages=spec.nr_pages + 16)
    finally:
        os.close(fd)
    ref_xen, ref = restored
    assert hvm_snapshot(xen, result.domid) == hvm_snapshot(ref_xen, ref.domid)
    assert result.xenstore == ref.xenstore and result.emulator_context == ref.emulator_context


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 1 << 20), min_size=1, max_size=40).filter(lambda s: sum(s) > 1 << 18))
def test_any_chunking_gives_the_same_guest(source, restored, sizes):
    stream, chunks, pos, k = source.stream, [], 0, 0
    while pos < len(stream):
        size = sizes[k % len(sizes)]
        chunks.append(stream[pos:pos + size])
        pos, k = pos + size, k + 1
    xen, result = hs.restore(stream, chunks=chunks)
    ref_xen, ref = restored
    assert hvm_snapshot(xen, result.domid) == hvm_snapshot(ref_xen, ref.domid)


def test_tail_fed_one_byte_at_a_time(source, restored):
    last_page = max(e.offset for e in events(source.stream) if isinstance(e, LibxcRecord) and e.type == C.REC_PAGE_DATA)
    stream = source.stream
    chunks = [stream[:last_page + 16]] + [stream[i:i + 1] for i in range(last_page + 16, len(stream))]
    xen, result = hs.restore(stream, chunks=chunks)
    ref_xen, ref = restored
    assert hvm_snapshot(xen, result.domid) == hvm_snapshot(ref_xen, ref.domid)


def test_bare_libxc_stream_restores_without_emulator(source):
    xen, guest = hs.build()
    stream = hs.save_v2(xen, guest, libxl=False)
    _, result = hs.restore(stream)
    assert result.emulator_context is None and result.xenstore == ()
    assert result.context == xen.get_hvm_context(guest.domid)


# ------------------------------------------------------------------ refusals


def _replace_record(stream: bytes, rtype: int, body: bytes) -> bytes:
    event = next(e for e in events(stream) if isinstance(e, LibxcRecord) and e.type == rtype)
    old_len = 8 + event.length + (-event.length % 8)
    return stream[:event.offset] + encode_record(rtype, body) + stream[event.offset + old_len:]


def _refused(stream: bytes, error=MalformedStream) -> StreamError:
    spec = hs.HvmGuestSpec.parse(hs.SPEC)
    xen = hs.host(spec)
    with pytest.raises(error) as info:
        restore_hvm_new_domain(xen, [stream], max_vcpus=3, max_pages=spec.nr_pages + 16)
    assert xen.domains == {}  # the half-built domain is gone
    return info.value


@pytest.mark.parametrize("damage", ["magic", "no-end", "overlong", "vcpu"])
def test_corrupted_context_is_refused_and_the_domain_destroyed(source, damage):
    blob = bytearray(source.xen.get_hvm_context(source.built.domid))
    end = hvm_context.list_records(blob)[-1].offset
    if damage == "magic":
        blob[8:12] = b"\0\0\0\0"
    elif damage == "no-end":
        blob = blob[:end]
    elif damage == "overlong":
        struct.pack_into("<I", blob, 8 + 24 + 4, 1 << 20)
    else:
        struct.pack_into("<H", blob, 8 + 24 + 2, 9)
    stream = _replace_record(source.stream, C.REC_HVM_CONTEXT, bytes(blob))
    error = _refused(stream)
    assert "HVM context" in str(error) and "refused" in str(error)
    end_offset = next(e.offset for e in events(stream) if isinstance(e, LibxcRecord) and e.type == C.REC_END)
    assert error.offset == end_offset


def test_missing_context_is_refused(source):
    stream = b"".join(_drop(source.stream, C.REC_HVM_CONTEXT))
    assert "no HVM_CONTEXT" in str(_refused(stream))


def _drop(stream: bytes, rtype: int):
    event = next(e for e in events(stream) if isinstance(e, LibxcRecord) and e.type == rtype)
    yield stream[:event.offset]
    yield stream[event.offset + 8 + event.length + (-event.length % 8):]


def test_empty_context_is_refused(source):
    assert "empty" in str(_refused(_replace_record(source.stream, C.REC_HVM_CONTEXT, b"")))


def test_bad_params_record_is_refused(source):
    body = struct.pack("<II", 2, 0) + struct.pack("<QQ", 1, 5)
    assert "HVM_PARAMS" in str(_refused(_replace_record(source.stream, C.REC_HVM_PARAMS, body)))
    unknown = struct.pack("<IIQQ", 1, 0, 200, 1)
    assert "param" in str(_refused(_replace_record(source.stream, C.REC_HVM_PARAMS, unknown)))


def test_truncated_stream_is_refused(source):
    _refused(source.stream[:len(source.stream) // 2], TruncatedStream)
    _refused(source.stream[:-40], TruncatedStream)


def test_pv_record_in_an_hvm_stream_is_refused(source):
    stream = _replace_record(source.stream, C.REC_X86_TSC_INFO, bytes(4096))
    stream = stream.replace(struct.pack("<II", C.REC_X86_TSC_INFO, 4096), struct.pack("<II", C.REC_SHARED_INFO, 4096), 1)
    assert "not valid in an HVM stream" in str(_refused(stream))


def test_streams_and_domains_of_the_other_type_are_refused(source):
    from tests.v2 import engine_support as es
    from xenstream.v2.restore import restore_new_domain
    pv = es.make_source("pv64:mem=1M,vcpus=1,seed=1")
    assert "x86 PV" in str(_refused(pv.stream, UnsupportedStream))
    xen = hs.host(hs.HvmGuestSpec.parse(hs.SPEC))
    with pytest.raises(UnsupportedStream):
        restore_new_domain(xen, [source.stream], max_vcpus=3, max_pages=4096)
    with pytest.raises(UnsupportedStream):
        HvmRestorer(xen, xen.create_domain(max_pages=16))


def test_memory_over_the_limit_is_refused(source):
    spec = hs.HvmGuestSpec.parse(hs.SPEC)
    xen = hs.host(spec)
    with pytest.raises(MalformedStream) as info:
        restore_hvm_new_domain(xen, [source.stream], max_vcpus=3, max_pages=spec.nr_pages // 2)
    assert "populate" in str(info.value) and xen.domains == {}


def test_bad_xenstore_key_is_refused(source):
    from xenstream.v2.libxl_records import EmulatorXenstoreData
    event = next(e for e in events(source.stream) if isinstance(e, LibxlRecord)
                 and e.type == C.LIBXL_REC_EMULATOR_XENSTORE_DATA)
    bad = EmulatorXenstoreData.from_pairs([(b"/abs", b"1")]).pack()
    old = 8 + event.length + (-event.length % 8)
    stream = source.stream[:event.offset] + encode_record(event.type, bad) + source.stream[event.offset + old:]
    assert "key" in str(_refused(stream))


def test_save_refuses_pv_domains_and_failed_suspends():
    from tests.v2 import engine_support as es
    pv = es.make_source("pv64:mem=1M,vcpus=1,seed=1")
    import io
    with pytest.raises(SaveError):
        save_hvm(pv.xen, pv.guest.domid, V2Writer(io.BytesIO()), lambda: True)
    xen, guest = hs.build("hvm:mem=1M,seed=4")
    calls = []
    sink = io.BytesIO()
    with pytest.raises(SaveError):
        save_hvm(xen, guest.domid, V2Writer(sink), lambda: False, qemu_logdirty=calls.append)
    assert calls == [True, False] and C.REC_END not in [t for _, t, _ in records_unchecked(sink.getvalue())]
    with pytest.raises(SaveError, match="not shut down"):
        save_hvm(xen, guest.domid, V2Writer(io.BytesIO()), lambda: True)


def records_unchecked(stream: bytes):
    reader = V2Reader(layer="auto")
    reader.feed(stream)
    out = []
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            return out
        if isinstance(event, LibxcRecord):
            out.append(("libxc", event.type, event))


def test_a_gfn_sent_twice_is_populated_once_and_holds_the_last_copy(source, restored):
    page_data = [e for e in events(source.stream) if isinstance(e, LibxcRecord) and e.type == C.REC_PAGE_DATA]
    record = page_data[1]
    size = 8 + record.length
    original = source.stream[record.offset:record.offset + size]
    changed = bytearray(original)
    changed[size - abi.PAGE_SIZE:] = b"\xa5" * abi.PAGE_SIZE  # the record's last page
    at = record.offset + size
    xen, result = hs.restore(source.stream[:at] + bytes(changed) + source.stream[at:])
    assert result.pages_populated == restored[1].pages_populated
    last = [p for p, t in zip(record.body.pfns, record.body.types) if t == abi.PAGETYPE_NOTAB][-1]
    assert bytes(xen.map_foreign(result.domid, [last])[0]) == b"\xa5" * abi.PAGE_SIZE


def test_a_v2_stream_without_static_data_restores(source, restored):
    """Xen 4.6-4.13 HVM streams: version 2, no STATIC_DATA_END and no policy records (spec 3.22/3.23)."""
    from xenstream.v2.records import ImageHeader
    stream = hs.save_v2(*hs.build(), libxl=False)
    for rtype in (C.REC_X86_CPUID_POLICY, C.REC_X86_MSR_POLICY, C.REC_STATIC_DATA_END):
        stream = b"".join(_drop(stream, rtype))
    stream = ImageHeader(version=2).pack() + stream[len(ImageHeader().pack()):]
    xen, result = hs.restore(stream)
    digest = hvm_snapshot(xen, result.domid)
    ref_xen, ref = restored
    assert digest.pages == hvm_snapshot(ref_xen, ref.domid).pages
    assert xen.get_cpu_policy(result.domid).cpuid == b""  # no policy in the stream: the domain keeps its own


def test_every_migrated_param_survives():
    spec = "hvm:mem=1M,vcpus=2,seed=2"  # a seed whose guest has all sixteen migrated params non-zero
    xen, guest = hs.build(spec)
    before = {i: xen.get_hvm_param(guest.domid, i) for i in hvm_params.MIGRATED}
    assert all(before.values())
    restored_xen, result = hs.restore(hs.save_v2(xen, guest), spec)
    assert {i: restored_xen.get_hvm_param(result.domid, i) for i in hvm_params.MIGRATED} == before
    assert [i for i, _ in result.params] == list(hvm_params.MIGRATED)
