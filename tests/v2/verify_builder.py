"""Byte-level stream construction for the verifier's tests, written from the spec's tables.

Deliberately independent of xenstream.v2's writer: the verifier is checked against bytes packed
here by hand, so a shared misreading of the format cannot make both sides agree. Every builder
takes the fields it packs as keywords, so a test can break exactly one of them.
"""

from __future__ import annotations

import struct

PAGE = 4096

# libxc record types (spec 3.0)
END, PAGE_DATA, PV_INFO, P2M_FRAMES, VCPU_BASIC, VCPU_EXTENDED, VCPU_XSAVE = 0, 1, 2, 3, 4, 5, 6
SHARED_INFO, TSC_INFO, HVM_CONTEXT, HVM_PARAMS, TOOLSTACK, VCPU_MSRS = 7, 8, 9, 0xA, 0xB, 0xC
VERIFY, CHECKPOINT, DIRTY_PFN_LIST, STATIC_DATA_END, CPUID_POLICY, MSR_POLICY = 0xD, 0xE, 0xF, 0x10, 0x11, 0x12
# libxl record types (spec 4.2)
XL_END, LIBXC_CONTEXT, EMU_XENSTORE, EMU_CONTEXT, CHECKPOINT_END, CHECKPOINT_STATE = 0, 1, 2, 3, 4, 5

NOTAB, L1TAB, L2TAB, L3TAB, L4TAB, PIN, BROKEN, XALLOC, XTAB = 0, 1, 2, 3, 4, 8, 0xD, 0xE, 0xF

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"


def rec(rtype: int, body: bytes = b"", *, length: int | None = None, pad: bytes | None = None) -> bytes:
    length = len(body) if length is None else length
    if pad is None:
        pad = bytes(-len(body) % 8)
    return struct.pack("<II", rtype, length) + body + pad


def ihdr(version=3, options=0, res1=0, res2=0, marker=0xFFFFFFFFFFFFFFFF, ident=0x58454E46) -> bytes:
    return struct.pack(">QIIHHI", marker, ident, version, options, res1, res2)


def dhdr(gtype=1, page_shift=12, res=0, major=4, minor=17) -> bytes:
    return struct.pack("<IHHII", gtype, page_shift, res, major, minor)


def has_data(ptype: int) -> bool:
    return (ptype & 7) <= 4 and ptype not in (BROKEN, XALLOC, XTAB)


def page_data(entries, *, count=None, reserved=0, extra_pages=0, fill=0, raw_words=None) -> bytes:
    """entries: (pfn, type) pairs; pages of `fill` bytes follow for those whose type carries data."""
    words = raw_words if raw_words is not None else [(t << 60) | pfn for pfn, t in entries]
    n_data = sum(1 for w in words if has_data(w >> 60)) + extra_pages
    body = struct.pack("<II", len(words) if count is None else count, reserved)
    body += struct.pack(f"<{len(words)}Q", *words) + bytes([fill]) * (PAGE * n_data)
    return rec(PAGE_DATA, body)


def pv_info(width=8, levels=4, reserved=bytes(6)) -> bytes:
    return rec(PV_INFO, struct.pack("<BB", width, levels) + reserved)


