"""ABI facts against the values the spec measured from Xen's headers (save-restore-engines 1.5-1.8)."""

from __future__ import annotations

import pytest

from xenstream.hv import abi


def test_vcpu_context_layouts():
    l64, l32 = abi.VCPU_CONTEXT_64, abi.VCPU_CONTEXT_32
    assert (l64.size, l32.size) == (5168, 2800)
    assert (l64.flags, l64.rdx, l64.gdt_frames, l64.gdt_ents, l64.ctrlreg_offset(3), l64.ctrlreg_offset(1)) == \
        (512, 616, 4832, 4960, 5008, 4992)
    assert (l32.flags, l32.rdx, l32.gdt_frames, l32.gdt_ents, l32.ctrlreg_offset(3)) == (512, 524, 2640, 2704, 2728)
    assert (l64.user_regs, l64.rsi, l64.trap_ctxt, l64.ldt_base, l64.kernel_ss, l64.kernel_sp, l64.debugreg,
            l64.vm_assist) == (520, 624, 720, 4816, 4968, 4976, 5048, 5136)
    assert (l32.user_regs, l32.rsi, l32.trap_ctxt, l32.ldt_base, l32.kernel_ss, l32.kernel_sp, l32.debugreg,
            l32.vm_assist) == (516, 528, 584, 2632, 2708, 2712, 2748, 2796)
    # cpu_user_regs: x86_64 rax/rdx/rip/rsp at 80/96/128/152, x86_32 eax/edx/eip/esp at 24/8/32/44
    assert (l64.rax - l64.user_regs, l64.rip - l64.user_regs, l64.rsp - l64.user_regs) == (80, 128, 152)
    assert (l32.rax - l32.user_regs, l32.rip - l32.user_regs, l32.rsp - l32.user_regs) == (24, 32, 44)
    assert abi.MAX_GDT_ENTS == 7168 and abi.VGCF_ONLINE == 32


def test_start_info_and_shared_info_layouts():
    s64, s32 = abi.START_INFO_64, abi.START_INFO_32
    assert (s64.nr_pages, s64.shared_info, s64.flags, s64.store_mfn, s64.store_evtchn, s64.console_mfn,
            s64.console_evtchn, s64.size) == (32, 40, 48, 56, 64, 72, 80, 1168)
    assert (s32.nr_pages, s32.shared_info, s32.flags, s32.store_mfn, s32.store_evtchn, s32.console_mfn,
            s32.console_evtchn, s32.size) == (32, 36, 40, 44, 48, 52, 56, 1112)
    h64, h32 = abi.SHARED_INFO_64, abi.SHARED_INFO_32
    assert (h64.evtchn_pending, h64.evtchn_mask, h64.max_pfn, h64.pfn_to_mfn_frame_list_list, h64.p2m_cr3,
            h64.p2m_vaddr, h64.p2m_generation, h64.size) == (2048, 2560, 3088, 3096, 3112, 3120, 3128, 3136)
    assert (h32.evtchn_pending, h32.evtchn_mask, h32.max_pfn, h32.pfn_to_mfn_frame_list_list, h32.p2m_cr3,
            h32.p2m_vaddr, h32.p2m_generation, h32.size) == (2048, 2176, 2316, 2320, 2328, 2332, 2336, 2344)


@pytest.mark.parametrize("mfn, cr3", [(0x123456, 0x23456001), (0, 0), (0xFFFFF, 0xFFFFF000), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_folded_cr3(mfn, cr3):
    assert abi.cr3_from_mfn(mfn, abi.WIDTH_32) == cr3
    assert abi.mfn_from_cr3(cr3, abi.WIDTH_32) == mfn


def test_cr3_edges():
    assert abi.cr3_from_mfn(1 << 32, abi.WIDTH_32) == abi.INVALID_MFN
    assert abi.mfn_from_cr3(1 << 32, abi.WIDTH_32) == abi.INVALID_MFN
    assert abi.cr3_from_mfn(0x1_2345_6789, abi.WIDTH_64) == 0x1_2345_6789 << 12
    assert abi.mfn_from_cr3(0x1_2345_6789 << 12, abi.WIDTH_64) == 0x1_2345_6789


def test_pagetable_entries_and_slots():
    assert abi.PTE_FRAME_MASK == 0x000F_FFFF_FFFF_F000
    assert abi.pte_with_frame((1 << 63) | 0x7FF0_0000_0000_0063, 0x12345) == (1 << 63) | 0x7FF0_0000_1234_5063
    assert abi.pte_frame(0x8000_0001_2345_6067) == 0x123456
    assert (abi.L4_XEN_SLOTS_64[0], abi.L4_XEN_SLOTS_64[-1]) == (256, 271)
    assert abi.PAE_L2_XEN_FIRST == (0xF580_0000 >> 21) & 511 == 428
    assert [abi.pagetable_level(t) for t in (0x0, 0x1, 0x4, 0x9, 0xC, 0xD, 0xE, 0xF)] == [0, 1, 4, 1, 4, 0, 0, 0]
