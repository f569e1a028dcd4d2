"""What a fresh v2 save of an HVM domain would carry, digested (spec save-restore-engines 8.2).

Per populated gfn its page type and the sha256 of the page as a save emits it (raw: nothing is
normalised for HVM), the non-zero migrated params, the HVM context's records and a hash of the whole
blob, and which vcpus are up. Two HVM guests are the same exactly when these digests agree. Used by
`xenstream restore --report json` and by the round-trip tests.
"""

from __future__ import annotations

import hashlib

import attrs

from xenstream.hv import abi, hvm_context
from xenstream.hv.guestview import hypervisor_call
from xenstream.hv.interface import Hypervisor
from xenstream.v2.save_hvm import migrated_params

_DATALESS = frozenset(abi.pfinfo_from_pagetype(t) for t in abi.PAGETYPES_WITHOUT_DATA)
_XTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_XTAB)


@attrs.frozen
class HvmPageDigest:
    pfn: int
    type: str
    sha256: str | None  # None for a type without data (BROKEN, XALLOC)


@attrs.frozen
class HvmDigest:
    p2m_size: int
    pages: tuple[HvmPageDigest, ...]
    params: tuple[tuple[int, int], ...]
    context_sha256: str
    context_records: tuple[hvm_context.ContextRecord, ...]
    vcpus_online: tuple[int, ...]

    def by_pfn(self) -> dict[int, HvmPageDigest]:
        return {page.pfn: page for page in self.pages}


def hvm_snapshot(hv: Hypervisor, domid: int) -> HvmDigest:
    info = hypervisor_call("get domain info", hv.get_domain_info, domid)
    p2m_size = hypervisor_call("maximum gpfn", hv.get_max_gpfn, domid) + 1
    pages: list[HvmPageDigest] = []
    for first in range(0, p2m_size, abi.MAX_BATCH_SIZE):
        gfns = range(first, min(first + abi.MAX_BATCH_SIZE, p2m_size))
        codes = hypervisor_call("page-type query", hv.get_page_types, domid, gfns)
        if set(codes) == {_XTAB}:
            continue
        data = [g for g, code in zip(gfns, codes) if code not in _DATALESS]
        views = dict(zip(data, hypervisor_call("map page batch", hv.map_foreign, domid, data))) if data else {}
        for gfn, code in zip(gfns, codes):
            if code == _XTAB:
                continue
            view = views.get(gfn)
            pages.append(HvmPageDigest(gfn, abi.pagetype_name(code >> abi.PFINFO_LTAB_SHIFT),
                                       hashlib.sha256(view).hexdigest() if view is not None else None))
    context = bytes(hypervisor_call("get HVM context", hv.get_hvm_context, domid))
    online = tuple(v for v in range(info.max_vcpu_id + 1)
                   if hypervisor_call(f"vcpu{v} info", hv.get_vcpu_online, domid, v))
    return HvmDigest(p2m_size=p2m_size, pages=tuple(pages), params=migrated_params(hv, domid),
                     context_sha256=hashlib.sha256(context).hexdigest(),
                     context_records=tuple(hvm_context.list_records(context)), vcpus_online=online)
