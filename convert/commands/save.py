"""`xenstream save --guest SPEC -o FILE [--legacy]`: build a simulated PV guest and save it.

SPEC is a seeded guest description such as ``pv64:mem=256M,vcpus=2,seed=7`` (also ``online=N``,
``pv32:``). The guest is built in a fresh simulated Xen, suspends itself the way Linux does, and is
saved non-live as a v2 stream (record order of Xen's current saver), or with ``--legacy`` as a v1
stream as Xen 4.5's saver wrote it, for a 64-bit toolstack unless ``--toolstack-width 32``.
"""

from __future__ import annotations

import os
import sys

from xenstream.convert import fdio
from xenstream.convert.edge import UsageError
from xenstream.hv import abi
from xenstream.hv.guestview import GuestStateError
from xenstream.hv.lazylog import get_logger
from xenstream.hv.sim.builder import GuestSpec, GuestSpecError, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.save import LegacySaveError, save_pv_legacy
from xenstream.v2.save import SaveError, save_pv
from xenstream.v2.writer import V2Writer

log = get_logger(__name__)

# Host frames beyond the guest's own: Xen's reserved extents, shared_info/grant frames, and room so
# that a 32-bit guest (low frames only: half the host) still fits.
_HOST_SLACK_FRAMES = 8 * abi.SUPERPAGE_FRAMES


def register(subparsers) -> None:
    parser = subparsers.add_parser("save", help="build a simulated PV guest and save it (v2, or v1 with --legacy)",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("--guest", required=True, metavar="SPEC", help="guest spec, e.g. pv64:mem=256M,vcpus=2,seed=7")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="output: path, fd number, or - for stdout")
    parser.add_argument("--legacy", action="store_true", help="write a legacy v1 stream (Xen 4.5 saver)")
    parser.add_argument("--toolstack-width", type=int, choices=(32, 64), default=64,
                        help="v1 only: word size of the saving toolstack (default 64)")
    parser.set_defaults(func=run)


def host_for(spec: GuestSpec) -> SimXen:
    """A simulated host big enough for the guest (twice its size: 32-bit guests get low frames only)."""
    return SimXen(capacity_frames=2 * spec.nr_pages + _HOST_SLACK_FRAMES, seed=spec.seed)


def build_suspendable(spec: GuestSpec) -> tuple[SimXen, PvGuest]:
    xen = host_for(spec)
    built = build_guest(xen, spec)
    return xen, PvGuest(xen, built.domid, built.layout)


def suspend_callback(guest):
    """The engines' suspend callback for a simulated guest (PV or HVM) that suspends itself."""
    def suspend() -> bool:
        guest.suspend()
        return True

    return suspend


def parse_save_spec(args, parse):
    """The guest spec of `save --guest` read by `parse`, and the options checked; UsageError when not usable."""
    try:
        spec = parse(args.guest)
    except GuestSpecError as exc:
        raise UsageError(str(exc)) from None
    if args.toolstack_width != 64 and not args.legacy:
        raise UsageError("--toolstack-width only applies to --legacy saves")
    return spec


def save_to_output(args, save_legacy, save_v2, errors=(SaveError, LegacySaveError, GuestStateError)) -> int:
    """Run one save into `--output`: `save_legacy(sink)` (a buffered file) with --legacy, else `save_v2(fd)`;
    each returns the summary line. A save failing with one of `errors` is reported and gives exit status 1."""
    fd, owned = fdio.open_output_fd(args.output)
    done = False
    try:
        if args.legacy:
            with open(fd, "wb", buffering=1 << 20, closefd=False) as sink:
                summary = save_legacy(sink)
        else:
            summary = save_v2(fd)
        done = True
    except errors as exc:
        print(f"xenstream save: {exc}", file=sys.stderr)
        return 1
    finally:
        if owned:
            os.close(fd)
            if not done:
                os.unlink(args.output)  # no half-written image left under the name asked for
    print(summary, file=sys.stderr)
    return 0


def run(args) -> int:
    spec = parse_save_spec(args, GuestSpec.parse)
    xen, guest = build_suspendable(spec)

    def save_legacy(sink) -> str:
        result = save_pv_legacy(xen, guest.domid, sink, toolstack_width=args.toolstack_width,
                                suspend=suspend_callback(guest))
        return (f"saved {spec} as a v1 stream ({result.toolstack_width}-bit toolstack): "
                f"p2m_size {result.p2m_size:#x}, {result.pages_written} pages")

    def save_v2(fd: int) -> str:
        result = save_pv(xen, guest.domid, V2Writer(fd), suspend_callback(guest), payload_fd=fd)
        return (f"saved {spec} as a v2 stream: max_pfn {result.max_pfn:#x}, {result.pages_written} pages, "
                f"{result.records} records, {result.bytes_written} bytes")

    return save_to_output(args, save_legacy, save_v2)
