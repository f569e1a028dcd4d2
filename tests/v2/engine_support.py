"""Helpers for the engine tests: seeded guests, saves, restores, record surgery, and the spec 8.1 comparison."""

from __future__ import annotations

import hashlib
import io
import struct
import tempfile
from array import array

import attrs

from xenstream.hv import abi
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.xen import SimXen
from xenstream.v2 import constants as C
from xenstream.v2.restore import RestoreResult, restore_new_domain
from xenstream.v2.save import save_pv
from xenstream.v2.snapshot import GuestDigest, snapshot
from xenstream.v2.writer import V2Writer

STORE_EVTCHN = 5
CONSOLE_EVTCHN = 6
HEADERS = C.IMAGE_HEADER_SIZE + C.DOMAIN_HEADER_SIZE
_RECORD = struct.Struct("<II")


def new_host(spec: GuestSpec, seed: int = 0) -> SimXen:
    return SimXen(capacity_frames=2 * spec.nr_pages + 16 * abi.SUPERPAGE_FRAMES, seed=seed)


@attrs.define
class Source:
    """A built guest, suspended and saved: its host, guest model, digest at suspension and the stream."""

    spec: GuestSpec
    xen: SimXen
    guest: PvGuest
    digest: GuestDigest
    stream: bytes


def suspend_of(guest: PvGuest):
    def suspend() -> bool:
        guest.suspend()
        return True

    return suspend


def save_guest(xen: SimXen, guest: PvGuest) -> bytes:
    out = io.BytesIO()
    save_pv(xen, guest.domid, V2Writer(out), suspend_of(guest))
    return out.getvalue()


def make_source(text: str, host_seed: int = 0) -> Source:
    spec = GuestSpec.parse(text)
    xen = new_host(spec, host_seed)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    stream = save_guest(xen, guest)
    return Source(spec=spec, xen=xen, guest=guest, digest=snapshot(PvGuestView.open(xen, guest.domid)), stream=stream)


