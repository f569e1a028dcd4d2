"""Shared helpers of the HVM tests: seeded guests on a fresh simulated host, their saves and restores."""

from __future__ import annotations

import io

import attrs

from xenstream.hv.emulator import EmulatorState
from xenstream.hv.sim.builder_hvm import BuiltHvmGuest, HvmGuest, HvmGuestSpec, build_hvm_guest
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.save_hvm import save_hvm_legacy
from xenstream.v2.restore_hvm import HvmRestoreResult, restore_hvm_new_domain
from xenstream.v2.save_hvm import save_hvm, save_hvm_libxl
from xenstream.v2.snapshot_hvm import HvmDigest, hvm_snapshot
from xenstream.v2.writer import V2Writer

SPEC = "hvm:mem=4M,vcpus=3,online=2,seed=11"
SLACK = 4096


@attrs.frozen
class Saved:
    xen: SimXen
    built: BuiltHvmGuest
    stream: bytes
    digest: HvmDigest


def host(spec: HvmGuestSpec, seed: int = 0) -> SimXen:
    return SimXen(capacity_frames=spec.nr_pages + SLACK, seed=seed)


def build(spec_text: str = SPEC, host_seed: int = 0) -> tuple[SimXen, HvmGuest]:
    spec = HvmGuestSpec.parse(spec_text)
    xen = host(spec, host_seed)
    return xen, HvmGuest(xen, build_hvm_guest(xen, spec))


def suspender(guest: HvmGuest):
    def suspend() -> bool:
        guest.suspend()
        return True

    return suspend


def save_v2(xen: SimXen, guest: HvmGuest, libxl: bool = True, emulator: EmulatorState | None = None) -> bytes:
    sink = io.BytesIO()
    writer = V2Writer(sink)
    state = emulator or guest.built.emulator
    if libxl:
        save_hvm_libxl(xen, guest.domid, writer, suspender(guest), lambda: state)
    else:
        save_hvm(xen, guest.domid, writer, suspender(guest))
    return sink.getvalue()


def saved(spec_text: str = SPEC, libxl: bool = True) -> Saved:
    xen, guest = build(spec_text)
    stream = save_v2(xen, guest, libxl)
    return Saved(xen=xen, built=guest.built, stream=stream, digest=hvm_snapshot(xen, guest.domid))


def save_v1(spec_text: str = SPEC, width: int = 64, **options) -> tuple[bytes, SimXen, HvmGuest]:
    xen, guest = build(spec_text)
    sink = io.BytesIO()
    save_hvm_legacy(xen, guest.domid, sink, toolstack_width=width, suspend=suspender(guest),
                    emulator=lambda: guest.built.emulator, **options)
    return sink.getvalue(), xen, guest


def restore(stream: bytes, spec_text: str = SPEC, chunks=None) -> tuple[SimXen, HvmRestoreResult]:
    spec = HvmGuestSpec.parse(spec_text)
    xen = host(spec, seed=99)
    source = chunks if chunks is not None else [stream]
    return xen, restore_hvm_new_domain(xen, source, max_vcpus=spec.vcpus, max_pages=spec.nr_pages + 16)


def resave(xen: SimXen, result: HvmRestoreResult, physmap) -> bytes:
    """Save a restored guest again: it suspends itself, the device model hands back what it was given."""
    xen.guest_suspend(result.domid, 0)
    sink = io.BytesIO()
    state = EmulatorState(context=result.emulator_context, physmap=physmap)
    save_hvm_libxl(xen, result.domid, V2Writer(sink), lambda: True, lambda: state)
    return sink.getvalue()
