"""The composite helpers restore calls at completion (spec 7.6), built on the Hypervisor protocol only."""

from __future__ import annotations

import errno
import struct

from xenstream.hv import abi
from xenstream.hv.interface import Hypervisor, HypervisorError

_GRANT_ENTRY = struct.Struct("<HHI")  # grant_entry_v1: flags, domid, frame


def _map_one(hv: Hypervisor, domid: int, gfn: int) -> memoryview:
    view = hv.map_foreign(domid, [gfn], writable=True)[0]
    if view is None:
        raise HypervisorError(errno.ENOENT, f"cannot map gfn {gfn:#x} of domain {domid}")
    return view


def seed_grant_table(hv: Hypervisor, domid: int, console_gfn: int, store_gfn: int,
                     console_domid: int, store_domid: int) -> None:
    """Write the two reserved v1 grant entries: console (0) and xenstore (1), permit-access.

    The frame field is 32 bits wide; like Xen's own toolstack the gfn is truncated to it.
    """
    frame = hv.map_grant_frame(domid, 0)
    for index, gfn, backend in ((abi.GNTTAB_RESERVED_CONSOLE, console_gfn, console_domid),
                                (abi.GNTTAB_RESERVED_XENSTORE, store_gfn, store_domid)):
        _GRANT_ENTRY.pack_into(frame, index * abi.GRANT_ENTRY_V1_SIZE, abi.GTF_PERMIT_ACCESS, backend,
                               gfn & 0xFFFF_FFFF)


def console_ring_init(hv: Hypervisor, domid: int, gfn: int, clear: bool) -> None:
    """Mark the console ring disconnected (optionally zeroing it first: HVM does, PV does not)."""
    page = _map_one(hv, domid, gfn)
    if clear:
        page[:] = bytes(abi.PAGE_SIZE)
    page[abi.XENCONSOLE_CONNECTION_OFFSET] = abi.XENCONSOLE_DISCONNECTED


def clear_page(hv: Hypervisor, domid: int, gfn: int) -> None:
    _map_one(hv, domid, gfn)[:] = bytes(abi.PAGE_SIZE)
