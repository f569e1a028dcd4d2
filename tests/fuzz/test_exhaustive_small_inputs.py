"""Exhaustive small-input checks: truncation at every byte offset, single-byte flips of every header byte.

Through the v1 parser and the converter (v1 samples) and the v2 reader and verifier (v2 samples), each
input must give one clean error of the project's own family (offset inside the input, one-line message)
or, where the damage is harmless, a valid result; never a traceback; and a conversion that fails never
leaves END in its output.

Every offset of the smallest samples of each format goes through the in-memory paths (parser and
transformer, reader and verifier); the fd pipeline (`convert_fds`, passthrough parser, spool) takes every
offset of the headers and record heads and a stride through the page data. Every other committed sample
is cut at each element boundary and its neighbours and in every byte of its first 64.
"""

from __future__ import annotations

import io
import os
import pathlib

import pytest

from xenstream.convert.fuzz_mutators import v1_layout, v2_layout
from xenstream.convert.fuzz_targets import reads_to_end, wrote_end
from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import ConvertOptions, Transformer
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.legacy.events import EndOfStream, QemuDeviceModelRecord
from xenstream.legacy.parser import DONE, LegacyParser, parse_bytes
from xenstream.v2.errors import StreamError as V2StreamError
from xenstream.v2.verify import verify_bytes
from xenstream.v2.verify_report import Report
from xenstream.v2.writer import V2Writer

ROOT = pathlib.Path(__file__).resolve().parents[2]
V1_SAMPLES = sorted((ROOT / "samples" / "v1").glob("*.v1"))
V2_SAMPLES = sorted(p for p in (ROOT / "samples" / "v2").iterdir() if p.suffix not in (".md", ".py", ".json"))
SMALLEST_V1 = "hvm32-tools32.v1"  # 37376 bytes: every offset
SMALLEST_V2 = "pv32-v2.libxc"  # 40576 bytes: every offset
FLIP_V1 = ("hvm32-tools32.v1", "pv64-broken-noxsave.v1", "pv64-remus-compressed.v1", "hvm64-xl-text.v1")
FLIP_V2 = ("pv32-v2.libxc", "hvm-v3.libxl", "pv64-v3.xl", "pv64-remus.libxl")
FLIPS = (0xFF, 0x01, 0x80)
PIPELINE_STRIDE = 97


def _clean(exc: Exception, family, data: bytes) -> None:
    assert isinstance(exc, family), f"{type(exc).__name__} escaped: {exc}"
    assert isinstance(exc.offset, int) and 0 <= exc.offset <= len(data), f"offset {exc.offset} of {exc}"
    assert "\n" not in str(exc)


def convert_in_memory(data: bytes, fmt: str = "libxl") -> tuple[LegacyStreamError | V2StreamError | None, bytes]:
    """The converter without fds: buffered parser -> transformer -> writer on a BytesIO."""
    out = io.BytesIO()
    transformer = Transformer(V2Writer(out), ConvertOptions(fmt=fmt))
    parser = LegacyParser()
    parser.feed(data)
    parser.feed(b"")
    try:
        while not transformer.finished:
            event = parser.next_event()
            if event is DONE:
                break
            transformer.handle(event)
        if not transformer.finished:
            raise LegacyStreamError("ended without completing a checkpoint", parser.offset)
    except (LegacyStreamError, V2StreamError) as exc:
        _clean(exc, (LegacyStreamError, V2StreamError), data)
        return exc, out.getvalue()
    return None, out.getvalue()


def check_conversion(data: bytes) -> bool:
    """One input through parser and transformer; True when it converted."""
    error, output = convert_in_memory(data)
    if error is not None:
        assert not wrote_end(output), f"failed with {error} but wrote END"
        return False
    assert reads_to_end(output) is None
    return True


def check_pipeline(data: bytes, fmt: str = "libxl", checkpoints: bool = False) -> bool:
    fd_in = os.memfd_create("in", os.MFD_CLOEXEC)
    fd_out = os.memfd_create("out", os.MFD_CLOEXEC)
    try:
        os.write(fd_in, data)
        os.lseek(fd_in, 0, os.SEEK_SET)
        try:
            convert_fds(fd_in, fd_out, ConvertOptions(fmt=fmt, checkpoints=checkpoints), spool_dir=os.environ.get("TMPDIR", "/tmp"))
            error = None
        except (LegacyStreamError, V2StreamError) as exc:
            _clean(exc, (LegacyStreamError, V2StreamError), data)
            error = exc
        output = os.pread(fd_out, os.lseek(fd_out, 0, os.SEEK_END), 0)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    if error is not None:
        assert not wrote_end(output), f"pipeline failed with {error} but wrote END"
        return False
    assert reads_to_end(output) is None
    return True


def check_verify(data: bytes) -> Report:
    report = verify_bytes(data)
    assert isinstance(report, Report)
    assert all("\n" not in line for line in report.lines())
    return report


