"""The v2 save and restore engines on the simulated Xen: record order, round trips, and spec 8.1 invariants."""

from __future__ import annotations

import io
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.v2 import engine_support as es
from xenstream.hv import abi
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.interface import HypervisorError
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.v2 import constants as C
from xenstream.v2.events import NEED_DATA, LibxcRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import PageData
from xenstream.v2.save import SaveError, save_pv
from xenstream.v2.snapshot import snapshot
from xenstream.v2.writer import V2Writer

GUESTS = ["pv64:mem=4M,vcpus=2,seed=3", "pv32:mem=4M,vcpus=3,online=2,seed=5"]


@pytest.fixture(scope="module", params=GUESTS)
def source(request) -> es.Source:
    return es.make_source(request.param)


def libxc_records(stream: bytes) -> list[LibxcRecord]:
    reader = V2Reader(layer="libxc")
    reader.feed(stream)
    reader.feed(b"")
    out = []
    while True:
        event = reader.next_event()
        assert event is not NEED_DATA
        if isinstance(event, LibxcRecord):
            out.append(event)
        elif event.__class__.__name__ == "EndOfStream":
            return out


def test_record_sequence_is_spec_3_3(source):
    records = libxc_records(source.stream)
    names = [r.type for r in records]
    vcpus_online = [v for v in source.digest.vcpus if v.online]
    expected_head = [C.REC_X86_PV_INFO, C.REC_X86_CPUID_POLICY, C.REC_X86_MSR_POLICY, C.REC_STATIC_DATA_END,
                     C.REC_X86_PV_P2M_FRAMES]
    assert names[:5] == expected_head
    pages = [r for r in records if r.type == C.REC_PAGE_DATA]
    p2m_size = source.digest.p2m_size
    assert len(pages) == -(-p2m_size // 1024)
    assert names[5:5 + len(pages)] == [C.REC_PAGE_DATA] * len(pages)
    # Every pfn 0..max_pfn exactly once, ascending, <= 1024 per record.
    pfns = [pfn for r in pages for pfn in r.body.pfns]
    assert pfns == list(range(p2m_size))
    tail = names[5 + len(pages):]
    assert tail[:2] == [C.REC_X86_TSC_INFO, C.REC_SHARED_INFO]
    assert tail[-1] == C.REC_END and names.count(C.REC_END) == 1
    vcpu_part = records[5 + len(pages) + 2:-1]
    groups = [r.body.vcpu_id for r in vcpu_part if r.type == C.REC_X86_PV_VCPU_BASIC]
    assert groups == [v.id for v in vcpus_online]
    order = {C.REC_X86_PV_VCPU_BASIC: 0, C.REC_X86_PV_VCPU_EXTENDED: 1, C.REC_X86_PV_VCPU_XSAVE: 2,
             C.REC_X86_PV_VCPU_MSRS: 3}
    keys = [(r.body.vcpu_id, order[r.type]) for r in vcpu_part]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    info = records[0].body
    assert (info.guest_width, info.pt_levels) == (source.spec.width, abi.LEVELS_FOR_WIDTH[source.spec.width])


def test_pagetables_in_stream_are_normalised(source):
    """8.3: no Xen slot set in a stream L4 / PAE L3, and every present PTE names a pfn <= max_pfn."""
    _, records = es.split(source.stream)
    max_pfn = source.digest.p2m_size - 1
    tables = 0
    for record in records:
        if record.type != C.REC_PAGE_DATA:
            continue
        pfns, types = es.page_data_entries(record.body)
        data = 8 + 8 * len(pfns)
        for pfn, page_type in zip(pfns, types):
            if not abi.pagetype_has_data(page_type):
                continue
            level = abi.pagetable_level(page_type)
            if level:
                tables += 1
                entries = struct.unpack_from("<512Q", record.body, data)
                if source.spec.width == abi.WIDTH_64 and level == 4:
                    assert not any(entries[i] for i in abi.L4_XEN_SLOTS_64)
                if source.spec.width == abi.WIDTH_32 and level == 3:
                    assert not any(entries[4:])
                for pte in entries:
                    if pte & abi.PTE_PRESENT:
                        assert abi.pte_frame(pte) <= max_pfn
            data += abi.PAGE_SIZE
    assert tables == sum(1 for p in source.digest.pages if p.type != "NOTAB")


def check_round_trip(src: es.Source, xen, result) -> None:
    layout = src.guest.layout
    target = es.restored_digest(xen, result)
    es.assert_same_guest(src.digest, target, es.exempt_pfns(src.guest))
    es.assert_p2m_bijection(xen, result)
    es.assert_start_info(xen, result, es.stream_page(src.stream, layout.start_info_pfn), layout)
    es.assert_shared_info(xen, result, es.shared_info_record(src.stream))
    es.assert_guest_p2m(xen, result, layout)
    console = xen.machine.frame(result.p2m[layout.console_pfn])
    assert console[abi.XENCONSOLE_CONNECTION_OFFSET] == abi.XENCONSOLE_DISCONNECTED
    before = bytearray(es.stream_page(src.stream, layout.console_pfn))
    before[abi.XENCONSOLE_CONNECTION_OFFSET] = abi.XENCONSOLE_DISCONNECTED
    assert bytes(console) == bytes(before)
    for vcpu in range(src.spec.vcpus):
        assert xen.get_vcpu_online(result.domid, vcpu) == src.xen.get_vcpu_online(src.guest.domid, vcpu)
        if xen.get_vcpu_online(result.domid, vcpu):
            for getter in ("get_ext_vcpu_context", "get_vcpu_xsave", "get_vcpu_msrs"):
                assert getattr(xen, getter)(result.domid, vcpu) == getattr(src.xen, getter)(src.guest.domid, vcpu)
    assert xen.get_tsc_info(result.domid) == src.xen.get_tsc_info(src.guest.domid)
    assert xen.get_cpu_policy(result.domid) == src.xen.get_cpu_policy(src.guest.domid)
    grant = xen.map_grant_frame(result.domid)
    assert struct.unpack_from("<HHI", grant, 0) == (abi.GTF_PERMIT_ACCESS, 0, result.console_mfn & 0xFFFFFFFF)
    assert struct.unpack_from("<HHI", grant, 8) == (abi.GTF_PERMIT_ACCESS, 0, result.store_mfn & 0xFFFFFFFF)
    resumed = PvGuest(xen, result.domid, layout)
    resumed.resume_new_domain()
    assert resumed.problems() == []


@pytest.mark.parametrize("via_fd", [False, True], ids=["fed", "fd"])
def test_save_restore_round_trip(source, via_fd):
    xen, result = es.restore(source.stream, source.spec, via_fd=via_fd)
    check_round_trip(source, xen, result)


@pytest.mark.parametrize("chunk", [1, 4093, 1 << 16])
def test_restore_is_independent_of_feeding(chunk):
    src = es.make_source("pv64:mem=1M,vcpus=1,seed=11")
    xen, result = es.restore(src.stream, src.spec, chunk=chunk)
    check_round_trip(src, xen, result)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 3 << 12), min_size=1, max_size=40),
       direct=st.lists(st.sampled_from(["feed", "feed_payload", "targets"]), min_size=1))