def chunked(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


def restore(stream: bytes, spec: GuestSpec, *, host_seed: int = 1, chunk: int = 1 << 20, max_pages: int | None = None,
            xen: SimXen | None = None, via_fd: bool = False) -> tuple[SimXen, RestoreResult]:
    """Restore `stream` into a new domain: fed in chunks, or (via_fd) read by the engine from a file."""
    xen = xen or new_host(spec, host_seed)
    if via_fd:
        with tempfile.TemporaryFile() as file:
            file.write(stream)
            file.seek(0)
            result = restore_new_domain(xen, file.fileno(), max_vcpus=spec.vcpus,
                                        max_pages=max_pages if max_pages is not None else spec.nr_pages,
                                        store_evtchn=STORE_EVTCHN, console_evtchn=CONSOLE_EVTCHN)
        return xen, result
    result = restore_new_domain(xen, chunked(stream, chunk), max_vcpus=spec.vcpus,
                                max_pages=max_pages if max_pages is not None else spec.nr_pages,
                                store_evtchn=STORE_EVTCHN, console_evtchn=CONSOLE_EVTCHN)
    return xen, result


def restored_digest(xen: SimXen, result: RestoreResult) -> GuestDigest:
    return snapshot(PvGuestView.with_p2m(xen, result.domid, result.p2m, result.max_pfn))


# ------------------------------------------------------------------ record surgery


@attrs.define
class Record:
    type: int
    body: bytes


def split(stream: bytes) -> tuple[bytes, list[Record]]:
    """Headers and records of a bare libxc stream (padding dropped)."""
    records, pos = [], HEADERS
    while pos < len(stream):
        rtype, length = _RECORD.unpack_from(stream, pos)
        records.append(Record(rtype, stream[pos + 8:pos + 8 + length]))
        pos += 8 + length + (-length & 7)
    return stream[:HEADERS], records


def join(headers: bytes, records: list[Record]) -> bytes:
    out = bytearray(headers)
    for record in records:
        out += _RECORD.pack(record.type, len(record.body)) + record.body + bytes(-len(record.body) & 7)
    return bytes(out)


def find(records: list[Record], rtype: int, nth: int = 0) -> int:
    return [i for i, r in enumerate(records) if r.type == rtype][nth]


def page_data_entries(body: bytes) -> tuple[list[int], list[int]]:
    count = struct.unpack_from("<I", body)[0]
    words = struct.unpack_from(f"<{count}Q", body, 8)
    return [w & C.PFN_MASK for w in words], [w >> C.PFN_TYPE_SHIFT for w in words]


def set_page_entry(body: bytes, index: int, pfn: int, page_type: int) -> bytes:
    out = bytearray(body)
    struct.pack_into("<Q", out, 8 + 8 * index, (page_type << C.PFN_TYPE_SHIFT) | pfn)
    return bytes(out)


def locate_page(records: list[Record], pfn: int) -> tuple[int, int, int]:
    """(record index, entry index, payload offset in the body) of the data page of `pfn`."""
    for i, record in enumerate(records):
        if record.type != C.REC_PAGE_DATA:
            continue
        pfns, types = page_data_entries(record.body)
        if pfn in pfns:
            entry = pfns.index(pfn)
            data_before = sum(abi.pagetype_has_data(t) for t in types[:entry])
            return i, entry, 8 + 8 * len(pfns) + data_before * abi.PAGE_SIZE
    raise KeyError(pfn)


def vcpu_basic_word(width: int, field: str) -> tuple[int, str]:
    layout = abi.VCPU_CONTEXT_LAYOUTS[width]
    return 8 + getattr(layout, field), layout.word


# ------------------------------------------------------------------ spec 8.1


def exempt_pfns(guest: PvGuest) -> set[int]:
    """Pages the restore patches on purpose (8.1 item 1): start_info, the console ring, the P2M leaves."""
    layout = guest.layout
    return {layout.start_info_pfn, layout.console_pfn, *layout.p2m_pfns}


def assert_same_guest(source: GuestDigest, target: GuestDigest, exempt: set[int]) -> None:
    assert (target.width, target.levels, target.p2m_size) == (source.width, source.levels, source.p2m_size)
    src, dst = source.by_pfn(), target.by_pfn()
    assert dst.keys() == src.keys(), "populated pfns differ"
    for pfn, page in src.items():
        other = dst[pfn]
        assert (other.type, other.pinned) == (page.type, page.pinned), f"pfn {pfn:#x}: type/pin differ"
        if pfn not in exempt:
            assert other.sha256 == page.sha256, f"pfn {pfn:#x}: contents differ"
    assert target.vcpus == source.vcpus


def assert_p2m_bijection(xen: SimXen, result: RestoreResult) -> None:
    """8.1 item 2: every valid P2M entry is a frame the domain owns, M2P maps it back, no frame twice."""
    m2p = xen.m2p_view()
    seen = set()
    for pfn, mfn in enumerate(result.p2m):
        if mfn == abi.INVALID_MFN:
            continue
        assert xen.frame_owner(mfn) == result.domid, f"pfn {pfn:#x}: mfn {mfn:#x} not owned"
        assert m2p[mfn] == pfn, f"pfn {pfn:#x}: M2P[{mfn:#x}] = {m2p[mfn]:#x}"
        assert mfn not in seen
        seen.add(mfn)


def word(view, offset: int, width: int) -> int:
    return int.from_bytes(bytes(view[offset:offset + width]), "little")


def assert_start_info(xen: SimXen, result: RestoreResult, source_page: bytes, layout) -> None:
    """8.1 item 6: only the documented start_info fields change."""
    width = result.width
    si = abi.START_INFO_LAYOUTS[width]
    page = bytes(xen.machine.frame(result.p2m[layout.start_info_pfn]))
    assert word(page, si.store_mfn, width) == result.p2m[layout.store_pfn] == result.store_mfn
    assert word(page, si.console_mfn, width) == result.p2m[layout.console_pfn] == result.console_mfn
    assert word(page, si.store_evtchn, 4) == STORE_EVTCHN
    assert word(page, si.console_evtchn, 4) == CONSOLE_EVTCHN
    assert word(page, si.nr_pages, width) == result.max_pfn + 1
    info = xen.get_domain_info(result.domid)
    assert word(page, si.shared_info, width) == info.shared_info_frame << abi.PAGE_SHIFT
    assert word(page, si.flags, 4) == 0
    patched = {si.store_mfn, si.console_mfn, si.store_evtchn, si.console_evtchn, si.nr_pages, si.shared_info, si.flags}
    mask = bytearray(abi.PAGE_SIZE)
    for offset in patched:
        size = 4 if offset in (si.store_evtchn, si.console_evtchn, si.flags) else width
        mask[offset:offset + size] = b"\1" * size
    assert all(m or a == b for a, b, m in zip(page, source_page, mask))


def assert_shared_info(xen: SimXen, result: RestoreResult, source_page: bytes) -> None:
    """8.1 item 7: vcpu_info[] and arch copied; FLL zero, pending selectors and bits clear, all masked."""
    layout = abi.SHARED_INFO_LAYOUTS[result.width]
    page = bytes(xen.shared_info(result.domid))
    width = result.width
    for vcpu in range(abi.XEN_LEGACY_MAX_VCPUS):
        base = vcpu * abi.VCPU_INFO_SIZE
        assert word(page, base + layout.evtchn_pending_sel, width) == 0
        expected = bytearray(source_page[base:base + abi.VCPU_INFO_SIZE])
        expected[layout.evtchn_pending_sel:layout.evtchn_pending_sel + width] = bytes(width)
        assert page[base:base + abi.VCPU_INFO_SIZE] == expected
    assert page[layout.evtchn_pending:layout.evtchn_pending + layout.evtchn_bytes] == bytes(layout.evtchn_bytes)
    assert page[layout.evtchn_mask:layout.evtchn_mask + layout.evtchn_bytes] == b"\xff" * layout.evtchn_bytes
    arch = bytearray(source_page[layout.arch:layout.arch_end])
    fll = layout.pfn_to_mfn_frame_list_list - layout.arch
    arch[fll:fll + width] = bytes(width)
    assert page[layout.arch:layout.arch_end] == arch


def assert_guest_p2m(xen: SimXen, result: RestoreResult, layout) -> None:
    """8.1 item 8: the P2M leaf pages hold the new pfn -> mfn table in guest width."""
    fmt = "Q" if result.width == abi.WIDTH_64 else "I"
    words = array(fmt)
    for pfn in layout.p2m_pfns:
        words.extend(xen.machine.frame(result.p2m[pfn]).cast(fmt))
    invalid = abi.INVALID_MFN_FOR_WIDTH[result.width]
    expected = [invalid if m == abi.INVALID_MFN else m for m in result.p2m]
    assert list(words[:len(expected)]) == expected


def stream_page(stream: bytes, pfn: int) -> bytes:
    headers, records = split(stream)
    index, _, offset = locate_page(records, pfn)
    return records[index].body[offset:offset + abi.PAGE_SIZE]


def shared_info_record(stream: bytes) -> bytes:
    _, records = split(stream)
    return records[find(records, C.REC_SHARED_INFO)].body


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()
