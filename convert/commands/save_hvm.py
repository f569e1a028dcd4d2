"""HVM guests for `xenstream save`: ``--guest hvm:mem=1G,vcpus=2,seed=7``.

Adds no command of its own. Discovered after `save`, it routes an ``hvm:`` spec to the HVM engines:
the guest is built in a fresh simulated Xen, suspends itself, and is saved non-live as a v2 libxl
stream (the libxc stream of Xen's current HVM saver, then the device model's EMULATOR_XENSTORE_DATA and
EMULATOR_CONTEXT), or with ``--legacy`` as the v1 stream a Xen 4.5 libxl toolstack wrote (HVM chunks,
magic pfns, HVM context, "DeviceModelRecord0002"). Other specs go to the PV save as before.
"""

from __future__ import annotations

from xenstream.convert.commands.save import parse_save_spec, save_to_output, suspend_callback
from xenstream.hv import abi
from xenstream.hv.sim.builder_hvm import HvmGuest, HvmGuestSpec, build_hvm_guest
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.save import LegacySaveError
from xenstream.legacy.save_hvm import save_hvm_legacy
from xenstream.v2.save import SaveError
from xenstream.v2.save_hvm import save_hvm_libxl
from xenstream.v2.writer import V2Writer

_HOST_SLACK_FRAMES = 8 * abi.SUPERPAGE_FRAMES


def is_hvm_spec(text: str) -> bool:
    return text.strip().startswith("hvm:")


def build_suspendable_hvm(spec: HvmGuestSpec) -> tuple[SimXen, HvmGuest]:
    xen = SimXen(capacity_frames=spec.nr_pages + _HOST_SLACK_FRAMES, seed=spec.seed)
    return xen, HvmGuest(xen, build_hvm_guest(xen, spec))


def run_hvm(args) -> int:
    spec = parse_save_spec(args, HvmGuestSpec.parse)
    xen, guest = build_suspendable_hvm(spec)

    def emulator():
        return guest.built.emulator

    def save_legacy(sink) -> str:
        result = save_hvm_legacy(xen, guest.domid, sink, toolstack_width=args.toolstack_width,
                                 suspend=suspend_callback(guest), emulator=emulator)
        return (f"saved {spec} as a v1 stream ({result.toolstack_width}-bit toolstack): "
                f"p2m_size {result.p2m_size:#x}, {result.pages_written} pages, {result.param_chunks} param chunks")

    def save_v2(fd: int) -> str:
        result = save_hvm_libxl(xen, guest.domid, V2Writer(fd), suspend_callback(guest), emulator, payload_fd=fd)
        return (f"saved {spec} as a v2 libxl stream: p2m_size {result.p2m_size:#x}, {result.pages_written} pages, "
                f"{result.records} libxc records, {len(result.params)} params, "
                f"HVM context {result.context_length} bytes")

    # Unlike the PV command, the HVM one has never turned GuestStateError into exit status 1; kept as it was.
    return save_to_output(args, save_legacy, save_v2, errors=(SaveError, LegacySaveError))


def register(subparsers) -> None:
    parser = subparsers.choices["save"]
    pv_run = parser.get_default("func")

    def run(args) -> int:
        return run_hvm(args) if is_hvm_spec(args.guest) else pv_run(args)

    parser.set_defaults(func=run)
