"""The libxc layer's rules (spec 3.20-3.23, 6.1, 6.2, 6.4), as a state machine over decoded records.

`LibxcRules` is told about the headers and each record as a strict V2Reader decodes it (PAGE_DATA: its
pfns and types; the page payloads are never needed) and reports findings through a callback. The strict
reader has already refused what a single record shows to be malformed (framing, padding, reserved fields,
fixed lengths, unknown mandatory types); what is left is what depends on the guest type, the stream
version, the order of records and the state built up so far. Only small state is kept (flags, counters,
the pfn fields of each vcpu's last BASIC context), never a record's payload.
"""

from __future__ import annotations

import struct
from typing import Callable, ClassVar

import attrs

from xenstream.hv.abi import PAGE_SIZE
from xenstream.v2 import constants as C
from xenstream.v2.records import libxc_record_name
from xenstream.v2.verify_pages import first_above, first_duplicate, is_ascending_run, table_count
from xenstream.v2.verify_pagetypes import TRACK_LIMIT, PageTypes
from xenstream.v2.verify_report import ERROR, WARNING

PV, HVM = C.DOMAIN_TYPE_X86_PV, C.DOMAIN_TYPE_X86_HVM

PV_ONLY = frozenset({
    C.REC_X86_PV_INFO, C.REC_X86_PV_P2M_FRAMES, C.REC_X86_PV_VCPU_BASIC, C.REC_X86_PV_VCPU_EXTENDED,
    C.REC_X86_PV_VCPU_XSAVE, C.REC_X86_PV_VCPU_MSRS, C.REC_SHARED_INFO,
})
HVM_ONLY = frozenset({C.REC_HVM_CONTEXT, C.REC_HVM_PARAMS})
ILLEGAL_FOR = {PV: HVM_ONLY, HVM: PV_ONLY}
GUEST_NAMES = {PV: "PV", HVM: "HVM"}
V3_ONLY = frozenset({C.REC_STATIC_DATA_END, C.REC_X86_CPUID_POLICY, C.REC_X86_MSR_POLICY})
STATIC = frozenset({C.REC_X86_PV_INFO, C.REC_X86_CPUID_POLICY, C.REC_X86_MSR_POLICY})
NEVER_FORWARD = {
    C.REC_TOOLSTACK: "TOOLSTACK is obsolete (never written by a released Xen); Xen's restore fails on it",
    C.REC_CHECKPOINT_DIRTY_PFN_LIST: "CHECKPOINT_DIRTY_PFN_LIST belongs to the COLO back channel, never the forward stream",
}
VCPU_RECORDS = frozenset({C.REC_X86_PV_VCPU_BASIC, C.REC_X86_PV_VCPU_EXTENDED, C.REC_X86_PV_VCPU_XSAVE, C.REC_X86_PV_VCPU_MSRS})
# What may follow VERIFY: its second memory pass and the end-of-checkpoint group.
AFTER_VERIFY = frozenset({C.REC_PAGE_DATA, C.REC_X86_TSC_INFO, C.REC_SHARED_INFO, C.REC_HVM_CONTEXT,
                          C.REC_HVM_PARAMS, C.REC_END}) | VCPU_RECORDS
VALID_PV_INFO = frozenset({(4, 3), (8, 4)})
BASIC_SIZE = {8: C.VCPU_CONTEXT_SIZE_64, 4: C.VCPU_CONTEXT_SIZE_32}
EXTENDED_MAX = 128
XSAVE_MIN = 16
TSC_MODES = 4
FIRST_RESERVED_GDT_ENTRY = 7168
# Xen's MAX_VIRT_CPUS on x86: a PV domain's per-vcpu GDT/LDT slots fill a 1 GiB area, 128 KiB each.
# No vcpu id at or above it can be restored, so per-vcpu state never grows beyond it.
X86_PV_MAX_VCPUS = 8192
# p2m frame list entries kept for the type checks (a 4 GiB 64-bit guest has 2048)
P2M_TRACK_LIMIT = 1 << 20

# vcpu_guest_context field offsets (spec 3.5): start-info pfn (rdx/edx), gdt_frames, gdt_ents, cr1 (64-bit), cr3
_CONTEXT_FIELDS = {
    8: {"edx": (616, "<Q"), "gdt_frames": (4832, "<16Q"), "gdt_ents": (4960, "<Q"), "cr1": (4992, "<Q"), "cr3": (5008, "<Q")},
    4: {"edx": (524, "<I"), "gdt_frames": (2640, "<16I"), "gdt_ents": (2704, "<I"), "cr3": (2728, "<I")},
}

