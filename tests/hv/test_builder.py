"""The seeded guest builder: spec strings, determinism, realism, self-consistency."""

from __future__ import annotations

import zlib
from array import array

import attrs
import pytest

from xenstream.hv import abi
from xenstream.hv.interface import VcpuContext
from xenstream.hv.sim.builder import GuestSpec, GuestSpecError, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.xen import SimXen

SPECS = ["pv64:mem=8M,vcpus=3,online=2,seed=1", "pv32:mem=8M,vcpus=2,seed=4", "pv64:mem=3M,seed=0",
         "pv32:mem=5M,vcpus=4,online=1,seed=9"]


def _build(spec: str, host_seed: int = 0):
    xen = SimXen(capacity_frames=1 << 14, seed=host_seed)
    built = build_guest(xen, spec)
    return xen, built, PvGuest(xen, built.domid, built.layout)


def test_spec_parsing():
    spec = GuestSpec.parse("pv64:mem=256M,vcpus=2,seed=7")
    assert (spec.width, spec.nr_pages, spec.vcpus, spec.online, spec.seed) == (8, 65536, 2, 2, 7)
    assert GuestSpec.parse(str(spec)) == spec
    assert GuestSpec.parse("pv32:mem=1G,vcpus=4,online=3").nr_pages == 262144
    assert GuestSpec.parse("pv32:mem=512K").width == abi.WIDTH_32


@pytest.mark.parametrize("text", ["hvm:mem=1M", "pv64:vcpus=2", "pv64:mem=1000", "pv64:mem=1M,vcpus=0",
                                  "pv64:mem=1M,vcpus=2,online=3", "pv64:mem=1M,colour=red", "pv64:mem=1M,mem=2M",
                                  "pv64:mem=12Q", "pv64:mem=1M,seed=x"])
def test_bad_specs_are_refused(text):
    with pytest.raises(GuestSpecError):
        GuestSpec.parse(text)


def test_too_small_for_its_structures():
    with pytest.raises(GuestSpecError):
        build_guest(SimXen(capacity_frames=1 << 12), "pv64:mem=256K,vcpus=32")


@pytest.mark.parametrize("spec", SPECS)
def test_built_guest_is_consistent(spec):
    xen, built, guest = _build(spec)
    assert guest.problems() == []
    info = xen.get_domain_info(built.domid)
    assert not info.paused and not info.shutdown and not info.is_hvm
    assert info.nr_pages == built.layout.nr_pages == built.spec.nr_pages
    assert xen.get_address_size(built.domid) == 8 * built.spec.width
    online = [xen.get_vcpu_online(built.domid, v) for v in range(built.spec.vcpus)]
    assert sum(online) == built.spec.online and online[0]


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_guest(spec):
    xen_a, a, guest_a = _build(spec, host_seed=5)
    xen_b, b, guest_b = _build(spec, host_seed=5)
    assert a.layout == b.layout
    assert guest_a.p2m_table() == guest_b.p2m_table()
    for pfn in range(a.layout.nr_pages):
        assert guest_a.read_page(pfn) == guest_b.read_page(pfn)
    for v in range(a.spec.vcpus):
        assert xen_a.get_vcpu_context(a.domid, v) == xen_b.get_vcpu_context(b.domid, v)
    assert bytes(xen_a.shared_info(a.domid)) == bytes(xen_b.shared_info(b.domid))


def test_other_host_same_pfn_contents_other_mfns():
    _, a, guest_a = _build("pv64:mem=4M,seed=2", host_seed=1)
    _, b, guest_b = _build("pv64:mem=4M,seed=2", host_seed=2)
    assert guest_a.p2m_table() != guest_b.p2m_table()
    mfn_bearing = set(a.layout.p2m_pfns) | set(a.layout.fl_pfns) | {a.layout.fll_pfn, a.layout.start_info_pfn} \
        | {t.pfn for t in a.layout.tables}
    for pfn in range(a.layout.nr_pages):
        if pfn not in mfn_bearing:
            assert guest_a.read_page(pfn) == guest_b.read_page(pfn), pfn


def test_different_seeds_differ():
    _, _, guest_a = _build("pv64:mem=4M,seed=1")
    _, _, guest_b = _build("pv64:mem=4M,seed=2")
    differing = sum(guest_a.read_page(p) != guest_b.read_page(p) for p in range(1024))
    assert differing > 900


