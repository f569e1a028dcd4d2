"""Every rule of the strict verifier, each tripped by a stream built byte by byte (tests/v2/verify_builder)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from tests.v2.verify_builder import (
    BROKEN, CHECKPOINT, CHECKPOINT_STATE, DIRTY_PFN_LIST, EMU_CONTEXT, EMU_XENSTORE,
    HVM_PAGES, L1TAB, LIBXC_CONTEXT, NOTAB, PV_PAGES, STATIC_DATA_END, TOOLSTACK, VCPU_BASIC, VCPU_EXTENDED,
    VCPU_MSRS, VCPU_XSAVE, VERIFY, XL_END, XL_MAGIC, XTAB, basic_context, cpuid_policy, emulator, empty,
    hvm_checkpoint_tail, hvm_context, hvm_params, hvm_static, hvm_stream, libxc, libxl,
    libxl_checkpointed_hvm, libxl_checkpointed_pv, libxl_header, libxl_hvm, msr_policy, p2m_frames, page_data, pv_checkpoint_records,
    pv_checkpoint_tail, pv_info, pv_pages, pv_static, pv_stream, rec, shared_info, tsc_info, vcpu, xl,
)
from xenstream.v2.verify import verify_bytes
from xenstream.v2.verify_report import ERROR, WARNING

SDE = empty(STATIC_DATA_END)


def pv(*middle, version=3, width=8, static=None, tail=None, end=True) -> bytes:
    """A PV stream: static section, P2M_FRAMES, one page batch, `middle`, the end-of-checkpoint group."""
    static = pv_static(version, width, 4 if width == 8 else 3) if static is None else list(static)
    tail = pv_checkpoint_tail(width) if tail is None else list(tail)
    body = static + [p2m_frames(0, 3, width=width), page_data(pv_pages(4 if width == 8 else 3))] + list(middle) + tail
    return libxc(body, version=version, gtype=1, end=end)


def hvm(*middle, version=3, tail=None) -> bytes:
    tail = hvm_checkpoint_tail() if tail is None else list(tail)
    return libxc(hvm_static(version) + [page_data(HVM_PAGES)] + list(middle) + tail, version=version, gtype=2)


def replace(records: list[bytes], old: bytes, new: list[bytes]) -> list[bytes]:
    i = records.index(old)
    return records[:i] + new + records[i + 1:]


def ckpt_libxc(checkpoints=2, end=False) -> bytes:
    return libxc(pv_checkpoint_records(checkpoints), end=end)


def colo_with_state(control_id: int) -> bytes:
    """A COLO stream whose one checkpoint is followed by CHECKPOINT_STATE(control_id)."""
    return libxl_checkpointed_pv(1) + rec(CHECKPOINT_STATE, struct.pack("<I", control_id))


def xl_raw(payload: bytes, *, order="<", mflags=3, optional_flags=0, optional=None) -> bytes:
    optional = struct.pack(order + "I", 3) + b"{}\0" if optional is None else optional
    return XL_MAGIC + struct.pack(order + "IIII", 0x01020304, mflags, optional_flags, len(optional)) + optional + payload


# (id, stream, verify_bytes keywords, severity, fragment of the finding's message)
RULES = [
    # ---- legality per guest type and stream version
    ("toolstack", pv(rec(TOOLSTACK, b"blob")), {}, ERROR, "TOOLSTACK is obsolete"),
    ("dirty-pfn-list-forward", pv(rec(DIRTY_PFN_LIST, bytes(8))), {}, ERROR, "COLO back channel"),
    ("hvm-record-in-pv", pv(hvm_context()), {}, ERROR, "not legal for PV guests"),
    ("pv-record-in-hvm", hvm(shared_info()), {}, ERROR, "not legal for HVM guests"),
    ("static-data-end-in-v2", pv(version=2, static=[pv_info(), SDE]), {}, ERROR, "not defined in stream version 2"),
    ("cpuid-policy-in-v2", pv(version=2, static=[pv_info(), cpuid_policy()]), {}, ERROR, "not defined in stream version 2"),
    ("msr-policy-in-v2", hvm(msr_policy(), version=2), {}, ERROR, "not defined in stream version 2"),
    ("unknown-optional-record", pv(rec(0x80000123, b"opt")), {}, WARNING, "unknown optional record"),
    # ---- phases and STATIC_DATA_END
    ("page-data-before-static-data-end",
     libxc([pv_info(), p2m_frames(), page_data(PV_PAGES), SDE] + pv_checkpoint_tail()), {}, ERROR,
     "before STATIC_DATA_END"),
    ("p2m-frames-before-static-data-end",
     libxc([pv_info(), p2m_frames(), SDE, page_data(PV_PAGES)] + pv_checkpoint_tail()), {}, ERROR,
     "before STATIC_DATA_END"),
    ("second-static-data-end", pv(SDE), {}, ERROR, "second STATIC_DATA_END"),
    ("v3-without-static-data-end", libxc([pv_info()] + pv_checkpoint_tail()), {}, ERROR,
     "without STATIC_DATA_END"),
    ("record-in-static-section", pv(static=[pv_info(), tsc_info(), SDE]), {}, WARNING, "in the static section"),
    ("policy-after-static-data-end", pv(cpuid_policy()), {}, WARNING, "never applies it"),
    ("second-policy", pv(static=[pv_info(), msr_policy(), msr_policy(), SDE]), {}, WARNING, "second policy record"),
    ("pv-info-after-static-data-end", pv(static=[SDE, pv_info()]), {}, WARNING, "static record after STATIC_DATA_END"),
    ("record-after-verify", pv(empty(VERIFY), page_data(PV_PAGES), msr_policy()), {}, WARNING, "after VERIFY"),
    ("second-verify", pv(empty(VERIFY), empty(VERIFY)), {}, WARNING, "second VERIFY"),
    ("memory-after-vcpu-state", pv(vcpu(VCPU_BASIC, 0, basic_context()), page_data(PV_PAGES[3:])), {}, WARNING,
     "memory after vcpu state"),
    # ---- X86_PV_INFO
    ("second-pv-info", pv(static=[pv_info(), pv_info(), SDE]), {}, ERROR, "second X86_PV_INFO"),
    ("pv-info-width-8-levels-3", pv(static=[pv_info(8, 3), SDE]), {}, ERROR, "guest_width 8 with pt_levels 3"),
    ("pv-info-width-4-levels-4", pv(static=[pv_info(4, 4), SDE], width=4), {}, ERROR, "guest_width 4 with pt_levels 4"),
    ("pv-info-width-2", pv(static=[pv_info(2, 4), SDE]), {}, ERROR, "guest_width 2 with pt_levels 4"),
    # ---- X86_PV_P2M_FRAMES and pfn ranges
    ("p2m-frames-before-pv-info",
     libxc([p2m_frames(), pv_info(), page_data(PV_PAGES)] + pv_checkpoint_tail(), version=2), {}, ERROR,
     "X86_PV_P2M_FRAMES before X86_PV_INFO"),
    ("p2m-start-above-end", pv().replace(p2m_frames(0, 3), p2m_frames(5, 3, frames=[2])),
     {}, ERROR, "start pfn 0x5 above end pfn 0x3"),
    ("p2m-frame-count-64bit", pv().replace(p2m_frames(0, 3), p2m_frames(0, 512, frames=[2])), {}, ERROR,
     "expected 24 for pfns 0x0-0x200 (2 frames of 512 entries)"),
    ("p2m-frame-count-32bit",
     pv(width=4).replace(p2m_frames(0, 3, width=4), p2m_frames(0, 1023, frames=[2, 2])), {}, ERROR,
     "expected 16 for pfns 0x0-0x3ff (1 frames of 1024 entries)"),
    ("page-data-before-p2m-frames", libxc(pv_static() + [page_data(PV_PAGES), p2m_frames()] + pv_checkpoint_tail()),
     {}, ERROR, "PAGE_DATA before X86_PV_P2M_FRAMES"),
    ("pfn-above-p2m-range", pv(page_data([(3, NOTAB), (4, NOTAB)])), {}, ERROR,
     "entry 1: pfn 0x4 above the p2m's last pfn 0x3"),
    ("duplicate-pfn-in-record", pv(page_data([(3, NOTAB), (2, NOTAB), (3, NOTAB)])), {}, WARNING,
     "pfn 0x3 appears more than once"),
    ("pagetables-in-hvm", hvm(page_data([(5, L1TAB)])), {}, WARNING, "pagetable-typed entries in an HVM stream"),
    ("batch-over-1024", hvm(page_data([(p, XTAB) for p in range(1025)])), {}, WARNING, "at most 1024 per record"),
    ("p2m-frame-pfn-above-range", pv().replace(p2m_frames(0, 3), p2m_frames(0, 3, frames=[9])), {}, ERROR,
     "p2m frame list entry 0: frame pfn 0x9 above the last pfn 0x3"),
    ("p2m-frame-never-sent", pv().replace(p2m_frames(0, 3), p2m_frames(0, 7, frames=[6])), {}, ERROR,
     "frame pfn 0x6 was never sent"),
    ("p2m-frame-resent-as-xtab", pv(page_data([(2, XTAB)])), {}, ERROR, "frame pfn 0x2 has page type 0xf, not NOTAB"),
    ("start-info-never-sent",
     pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(start_info_pfn=7))]).replace(
         p2m_frames(0, 3), p2m_frames(0, 7)), {}, ERROR, "start-info pfn 0x7 was never sent"),
    ("start-info-is-a-page-table", pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(start_info_pfn=0))]),
     {}, ERROR, "start-info pfn 0x0 has page type 0xc, not NOTAB"),
    ("gdt-frame-is-a-page-table",
     pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(gdt_ents=1, gdt_frames=(0,)))]), {}, ERROR,
     "GDT frame 0 pfn 0x0 has page type 0xc, not NOTAB"),
    ("cr3-not-a-top-level-table", pv(page_data([(0, L1TAB)])), {}, ERROR, "cr3 pfn 0x0 has page type 0x1, not an L4 table"),
    ("cr3-resent-as-data-out-of-order", pv(page_data([(3, NOTAB), (0, NOTAB)])), {}, ERROR,
     "cr3 pfn 0x0 has page type 0x0, not an L4 table"),
    ("user-cr1-not-a-table",
     pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(cr1=(3 << 12) | 1))]), {}, ERROR,
     "user cr1 pfn 0x3 has page type 0x0, not an L4 table"),
    ("huge-guest-type-checks-limited",
     pv().replace(p2m_frames(0, 3), p2m_frames(0, 1 << 24, frames=[2] * ((1 << 24) // 512 + 1))), {}, WARNING,
     "page types tracked for the first 16777216 pfns only"),
    ("start-info-pfn-above-range",
     pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(start_info_pfn=0x99))]), {}, ERROR,
     "start-info pfn 0x99 above the last pfn 0x3"),
    ("gdt-frame-above-range",
     pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(gdt_ents=600, gdt_frames=(1, 7)))]), {},
     ERROR, "GDT frame 1 pfn 0x7"),
    ("cr3-above-range-64bit",
     pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(cr3_pfn=0x12345))]), {}, ERROR,
     "cr3 pfn 0x12345"),
    ("cr3-above-range-32bit-pae",
     pv(width=4, tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, basic_context(4, cr3_pfn=0x1234567))]), {},
     ERROR, "cr3 pfn 0x1234567"),
    # ---- vcpus
    ("vcpu-id-not-below-max-vcpus", pv(tail=pv_checkpoint_tail(vcpus=2)), {"max_vcpus": 1}, ERROR,
     "vcpu_id 1 not below the domain's 1 vcpus"),
    ("vcpu-id-beyond-x86-pv-limit", pv(vcpu(VCPU_EXTENDED, 8192, bytes(64))), {}, ERROR,
     "an x86 PV domain has at most 8192 vcpus"),
    ("guest-type-mismatch", pv_stream(), {"guest": "hvm"}, ERROR, "a PV stream cannot be restored into a HVM domain"),
    ("basic-size-64bit", pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, bytes(2800))]), {}, ERROR,
     "context 2800 bytes, expected 5168 for a 64-bit guest"),
    ("basic-size-32bit", pv(width=4, tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 0, bytes(5168))]), {}, ERROR,
     "context 5168 bytes, expected 2800 for a 32-bit guest"),
    ("extended-over-128", pv(vcpu(VCPU_EXTENDED, 0, bytes(136))), {}, ERROR, "more than 128"),
    ("xsave-under-16", pv(vcpu(VCPU_XSAVE, 0, bytes(8))), {}, ERROR, "fewer than 16"),
    ("msrs-not-multiple-of-16", pv(vcpu(VCPU_MSRS, 0, bytes(24))), {}, ERROR, "not a multiple of 16"),
    ("empty-vcpu-record", pv(vcpu(VCPU_XSAVE, 0, b"")), {}, WARNING, "empty context"),
    ("vcpu-record-repeated", pv(tail=pv_checkpoint_tail() + [vcpu(VCPU_EXTENDED, 0, bytes(64))]), {}, WARNING,
     "repeated in one checkpoint"),
    ("vcpu-record-without-basic", pv(tail=pv_checkpoint_tail() + [vcpu(VCPU_MSRS, 1, bytes(16))]), {}, WARNING,
     "vcpu 1: no X86_PV_VCPU_BASIC before it"),
    ("no-vcpu0-basic", pv(tail=[tsc_info(), shared_info(), vcpu(VCPU_BASIC, 1, basic_context())]), {}, ERROR,
     "without X86_PV_VCPU_BASIC for vcpu 0"),
    # ---- other records
    ("shared-info-before-pv-info",
     libxc([shared_info(), pv_info(), p2m_frames(), page_data(PV_PAGES)] + pv_checkpoint_tail(), version=2), {},
     ERROR, "SHARED_INFO before X86_PV_INFO"),
    ("second-shared-info", pv(shared_info()), {}, WARNING, "second SHARED_INFO"),
    ("second-tsc-info", pv(tsc_info()), {}, WARNING, "second X86_TSC_INFO"),
    ("unknown-tsc-mode", pv(tail=[tsc_info(mode=7)] + pv_checkpoint_tail()[1:]), {}, WARNING, "unknown TSC mode 7"),
    ("hvm-params-without-entries", hvm(tail=[tsc_info(), hvm_context(), hvm_params(())]), {}, WARNING, "no entries"),
    ("second-hvm-context", hvm(tail=hvm_checkpoint_tail() + [hvm_context()]), {}, WARNING, "second HVM_CONTEXT"),
    ("hvm-params-repeated", hvm(tail=hvm_checkpoint_tail() + [hvm_params(((17, 1), (12, 2)))]), {}, WARNING,
     "HVM params 17 set again in one checkpoint"),
    # ---- mandatory records
    ("no-pv-info", libxc([p2m_frames(), page_data(PV_PAGES)] + pv_checkpoint_tail(), version=2), {}, ERROR,
     "stream without X86_PV_INFO"),
    ("no-p2m-frames", libxc(pv_static() + pv_checkpoint_tail()), {}, ERROR, "stream without X86_PV_P2M_FRAMES"),
    ("no-hvm-context", hvm(tail=[tsc_info(), hvm_params()]), {}, ERROR, "stream without HVM_CONTEXT"),
    ("no-shared-info", pv(tail=[tsc_info(), vcpu(VCPU_BASIC, 0, basic_context())]), {}, WARNING, "no SHARED_INFO"),
    ("no-tsc-info", hvm(tail=[hvm_context()]), {}, WARNING, "no X86_TSC_INFO"),
    ("no-page-data", libxc(hvm_static() + hvm_checkpoint_tail(), gtype=2), {}, WARNING, "without any PAGE_DATA"),
    # ---- checkpointed streams
    ("checkpoint-in-plain-stream", ckpt_libxc(end=True), {"checkpointed": False}, ERROR, "not checkpointed"),
    ("plain-stream-ends-at-checkpoint", ckpt_libxc(), {"checkpointed": False}, ERROR,
     "input ends after a checkpoint, without END"),
    ("checkpoint-incomplete", libxc(pv_static() + [p2m_frames(), page_data(PV_PAGES), empty(CHECKPOINT)], end=False),
     {}, ERROR, "checkpoint without X86_PV_VCPU_BASIC for vcpu 0"),
    ("records-after-last-checkpoint", libxc(pv_checkpoint_records(1) + [page_data(PV_PAGES[3:])]), {}, WARNING,
     "1 records after the last CHECKPOINT"),
    ("verify-in-checkpointed-stream",
     libxc(pv_static() + [p2m_frames(), page_data(PV_PAGES), empty(VERIFY)] + pv_checkpoint_tail() + [empty(CHECKPOINT)],
           end=False), {}, WARNING, "VERIFY in a checkpointed stream"),
    # ---- libxl layer
    ("libxl-record-before-libxc-context",
     libxl_header() + emulator(EMU_CONTEXT, b"x") + empty(LIBXC_CONTEXT) + hvm() + empty(XL_END), {}, ERROR,
     "record before LIBXC_CONTEXT"),
    ("libxl-second-libxc-context", libxl(pv_stream(), [empty(LIBXC_CONTEXT), pv_stream()]), {}, ERROR,
     "second LIBXC_CONTEXT"),
    ("emulator-record-in-pv", libxl(pv_stream(), [emulator(EMU_CONTEXT, b"ctx")]), {}, ERROR,
     "emulator record in a PV stream"),
    ("emulator-id-unknown-value", libxl(hvm_stream(), [emulator(EMU_CONTEXT, b"ctx", emu_id=3)]), {}, ERROR,
     "emulator id 0x3 is not 0, 1 or 2"),
    ("emulator-id-0-not-legacy", libxl(hvm_stream(), [emulator(EMU_CONTEXT, b"ctx", emu_id=0)]), {}, WARNING,
     "emulator id 0 (unknown) outside a stream converted from legacy"),
    ("emulator-index", libxl(hvm_stream(), [emulator(EMU_CONTEXT, b"ctx", index=1)]), {}, WARNING, "emulator index 1"),
    ("second-emulator-context", libxl(hvm_stream(), [emulator(EMU_CONTEXT, b"a"), emulator(EMU_CONTEXT, b"b")]), {},
     WARNING, "second EMULATOR_CONTEXT"),
    ("no-emulator-context", libxl(hvm_stream()), {}, WARNING, "no EMULATOR_CONTEXT in this HVM stream"),
    ("xenstore-after-context",
     libxl(hvm_stream(), [emulator(EMU_CONTEXT, b"c"), emulator(EMU_XENSTORE, b"k\0v\0")]), {}, WARNING,
     "EMULATOR_XENSTORE_DATA after EMULATOR_CONTEXT"),
    ("xenstore-empty", libxl(hvm_stream(), [emulator(EMU_XENSTORE, b""), emulator(EMU_CONTEXT, b"c")]), {}, WARNING,
     "no key/value data"),
    ("xenstore-not-nul-terminated", libxl_hvm(xenstore=b"key\0value"), {}, ERROR, "data not NUL terminated"),
    ("xenstore-key-without-value", libxl_hvm(xenstore=b"a\0b\0orphan\0"), {}, ERROR, "has no value"),
    ("xenstore-empty-key", libxl_hvm(xenstore=b"\0value\0"), {}, ERROR, "empty key"),
    ("xenstore-absolute-key", libxl_hvm(xenstore=b"/local/x\0v\0"), {}, ERROR, "is absolute"),
    ("xenstore-key-characters", libxl_hvm(xenstore=b"bad key\0v\0"), {}, WARNING, "characters outside"),
    ("xenstore-value-unprintable", libxl_hvm(xenstore=b"key\0\x01\x02\0"), {}, WARNING, "not printable ASCII"),
    ("checkpoint-state-not-new", colo_with_state(2), {"colo": True}, ERROR, "control id SVM_READY"),
    # ---- xl header
    ("xl-big-endian-writer", xl_raw(libxl(pv_stream()), order=">"), {}, ERROR, "big-endian order"),
    ("xl-without-streamv2", xl_raw(libxl(pv_stream()), mflags=1), {}, ERROR, "lack STREAMv2"),
    ("xl-without-streamv2-libxc-payload", xl_raw(pv_stream(), mflags=1), {}, ERROR, "lack STREAMv2"),
    ("xl-optional-flags", xl_raw(libxl(pv_stream()), optional_flags=4), {}, WARNING, "optional flags 0x4"),
    ("xl-no-config", xl_raw(libxl(pv_stream()), optional=b""), {}, WARNING, "no stored domain configuration"),
    ("xl-json-config-without-nul", xl_raw(libxl(pv_stream()), optional=struct.pack("<I", 2) + b"{}"), {}, WARNING,
     "not NUL terminated"),
    # ---- the file as a whole
    ("trailing-bytes", pv_stream() + b"garbage!", {}, ERROR, "8 bytes after the end of the stream"),
]


@pytest.mark.parametrize("stream,options,severity,fragment", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule_trips(stream, options, severity, fragment):
    report = verify_bytes(stream, **options)
    found = report.errors if severity == ERROR else report.warnings
    matches = [f for f in found if fragment in f.message]
    assert matches, report.lines()
    assert not report.broken, report.lines()
    if severity == WARNING:
        assert report.ok, report.lines()
    else:
        assert not report.ok
    line = str(matches[0])
    assert "\n" not in line and line.startswith(f"{severity}: offset 0x")


def test_rule_ids_unique():
    assert len({r[0] for r in RULES}) == len(RULES)


VALID = {
    "pv-v3": pv_stream(),
    "pv-v2": pv_stream(2),
    "pv-32bit": pv_stream(width=4),
    "pv-2-vcpus": pv_stream(vcpus=2),
    "hvm-v3": hvm_stream(),
    "hvm-v2": hvm_stream(2),
    "libxl-pv": libxl(pv_stream()),
    "libxl-hvm-xenstore": libxl_hvm(xenstore=b"physmap/f0000000/start_addr\0f0000000\0physmap/f0000000/name\0vga\0"),
    "xl-pv": xl(libxl(pv_stream())),
    "remus-libxc": ckpt_libxc(),
    "remus-libxc-with-end": ckpt_libxc(end=True),
    "remus-libxl-pv": libxl_checkpointed_pv(3),
    "colo-libxl-pv": libxl_checkpointed_pv(2, colo=True),
    "remus-libxl-hvm-ending-with-end": libxl_checkpointed_hvm(2) + empty(0) + empty(XL_END),  # libxc END, libxl END
    "live-with-verify-pass": pv(page_data(PV_PAGES[2:]), empty(VERIFY), page_data(PV_PAGES)),
    "hvm-context-before-params": hvm(),  # Xen's order, against the spec's sentence (spec A1)
    "hvm-params-in-two-records": hvm(tail=hvm_checkpoint_tail() + [hvm_params(((12, 2),))]),  # Xen's converter
    "broken-and-xalloc-entries": pv(page_data([(3, BROKEN)]), page_data([(3, 0xE)])),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_streams_have_no_findings(name):
    report = verify_bytes(VALID[name], colo=name.startswith("colo"))
    assert report.ok and not report.warnings, report.lines()


def test_spec_worked_example_fails_where_the_spec_says_xen_restore_fails():
    """Spec 7: the example passes Xen's verifier, but restore fails at END: cr3 points at a NOTAB page."""
    example = libxc([pv_info(), SDE, p2m_frames(0, 0, [0]), page_data([(0, NOTAB)]),
                     vcpu(VCPU_BASIC, 0, bytes(5168))], major=4, minor=20)
    assert hashlib.sha256(example).hexdigest() == "7e5ec5d368b02f9f8dd453be9776fddf22156829fb45cb913f40b5405e70283d"
    report = verify_bytes(example)
    assert [e.message for e in report.errors] == [
        "vcpu 0 (X86_PV_VCPU_BASIC record 4): cr3 pfn 0x0 has page type 0x0, not an L4 table (Xen's restore fails)"]
    assert sorted(w.message.split(" (")[0] for w in report.warnings) == ["no SHARED_INFO in this stream",
                                                                          "no X86_TSC_INFO in this stream"]


