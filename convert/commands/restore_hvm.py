"""HVM guests for `xenstream restore`: v2 HVM streams, and v1 HVM streams converted on the fly.

Adds no command of its own. Discovered after `restore`, it looks at the input's first bytes (the v2
domain header, or the v1 detection) and takes HVM streams: a v2 stream goes to the HVM restore engine
(page payloads straight from the fd into the guest); a v1 stream is converted to a v2 libxl stream by
the converter's transformer (so the device-model record arrives as EMULATOR_CONTEXT) and fed to it.
A failed restore destroys the half-built domain and fails with one line naming the problem.

``--report json`` for an HVM guest: guest_type "hvm", p2m_size, store_pfn, console_pfn, vcpus (id,
online), pages (pfn, type, sha256 of the page as a fresh save emits it), params (index, name, value
of every non-zero migrated param), hvm_context (sha256, and its records: typecode, name, instance,
length), emulator (id, context sha256 and length, the xenstore keys) as the restore handed them back.
"""

from __future__ import annotations

import hashlib
import json

from xenstream.convert import fdio
from xenstream.convert.commands import restore as restore_command
from xenstream.hv import hvm_params
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.legacy.events import Detected
from xenstream.legacy.parser import LegacyParser
from xenstream.v2 import constants as C
from xenstream.v2.errors import StreamError
from xenstream.v2.events import NEED_DATA, EndOfStream, Header
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import DomainHeader
from xenstream.v2.restore_hvm import HvmRestoreResult, restore_hvm_new_domain
from xenstream.v2.snapshot_hvm import hvm_snapshot

MAX_VCPUS = 128


def v2_guest_type(head: bytes) -> int | None:
    """The domain header's guest type, when `head` reaches it."""
    reader = V2Reader(layer="auto", payload="passthrough", strict=False)
    reader.feed(head)
    try:
        while True:
            event = reader.next_event()
            if event is NEED_DATA or isinstance(event, EndOfStream):
                return None
            if isinstance(event, Header) and isinstance(event.header, DomainHeader):
                return event.header.guest_type
    except StreamError:
        return None  # the PV restore reports it


def v1_is_hvm(head: bytes) -> bool:
    parser = LegacyParser()
    parser.feed(head)
    try:
        event = parser.next_event()
    except LegacyStreamError:
        return False
    return isinstance(event, Detected) and event.guest == "hvm"


def report(xen: SimXen, result: HvmRestoreResult) -> dict:
    digest = hvm_snapshot(xen, result.domid)
    top = max(digest.vcpus_online, default=0)
    emulator = None
    if result.emulator_context is not None:
        emulator = {"id": result.emulator_id, "context_sha256": hashlib.sha256(result.emulator_context).hexdigest(),
                    "context_length": len(result.emulator_context),
                    "xenstore": {key.decode(errors="replace"): value.decode(errors="replace")
                                 for key, value in result.xenstore}}
    return {
        "guest_type": "hvm",
        "p2m_size": digest.p2m_size,
        "store_pfn": result.store_gfn,
        "console_pfn": result.console_gfn,
        "vcpus": [{"id": v, "online": v in digest.vcpus_online} for v in range(top + 1)],
        "pages": [{"pfn": p.pfn, "type": p.type, "sha256": p.sha256} for p in digest.pages],
        "params": [{"index": i, "name": hvm_params.name(i), "value": v} for i, v in digest.params],
        "hvm_context": {"sha256": digest.context_sha256,
                        "records": [{"typecode": r.typecode, "name": r.name, "instance": r.instance, "length": r.length}
                                    for r in digest.context_records]},
        "emulator": emulator,
    }


def restore_hvm(args, fd: int, head: bytes) -> int | None:
    if restore_command.is_v2(head):
        if v2_guest_type(head) != C.DOMAIN_TYPE_X86_HVM:
            return None
        source, initial = fd, head
    elif v1_is_hvm(head):
        source = restore_command.legacy_chunks(head, fdio.read_chunks(fd, restore_command.READ_SIZE), fmt="libxl")
        initial = b""
    else:
        return None
    frames = args.host_frames or restore_command.host_frames(fd)
    xen = SimXen(capacity_frames=frames)
    result = restore_hvm_new_domain(xen, source, initial=initial, max_vcpus=MAX_VCPUS, max_pages=frames)
    if args.report == "json":
        print(json.dumps(report(xen, result)))
        return 0
    online = sum(xen.get_vcpu_online(result.domid, v) for v in range(MAX_VCPUS))
    emulator = "no emulator records" if result.emulator_context is None else (
        f"emulator context {len(result.emulator_context)} bytes, {len(result.xenstore)} xenstore keys")
    print(f"restored an HVM guest as domain {result.domid}: {result.pages_populated} gfns populated, "
          f"{result.pages_written} written, {online} vcpus online, {len(result.params)} params, "
          f"HVM context {len(result.context)} bytes, xenstore gfn {result.store_gfn:#x}, "
          f"console gfn {result.console_gfn:#x}, {emulator}")
    return 0


def register(subparsers) -> None:
    if restore_hvm not in restore_command.GUEST_RESTORES:
        restore_command.GUEST_RESTORES.append(restore_hvm)