Report = Callable[[str, int | None, int | None, str, str], None]


@attrs.define
class Basic:
    """The fields of a vcpu's last BASIC context that restore turns from pfns into mfns."""

    offset: int
    index: int
    start_info: int
    gdt_frames: tuple[int, ...]
    cr3_pfn: int
    cr1_pfn: int | None  # a 64-bit guest's user page table, when cr1 says it has one

    @classmethod
    def parse(cls, context: bytes, width: int, offset: int, index: int) -> Basic:
        fields = _CONTEXT_FIELDS[width]
        (edx,) = struct.unpack_from(fields["edx"][1], context, fields["edx"][0])
        (ents,) = struct.unpack_from(fields["gdt_ents"][1], context, fields["gdt_ents"][0])
        frames = struct.unpack_from(fields["gdt_frames"][1], context, fields["gdt_frames"][0])
        (cr3,) = struct.unpack_from(fields["cr3"][1], context, fields["cr3"][0])
        # 32-bit PAE guests store cr3 rotated ("extended cr3"): pfn << 12 | pfn >> 20
        cr3_pfn = cr3 >> 12 if width == 8 else ((cr3 >> 12) | (cr3 << 20)) & 0xFFFFFFFF
        cr1_pfn = None
        if width == 8:
            (cr1,) = struct.unpack_from(fields["cr1"][1], context, fields["cr1"][0])
            cr1_pfn = cr1 >> 12 if cr1 & 1 else None
        used = min(16, (min(ents, FIRST_RESERVED_GDT_ENTRY) + 511) // 512)
        return cls(offset=offset, index=index, start_info=edx, gdt_frames=frames[:used], cr3_pfn=cr3_pfn, cr1_pfn=cr1_pfn)


@attrs.define
class Checkpoint:
    """What one checkpoint (or the only one, in a plain stream) has carried so far."""

    records: int = 0
    tsc: bool = False
    shared_info: bool = False
    hvm_context: bool = False
    hvm_params: set = attrs.field(factory=set)  # HVM_PARAM indexes set in this checkpoint
    vcpu_records: set = attrs.field(factory=set)  # (vcpu_id, type)
    vcpu_state_seen: bool = False


@attrs.define
class LibxcRules:
    """Fed image_header(), domain_header(), then record() for each record in stream order."""

    report: Report
    checkpointed: bool | None = None  # None: decided by the stream (a CHECKPOINT makes it checkpointed)
    max_vcpus: int | None = None
    expected_guest: int | None = None  # the type of the domain being restored into, when known

    version: int = 0
    guest: int = 0
    static_done: bool = False  # STATIC_DATA_END seen (v3) or inferred (v2)
    sde_count: int = 0
    pv_info: tuple[int, int] | None = None
    max_pfn: int | None = None
    p2m: dict = attrs.field(factory=dict)  # p2m frame list index -> frame pfn (last record wins, as in Xen)
    page_types: PageTypes = attrs.field(factory=PageTypes)
    policies: dict = attrs.field(factory=dict)
    verify_seen: bool = False
    checkpoints: int = 0
    current: Checkpoint = attrs.field(factory=Checkpoint)
    basic_vcpus: dict = attrs.field(factory=dict)  # vcpu_id -> Basic
    hvm_context_seen: bool = False
    any_pages: bool = False
    pages: int = 0  # page payloads carried (every pass and checkpoint counted)

    # ---- headers -------------------------------------------------------------------------------

    def image_header(self, offset: int, header) -> None:
        self.version = header.version

    def domain_header(self, offset: int, header) -> None:
        self.guest = header.guest_type
        if self.expected_guest is not None and self.guest != self.expected_guest:
            self.report(ERROR, offset, None, "domain header", f"a {GUEST_NAMES.get(self.guest)} stream cannot be restored "
                        f"into a {GUEST_NAMES[self.expected_guest]} domain (Xen's restore fails)")

    # ---- records -------------------------------------------------------------------------------

    def record(self, offset: int, index: int, rtype: int, length: int, body) -> None:
        """One record: `body` is the reader's decoded object (None for a skipped optional record)."""
        name = libxc_record_name(rtype)
        if not self._admit(offset, index, rtype, name):
            return
        handler = self._HANDLERS.get(rtype)
        if handler is not None:
            handler(self, offset, index, name, length, body)
        if rtype in VCPU_RECORDS:
            self.current.vcpu_state_seen = True

    def _error(self, offset, index, name, message):
        self.report(ERROR, offset, index, name, message)

    def _warn(self, offset, index, name, message):
        self.report(WARNING, offset, index, name, message)

    def _admit(self, offset: int, index: int, rtype: int, name: str) -> bool:
        """Stream-level legality of a record; False when its body is not worth looking at."""
        self.current.records += 1
        if rtype not in KNOWN:  # the reader refuses unknown mandatory types; this one has bit 31 set
            self._warn(offset, index, name, "unknown optional record: Xen's restore skips it, its verifier rejects it")
            return False
        if rtype in NEVER_FORWARD:
            self._error(offset, index, name, NEVER_FORWARD[rtype])
            return False
        if rtype in ILLEGAL_FOR.get(self.guest, ()):
            self._error(offset, index, name, f"record not legal for {GUEST_NAMES[self.guest]} guests (Xen's restore fails)")
            return False
        if rtype in V3_ONLY and self.version < 3:
            self._error(offset, index, name, f"record not defined in stream version {self.version} (a v3 record)")
        if self.version >= 3 and not self.static_done and rtype not in STATIC and rtype != C.REC_STATIC_DATA_END:
            if rtype in (C.REC_PAGE_DATA, C.REC_X86_PV_P2M_FRAMES):
                self._error(offset, index, name, "record before STATIC_DATA_END (Xen's restore fails)")
            elif rtype not in (C.REC_END, C.REC_CHECKPOINT):  # those get the completeness check
                self._warn(offset, index, name, "record in the static section, before STATIC_DATA_END")
        if self.verify_seen and rtype not in AFTER_VERIFY:
            self._warn(offset, index, name, "record after VERIFY other than memory or end-of-checkpoint state")
        return True

    def _infer_static_end(self) -> None:
        if self.version < 3:
            self.static_done = True

    # ---- per type ------------------------------------------------------------------------------

    def _end(self, offset, index, name, length, body):
        if not self.checkpoints:
            self._complete(offset, index, name)
        elif self.current.records > 1:  # restore resumes from the last CHECKPOINT, already checked complete
            self._warn(offset, index, name, f"{self.current.records - 1} records after the last CHECKPOINT: "
                       "Xen's restore discards them and resumes from the last checkpoint")

    def _checkpoint(self, offset, index, name, length, body):
        if self.checkpointed is False:
            self._error(offset, index, name, "CHECKPOINT in a stream that is not checkpointed (Xen's restore fails)")
        else:
            self.checkpointed = True
        if self.verify_seen:
            self._warn(offset, index, name, "VERIFY in a checkpointed stream: Xen writes it only in plain live saves")
        self._complete(offset, index, name)
        self.checkpoints += 1
        self.current = Checkpoint()

    def _verify(self, offset, index, name, length, body):
        if self.verify_seen:
            self._warn(offset, index, name, "second VERIFY record (Xen writes at most one)")
        self.verify_seen = True

    def _static_data_end(self, offset, index, name, length, body):
        self.sde_count += 1
        if self.sde_count > 1:
            self._error(offset, index, name, "second STATIC_DATA_END (Xen's restore fails)")
        self.static_done = True

    def _policy(self, offset, index, name, rtype: int):
        if self.static_done and self.version >= 3:
            self._warn(offset, index, name, "policy after STATIC_DATA_END: Xen's restore accepts it but never applies it")
        elif rtype in self.policies:
            self._warn(offset, index, name, "second policy record of this kind; Xen applies only the last")
        self.policies[rtype] = offset

    def _cpuid_policy(self, offset, index, name, length, body):
        self._policy(offset, index, name, C.REC_X86_CPUID_POLICY)

    def _msr_policy(self, offset, index, name, length, body):
        self._policy(offset, index, name, C.REC_X86_MSR_POLICY)

    def _pv_info(self, offset, index, name, length, body):
        if self.pv_info is not None:
            self._error(offset, index, name, "second X86_PV_INFO (Xen's restore fails)")
        pair = (body.guest_width, body.pt_levels)
        if pair not in VALID_PV_INFO:
            self._error(offset, index, name, f"guest_width {pair[0]} with pt_levels {pair[1]}: "
                        "Xen accepts only 4 with 3 and 8 with 4")
        if self.static_done and self.version >= 3:
            self._warn(offset, index, name, "static record after STATIC_DATA_END")
        if self.pv_info is None:  # an invalid width still has to size the vcpu and p2m checks
            self.pv_info = (pair[0] if pair[0] in BASIC_SIZE else 8, pair[1])

    def _p2m_frames(self, offset, index, name, length, body):
        self._infer_static_end()
        if self.pv_info is None:
            self._error(offset, index, name, "X86_PV_P2M_FRAMES before X86_PV_INFO (Xen's restore fails)")
        start, end = body.start_pfn, body.end_pfn
        if start > end:
            self._error(offset, index, name, f"start pfn {start:#x} above end pfn {end:#x}")
            return
        width = self.pv_info[0] if self.pv_info else 8
        per_frame = PAGE_SIZE // width
        frames = end // per_frame - start // per_frame + 1
        if len(body.frames) != frames:
            self._error(offset, index, name, f"length {length}, expected {8 + 8 * frames} for pfns {start:#x}-{end:#x} "
                        f"({frames} frames of {per_frame} entries)")
            return
        self.max_pfn = end if self.max_pfn is None else max(self.max_pfn, end)
        self.page_types.cover(self.max_pfn)
        first = start // per_frame
        if len(self.p2m) + frames <= P2M_TRACK_LIMIT:
            self.p2m.update(zip(range(first, first + frames), body.frames))
        else:
            self._warn(offset, index, name, f"more than {P2M_TRACK_LIMIT} p2m frames: their pfns are not checked")

    def _vcpu(self, offset, index, name, length, body, rtype: int):
        vcpu_id = body.vcpu_id
        blob = len(body.context)
        if blob == 0:
            self._warn(offset, index, name, f"vcpu {vcpu_id}: empty context (Xen's restore skips it; savers since 4.9 omit it)")
            return
        if self.max_vcpus is not None and vcpu_id >= self.max_vcpus:
            self._error(offset, index, name, f"vcpu_id {vcpu_id} not below the domain's {self.max_vcpus} vcpus")
        if vcpu_id >= X86_PV_MAX_VCPUS:
            self._error(offset, index, name, f"vcpu_id {vcpu_id}: an x86 PV domain has at most {X86_PV_MAX_VCPUS} vcpus")
            return
        width = self.pv_info[0] if self.pv_info else 8
        if rtype == C.REC_X86_PV_VCPU_BASIC:
            expected = BASIC_SIZE[width]
            if blob != expected:
                self._error(offset, index, name, f"vcpu {vcpu_id}: context {blob} bytes, expected {expected} for a {width * 8}-bit guest")
            else:
                self.basic_vcpus[vcpu_id] = Basic.parse(body.context, width, offset, index)
        elif rtype == C.REC_X86_PV_VCPU_EXTENDED and blob > EXTENDED_MAX:
            self._error(offset, index, name, f"vcpu {vcpu_id}: context {blob} bytes, more than {EXTENDED_MAX}")
        elif rtype == C.REC_X86_PV_VCPU_XSAVE and blob < XSAVE_MIN:
            self._error(offset, index, name, f"vcpu {vcpu_id}: context {blob} bytes, fewer than {XSAVE_MIN}")
        elif rtype == C.REC_X86_PV_VCPU_MSRS and blob % 16:
            self._error(offset, index, name, f"vcpu {vcpu_id}: context {blob} bytes, not a multiple of 16")
        records = self.current.vcpu_records
        key = (vcpu_id, rtype)
        if key in records:
            self._warn(offset, index, name, f"vcpu {vcpu_id}: repeated in one checkpoint; the later record replaces the earlier")
        elif rtype != C.REC_X86_PV_VCPU_BASIC and (vcpu_id, C.REC_X86_PV_VCPU_BASIC) not in records:
            self._warn(offset, index, name, f"vcpu {vcpu_id}: no X86_PV_VCPU_BASIC before it in this checkpoint")
        records.add(key)

    def _vcpu_basic(self, offset, index, name, length, body):
        self._vcpu(offset, index, name, length, body, C.REC_X86_PV_VCPU_BASIC)

    def _vcpu_extended(self, offset, index, name, length, body):
        self._vcpu(offset, index, name, length, body, C.REC_X86_PV_VCPU_EXTENDED)

    def _vcpu_xsave(self, offset, index, name, length, body):
        self._vcpu(offset, index, name, length, body, C.REC_X86_PV_VCPU_XSAVE)

    def _vcpu_msrs(self, offset, index, name, length, body):
        self._vcpu(offset, index, name, length, body, C.REC_X86_PV_VCPU_MSRS)

    def _shared_info(self, offset, index, name, length, body):
        if self.pv_info is None:
            self._error(offset, index, name, "SHARED_INFO before X86_PV_INFO (Xen's restore fails)")
        if self.current.shared_info:
            self._warn(offset, index, name, "second SHARED_INFO in one checkpoint")
        self.current.shared_info = True

    def _tsc_info(self, offset, index, name, length, body):
        if body.mode >= TSC_MODES:
            self._warn(offset, index, name, f"unknown TSC mode {body.mode}")
        if self.current.tsc:
            self._warn(offset, index, name, "second X86_TSC_INFO in one checkpoint")
        self.current.tsc = True

    def _hvm_context(self, offset, index, name, length, body):
        if self.current.hvm_context:
            self._warn(offset, index, name, "second HVM_CONTEXT in one checkpoint; Xen loads only the last")
        self.current.hvm_context = True
        self.hvm_context_seen = True

    def _hvm_params(self, offset, index, name, length, body):
        if not body.params:
            self._warn(offset, index, name, "no entries (Xen's restore skips it; savers since 4.9 omit it)")
        # Xen's legacy converter writes two HVM_PARAMS records with different parameters; what is suspicious
        # is one parameter set twice, where the later value silently wins.
        seen = self.current.hvm_params
        repeated = sorted({param for param, _ in body.params if param in seen})
        if repeated:
            self._warn(offset, index, name, f"HVM params {', '.join(map(str, repeated))} set again in one checkpoint; "
                       "the later values win")
        seen.update(param for param, _ in body.params)

    def _page_data(self, offset, index, name, length, body):
        self._infer_static_end()
        pfns = body.pfns
        count = len(pfns)
        ascending_run = is_ascending_run(pfns)
        if self.guest == HVM:
            tables = table_count(body.types)
            if tables:
                self._warn(offset, index, name, f"{tables} pagetable-typed entries in an HVM stream")
        if count > C.MAX_BATCH_SIZE:
            self._warn(offset, index, name, f"{count} entries; Xen's saver writes at most {C.MAX_BATCH_SIZE} per record")
        if self.guest == PV:
            if self.max_pfn is None:
                self._error(offset, index, name, "PAGE_DATA before X86_PV_P2M_FRAMES: no pfn is valid yet (Xen's restore fails)")
            else:
                above = first_above(pfns, self.max_pfn)
                if above is not None:
                    self._error(offset, index, name, f"entry {above[0]}: pfn {above[1]:#x} above the p2m's last pfn "
                                f"{self.max_pfn:#x} (Xen's restore fails)")
                self.page_types.record(pfns, body.types, ascending_run)
        duplicate = first_duplicate(pfns, ascending_run)
        if duplicate is not None:
            self._warn(offset, index, name, f"pfn {duplicate:#x} appears more than once in one record")
        if self.current.vcpu_state_seen:
            self._warn(offset, index, name, "memory after vcpu state in the same checkpoint")
        self.any_pages = True
        self.pages += body.page_count

    # ---- completeness ------------------------------------------------------------------------

    def _complete(self, offset: int, index: int, name: str) -> None:
        """Is the state carried so far one a restore can finish with (at END and at each CHECKPOINT)?"""
        what = "checkpoint" if name == "CHECKPOINT" else "stream"
        if self.version >= 3 and not self.sde_count:
            self._error(offset, index, name, f"{what} without STATIC_DATA_END (mandatory in v3)")
        if self.guest == PV:
            if self.pv_info is None:
                self._error(offset, index, name, f"{what} without X86_PV_INFO")
            if self.max_pfn is None:
                self._error(offset, index, name, f"{what} without X86_PV_P2M_FRAMES")
            if 0 not in self.basic_vcpus:
                self._error(offset, index, name, f"{what} without X86_PV_VCPU_BASIC for vcpu 0 (Xen's restore fails)")
            if not self.current.shared_info:
                self._warn(offset, index, name, f"no SHARED_INFO in this {what} (Xen always sends one)")
            self._restore_checks(offset, index, name)
        elif self.guest == HVM and not self.hvm_context_seen:
            self._error(offset, index, name, f"{what} without HVM_CONTEXT (Xen's restore fails)")
        if not self.current.tsc:
            self._warn(offset, index, name, f"no X86_TSC_INFO in this {what} (Xen always sends one)")
        if not self.any_pages:
            self._warn(offset, index, name, f"{what} without any PAGE_DATA")

    def _restore_checks(self, offset: int, index: int, name: str) -> None:
        """What PV restore checks at END when it turns the pfns in vcpu state and in the p2m frame list into
        mfns: each must be within the p2m and a populated page of the right type (spec 6.2, R18)."""
        if self.max_pfn is None:
            return
        levels = self.pv_info[1] if self.pv_info else 4

        def problem(pfn: int, wanted_level: int | None) -> str | None:
            if pfn > self.max_pfn:
                return f"above the last pfn {self.max_pfn:#x}"
            return self.page_types.problem(pfn, wanted_level)

        for vcpu_id, basic in sorted(self.basic_vcpus.items()):
            checks = [(f"GDT frame {i}", pfn, None) for i, pfn in enumerate(basic.gdt_frames)]
            checks.append(("cr3", basic.cr3_pfn, levels))
            if basic.cr1_pfn is not None:
                checks.append(("user cr1", basic.cr1_pfn, levels))
            if vcpu_id == 0:
                checks.insert(0, ("start-info", basic.start_info, None))
            for what, pfn, wanted in checks:
                why = problem(pfn, wanted)
                if why:
                    self._error(offset, index, name, f"vcpu {vcpu_id} (X86_PV_VCPU_BASIC record {basic.index}): "
                                f"{what} pfn {pfn:#x} {why} (Xen's restore fails)")
        bad = [(k, pfn, why) for k, pfn in sorted(self.p2m.items()) if (why := problem(pfn, None))]
        if bad:
            k, pfn, why = bad[0]
            more = f" ({len(bad) - 1} more entries like it)" if len(bad) > 1 else ""
            self._error(offset, index, name, f"p2m frame list entry {k}: frame pfn {pfn:#x} {why}{more} "
                        "(Xen's restore fails)")
        if self.page_types.overflow:
            self._warn(offset, index, name, f"page types tracked for the first {TRACK_LIMIT} pfns only")

    _HANDLERS: ClassVar[dict] = {}


LibxcRules._HANDLERS = {
    C.REC_END: LibxcRules._end,
    C.REC_CHECKPOINT: LibxcRules._checkpoint,
    C.REC_VERIFY: LibxcRules._verify,
    C.REC_STATIC_DATA_END: LibxcRules._static_data_end,
    C.REC_X86_CPUID_POLICY: LibxcRules._cpuid_policy,
    C.REC_X86_MSR_POLICY: LibxcRules._msr_policy,
    C.REC_X86_PV_INFO: LibxcRules._pv_info,
    C.REC_X86_PV_P2M_FRAMES: LibxcRules._p2m_frames,
    C.REC_X86_PV_VCPU_BASIC: LibxcRules._vcpu_basic,
    C.REC_X86_PV_VCPU_EXTENDED: LibxcRules._vcpu_extended,
    C.REC_X86_PV_VCPU_XSAVE: LibxcRules._vcpu_xsave,
    C.REC_X86_PV_VCPU_MSRS: LibxcRules._vcpu_msrs,
    C.REC_SHARED_INFO: LibxcRules._shared_info,
    C.REC_X86_TSC_INFO: LibxcRules._tsc_info,
    C.REC_HVM_CONTEXT: LibxcRules._hvm_context,
    C.REC_HVM_PARAMS: LibxcRules._hvm_params,
    C.REC_PAGE_DATA: LibxcRules._page_data,
}

KNOWN = frozenset(LibxcRules._HANDLERS) | frozenset(NEVER_FORWARD)
