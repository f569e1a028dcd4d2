"""Save-side failures of spec 8.6: each a SaveError saying what was wrong and where, with no END written."""

from __future__ import annotations

import io
import struct

import attrs
import pytest

from tests.v2 import engine_support as es
from xenstream.hv import abi
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.v2 import constants as C
from xenstream.v2.save import SaveError, save_pv
from xenstream.v2.writer import V2Writer


def build(kind: str = "pv64"):
    spec = GuestSpec.parse(f"{kind}:mem=2M,vcpus=2,seed=61")
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    return xen, PvGuest(xen, built.domid, built.layout)


def shared_word(xen, guest, field: str, value: int) -> None:
    layout = abi.SHARED_INFO_LAYOUTS[guest.width]
    struct.pack_into(layout.word, xen.shared_info(guest.domid), getattr(layout, field), value)


def frame_word(xen, mfn: int, index: int, value: int, size: int = 8) -> None:
    xen.machine.frame(mfn)[index * size:(index + 1) * size] = value.to_bytes(size, "little")


def set_context(xen, guest, vcpu: int, **changes) -> None:
    state = xen.domains[guest.domid].vcpus[vcpu]
    state.context = attrs.evolve(state.context, **changes)


def foreign_frame(xen) -> int:
    other = xen.create_domain(max_vcpus=1, max_pages=1)
    return xen.populate_physmap(other, [0])[0]


def fll_mfn(xen, guest) -> int:
    return guest.p2m(guest.layout.fll_pfn)


SETUP_FAILURES = {
    "frame-list-list mfn 0": (lambda x, g: shared_word(x, g, "pfn_to_mfn_frame_list_list", 0),
                              "bad mfn 0x0 for the P2M frame-list-list"),
    "frame-list-list beyond max_mfn": (lambda x, g: shared_word(x, g, "pfn_to_mfn_frame_list_list", x.get_max_mfn() + 1),
                                       "for the P2M frame-list-list"),
    "frame list entry 0": (lambda x, g: frame_word(x, fll_mfn(x, g), 0, 0, g.width),
                           "at index 0 of the P2M frame-list-list"),
    "leaf entry 0": (lambda x, g: frame_word(x, g.p2m(g.layout.fl_pfns[0]), 0, 0, g.width),
                     "at index 0 of the P2M frame list"),
    # shared_info is the domain's, so it maps, but it has no pfn: the M2P round trip fails.
    "leaf not in the pseudo-physical map": (
        lambda x, g: frame_word(x, g.p2m(g.layout.fl_pfns[0]), 0, x.get_domain_info(g.domid).shared_info_frame,
                                g.width),
        "P2M leaf 0 at mfn .* is not in the guest's pseudo-physical map"),
    "leaf of another domain": (lambda x, g: frame_word(x, g.p2m(g.layout.fl_pfns[0]), 0, foreign_frame(x), g.width),
                               "cannot map P2M leaf frame"),
    "max_pfn too large for the tree": (lambda x, g: shared_word(x, g, "max_pfn", 512 ** 3 + 2), "too large for a P2M tree"),
}


@pytest.mark.parametrize("name", sorted(SETUP_FAILURES))
def test_p2m_setup_failures(name):
    xen, guest = build()
    corrupt, message = SETUP_FAILURES[name]
    corrupt(xen, guest)
    out = io.BytesIO()
    with pytest.raises(SaveError, match=message):
        save_pv(xen, guest.domid, V2Writer(out), es.suspend_of(guest))
    assert out.getvalue() == b""  # setup fails before the headers


def suspend_then(guest, corrupt):
    def suspend() -> bool:
        guest.suspend()
        corrupt()
        return True

    return suspend


def test_superpage_entry_fails_naming_pfn_and_entry():
    xen, guest = build()
    table = next(t for t in guest.layout.tables if t.level == 2)
    entries = xen.machine.frame(guest.p2m(table.pfn)).cast("Q")
    index = next(i for i, pte in enumerate(entries) if pte & abi.PTE_PRESENT)
    pte = entries[index]
    out = io.BytesIO()
    with pytest.raises(SaveError, match=f"L2 pagetable at pfn {table.pfn:#x}: entry {index} .* superpage"):
        save_pv(xen, guest.domid, V2Writer(out),
                suspend_then(guest, lambda: frame_word(xen, guest.p2m(table.pfn), index, pte | abi.PTE_PSE)))
    assert all(r.type != C.REC_END for r in es.split(out.getvalue())[1])


@pytest.mark.parametrize("field, value, message", [
    ("cr3", "foreign", "vcpu1's cr3"),
    ("cr1", "foreign", "vcpu1's cr1"),
    ("gdt_frames", "foreign", "frame 0 of vcpu1's GDT"),
    ("gdt_ents", abi.MAX_GDT_ENTS + 1, "gdt_ents"),
    ("start_info", "foreign", "start_info"),
])
def test_bad_vcpu_frames(field, value, message):
    xen, guest = build()
    vcpu = 0 if field == "start_info" else 1
    frame = foreign_frame(xen)
    encoded = {"cr3": abi.cr3_from_mfn(frame, guest.width), "cr1": frame << 12, "start_info": frame,
               "gdt_frames": (frame,) + (0,) * 15}
    new = encoded.get(field, value)
    out = io.BytesIO()
    with pytest.raises(SaveError, match=message):
        save_pv(xen, guest.domid, V2Writer(out), suspend_then(guest, lambda: set_context(xen, guest, vcpu, **{field: new})))
    assert all(r.type != C.REC_END for r in es.split(out.getvalue())[1])
