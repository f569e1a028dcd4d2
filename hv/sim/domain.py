"""Per-domain state the simulated Xen keeps: vcpus, TSC, policy, log-dirty, HVM bits."""

from __future__ import annotations

from array import array

import attrs

from xenstream.hv import abi
from xenstream.hv.interface import CpuPolicy, TscInfo, VcpuContext, XsaveState


def blank_vcpu_context(width: int) -> VcpuContext:
    return VcpuContext.unpack(bytes(abi.VCPU_CONTEXT_SIZES[width]), width)


@attrs.define
class Vcpu:
    vcpu_id: int
    online: bool
    context: VcpuContext
    ext_context: bytes
    xsave: XsaveState
    msrs: bytes
    # Frames this vcpu holds type references on (cr3 root, ctrlreg[1] root, GDT frames).
    held_roots: list[tuple[int, int]] = attrs.field(factory=list)  # (mfn, machine type)


# HVM p2m and log-dirty bitmap chunks, allocated on first touch. One p2m chunk is 512 entries (4 KiB),
# the span of an EPT leaf table and of a 2 MiB extent: like Xen's own p2m tree, the map then costs at
# most about one page per populated gfn however far apart the gfns are, never a flat array up to the
# highest gfn a (possibly untrusted) stream named.
P2M_CHUNK_SHIFT = abi.SUPERPAGE_ORDER
P2M_CHUNK = 1 << P2M_CHUNK_SHIFT
_P2M_MASK = P2M_CHUNK - 1
_INVALID_CHUNK = array("Q", [abi.INVALID_MFN]) * P2M_CHUNK
DIRTY_CHUNK_SHIFT = 15  # 32768 pfns = one 4 KiB page of bits per chunk
_DIRTY_BYTES = 1 << (DIRTY_CHUNK_SHIFT - 3)


class HvmP2m:
    """Xen's gfn -> mfn map of one HVM domain, sparse: INVALID_MFN wherever nothing is populated."""

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: dict[int, array] = {}

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    @property
    def nbytes(self) -> int:
        return sum(chunk.itemsize * len(chunk) for chunk in self._chunks.values())

    def __getitem__(self, gfn: int) -> int:
        chunk = self._chunks.get(gfn >> P2M_CHUNK_SHIFT) if gfn >= 0 else None
        return abi.INVALID_MFN if chunk is None else chunk[gfn & _P2M_MASK]

    def lookup(self, gfns) -> list[int]:
        """The mfn of each gfn, in order (INVALID_MFN for unpopulated or out-of-range gfns)."""
        chunks, invalid = self._chunks, abi.INVALID_MFN
        out = []
        for gfn in gfns:
            chunk = chunks.get(gfn >> P2M_CHUNK_SHIFT)  # negative gfns have negative keys: never stored
            out.append(invalid if chunk is None else chunk[gfn & _P2M_MASK])
        return out

    def frames(self, first: int, count: int) -> array:
        """The mfns of gfns first..first+count-1 (first >= 0) as one array('Q'): the batch fast path."""
        chunks = self._chunks
        low = first & _P2M_MASK
        if low + count <= P2M_CHUNK:  # within one chunk: a single slice
            chunk = chunks.get(first >> P2M_CHUNK_SHIFT, _INVALID_CHUNK)
            return chunk[low:low + count]
        out = array("Q")
        gfn, end = first, first + count
        while gfn < end:
            low = gfn & _P2M_MASK
            high = min(P2M_CHUNK, low + end - gfn)
            out += chunks.get(gfn >> P2M_CHUNK_SHIFT, _INVALID_CHUNK)[low:high]
            gfn += high - low
        return out

    def set(self, gfn: int, mfn: int) -> None:
        self._chunk(gfn >> P2M_CHUNK_SHIFT)[gfn & _P2M_MASK] = mfn

    def set_run(self, first: int, mfns: array) -> None:
        """gfns first.. map to mfns (an array('Q')) in order."""
        done = 0
        while done < len(mfns):
            gfn = first + done
            low = gfn & _P2M_MASK
            take = min(P2M_CHUNK - low, len(mfns) - done)
            self._chunk(gfn >> P2M_CHUNK_SHIFT)[low:low + take] = mfns[done:done + take]
            done += take

    def _chunk(self, index: int) -> array:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = array("Q", _INVALID_CHUNK)
        return chunk


@attrs.define
class LogDirty:
    """Dirty bits by pfn, kept in chunks allocated when a pfn in them is first marked: a bitmap up to the
    highest gfn would cost max_gpfn / 8 bytes (8 GiB for an HVM gfn near Xen's 2**36 limit) at enable."""

    enabled: bool = False
    chunks: dict[int, bytearray] = attrs.field(factory=dict)  # pfn >> DIRTY_CHUNK_SHIFT -> bits
    fault_count: int = 0

    def mark(self, pfn: int) -> None:
        if not 0 <= pfn <= abi.INVALID_MFN_32 * 16:  # junk M2P entries: nothing to track
            return
        index = pfn >> DIRTY_CHUNK_SHIFT
        chunk = self.chunks.get(index)
        if chunk is None:
            chunk = self.chunks[index] = bytearray(_DIRTY_BYTES)
        bit = pfn & ((1 << DIRTY_CHUNK_SHIFT) - 1)
        chunk[bit >> 3] |= 1 << (bit & 7)
        self.fault_count += 1

    def mark_range(self, first_pfn: int, count: int) -> None:
        for pfn in range(first_pfn, first_pfn + count):
            self.mark(pfn)

    def dirty_count(self) -> int:
        return sum(int.from_bytes(chunk, "little").bit_count() for chunk in self.chunks.values())

    def copy_to(self, bitmap: bytearray | memoryview, nr_pages: int) -> None:
        """The bits of pfns 0..nr_pages-1 into bitmap (its first ceil(nr_pages / 8) bytes)."""
        nbytes = (nr_pages + 7) >> 3
        bitmap[:nbytes] = bytes(nbytes)
        for index, chunk in self.chunks.items():
            start = index * _DIRTY_BYTES
            if start < nbytes:
                take = min(_DIRTY_BYTES, nbytes - start)
                bitmap[start:start + take] = chunk[:take]
        if nr_pages & 7:
            bitmap[nbytes - 1] &= (1 << (nr_pages & 7)) - 1

    def clear(self) -> None:
        self.chunks = {}
        self.fault_count = 0


@attrs.define
class Domain:
    domid: int
    is_hvm: bool
    width: int
    max_pages: int
    vcpus: list[Vcpu]
    shared_info_frame: int
    grant_frame: int
    tsc: TscInfo
    policy: CpuPolicy
    nr_pages: int = 0
    max_gpfn: int = 0
    pause_count: int = 0
    shutdown: bool = False
    shutdown_reason: int = 0
    logdirty: LogDirty = attrs.field(factory=LogDirty)
    # HVM only: Xen's own gfn -> mfn map (INVALID where unpopulated), context blob, params.
    hvm_p2m: HvmP2m = attrs.field(factory=HvmP2m)
    hvm_context: bytes = b""
    hvm_params: dict[int, int] = attrs.field(factory=dict)

    @property
    def max_vcpu_id(self) -> int:
        return len(self.vcpus) - 1