def test_passthrough_feeding_restores_the_same_guest(sizes, direct):
    """Passthrough mode fed by a driver: stream bytes through feed(), payload bytes through feed(),
    feed_payload() or copied into payload_targets() in any split, restore the guest as the views mode does."""
    from xenstream.v2.restore import PvRestorer

    src = _passthrough_source()
    xen = es.new_host(src.spec, 1)
    domid = xen.create_domain(max_vcpus=src.spec.vcpus, max_pages=src.spec.nr_pages)
    restorer = PvRestorer(xen, domid, store_evtchn=es.STORE_EVTCHN, console_evtchn=es.CONSOLE_EVTCHN,
                          payload="passthrough")
    stream, position, step = memoryview(src.stream), 0, 0
    while position < len(stream):
        n = sizes[step % len(sizes)]
        how = direct[step % len(direct)] if restorer.payload_remaining else "feed"
        if how == "feed_payload":
            n = min(n, restorer.payload_remaining)
            restorer.feed_payload(stream[position:position + n])
        elif how == "targets":
            n = _read_into(restorer.payload_targets(), stream[position:position + n])
            restorer.payload_filled(n)
        else:
            restorer.feed(stream[position:position + n])
        position += n
        step += 1
    check_round_trip(src, xen, restorer.finish())