def _header_offsets(layout, length: int) -> list[int]:
    """Every byte of the mapped fields and of each element's first 8 bytes (record heads, chunk ids)."""
    offsets = set()
    for field in layout.fields:
        offsets.update(range(field.offset, field.offset + field.size))
    for start, _end in layout.elements:
        offsets.update(range(start, min(start + 8, length)))
    return sorted(o for o in offsets if o < length)


def _boundaries(layout, length: int) -> list[int]:
    cuts = set(range(min(64, length + 1)))
    for start, end in layout.elements:
        cuts.update((start - 1, start, start + 1, end - 1, end))
    cuts.update(layout.checkpoints)
    return sorted(c for c in cuts if 0 <= c <= length)


# ------------------------------------------------------------------ truncation


def test_smallest_v1_sample_cut_at_every_offset():
    data = (ROOT / "samples" / "v1" / SMALLEST_V1).read_bytes()
    assert check_conversion(data), "the whole sample must convert"
    converted = [check_conversion(data[:cut]) for cut in range(len(data))]
    assert not any(converted), f"a cut at {converted.index(True)} converted as if complete"


def test_smallest_v1_sample_cut_through_the_pipeline():
    data = (ROOT / "samples" / "v1" / SMALLEST_V1).read_bytes()
    layout = v1_layout(data)
    cuts = sorted(set(_header_offsets(layout, len(data))) | set(range(0, len(data), PIPELINE_STRIDE)))
    assert check_pipeline(data)
    assert not any(check_pipeline(data[:cut]) for cut in cuts)


def test_smallest_v2_sample_cut_at_every_offset():
    data = (ROOT / "samples" / "v2" / SMALLEST_V2).read_bytes()
    assert check_verify(data).ok
    for cut in range(len(data)):
        report = check_verify(data[:cut])
        assert not report.ok, f"a cut at {cut} verified"


@pytest.mark.parametrize("path", V1_SAMPLES, ids=lambda p: p.name)
def test_v1_sample_cut_at_its_boundaries(path):
    data = path.read_bytes()
    layout = v1_layout(data)
    checkpointed = len(layout.checkpoints) > 1
    events = parse_bytes(data)
    # What follows the logical end (an xl "go" message) may be cut without harm; so may the state of a
    # QemuDeviceModelRecord, which has no length and runs to the end of input (spec 4.4): no format
    # can tell such a cut.
    logical_end = next(e.offset for e in events if isinstance(e, EndOfStream))
    logical_end = min([logical_end] + [e.offset + len(e.signature) for e in events if isinstance(e, QemuDeviceModelRecord)])
    for cut in _boundaries(layout, len(data)):
        converted = check_conversion(data[:cut]) if not checkpointed else check_pipeline(data[:cut])
        # A Remus stream cut at a checkpoint boundary is complete up to that checkpoint (spec 5.3).
        assert not converted or checkpointed or cut >= logical_end, f"a cut at {cut} converted as if complete"


@pytest.mark.parametrize("path", V2_SAMPLES, ids=lambda p: p.name)
def test_v2_sample_cut_at_its_boundaries(path):
    data = path.read_bytes()
    layout = v2_layout(data)
    whole_ok = check_verify(data).ok
    for cut in _boundaries(layout, len(data)):
        report = check_verify(data[:cut])
        assert not (report.ok and whole_ok and cut < len(data) and not layout.checkpoints), f"cut at {cut} verified"


# ------------------------------------------------------------------ single-byte flips


@pytest.mark.parametrize("name", FLIP_V1)
def test_v1_header_byte_flips(name):
    data = (ROOT / "samples" / "v1" / name).read_bytes()
    layout = v1_layout(data)
    checkpointed = len(layout.checkpoints) > 1
    offsets = _header_offsets(layout, len(data))
    assert len(offsets) > 50
    for offset in offsets:
        for flip in FLIPS:
            mutated = data[:offset] + bytes([data[offset] ^ flip]) + data[offset + 1:]
            if checkpointed:
                check_pipeline(mutated)
            else:
                check_conversion(mutated)
    for offset in offsets[::7]:  # the fd pipeline too, on a sample of them
        check_pipeline(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])


@pytest.mark.parametrize("name", FLIP_V2)
def test_v2_header_byte_flips(name):
    data = (ROOT / "samples" / "v2" / name).read_bytes()
    layout = v2_layout(data)
    offsets = sorted({o for start, _ in layout.elements for o in range(start, start + 8)} |
                     {o for f in layout.fields for o in range(f.offset, f.offset + f.size)})
    offsets = [o for o in offsets if o < len(data)]
    assert len(offsets) > 40
    for offset in offsets:
        for flip in FLIPS:
            check_verify(data[:offset] + bytes([data[offset] ^ flip]) + data[offset + 1:])
