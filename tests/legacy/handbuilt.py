"""Hand-built v1 byte streams for the parser tests, written with struct straight from the spec tables.

Deliberately independent of `xenstream.legacy.writer`: these bytes check the parser against the spec,
not against our own writer. `Stream.mark(name)` records the offset where the next element begins.
"""

from __future__ import annotations

import struct

PAGE = 4096
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
GO = b"domain is yours, you are cleared to unpause\0"


def page(fill: int) -> bytes:
    return bytes([fill & 0xFF]) * PAGE


class Stream:
    def __init__(self, width: int = 64):
        self.word = width // 8
        self.parts: list[bytes] = []
        self.size = 0
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> "Stream":
        self.marks[name] = self.size
        return self

    def raw(self, data: bytes) -> "Stream":
        self.parts.append(bytes(data))
        self.size += len(data)
        return self

    def ulong(self, *values: int) -> "Stream":
        return self.raw(struct.pack("<" + ("I" if self.word == 4 else "Q") * len(values), *values))

    def u32(self, *values: int) -> "Stream":
        return self.raw(struct.pack(f"<{len(values)}I", *values))

    def i32(self, value: int) -> "Stream":
        return self.raw(struct.pack("<i", value))

    def bytes(self) -> bytes:
        return b"".join(self.parts)

    # --- wrappers ---------------------------------------------------------------------------------

    def xl_header(self, config: bytes = b'{"c_info": {"type": "pv"}}\0', flags: int = 1) -> "Stream":
        optional = struct.pack("<I", len(config)) + config
        return self.raw(XL_MAGIC + struct.pack("<IIII", 0x01020304, flags, 0, len(optional)) + optional)

    # --- PV header -------------------------------------------------------------------------------

    def pv_header(self, p2m_size: int, guest_width: int = 8, xcnt: int | None = None, frames=None) -> "Stream":
        context = 0x1430 if guest_width == 8 else 0xAF0
        blocks = b"vcpu" + struct.pack("<I", context) + bytes(context) + b"extv" + struct.pack("<I", 0)
        if xcnt is not None:
            blocks += b"xcnt" + struct.pack("<II", 4, xcnt)
        self.mark("p2m_size").ulong(p2m_size)
        self.mark("extended_info").raw(b"\xff" * self.word).u32(len(blocks)).raw(blocks)
        per_frame = PAGE // guest_width
        count = -(-p2m_size // per_frame)
        frames = list(range(count)) if frames is None else frames
        return self.mark("p2m_frames").ulong(*frames)

    # --- body ------------------------------------------------------------------------------------

    def batch(self, entries, pages=()) -> "Stream":
        self.i32(len(entries)).ulong(*entries)
        for data in pages:
            self.raw(data)
        return self

    def tsc(self, mode=1, nsec=2, khz=3, incarnation=4) -> "Stream":
        return self.i32(-7).raw(struct.pack("<IQII", mode, nsec, khz, incarnation))

    def vcpu_info(self, max_id: int, *words: int) -> "Stream":
        return self.i32(-2).i32(max_id).raw(struct.pack(f"<{len(words)}Q", *words))

    def hvm_param(self, chunk_id: int, value: int, pad: int = 0) -> "Stream":
        return self.i32(chunk_id).raw(struct.pack("<IQ", pad, value))

    def toolstack(self, blob: bytes) -> "Stream":
        return self.i32(-18).u32(len(blob)).raw(blob)

    def end_body(self) -> "Stream":
        return self.mark("end_of_body").i32(0)

    # --- tails -----------------------------------------------------------------------------------

    def pv_tail(self, vcpus, unmapped=(), guest_width: int = 8, xsave: bytes | None = None) -> "Stream":
        self.mark("tail").u32(len(unmapped)).ulong(*unmapped)
        context = 0x1430 if guest_width == 8 else 0xAF0
        for vcpu in vcpus:
            self.raw(bytes([vcpu + 1]) * context).raw(struct.pack("<II", vcpu, 56) + bytes(120))
            if xsave is not None:
                self.raw(struct.pack("<QQ", 7, len(xsave)) + xsave)
        return self.mark("shared_info").raw(page(0x55))

    def hvm_tail(self, context: bytes = b"HVMCTX") -> "Stream":
        self.mark("tail").raw(struct.pack("<QQQ", 0xFEFFF, 0xFEFFE, 0xFEFFD))
        return self.u32(len(context)).raw(context)

    def dm_record(self, state: bytes = b"QEVM-state", signature: bytes = b"DeviceModelRecord0002") -> "Stream":
        return self.mark("dm").raw(signature).u32(len(state)).raw(state)


def toolstack_blob(entries, width: int = 64, gap: bytes = b"\0\0\0\0") -> bytes:
    """libxl physmap blob: (phys_offset, start_addr, size, name-with-NUL or None) per entry."""
    out = struct.pack("<II", 1, len(entries))
    for phys_offset, start, size, name in entries:
        name = name or b""
        out += struct.pack("<QQQI", phys_offset, start, size, len(name)) + name
        if width == 64:
            out += gap
    return out


def minimal_pv(width: int = 64, guest_width: int = 8, last: bool = True, xcnt: int | None = None) -> Stream:
    """p2m_size 16: pfns 0-3 (pfn 2 an L1 table, pinned L4 at 3), an XTAB, a BROKEN pfn 9; 1 VCPU."""
    s = Stream(width)
    s.pv_header(16, guest_width, xcnt=xcnt)
    s.mark("tsc").tsc()
    s.mark("batch").batch(
        [0, 1, 0x10000002, 0xC0000003, 0xF0000000, 0xD0000009], [page(1), page(2), page(3), page(4)]
    )
    s.mark("vcpu_info").vcpu_info(0, 1)
    s.mark("toolstack").toolstack(toolstack_blob([], width))
    if last:
        s.mark("last").i32(-9)
    s.end_body()
    xsave = bytes(range(xcnt - 16)) if xcnt else None
    return s.pv_tail([0], unmapped=[12, 13], guest_width=guest_width, xsave=xsave)


HVM_PARAMS = {-3: 12, -4: 15, -8: 17, -10: 19, -11: 9, -14: 34, -15: 27, -16: 28, -17: 29, -19: 32, -20: 33, -21: 36}


def minimal_hvm(width: int = 64, dm: bytes = b"DeviceModelRecord0002", last: bool = True) -> Stream:
    s = Stream(width)
    s.mark("p2m_size").ulong(0x20)
    s.mark("tsc").tsc()
    s.mark("batch").batch([0, 1, 0xF0000000, 0xE0000003], [page(7), page(8)])
    s.mark("vcpu_info").vcpu_info(1, 3)
    for chunk_id in HVM_PARAMS:
        s.hvm_param(chunk_id, 0x1000 - chunk_id)
    s.toolstack(toolstack_blob([(0xF0000000, 0xF1000000, 0x800000, b"vga\0")], width, gap=b"\xde\xad\xbe\xef"))
    if last:
        s.i32(-9)
    s.end_body()
    s.hvm_tail()
    if dm == b"QemuDeviceModelRecord":
        return s.mark("dm").raw(dm + b"QEVM" + b"q" * 100)
    return s.dm_record(signature=dm)
