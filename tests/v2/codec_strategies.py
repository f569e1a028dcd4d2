"""Hypothesis strategies for v2 record objects and whole streams, plus a reader driver that normalises events
(PAGE_DATA payload chunks joined per record) so that different feeding patterns can be compared."""

from __future__ import annotations

import io

from hypothesis import strategies as st

from xenstream.hv.abi import PAGE_SIZE
from xenstream.v2 import constants as C
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.events import NEED_DATA, EndOfStream, PagePayload
from xenstream.v2.reader import V2Reader
from xenstream.v2.writer import V2Writer
from xenstream.v2.xl_header import XlHeader

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
small_blob = st.binary(max_size=40)

VALID_PAGE_TYPES = [0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF]


def vcpu_record(cls, min_size=0):
    return st.builds(cls, vcpu_id=u32, context=st.binary(min_size=min_size, max_size=64))


page_data = st.lists(
    st.tuples(st.integers(0, C.PFN_MASK), st.sampled_from(VALID_PAGE_TYPES)), min_size=1, max_size=6
).map(lambda entries: R.PageData(pfns=[p for p, _ in entries], types=[t for _, t in entries]))

libxc_body = st.one_of(
    st.builds(R.X86PvInfo, guest_width=u8, pt_levels=u8),
    st.builds(R.X86PvP2mFrames, start_pfn=u32, end_pfn=u32, frames=st.lists(u64, max_size=5)),
    vcpu_record(R.X86PvVcpuBasic),
    vcpu_record(R.X86PvVcpuExtended),
    vcpu_record(R.X86PvVcpuXsave),
    vcpu_record(R.X86PvVcpuMsrs),
    st.builds(R.SharedInfo, data=st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE)),
    st.builds(R.X86TscInfo, mode=u32, khz=u32, nsec=u64, incarnation=u32),
    st.builds(R.HvmContext, data=st.binary(min_size=1, max_size=40)),
    st.builds(R.HvmParams, params=st.lists(st.tuples(u64, u64), max_size=4)),
    st.builds(R.Verify),
    st.builds(R.StaticDataEnd),
    st.builds(R.CheckpointDirtyPfnList, pfns=st.lists(u64, max_size=5)),
    st.builds(R.X86CpuidPolicy, leaves=st.lists(st.builds(R.CpuidLeaf, u32, u32, u32, u32, u32, u32), min_size=1, max_size=3)),
    st.builds(R.X86MsrPolicy, entries=st.lists(st.builds(R.MsrEntry, idx=u32, val=u64), min_size=1, max_size=3)),
    page_data,
)

emulator_id = st.sampled_from([C.EMULATOR_UNKNOWN, C.EMULATOR_QEMU_TRADITIONAL, C.EMULATOR_QEMU_UPSTREAM])
libxl_body = st.one_of(
    st.builds(L.EmulatorXenstoreData, emulator_id=emulator_id, index=u32, data=small_blob),
    st.builds(L.EmulatorContext, emulator_id=emulator_id, index=u32, data=small_blob),
)

image_header = st.builds(R.ImageHeader, version=st.sampled_from([2, 3]))
domain_header = st.builds(R.DomainHeader, guest_type=st.sampled_from([1, 2]), xen_major=u32, xen_minor=u32)
xl_header = st.builds(
    XlHeader.with_config, config=st.binary(max_size=30), byteorder=st.sampled_from(["<", ">"])
)


@st.composite
def streams(draw):
    """(bytes, description) of a valid stream: a list of what was written, for comparing with the reader."""
    wrap = draw(st.sampled_from(["libxc", "libxl", "xl"]))
    checkpoints = draw(st.integers(0, 2)) if wrap != "xl" else 0
    seed = draw(st.integers(0, 255))
    sink = io.BytesIO()
    w = V2Writer(sink)
    written = []
    if wrap == "xl":
        header = draw(xl_header)
        w.xl_header(header)
        written.append(header)
    if wrap in ("libxl", "xl"):
        header = L.LibxlHeader(options=draw(st.sampled_from([0, C.LIBXL_OPTION_LEGACY])))
        w.libxl_header(header)
        written.append(header)
        w.libxl_record(L.LibxcContext())
        written.append(L.LibxcContext())
    for header, write in ((draw(image_header), w.image_header), (draw(domain_header), w.domain_header)):
        write(header)
        written.append(header)

    def libxc_records():
        for body in draw(st.lists(libxc_body, max_size=6)):
            if isinstance(body, R.PageData):
                payload = b"".join(bytes([(seed + i) & 0xFF]) * PAGE_SIZE for i in range(body.page_count))
                w.page_data(body.pfns, body.types, [payload])
                written.append((body, payload))
            else:
                w.record(body)
                written.append(body)

    def libxl_records():
        for body in draw(st.lists(libxl_body, max_size=2)):
            w.libxl_record(body)
            written.append(body)

    libxc_records()
    for _ in range(checkpoints):
        w.record(R.Checkpoint())
        written.append(R.Checkpoint())
        if wrap != "libxc":
            libxl_records()
            w.libxl_record(L.CheckpointEnd())
            written.append(L.CheckpointEnd())
        libxc_records()
    end_with_end = checkpoints == 0 or draw(st.booleans())
    if end_with_end:
        w.record(R.End())
        written.append(R.End())
        if wrap != "libxc":
            libxl_records()
            w.libxl_record(L.LibxlEnd())
            written.append(L.LibxlEnd())
    elif wrap == "libxc":
        w.record(R.Checkpoint())
        written.append(R.Checkpoint())
    else:
        w.record(R.Checkpoint())
        written.append(R.Checkpoint())
        w.libxl_record(L.CheckpointEnd())
        written.append(L.CheckpointEnd())
    return Stream(sink.getvalue(), written)


class Stream(tuple):
    """(data, written) with a short repr, so failing examples stay readable."""

    def __new__(cls, data, written):
        return super().__new__(cls, (data, written))

    def __repr__(self) -> str:
        names = [type(x[0] if isinstance(x, tuple) else x).__name__ for x in self[1]]
        return f"Stream({len(self[0])} bytes: {' '.join(names)})"


def chunked(data: bytes, sizes):
    """Split data into chunks of the given sizes, cycling through them."""
    sizes = list(sizes) or [len(data) or 1]
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = max(1, sizes[i % len(sizes)])
        out.append(data[pos : pos + size])
        pos += size
        i += 1
    return out


def read_events(chunks, **reader_options):
    """Feed chunks one by one and return the event list with each record's payload chunks joined into one
    ("payload", record_index, offset, bytes) entry, so any feeding pattern gives an identical list."""
    reader = V2Reader(**reader_options)
    pending = list(chunks) + [b""]
    events = []
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            reader.feed(pending.pop(0))
            continue
        if isinstance(event, PagePayload):
            data = bytes(event.data)
            if events and isinstance(events[-1], tuple) and events[-1][1] == event.record_index:
                _, index, offset, previous = events.pop()
                events.append(("payload", index, offset, previous + data))
            else:
                events.append(("payload", event.record_index, event.offset, data))
            continue
        events.append(event)
        if isinstance(event, EndOfStream):
            return events