def test_mfns_are_scattered_and_wide_for_64_bit():
    xen = SimXen(capacity_frames=1 << 15, seed=4)
    guest = PvGuest(xen, *(lambda b: (b.domid, b.layout))(build_guest(xen, "pv64:mem=32M,seed=3")))
    table = guest.p2m_table()
    assert any(mfn >= 1 << 32 for mfn in table) and any(mfn < 1 << 32 for mfn in table)
    extents = [table[k] >> 9 for k in range(0, len(table), 512)]
    assert extents != sorted(extents)
    assert sum(1 for pfn in range(len(table) - 1) if table[pfn + 1] != table[pfn] + 1) > len(extents)
    assert all(mfn != pfn for pfn, mfn in enumerate(table))


def test_32_bit_guest_frames_fit_32_bits():
    xen = SimXen(capacity_frames=1 << 15, seed=4)
    built = build_guest(xen, "pv32:mem=32M,seed=3")
    guest = PvGuest(xen, built.domid, built.layout)
    assert max(guest.p2m_table()) < 1 << 32
    assert xen.get_domain_info(built.domid).shared_info_frame < 1 << 20


def test_contents_do_not_compress_trivially():
    _, built, guest = _build("pv64:mem=8M,seed=6")
    sample = b"".join(guest.read_page(p) for p in range(0, built.layout.nr_pages, 7))
    assert len(zlib.compress(sample, 6)) > 0.7 * len(sample)
    zero = bytes(abi.PAGE_SIZE)
    zeros = sum(guest.read_page(p) == zero for p in range(built.layout.nr_pages))
    assert 0 < zeros < built.layout.nr_pages // 10


@pytest.mark.parametrize("spec", ["pv64:mem=8M,vcpus=2,seed=3", "pv32:mem=8M,vcpus=2,seed=3"])
def test_guest_structures(spec):
    xen, built, guest = _build(spec)
    layout, domid, width = built.layout, built.domid, built.spec.width
    types = xen.get_page_types(domid, [guest.p2m(r.pfn) for r in layout.pinned])
    top = 4 if width == abi.WIDTH_64 else 3
    assert set(types) == {(top | abi.PAGETYPE_LPINTAB) << 28}
    start_info = guest.read_page(layout.start_info_pfn)
    si = abi.START_INFO_LAYOUTS[width]
    word = lambda data, off: int.from_bytes(data[off:off + width], "little")  # noqa: E731
    assert start_info.startswith(abi.START_INFO_MAGIC[width])
    assert word(start_info, si.nr_pages) == layout.nr_pages
    assert word(start_info, si.shared_info) == xen.get_domain_info(domid).shared_info_frame << 12
    assert word(start_info, si.store_mfn) == guest.p2m(layout.store_pfn)
    assert word(start_info, si.console_mfn) == guest.p2m(layout.console_pfn)
    shared = bytes(xen.shared_info(domid))
    sh = abi.SHARED_INFO_LAYOUTS[width]
    assert word(shared, sh.max_pfn) == layout.nr_pages
    fll = word(shared, sh.pfn_to_mfn_frame_list_list)
    assert fll == guest.p2m(layout.fll_pfn)
    fmt = "Q" if width == abi.WIDTH_64 else "I"
    fl_mfns = array(fmt, bytes(xen.machine.frame(fll)))[: len(layout.fl_pfns)]
    leaf_mfns = [m for fl in fl_mfns for m in array(fmt, bytes(xen.machine.frame(fl)))][: len(layout.p2m_pfns)]
    assert leaf_mfns == [guest.p2m(p) for p in layout.p2m_pfns]
    context = xen.get_vcpu_context(domid, 0)
    assert context.online and len(context.pack()) == abi.VCPU_CONTEXT_SIZES[width]
    assert VcpuContext.unpack(context.pack(), width) == attrs.evolve(context, blob=context.pack())
    ext = xen.get_ext_vcpu_context(domid, 0)
    assert int.from_bytes(ext[4:8], "little") == len(ext) == abi.EXT_VCPU_CONTEXT_SIZE
    assert xen.get_vcpu_xsave(domid, 0).xfeature_mask
    assert len(xen.get_cpu_policy(domid).cpuid) % abi.CPUID_LEAF_SIZE == 0