def test_feed_payload_refuses_more_than_the_payload():
    from xenstream.v2.restore import PvRestorer

    src = _passthrough_source()
    xen = es.new_host(src.spec, 1)
    restorer = PvRestorer(xen, xen.create_domain(max_vcpus=src.spec.vcpus, max_pages=src.spec.nr_pages),
                          payload="passthrough")
    position = 0
    while not restorer.payload_remaining:
        restorer.feed(src.stream[position:position + 1])
        position += 1
    with pytest.raises(ValueError):
        restorer.feed_payload(bytes(restorer.payload_remaining + 1))


def _read_into(targets: list, data) -> int:
    """What readv does: fill the buffers in order from `data`; returns how many bytes moved."""
    moved = 0
    for target in targets:
        take = min(len(target), len(data) - moved)
        target[:take] = data[moved:moved + take]
        moved += take
        if moved == len(data):
            break
    return moved


_PASSTHROUGH_SOURCE: list = []


def _passthrough_source() -> es.Source:
    if not _PASSTHROUGH_SOURCE:
        _PASSTHROUGH_SOURCE.append(es.make_source("pv64:mem=2M,vcpus=2,seed=5"))
    return _PASSTHROUGH_SOURCE[0]


shapes = st.builds(
    lambda width, mem, vcpus, online, seed: f"{width}:mem={mem}M,vcpus={vcpus},online={min(online, vcpus)},seed={seed}",
    st.sampled_from(["pv64", "pv32"]), st.sampled_from([1, 2, 3, 5]), st.integers(1, 4), st.integers(1, 4),
    st.integers(0, 10_000))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=shapes, host_seed=st.integers(0, 1000), chunk=st.sampled_from([7, 4096, 1 << 20, "fd"]))
def test_round_trip_property(spec, host_seed, chunk):
    src = es.make_source(spec, host_seed)
    via_fd = chunk == "fd"
    xen, result = es.restore(src.stream, src.spec, host_seed=host_seed + 1, chunk=1 if via_fd else chunk,
                             via_fd=via_fd)
    check_round_trip(src, xen, result)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=shapes)
def test_save_restore_save_is_idempotent(spec):
    """8.1 item 9: a second hop carries the same guest; only pages holding mfns as data may differ."""
    src = es.make_source(spec)
    xen, result = es.restore(src.stream, src.spec)
    resumed = PvGuest(xen, result.domid, src.guest.layout)
    resumed.resume_new_domain()
    second = es.save_guest(xen, resumed)
    digest = snapshot(PvGuestView.open(xen, result.domid))
    layout = src.guest.layout
    holding_mfns = es.exempt_pfns(src.guest) | set(layout.fl_pfns) | {layout.fll_pfn}
    es.assert_same_guest(src.digest, digest, holding_mfns)
    first_records, second_records = es.split(src.stream)[1], es.split(second)[1]
    assert [r.type for r in first_records] == [r.type for r in second_records]
    for a, b in zip(first_records, second_records):
        if a.type == C.REC_PAGE_DATA:
            assert es.page_data_entries(a.body) == es.page_data_entries(b.body)
        elif a.type not in (C.REC_SHARED_INFO, C.REC_X86_TSC_INFO):
            assert a.body == b.body, f"record {a.type:#x} differs"


def test_normalisation_failure_names_pfn_and_entry():
    src = es.make_source("pv64:mem=1M,vcpus=1,seed=2")
    xen2 = es.new_host(src.spec)
    built = build_guest(xen2, src.spec)
    guest = PvGuest(xen2, built.domid, built.layout)
    foreign = xen2.create_domain(max_vcpus=1, max_pages=1)
    stranger = xen2.populate_physmap(foreign, [0])[0]
    table = next(t for t in built.layout.tables if t.level == 1)
    entries = xen2.machine.frame(guest.p2m(table.pfn)).cast("Q")
    index = next(i for i, pte in enumerate(entries) if not pte & abi.PTE_PRESENT)
    # The simulated Xen refuses a foreign frame in mmu_update, so plant it behind its back.
    xen2.machine.frame(guest.p2m(table.pfn))[index * 8:index * 8 + 8] = struct.pack(
        "<Q", (stranger << 12) | abi.PTE_PRESENT)
    with pytest.raises(SaveError) as caught:
        save_pv(xen2, guest.domid, V2Writer(io.BytesIO()), es.suspend_of(guest))
    message = str(caught.value)
    assert f"pfn {table.pfn:#x}" in message and f"entry {index}" in message