def p2m_frames(start=0, end=3, frames=None, width=8) -> bytes:
    fpp = PAGE // width
    if frames is None:
        frames = [2] * (end // fpp - start // fpp + 1)
    return rec(P2M_FRAMES, struct.pack(f"<II{len(frames)}Q", start, end, *frames))


def vcpu(rtype: int, vcpu_id: int, blob: bytes, reserved=0) -> bytes:
    return rec(rtype, struct.pack("<II", vcpu_id, reserved) + blob)


def basic_context(width=8, *, cr3_pfn=0, start_info_pfn=1, gdt_ents=0, gdt_frames=(), cr1=0) -> bytes:
    """A vcpu_guest_context with only the fields restore looks at filled in (offsets: spec 3.5)."""
    if width == 8:
        ctx = bytearray(5168)
        struct.pack_into("<Q", ctx, 616, start_info_pfn)
        for i, frame in enumerate(gdt_frames):
            struct.pack_into("<Q", ctx, 4832 + 8 * i, frame)
        struct.pack_into("<Q", ctx, 4960, gdt_ents)
        struct.pack_into("<Q", ctx, 4992, cr1)
        struct.pack_into("<Q", ctx, 5008, cr3_pfn << 12)
    else:
        ctx = bytearray(2800)
        struct.pack_into("<I", ctx, 524, start_info_pfn)
        for i, frame in enumerate(gdt_frames):
            struct.pack_into("<I", ctx, 2640 + 4 * i, frame)
        struct.pack_into("<I", ctx, 2704, gdt_ents)
        struct.pack_into("<I", ctx, 2728, ((cr3_pfn << 12) | (cr3_pfn >> 20)) & 0xFFFFFFFF)
    return bytes(ctx)


def shared_info(length=PAGE) -> bytes:
    return rec(SHARED_INFO, bytes(length))


def tsc_info(mode=0, khz=2_000_000, nsec=0, incarnation=0, reserved=0) -> bytes:
    return rec(TSC_INFO, struct.pack("<IIQII", mode, khz, nsec, incarnation, reserved))


def hvm_context(blob=b"\x01\x00\x00\x00\x18\x00\x00\x00" + bytes(24) + bytes(8)) -> bytes:
    return rec(HVM_CONTEXT, blob)


def hvm_params(pairs=((1, 0xFEFFF), (17, 0xFEFFE)), *, count=None, reserved=0) -> bytes:
    body = struct.pack("<II", len(pairs) if count is None else count, reserved)
    for index, value in pairs:
        body += struct.pack("<QQ", index, value)
    return rec(HVM_PARAMS, body)


def cpuid_policy(leaves=1) -> bytes:
    return rec(CPUID_POLICY, struct.pack("<6I", 0, 0xFFFFFFFF, 0xD, 0, 0, 0) * leaves)


def msr_policy(entries=1) -> bytes:
    return rec(MSR_POLICY, struct.pack("<IIQ", 0xCE, 0, 0) * entries)


def empty(rtype: int) -> bytes:
    return rec(rtype)


# ---- whole streams -------------------------------------------------------------------------------

PV_PAGES = [(0, L4TAB | PIN), (1, NOTAB), (2, NOTAB), (3, NOTAB)]  # cr3, start info, p2m frame, data
HVM_PAGES = [(0, NOTAB), (1, NOTAB), (2, XTAB), (3, NOTAB)]


def pv_static(version=3, width=8, levels=4, policies=True) -> list[bytes]:
    if version < 3:
        return [pv_info(width, levels)]
    static = [pv_info(width, levels)]
    if policies:
        static += [cpuid_policy(), msr_policy()]
    return static + [empty(STATIC_DATA_END)]


def pv_checkpoint_tail(width=8, vcpus=1) -> list[bytes]:
    tail = [tsc_info(), shared_info()]
    for vcpu_id in range(vcpus):
        tail.append(vcpu(VCPU_BASIC, vcpu_id, basic_context(width)))
        tail.append(vcpu(VCPU_EXTENDED, vcpu_id, bytes(64)))
    return tail


def pv_pages(levels=4) -> list[tuple[int, int]]:
    """PV_PAGES with the top-level table of a guest with `levels` levels at pfn 0."""
    return [(0, levels | PIN)] + PV_PAGES[1:]


def pv_records(version=3, width=8, levels=None, vcpus=1, pages=None) -> list[bytes]:
    levels = levels or (4 if width == 8 else 3)
    pages = pv_pages(levels) if pages is None else pages
    return (
        pv_static(version, width, levels)
        + [p2m_frames(0, 3, width=width), page_data(pages)]
        + pv_checkpoint_tail(width, vcpus)
    )


def hvm_static(version=3) -> list[bytes]:
    return [cpuid_policy(), msr_policy(), empty(STATIC_DATA_END)] if version >= 3 else []


def hvm_checkpoint_tail() -> list[bytes]:
    return [tsc_info(), hvm_context(), hvm_params()]


def hvm_records(version=3) -> list[bytes]:
    return hvm_static(version) + [page_data(HVM_PAGES)] + hvm_checkpoint_tail()


def libxc(records, *, version=3, gtype=1, end=True, **dhdr_fields) -> bytes:
    return ihdr(version) + dhdr(gtype, **dhdr_fields) + b"".join(records) + (empty(END) if end else b"")


def pv_stream(version=3, **kw) -> bytes:
    return libxc(pv_records(version, **kw), version=version, gtype=1)


def hvm_stream(version=3) -> bytes:
    return libxc(hvm_records(version), version=version, gtype=2)


def libxl_header(version=2, options=0, ident=0x4C6962786C466D74) -> bytes:
    return struct.pack(">QII", ident, version, options)


def emulator(rtype: int, blob: bytes, emu_id=2, index=0) -> bytes:
    return rec(rtype, struct.pack("<II", emu_id, index) + blob)


def libxl(libxc_bytes: bytes, after=(), *, options=0, end=True) -> bytes:
    return (libxl_header(options=options) + empty(LIBXC_CONTEXT) + libxc_bytes + b"".join(after)
            + (empty(XL_END) if end else b""))


def libxl_pv(version=3) -> bytes:
    return libxl(pv_stream(version))


def libxl_hvm(version=3, xenstore=b"") -> bytes:
    after = [emulator(EMU_XENSTORE, xenstore)] if xenstore else []
    return libxl(hvm_stream(version), after + [emulator(EMU_CONTEXT, b"\xb0\xb1\xb2\xb3\xb4")])


def xl(payload: bytes, mflags=3, config=b"{}\0", byteorder=0x01020304, optional=None) -> bytes:
    optional = struct.pack("<I", len(config)) + config if optional is None else optional
    return XL_MAGIC + struct.pack("<IIII", byteorder, mflags, 0, len(optional)) + optional + payload


# ---- checkpointed streams ------------------------------------------------------------------------

def pv_checkpoint_records(checkpoints=2) -> list[bytes]:
    """libxc records of a Remus-style PV stream: each checkpoint is memory, tail, CHECKPOINT."""
    out = pv_static() + [p2m_frames(0, 3)]
    for n in range(checkpoints):
        out += [page_data(PV_PAGES if n == 0 else PV_PAGES[3:])] + pv_checkpoint_tail() + [empty(CHECKPOINT)]
    return out


def libxl_checkpointed_pv(checkpoints=2, colo=False) -> bytes:
    """libxl checkpointed stream: after each libxc CHECKPOINT, libxl records up to CHECKPOINT_END."""
    out = libxl_header() + empty(LIBXC_CONTEXT) + ihdr() + dhdr(1)
    out += b"".join(pv_static() + [p2m_frames(0, 3)])
    for n in range(checkpoints):
        out += page_data(PV_PAGES if n == 0 else PV_PAGES[3:]) + b"".join(pv_checkpoint_tail())
        out += empty(CHECKPOINT) + empty(CHECKPOINT_END)
        if colo:
            out += rec(CHECKPOINT_STATE, struct.pack("<I", 0))
    return out


def libxl_checkpointed_hvm(checkpoints=2) -> bytes:
    out = libxl_header() + empty(LIBXC_CONTEXT) + ihdr() + dhdr(2) + b"".join(hvm_static())
    for n in range(checkpoints):
        out += page_data(HVM_PAGES) + b"".join(hvm_checkpoint_tail()) + empty(CHECKPOINT)
        out += emulator(EMU_CONTEXT, b"ctx") + empty(CHECKPOINT_END)
    return out
