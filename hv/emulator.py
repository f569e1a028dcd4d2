"""What the device model (qemu) of an HVM guest hands the toolstack at save time.

Neither Xen nor libxc sees it: libxl takes qemu's save blob and the qemu physmap entries from xenstore
and puts them in its own layer (v2: EMULATOR_CONTEXT and EMULATOR_XENSTORE_DATA records; v1: the
device-model record after the HVM tail and the TOOLSTACK chunk). A restore hands them back unchanged.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class PhysmapRange:
    """One qemu physmap entry (xenstore ``physmap/<phys_offset>/{start_addr,size,name}``)."""

    phys_offset: int
    start_addr: int
    size: int
    name: bytes  # without its NUL


@attrs.frozen
class EmulatorState:
    """qemu's save blob and its physmap entries."""

    context: bytes
    physmap: tuple[PhysmapRange, ...] = ()

    def xenstore_pairs(self) -> list[tuple[bytes, bytes]]:
        """The keys libxl saves from the device model's xenstore directory, values as qemu wrote them (hex)."""
        pairs = []
        for entry in self.physmap:
            root = b"physmap/%x" % entry.phys_offset
            pairs += [(root + b"/start_addr", b"%x" % entry.start_addr), (root + b"/size", b"%x" % entry.size),
                      (root + b"/name", entry.name)]
        return pairs
