"""`xenstream restore FILE [--report json]`: restore a saved PV guest into a simulated Xen.

FILE (a path, fd number, or - for stdin) holds a v2 stream (bare libxc, libxl, or an xl save file)
or a legacy v1 stream, which is converted on the fly (the converter's transformer feeding the v2
restore engine, no temporary file). The restore runs into a fresh simulated host; if anything is
inconsistent the half-built domain is destroyed and the command fails with one line naming the
problem and its stream offset.

The report says what was restored. ``--report json`` prints one JSON object: guest_type,
guest_width (bytes), levels, p2m_size, start_info_pfn, store_pfn, console_pfn, pages (one entry per
populated pfn: pfn, type, pinned, sha256 of the page as a fresh save would emit it) and vcpus (id,
online, sha256 of the normalised basic context), up to the highest online vcpu.
"""

from __future__ import annotations

import json
import os
import stat
import struct

from xenstream.convert import fdio
from xenstream.convert.transform import ConvertOptions, Payload, Transformer
from xenstream.hv import abi
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.lazylog import get_logger
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.legacy.constants import XL_FIXED_SIZE, XL_FLAG_STREAMV2, XL_MAGIC
from xenstream.v2 import constants as C
from xenstream.v2.restore import RestoreResult, restore_new_domain
from xenstream.v2.snapshot import snapshot
from xenstream.v2.writer import V2Writer

log = get_logger(__name__)

READ_SIZE = 1 << 20
DEFAULT_HOST_FRAMES = 1 << 20  # 4 GiB
MAX_VCPUS = abi.XEN_LEGACY_MAX_VCPUS
_V2_STARTS = (struct.pack(">Q", C.IMAGE_MARKER) + struct.pack(">I", C.IMAGE_ID), struct.pack(">Q", C.LIBXL_IDENT))


def register(subparsers) -> None:
    parser = subparsers.add_parser("restore", help="restore a saved PV guest (v2, or v1 converted on the fly)",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("input", metavar="FILE", help="saved image: path, fd number, or - for stdin")
    parser.add_argument("--report", choices=("text", "json"), default="text", help="report format (default text)")
    parser.add_argument("--host-frames", type=int, default=None,
                        help="simulated host size in 4 KiB frames (default 4 GiB, or twice a bigger image)")
    parser.set_defaults(func=run)


def is_v2(head: bytes) -> bool:
    """True for the first bytes of a v2 stream: libxc image header, libxl header, or an xl header saying STREAMV2."""
    if head.startswith(_V2_STARTS):
        return True
    if head.startswith(XL_MAGIC) and len(head) >= XL_FIXED_SIZE:
        mandatory = int.from_bytes(head[len(XL_MAGIC) + 4:len(XL_MAGIC) + 8], "little")
        return bool(mandatory & XL_FLAG_STREAMV2)
    return False


class _Feed:
    """A file-like sink that hands everything written to a consumer (the restore engine's feed)."""

    def __init__(self, consume) -> None:
        self.write = consume


def legacy_chunks(head: bytes, rest, fmt: str = "libxc"):
    """The v2 stream (`fmt` libxc or libxl) converted from the v1 stream `head` + `rest`, as a generator of chunks."""
    out: list = []
    writer = V2Writer(_Feed(lambda data: out.append(bytes(data))))
    transformer = Transformer(writer, ConvertOptions(fmt=fmt))
    parser = LegacyParser()
    parser.feed(head)
    source = iter(rest)
    while not transformer.finished:
        event = parser.next_event()
        if event is NEED_DATA:
            parser.feed(next(source, b""))
            continue
        if event is DONE:
            break
        if transformer.handle(event) is not Payload.NOWHERE:
            raise AssertionError("a buffered parser hands its payloads with the batch")
        if out:
            yield from out
            out.clear()
    yield from out


def host_frames(fd: int) -> int:
    """A host of 4 GiB, or twice the image for bigger files: the same host (so the same mfns, and the same
    report) whether the image comes from a file or a pipe, room for 32-bit guests (low frames only)."""
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return max(DEFAULT_HOST_FRAMES, 2 * (info.st_size // abi.PAGE_SIZE) + 16 * abi.SUPERPAGE_FRAMES)
    return DEFAULT_HOST_FRAMES


def read_head(fd: int, head: bytes = b"") -> bytes:
    """At least the first XL_FIXED_SIZE bytes (fewer only at end of input)."""
    while len(head) < XL_FIXED_SIZE:
        data = os.read(fd, READ_SIZE)
        if not data:
            break
        head += data
    return head


def restore_fd(fd: int, frames: int, head: bytes = b"") -> tuple[SimXen, RestoreResult]:
    xen = SimXen(capacity_frames=frames)
    head = read_head(fd, head)
    if is_v2(head):
        source = fd  # page payloads go from the fd straight into the guest
    else:
        source, head = legacy_chunks(head, fdio.read_chunks(fd, READ_SIZE)), b""
    return xen, restore_new_domain(xen, source, initial=head, max_vcpus=MAX_VCPUS, max_pages=frames)


def report(xen: SimXen, result: RestoreResult) -> dict:
    view = PvGuestView.with_p2m(xen, result.domid, result.p2m, result.max_pfn)
    digest = snapshot(view)
    m2p = xen.m2p_view()
    return {
        "guest_type": "pv",
        "guest_width": result.width,
        "levels": result.levels,
        "p2m_size": result.max_pfn + 1,
        "start_info_pfn": result.start_info_pfn,
        "store_pfn": m2p[result.store_mfn],
        "console_pfn": m2p[result.console_mfn],
        "pages": [{"pfn": p.pfn, "type": p.type, "pinned": p.pinned, "sha256": p.sha256} for p in digest.pages],
        "vcpus": [{"id": v.id, "online": v.online, "sha256": v.sha256} for v in digest.vcpus],
    }


# Restores of other guest types (plug-ins such as restore_hvm): given (args, fd, head), each returns an
# exit code when the stream is its kind, or None to leave it to the PV restore.
GUEST_RESTORES: list = []


def run(args) -> int:
    fd, owned = fdio.open_input_fd(args.input)
    try:
        head = read_head(fd)
        for restore in GUEST_RESTORES:
            code = restore(args, fd, head)
            if code is not None:
                return code
        xen, result = restore_fd(fd, args.host_frames or host_frames(fd), head)
    finally:
        if owned:
            os.close(fd)
    if args.report == "json":
        print(json.dumps(report(xen, result)))
        return 0
    kind = "pv64" if result.width == abi.WIDTH_64 else "pv32"
    online = sum(xen.get_vcpu_online(result.domid, v) for v in range(MAX_VCPUS))
    print(f"restored a {kind} guest as domain {result.domid}: p2m_size {result.max_pfn + 1:#x}, "
          f"{result.pages_populated} pages populated, {result.pages_written} written, {online} vcpus online, "
          f"start_info pfn {result.start_info_pfn:#x}, xenstore mfn {result.store_mfn:#x}, "
          f"console mfn {result.console_mfn:#x}")
    return 0