def test_save_refuses_a_domain_that_does_not_suspend():
    spec = "pv64:mem=1M,vcpus=1,seed=4"
    parsed = GuestSpec.parse(spec)
    xen = es.new_host(parsed)
    built = build_guest(xen, parsed)
    out = io.BytesIO()
    with pytest.raises(SaveError, match="not shut down for suspend"):
        save_pv(xen, built.domid, V2Writer(out), lambda: True)
    assert all(r.type != C.REC_END for r in es.split(out.getvalue())[1])
    with pytest.raises(SaveError, match="suspend callback failed"):
        save_pv(xen, built.domid, V2Writer(io.BytesIO()), lambda: False)
    with pytest.raises(SaveError, match="domain 99"):
        save_pv(xen, 99, V2Writer(io.BytesIO()), lambda: True)


def test_page_batches_use_one_type_query_and_one_map_each(source):
    xen, result = es.restore(source.stream, source.spec)
    resumed = PvGuest(xen, result.domid, source.guest.layout)
    resumed.resume_new_domain()
    before = dict(xen.calls)
    es.save_guest(xen, resumed)
    batches = -(-source.digest.p2m_size // 1024)
    assert xen.calls["get_page_types"] - before.get("get_page_types", 0) == batches
    pages = [r for r in libxc_records(source.stream) if r.type == C.REC_PAGE_DATA]
    assert all(isinstance(r.body, PageData) and 1 <= r.body.count <= 1024 for r in pages)


def test_ballooned_pfns_travel_as_xtab_and_stay_unpopulated():
    spec = GuestSpec.parse("pv32:mem=2M,vcpus=1,seed=41")
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    ballooned = []
    for pfn in range(spec.nr_pages - 2, 0, -5):
        try:
            guest.balloon_out(pfn)
        except HypervisorError:
            continue  # still mapped elsewhere
        ballooned.append(pfn)
        if len(ballooned) == 4:
            break
    stream = es.save_guest(xen, guest)
    digest = snapshot(PvGuestView.open(xen, guest.domid))
    _, records = es.split(stream)
    entries = {}
    for record in records:
        if record.type == C.REC_PAGE_DATA:
            entries.update(zip(*es.page_data_entries(record.body)))
    assert all(entries[pfn] == abi.PAGETYPE_XTAB for pfn in ballooned)
    xen2, result = es.restore(stream, spec)
    assert all(result.p2m[pfn] == abi.INVALID_MFN for pfn in ballooned)
    assert result.pages_populated == spec.nr_pages - len(ballooned)
    es.assert_same_guest(digest, es.restored_digest(xen2, result), es.exempt_pfns(guest))
    es.assert_guest_p2m(xen2, result, guest.layout)


def test_direct_payload_writes_give_the_same_stream(tmp_path):
    """payload_fd: pages written with writev from guest memory; byte-identical to the writer path."""
    spec = GuestSpec.parse("pv32:mem=5M,vcpus=2,seed=42")
    streams = []
    for direct in (False, True):
        xen = es.new_host(spec)
        built = build_guest(xen, spec)
        guest = PvGuest(xen, built.domid, built.layout)
        path = tmp_path / f"direct-{direct}.v2"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            result = save_pv(xen, guest.domid, V2Writer(fd), es.suspend_of(guest), payload_fd=fd if direct else None)
        finally:
            os.close(fd)
        assert result.bytes_written == path.stat().st_size
        streams.append(path.read_bytes())
    assert streams[0] == streams[1]


@settings(max_examples=60, deadline=None)
@given(first=st.integers(0, 1 << 40), types=st.lists(st.sampled_from(sorted(abi.KNOWN_PAGETYPES)), min_size=1,
                                                     max_size=1024))
def test_page_data_head_equals_the_writer_encoding(first, types):
    from xenstream.v2.save import page_data_head
    from xenstream.v2.writer import encode_page_data_header

    assert page_data_head(first, types) == encode_page_data_header(range(first, first + len(types)), types)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, (1 << 52) - 1), st.sampled_from(sorted(abi.KNOWN_PAGETYPES))),
                        min_size=1, max_size=1024))
