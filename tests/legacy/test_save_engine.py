"""The legacy (Xen 4.5 style) save engine: faithful v1 streams from simulated guests, both toolstack widths."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.v2 import engine_support as es
from xenstream.convert.commands.restore import legacy_chunks
from xenstream.hv import abi
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.interface import HypervisorError
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.legacy.save import LegacySaveError, save_pv_legacy
from xenstream.v2.restore import restore_new_domain
from xenstream.v2.snapshot import snapshot

CASES = [(w, g) for w in (64, 32) for g in ("pv64:mem=2M,vcpus=2,seed=31", "pv32:mem=2M,vcpus=3,online=2,seed=32")]


class LegacySource:
    def __init__(self, text: str, width: int, balloon: int = 0):
        self.spec = GuestSpec.parse(text)
        self.xen = es.new_host(self.spec)
        built = build_guest(self.xen, self.spec)
        self.guest = PvGuest(self.xen, built.domid, built.layout)
        self.ballooned = []
        for pfn in range(self.spec.nr_pages - 2, 0, -3):
            if len(self.ballooned) == balloon:
                break
            try:
                self.guest.balloon_out(pfn)  # refused while something else (a user mapping) holds the page
            except HypervisorError:
                continue
            self.ballooned.append(pfn)
        assert len(self.ballooned) == balloon
        out = io.BytesIO()
        self.result = save_pv_legacy(self.xen, self.guest.domid, out, toolstack_width=width,
                                     suspend=es.suspend_of(self.guest))
        self.stream = out.getvalue()
        self.digest = snapshot(PvGuestView.open(self.xen, self.guest.domid))


@pytest.fixture(scope="module", params=CASES, ids=[f"w{w}-{g.split(':')[0]}" for w, g in CASES])
def legacy(request) -> tuple[int, LegacySource]:
    width, text = request.param
    return width, LegacySource(text, width)


def parse(stream: bytes, width: int | None = None) -> list[ev.Event]:
    parser = LegacyParser(width=width)
    parser.feed(stream)
    parser.feed(b"")
    events = []
    while (event := parser.next_event()) is not DONE:
        assert event is not NEED_DATA
        events.append(event)
    return events


def test_stream_shape_is_a_45_non_live_pv_save(legacy):
    width, src = legacy
    events = parse(src.stream)
    detected = events[0]
    assert isinstance(detected, ev.Detected)
    assert (detected.width, detected.guest, detected.guest_width) == (width, "pv", src.spec.width)
    kinds = [type(e).__name__ for e in events[1:]]
    batches = kinds.count("PageBatch")
    assert kinds[:4] == ["P2mSize", "ExtendedInfo", "P2mFrames", "TscInfo"]
    assert kinds[4:4 + batches] == ["PageBatch"] * batches
    online = [v for v in range(src.spec.vcpus) if src.xen.get_vcpu_online(src.guest.domid, v)]
    tail = ["VcpuInfo", "Toolstack", "LastCheckpoint", "EndOfBody", "UnmappedPfns"]
    tail += ["VcpuBasic", "VcpuExtended", "VcpuXsave"] * len(online) + ["SharedInfo"]
    assert kinds[4 + batches:4 + batches + len(tail)] == tail
    info = next(e for e in events if isinstance(e, ev.ExtendedInfo))
    assert [b.block_id for b in info.blocks] == [c.EXT_BLOCK_VCPU, c.EXT_BLOCK_EXTV, c.EXT_BLOCK_XCNT]
    vcpu_info = next(e for e in events if isinstance(e, ev.VcpuInfo))
    assert vcpu_info.online == tuple(online)
    extended = [e for e in events if isinstance(e, ev.VcpuExtended)]
    assert all(len(e.data) == c.EXTENDED_CONTEXT_SIZE for e in extended)
    toolstack = next(e for e in events if isinstance(e, ev.Toolstack))
    assert toolstack.data == struct.pack("<II", 1, 0)
    shared = next(e for e in events if isinstance(e, ev.SharedInfo))
    layout = abi.SHARED_INFO_LAYOUTS[src.spec.width]
    assert int.from_bytes(shared.data[layout.pfn_to_mfn_frame_list_list:][:src.spec.width], "little") == 0


def test_every_mapped_pfn_once_in_order(legacy):
    width, src = legacy
    batches = [e for e in parse(src.stream, width) if isinstance(e, ev.PageBatch)]
    assert all(1 <= b.count <= c.MAX_BATCH_SIZE for b in batches)
    pfns = [p for b in batches for p in b.pfns]
    assert pfns == list(range(src.result.p2m_size))
    assert src.result.p2m_size == src.spec.nr_pages


def test_pagetables_are_canonical_by_45_rules(legacy):
    width, src = legacy
    tables = 0
    for batch in (e for e in parse(src.stream, width) if isinstance(e, ev.PageBatch)):
        data = 0
        for pfn, page_type in zip(batch.pfns, batch.types):
            if not abi.pagetype_has_data(page_type):
                continue
            level = abi.pagetable_level(page_type)
            page = struct.unpack_from("<512Q", batch.payload, data)
            data += abi.PAGE_SIZE
            if not level:
                continue
            tables += 1
            if src.spec.width == abi.WIDTH_64 and level == 4:
                assert not any(page[i] for i in abi.L4_XEN_SLOTS_64)
            if src.spec.width == abi.WIDTH_32 and level == 3:
                assert not any(page[4:])
                assert all(not e & (abi.PTE_RW | abi.PTE_USER | abi.PTE_ACCESSED) for e in page[:4])
            top_l2 = src.spec.width == abi.WIDTH_32 and level == 2 and page[abi.PAE_L2_XEN_FIRST] != 0
            if top_l2:
                # 64-bit tools cannot spot the compat M2P: its mappings stay, zapped to frame 0.
                assert width == 64
                assert all(abi.pte_frame(e) == 0 for e in page[abi.PAE_L2_XEN_FIRST:])
            for pte in page:
                if pte & abi.PTE_PRESENT:
                    assert abi.pte_frame(pte) < src.result.p2m_size
    assert tables == sum(1 for p in src.digest.pages if p.type != "NOTAB")


def test_ballooned_pfns_are_unmapped_not_sent():
    src = LegacySource("pv64:mem=2M,vcpus=1,seed=33", 64, balloon=3)
    events = parse(src.stream, 64)
    sent = {p for e in events if isinstance(e, ev.PageBatch) for p in e.pfns}
    unmapped = next(e for e in events if isinstance(e, ev.UnmappedPfns))
    assert sorted(unmapped.pfns) == sorted(src.ballooned) and list(unmapped.pfns) == sorted(unmapped.pfns)
    assert not sent & set(src.ballooned)


def test_convert_then_restore_is_the_same_guest(legacy):
    """legacy save -> convert (our transformer) -> v2 restore: the same guest modulo MFN renumbering."""
    width, src = legacy
    xen = es.new_host(src.spec, seed=7)
    result = restore_new_domain(xen, legacy_chunks(src.stream[:48], [src.stream[48:]]), max_vcpus=src.spec.vcpus,
                                max_pages=src.spec.nr_pages, store_evtchn=es.STORE_EVTCHN,
                                console_evtchn=es.CONSOLE_EVTCHN)
    target = es.restored_digest(xen, result)
    es.assert_same_guest(src.digest, target, es.exempt_pfns(src.guest))
    es.assert_p2m_bijection(xen, result)
    es.assert_guest_p2m(xen, result, src.guest.layout)
    for vcpu in range(src.spec.vcpus):
        if xen.get_vcpu_online(result.domid, vcpu):
            assert xen.get_vcpu_xsave(result.domid, vcpu) == src.xen.get_vcpu_xsave(src.guest.domid, vcpu)
            assert xen.get_vcpu_msrs(result.domid, vcpu) == b""  # v1 cannot carry them
    resumed = PvGuest(xen, result.domid, src.guest.layout)
    resumed.resume_new_domain()
    assert resumed.problems() == []


def test_msrs_refused_when_asked_like_45():
    spec = GuestSpec.parse("pv64:mem=1M,vcpus=4,seed=34")
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    assert any(xen.get_vcpu_msrs(guest.domid, v) for v in range(spec.vcpus))
    with pytest.raises(LegacySaveError, match="MSRs"):
        save_pv_legacy(xen, guest.domid, io.BytesIO(), suspend=es.suspend_of(guest), refuse_msrs=True)


def test_fatal_pagetable_race_names_pfn_and_entry():
    spec = GuestSpec.parse("pv64:mem=1M,vcpus=1,seed=35")
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    other = xen.create_domain(max_vcpus=1, max_pages=1)
    stranger = xen.populate_physmap(other, [0])[0]
    table = next(t for t in built.layout.tables if t.level == 1)
    frame = xen.machine.frame(guest.p2m(table.pfn))
    index = next(i for i, pte in enumerate(frame.cast("Q")) if not pte & abi.PTE_PRESENT)
    frame[index * 8:index * 8 + 8] = struct.pack("<Q", (stranger << 12) | abi.PTE_PRESENT)
    with pytest.raises(LegacySaveError, match=f"pfn {table.pfn:#x}, entry {index}"):
        save_pv_legacy(xen, guest.domid, io.BytesIO(), suspend=es.suspend_of(guest))


def test_unsuspended_guest_is_refused():
    spec = GuestSpec.parse("pv32:mem=1M,vcpus=1,seed=36")
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    with pytest.raises(LegacySaveError, match="not shut down for suspend"):
        save_pv_legacy(xen, built.domid, io.BytesIO(), suspend=lambda: True)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["pv64", "pv32"]), mem=st.sampled_from([1, 2, 3]), vcpus=st.integers(1, 3),
       online=st.integers(1, 3), seed=st.integers(0, 10_000), width=st.sampled_from([32, 64]))
def test_legacy_round_trip_property(kind, mem, vcpus, online, seed, width):
    """legacy save -> convert -> restore over random guest shapes and both toolstack widths (spec 8.1)."""
    src = LegacySource(f"{kind}:mem={mem}M,vcpus={vcpus},online={min(online, vcpus)},seed={seed}", width)
    xen = es.new_host(src.spec, seed=seed + 1)
    result = restore_new_domain(xen, legacy_chunks(src.stream[:48], [src.stream[48:]]), max_vcpus=src.spec.vcpus,
                                max_pages=src.spec.nr_pages)
    es.assert_same_guest(src.digest, es.restored_digest(xen, result), es.exempt_pfns(src.guest))
    es.assert_p2m_bijection(xen, result)
