"""What a fresh v2 save of a PV domain would carry, digested: per-pfn type, pin and page hash, per-vcpu hash.

Two guests are the same modulo MFN renumbering exactly when these digests agree (spec 8.1 items 1, 4,
5): pagetables are hashed in their normalised (pfn) form and vcpu contexts with their frames as
pfns, so host frame numbers drop out. Used by `xenstream restore --report json` and by the
round-trip tests.

    digest = snapshot(PvGuestView.open(hv, domid))                  # a suspended source guest
    digest = snapshot(PvGuestView.with_p2m(hv, domid, p2m, max_pfn))  # a freshly restored one
"""

from __future__ import annotations

import hashlib

import attrs

from xenstream.hv import abi
from xenstream.hv.guestview import GuestStateError, PvGuestView, hypervisor_call
from xenstream.v2.save import SaveError, pages_of, stream_pages

_LEVEL_NAMES = {0: "NOTAB", 1: "L1TAB", 2: "L2TAB", 3: "L3TAB", 4: "L4TAB"}
_BATCH = abi.MAX_BATCH_SIZE


@attrs.frozen
class PageDigest:
    pfn: int
    type: str  # NOTAB, L1TAB..L4TAB, or BROKEN / XALLOC / XTAB for frames without data
    pinned: bool
    sha256: str | None  # of the 4096 bytes a save would emit; None when the type carries no data


@attrs.frozen
class VcpuDigest:
    id: int
    online: bool
    sha256: str | None  # of the normalised basic context; None for an offline vcpu


@attrs.frozen
class GuestDigest:
    width: int
    levels: int
    p2m_size: int
    pages: tuple[PageDigest, ...]
    vcpus: tuple[VcpuDigest, ...]

    def by_pfn(self) -> dict[int, PageDigest]:
        return {entry.pfn: entry for entry in self.pages}


def _type_name(page_type: int) -> str:
    level = abi.pagetable_level(page_type)
    if level or page_type in (abi.PAGETYPE_NOTAB, abi.PAGETYPE_LPINTAB):
        return _LEVEL_NAMES[level]
    return abi.pagetype_name(page_type)


def page_digests(view: PvGuestView) -> list[PageDigest]:
    """One entry per populated pfn (P2M entry valid), in pfn order."""
    out: list[PageDigest] = []
    for first in range(0, view.p2m_size, _BATCH):
        count = min(_BATCH, view.p2m_size - first)
        gfns = view.gfns(first, count)
        types, payloads = stream_pages(view, first, count)
        data = pages_of(payloads)
        for i, page_type in enumerate(types):
            digest = hashlib.sha256(next(data)).hexdigest() if abi.pagetype_has_data(page_type) else None
            if gfns[i] == abi.INVALID_MFN:
                continue
            pinned = bool(page_type & abi.PAGETYPE_LPINTAB) and abi.pagetable_level(page_type) > 0
            out.append(PageDigest(pfn=first + i, type=_type_name(page_type), pinned=pinned, sha256=digest))
    return out


def vcpu_digests(view: PvGuestView) -> list[VcpuDigest]:
    """Vcpus 0 .. the highest online one (a restore cannot tell how many offline vcpus followed)."""
    hv, domid = view.hv, view.domid
    online = [hypervisor_call(f"vcpu{v} info", hv.get_vcpu_online, domid, v) for v in range(view.info.max_vcpu_id + 1)]
    last = max((v for v, up in enumerate(online) if up), default=-1)
    out = []
    for vcpu in range(last + 1):
        digest = None
        if online[vcpu]:
            context = hypervisor_call(f"vcpu{vcpu} context", hv.get_vcpu_context, domid, vcpu)
            try:
                digest = hashlib.sha256(view.normalised_vcpu(vcpu, context).pack()).hexdigest()
            except GuestStateError as exc:
                raise SaveError(str(exc), exc.errno) from exc
        out.append(VcpuDigest(id=vcpu, online=online[vcpu], sha256=digest))
    return out


def snapshot(view: PvGuestView) -> GuestDigest:
    return GuestDigest(width=view.width, levels=view.levels, p2m_size=view.p2m_size,
                       pages=tuple(page_digests(view)), vcpus=tuple(vcpu_digests(view)))