def test_page_data_head_of_any_pfns_equals_the_writer_encoding(entries):
    from xenstream.v2.save import page_data_head_of
    from xenstream.v2.writer import encode_page_data_header

    pfns, types = [p for p, _ in entries], [t for _, t in entries]
    assert page_data_head_of(pfns, types) == encode_page_data_header(pfns, types)


def publish_linear_p2m(kind: str, l2_index: int = 0):
    """A built guest that also publishes its P2M as a linear list, mapped by private tables in four spare
    data pages at 512 GiB (64-bit) or 1 GiB (32-bit), plus `l2_index` 2 MiB steps."""
    spec = GuestSpec.parse(f"{kind}:mem=5M,vcpus=1,seed=44")
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    tree = PvGuestView.open(xen, guest.domid)
    assert not tree.linear_p2m
    # Private tables in four spare data pages map the leaves at 1 GiB (64-bit: L4 slot 1 = 512 GiB).
    spare = [spec.nr_pages - 2 - i for i in range(4)]
    frames = [guest.p2m(pfn) for pfn in spare]
    vaddr = (1 << 39 if spec.width == abi.WIDTH_64 else 1 << 30) + (l2_index << 21)
    chain = frames if spec.width == abi.WIDTH_64 else frames[1:]
    tables = {frame: [0] * 512 for frame in chain}
    indices = [1, 0, l2_index] if spec.width == abi.WIDTH_64 else [1, l2_index]
    for upper, lower, index in zip(chain, chain[1:], indices):
        tables[upper][index] = (lower << 12) | abi.PTE_PRESENT | abi.PTE_RW
    for i, leaf in enumerate(tree.leaf_mfns):
        tables[chain[-1]][i] = (leaf << 12) | abi.PTE_PRESENT
    for frame, entries in tables.items():
        xen.machine.frame(frame)[:] = struct.pack("<512Q", *entries)
    layout = abi.SHARED_INFO_LAYOUTS[spec.width]
    shared = xen.shared_info(guest.domid)
    for field, value in (("p2m_cr3", abi.cr3_from_mfn(chain[0], spec.width)), ("p2m_vaddr", vaddr),
                         ("p2m_generation", 2)):
        struct.pack_into(layout.word, shared, getattr(layout, field), value)
    return spec, xen, guest, tree


@pytest.mark.parametrize("kind", ["pv64", "pv32"])
def test_linear_p2m_list_is_walked_like_the_tree(kind):
    """A guest publishing its P2M as a linear list (p2m_cr3/p2m_vaddr) saves and restores the same guest."""
    spec, xen, guest, tree = publish_linear_p2m(kind)
    linear = PvGuestView.open(xen, guest.domid)
    assert linear.linear_p2m
    assert (linear.leaf_mfns, linear.max_pfn, linear.p2m_pfns) == (tree.leaf_mfns, tree.max_pfn, tree.p2m_pfns)
    stream = es.save_guest(xen, guest)
    digest = snapshot(PvGuestView.open(xen, guest.domid))
    xen2, result = es.restore(stream, spec)
    es.assert_same_guest(digest, es.restored_digest(xen2, result), es.exempt_pfns(guest))


def test_unaligned_linear_p2m_hits_xens_trim_and_fails_clearly():
    """Spec 1.3 quirk: Xen's level-2 trim compares a relative index with an absolute one, so a list whose
    single level-2 entry is not the first of its table trims to nothing. Reproduced, and said clearly."""
    spec, xen, guest, _ = publish_linear_p2m("pv64", l2_index=5)
    with pytest.raises(SaveError, match="trims to no pfn"):
        save_pv(xen, guest.domid, V2Writer(io.BytesIO()), es.suspend_of(guest))
