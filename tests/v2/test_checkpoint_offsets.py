"""Errors of the checkpoint-aware restore carry offsets in the input as fed, not in the bare libxc stream
its engine sees (which leaves out the xl header, the libxl layer and every CHECKPOINT record)."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys

import pytest

from tests.v2 import engine_support as es
from tests.v2.live_support import migrate, start_guest
from tests.v2.test_live_checkpoint import restore, restore_reading_into_targets
from xenstream.hv import abi
from xenstream.v2 import constants as C
from xenstream.v2.errors import MalformedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxcRecord, LibxlRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.xl_header import XlHeader

SPEC = "pv64:mem=4M,vcpus=2,seed=37"
XL_CONFIG = b'{"c_info": {"name": "guest"}}\x00'


@pytest.fixture(scope="module", params=["xl", "libxc"])
def run(request):
    """A checkpointed stream of 3 checkpoints: xl header + libxl stream, or a bare libxc stream."""
    xl = request.param == "xl"
    run = migrate(start_guest(SPEC), "uniform:rate=20000", libxl=xl, checkpoints=3, interval=0.01)
    if xl:
        run.stream = XlHeader.with_config(XL_CONFIG).pack() + run.stream
    return run


def walk(stream: bytes) -> list[tuple[int, str, int]]:
    """(offset, layer, type) of every record in the stream, found by reading it."""
    reader = V2Reader(layer="auto", payload="views", strict=False)
    reader.feed(stream)
    reader.feed(b"")
    records = []
    while True:
        event = reader.next_event()
        assert event is not NEED_DATA
        if isinstance(event, EndOfStream):
            return records
        if isinstance(event, (LibxcRecord, LibxlRecord)):
            records.append((event.offset, "libxc" if isinstance(event, LibxcRecord) else "libxl", event.type))


def checkpoint_offsets(records) -> list[int]:
    return [offset for offset, layer, rtype in records if layer == "libxc" and rtype == C.REC_CHECKPOINT]


def commit_points(records, end: int) -> list[int]:
    """Where each checkpoint is complete: just after its CHECKPOINT (bare libxc) or CHECKPOINT_END (libxl)."""
    libxl = any(layer == "libxl" for _, layer, _ in records)
    closing = ("libxl", C.LIBXL_REC_CHECKPOINT_END) if libxl else ("libxc", C.REC_CHECKPOINT)
    starts = [offset for offset, _, _ in records] + [end]
    return [starts[i + 1] for i, (_, layer, rtype) in enumerate(records) if (layer, rtype) == closing]


def in_checkpoint(records, n: int, rtype: int, where=lambda offset: True) -> int:
    """Offset of the first libxc record of `rtype` in checkpoint `n` (from 1) for which `where` holds."""
    bounds = [0, *checkpoint_offsets(records)]
    return next(offset for offset, layer, t in records
                if layer == "libxc" and t == rtype and bounds[n - 1] <= offset < bounds[n] and where(offset))


def patched(stream: bytes, record_offset: int, body_offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(stream)
    struct.pack_into(fmt, out, record_offset + C.RECORD_HEADER_SIZE + body_offset, value)
    return bytes(out)


def bad_pfn(run, offset: int) -> bytes:
    """The first entry of the PAGE_DATA record at `offset` names a pfn past the guest's P2M."""
    pfn = run.suspended[0][0].p2m_size + 5
    rtype, _ = struct.unpack_from("<II", run.stream, offset)
    assert rtype == C.REC_PAGE_DATA
    (entry,) = struct.unpack_from("<Q", run.stream, offset + C.RECORD_HEADER_SIZE + 8)
    return patched(run.stream, offset, 8, "<Q", (entry & ~C.PFN_MASK) | pfn)


def bad_vcpu(run, offset: int) -> bytes:
    """The vcpu record at `offset` names a vcpu the domain does not have."""
    return patched(run.stream, offset, 0, "<I", 200)


def l1_tables(stream: bytes, offset: int) -> list[int]:
    """Stream offsets of the L1 pagetable pages in the payload of the PAGE_DATA record at `offset`."""
    body = offset + C.RECORD_HEADER_SIZE
    (count,) = struct.unpack_from("<I", stream, body)
    types = [word >> C.PFN_TYPE_SHIFT for word in struct.unpack_from(f"<{count}Q", stream, body + 8)]
    page = body + 8 + 8 * count
    found = []
    for page_type in types:
        if abi.pagetype_has_data(page_type):
            if abi.pagetable_level(page_type) == 1:
                found.append(page)
            page += abi.PAGE_SIZE
    return found


def bad_pte(run, offset: int) -> bytes:
    """The first L1 pagetable page in the payload of the PAGE_DATA record at `offset` maps a pfn past the
    guest's P2M: found only once the payload has arrived."""
    page = l1_tables(run.stream, offset)[0]
    out = bytearray(run.stream)
    struct.pack_into("<Q", out, page + 8 * 7, ((run.suspended[0][0].p2m_size + 5) << 12) | abi.PTE_PRESENT)
    return bytes(out)