def test_report_summary_fields():
    report = verify_bytes(libxl_checkpointed_pv(3))
    assert (report.format, report.version, report.guest_type, report.checkpoints) == ("libxl", 3, "PV", 3)


def test_findings_name_offset_index_and_record():
    stream = pv(vcpu(VCPU_XSAVE, 0, bytes(8)))
    report = verify_bytes(stream)
    (finding,) = report.errors
    offset = stream.index(struct.pack("<II", VCPU_XSAVE, 16))
    assert (finding.offset, finding.layer, finding.record) == (offset, "libxc", "X86_PV_VCPU_XSAVE")
    assert finding.index == 6  # after X86_PV_INFO, CPUID, MSR, STATIC_DATA_END, P2M_FRAMES, PAGE_DATA


def test_where_xens_verifier_is_wrong_we_follow_xens_restore():
    """Spec section 8. Xen's verify-stream-v2 rejects these streams, Xen's restore code accepts them:
    A20, a non-empty EMULATOR_XENSTORE_DATA (a bytes/str comparison under Python 3); A13, checkpointed
    streams (its libxc verifier reads on past CHECKPOINT); A4, an unknown optional record (restore skips it:
    we warn). tests/interop/test_verify_xen.py shows Xen's script failing on each."""
    assert verify_bytes(libxl_hvm(xenstore=b"physmap/f0000000/name\0vga\0")).ok
    assert verify_bytes(libxl_checkpointed_pv(2)).ok
    assert verify_bytes(ckpt_libxc()).ok
    optional = verify_bytes(pv(rec(0x80000001, b"x")))
    assert optional.ok and [w.record for w in optional.warnings] == ["UNKNOWN(0x80000001)"]


def test_where_xens_verifier_is_lax_we_follow_xens_restore():
    """Xen's verifier accepts these; Xen's restore refuses them (spec 6.2), so they are errors here:
    width/levels pairs other than 4/3 and 8/4 (A6), a big-endian image header (A14), PV records in an HVM stream."""
    assert not verify_bytes(pv(static=[pv_info(8, 3), SDE])).ok
    assert not verify_bytes(pv_stream()[:16] + b"\x00\x01" + pv_stream()[18:]).ok
    assert not verify_bytes(hvm(shared_info())).ok