def test_pae_top_l2_gets_xen_compat_slots():
    xen, built, guest = _build("pv32:mem=8M,seed=2")
    top = next(guest.p2m(r.pfn) for r in built.layout.tables if r.level == 2)
    entries = xen.machine.frame(top).cast("Q")
    assert abi.pte_frame(entries[abi.PAE_L2_XEN_FIRST]) == xen.compat_m2p_first_mfn()
    root = guest.p2m(built.layout.pinned[0].pfn)
    assert not any(xen.machine.frame(root).cast("Q")[4:])


def test_l4_gets_xen_slots():
    xen, built, guest = _build("pv64:mem=4M,seed=2")
    root = guest.p2m(built.layout.pinned[0].pfn)
    entries = xen.machine.frame(root).cast("Q")
    assert all(entries[i] & abi.PTE_PRESENT for i in abi.L4_XEN_SLOTS_64)


@pytest.mark.parametrize("spec", ["pv64:mem=8M,seed=2,p2m=linear", "pv32:mem=8M,vcpus=2,seed=2,p2m=linear"])
def test_linear_p2m_guest(spec):
    xen, built, guest = _build(spec)
    assert guest.problems() == []
    width, layout = built.spec.width, built.layout
    lay = abi.SHARED_INFO_LAYOUTS[width]
    shared = bytes(xen.shared_info(built.domid))
    word = lambda off: int.from_bytes(shared[off:off + width], "little")  # noqa: E731
    assert word(lay.p2m_vaddr) == layout.p2m_vaddr and layout.p2m_vaddr % (1 << 30) == 0
    assert abi.mfn_from_cr3(word(lay.p2m_cr3), width) == guest.p2m(layout.pinned[0].pfn)
    assert word(lay.pfn_to_mfn_frame_list_list) == guest.p2m(layout.fll_pfn)  # the tree stays published
    assert GuestSpec.parse(str(built.spec)) == built.spec
    guest.bump_p2m_generation()
    assert int.from_bytes(bytes(xen.shared_info(built.domid))[lay.p2m_generation:lay.p2m_generation + width],
                          "little") == 2


def test_tree_guest_publishes_no_linear_p2m():
    xen, built, _ = _build("pv64:mem=4M,seed=2")
    lay = abi.SHARED_INFO_64
    assert bytes(xen.shared_info(built.domid))[lay.p2m_cr3:lay.p2m_cr3 + 16] == bytes(16)


@pytest.mark.parametrize("spec", ["pv64:mem=6M,maxmem=2G,seed=3", "pv64:mem=6M,maxmem=3G,seed=3,p2m=linear",
                                  "pv32:mem=6M,maxmem=5G,vcpus=2,seed=4", "pv32:mem=6M,maxmem=1G,seed=4,p2m=linear"])
def test_sparse_p2m_like_linux(spec):
    xen, built, guest = _build(spec)
    layout, width = built.layout, built.spec.width
    assert layout.p2m_pages == built.spec.p2m_pages > layout.nr_pages
    assert guest.problems() == []
    table = guest.p2m_table()
    assert len(table) == layout.p2m_pages
    assert all(mfn == abi.INVALID_MFN for mfn in table[layout.nr_pages:])
    assert xen.get_max_gpfn(built.domid) == layout.p2m_pages - 1
    fmt = "Q" if width == abi.WIDTH_64 else "I"
    fll = array(fmt, bytes(xen.machine.frame(guest.p2m(layout.fll_pfn))))
    mid_missing = guest.p2m(layout.p2m_mid_missing_pfn)
    assert list(fll[len(layout.fl_pfns):]) == [mid_missing] * (len(fll) - len(layout.fl_pfns))
    missing = array(fmt, bytes(xen.machine.frame(mid_missing)))
    assert set(missing) == {guest.p2m(layout.p2m_missing_pfn)}
    assert GuestSpec.parse(str(built.spec)) == built.spec
    guest.suspend()
    xen.resume_domain(built.domid)
    guest.resume_cancelled()
    assert guest.problems() == []


def test_maxmem_below_mem_is_refused():
    with pytest.raises(GuestSpecError):
        GuestSpec.parse("pv64:mem=8M,maxmem=4M")