CORRUPTIONS = {
    "page_data_pfn": (C.REC_PAGE_DATA, bad_pfn, "PAGE_DATA: pfn .* out of range"),
    "vcpu_id": (C.REC_X86_PV_VCPU_BASIC, bad_vcpu, "vcpu 200 out of range"),
    "pte": (C.REC_PAGE_DATA, bad_pte, "PAGE_DATA: L1 pagetable at pfn"),
}


def target_record(run, records, checkpoint: int, corruption: str) -> int:
    """Offset of the record `corruption` is applied to in checkpoint `checkpoint`."""
    rtype = CORRUPTIONS[corruption][0]
    where = (lambda offset: bool(l1_tables(run.stream, offset))) if corruption == "pte" else (lambda offset: True)
    return in_checkpoint(records, checkpoint, rtype, where)


def drive(mode: str, run, stream: bytes):
    if mode == "feed":
        return restore(run, stream, chunk=5000)
    return restore_reading_into_targets(run, stream, 1 << 16)


@pytest.mark.parametrize("mode", ["feed", "targets"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("checkpoint", [1, 2])
def test_bad_record_is_reported_at_its_offset_in_the_whole_input(run, checkpoint, corruption, mode):
    """Checkpoint 1's records reach the engine as they arrive, checkpoint 2's only once it is complete:
    either way the error names the record's offset in the stream as fed (xl header and all)."""
    _, corrupt, message = CORRUPTIONS[corruption]
    records = walk(run.stream)
    target = target_record(run, records, checkpoint, corruption)
    stream = corrupt(run, target)
    with pytest.raises(MalformedStream, match=message) as caught:
        drive(mode, run, stream)
    assert caught.value.offset == target
    assert str(caught.value).startswith(f"offset {target:#x}: ")


def bad_start_info(run, offset: int) -> bytes:
    """vcpu 0's start_info pfn (rdx) in the VCPU_BASIC record at `offset` is past the guest's P2M."""
    word, fmt = es.vcpu_basic_word(run.spec.width, "rdx")
    assert struct.unpack_from("<I", run.stream, offset + C.RECORD_HEADER_SIZE)[0] == 0  # vcpu 0
    return patched(run.stream, offset, word, fmt, run.suspended[0][0].p2m_size + 3)


def test_completion_error_after_end_is_at_the_end_record(run):
    """Checkpoint 2 committed, then END: completing it fails at the END record of the input."""
    records = walk(run.stream)
    commits = commit_points(records, len(run.stream))
    stream = bad_start_info(run, in_checkpoint(records, 2, C.REC_X86_PV_VCPU_BASIC))
    libxl = any(layer == "libxl" for _, layer, _ in records)
    tail = es._RECORD.pack(C.REC_END, 0) + (es._RECORD.pack(C.LIBXL_REC_END, 0) if libxl else b"")
    stream = stream[:commits[1]] + tail
    with pytest.raises(MalformedStream, match="start_info pfn .* out of range") as caught:
        restore(run, stream)
    assert caught.value.offset == commits[1]


def test_completion_error_at_failover_is_at_the_last_committed_checkpoint(run):
    """The stream breaks off inside checkpoint 3: completing checkpoint 2 fails, reported at the CHECKPOINT
    record that closed it (the failover completes the guest where that record stands)."""
    records = walk(run.stream)
    commits = commit_points(records, len(run.stream))
    stream = bad_start_info(run, in_checkpoint(records, 2, C.REC_X86_PV_VCPU_BASIC))
    cut = next(offset for offset, _, _ in records if offset > commits[1])
    with pytest.raises(MalformedStream, match="start_info pfn .* out of range") as caught:
        restore(run, stream[:cut])
    assert caught.value.offset == checkpoint_offsets(records)[1]


@pytest.mark.parametrize("checkpoint,corruption", [(1, "pte"), (2, "vcpu_id")])
def test_receive_prints_the_offset_in_the_stream_it_received(run, checkpoint, corruption):
    """`xenstream receive`: the one line it fails with names the bad record's offset in what it received."""
    _, corrupt, message = CORRUPTIONS[corruption]
    records = walk(run.stream)
    target = target_record(run, records, checkpoint, corruption)
    stream = corrupt(run, target)
    proc = subprocess.Popen([sys.executable, "-m", "xenstream.convert", "-q", "receive", "--listen", "127.0.0.1:0",
                             "--host-mem", "256M"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("listening on "), line
        host, port = line.split()[-1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            try:
                sock.sendall(stream)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the receiver gave up at the bad record
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"xenstream: offset {target:#x}: "), err
    assert re.search(message, lines[0]), err
