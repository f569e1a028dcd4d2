"""The verifier on broken input (one finding, then stop), in every feeding pattern, and over real fds."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.v2.verify_builder import (
    CHECKPOINT_END, END, PAGE_DATA, PV_PAGES, TSC_INFO, NOTAB, empty,
    libxc, libxl, libxl_checkpointed_pv, libxl_hvm, page_data, pv_checkpoint_records, pv_info, pv_records, pv_stream,
    rec, xl,
)
from xenstream.v2.events import NEED_DATA, EndOfStream
from xenstream.v2.errors import StreamError
from xenstream.v2.reader import V2Reader
from xenstream.v2.verify import Verifier, verify_bytes, verify_fd, verify_path
from xenstream.v2.verify_report import DEFAULT_FINDING_CAP

PV = pv_stream()


def _at(record: bytes, stream: bytes = PV) -> int:
    return stream.index(record)


def _patch(stream: bytes, offset: int, new: bytes) -> bytes:
    return stream[:offset] + new + stream[offset + len(new):]


# (id, stream, offset the single error must name, fragment of its message)
BROKEN = [
    ("wrong-marker", b"\xff" * 7 + b"\xfe" + PV[8:], 0, "not a v2 stream"),
    ("wrong-id", _patch(PV, 8, b"XENG"), 0, "id"),
    ("wrong-version", _patch(PV, 12, struct.pack(">I", 4)), 0, "version 4"),
    ("big-endian-image", _patch(PV, 16, b"\x00\x01"), 0, "big-endian"),
    ("image-reserved-options", _patch(PV, 16, b"\x00\x02"), 0, "reserved option bits"),
    ("image-reserved-field", _patch(PV, 20, b"\x00\x00\x00\x01"), 0, "reserved fields"),
    ("domain-type", _patch(PV, 24, struct.pack("<I", 3)), 24, "guest type"),
    ("page-shift", _patch(PV, 28, struct.pack("<H", 13)), 24, "page_shift 13"),
    ("domain-reserved", _patch(PV, 30, b"\x01\x00"), 24, "reserved"),
    ("record-over-128MiB", PV[:40] + struct.pack("<II", PAGE_DATA, 0x08000008) + PV[48:], 40, "exceeds"),
    ("length-past-end", PV[:40] + struct.pack("<II", TSC_INFO, 0x07FFFFF8), 40, "truncated"),
    ("non-zero-padding", libxc([rec(2, bytes([8, 4, 0, 0, 0, 0]), length=6, pad=b"\0\1")]), 40 + 8 + 6, "padding"),
    ("pv-info-reserved", libxc([rec(2, bytes([8, 4, 0, 0, 0, 1, 0, 0]))]), 40, "reserved"),
    ("page-data-reserved-bits", libxc([pv_info(), empty(0x10), page_data([], raw_words=[1 << 52])]), 64, "reserved bits"),
    ("page-data-invalid-type", libxc([pv_info(), empty(0x10), page_data([(0, 5)])]), 64, "invalid page type"),
    ("page-data-count-0", libxc([pv_info(), empty(0x10), page_data([], count=0)]), 64, "count is 0"),
    ("page-data-length", libxc([pv_info(), empty(0x10), page_data([(0, NOTAB)], extra_pages=1)]), 64, "expected"),
    ("end-with-length", libxc([rec(END, b"\0" * 8)], end=False), 40, "END length 8"),
    ("unknown-mandatory-record", libxc([rec(0x13, b"")]), 40, "unknown mandatory"),
    ("libxl-ident", b"LibxlFmX" + libxl(PV)[8:], 0, "no xl / libxl / libxc header"),
    ("libxl-version", libxl(PV)[:8] + struct.pack(">I", 3) + libxl(PV)[12:], 0, "version 3"),
    ("libxl-unknown-record", libxl(PV, [rec(6, b"")]), 16 + 8 + len(PV), "unknown mandatory libxl record"),
    ("checkpoint-end-out-of-phase", libxl(PV, [empty(CHECKPOINT_END)]), 16 + 8 + len(PV), "outside a checkpoint"),
    ("xl-unknown-mandatory-flag", xl(libxl(PV), mflags=0x7), 0, "unknown mandatory flags"),
    ("not-a-v2-stream", struct.pack("<Q", 1024) + bytes(64), 0, "not a v2 stream"),
    ("empty-input", b"", 0, "truncated"),
]


@pytest.mark.parametrize("stream,offset,fragment", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_input_gives_one_error_with_offset(stream, offset, fragment):
    report = verify_bytes(stream)
    assert report.broken and not report.ok
    (finding,) = report.errors
    assert finding.offset == offset, str(finding)
    assert fragment in finding.message, str(finding)
    assert str(finding).startswith(f"error: offset {offset:#x}: ")


def test_broken_finding_names_the_record_the_reader_rejected():
    stream = libxc([pv_info(), empty(0x10), page_data([(0, 7)])])
    (finding,) = verify_bytes(stream).errors
    assert (finding.layer, finding.index, finding.record) == ("libxc", 2, "PAGE_DATA")


def test_truncation_names_the_record_being_read():
    (finding,) = verify_bytes(PV[: _at(page_data(PV_PAGES)) + 100]).errors
    assert (finding.index, finding.record) == (5, "PAGE_DATA") and "truncated" in finding.message


SAMPLES = {
    "pv": PV,
    "libxl-hvm": libxl_hvm(xenstore=b"k\0v\0"),
    "xl": xl(libxl(pv_stream(2))),
    "remus": libxl_checkpointed_pv(2),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_truncation_anywhere_is_one_error(name):
    stream = SAMPLES[name]
    # Every cut of the headers and record heads, and a stride through the bulk of the pages.
    cuts = set(range(0, 200)) | set(range(0, len(stream), 61))
    cuts |= {i + d for i in range(0, len(stream), 8) if stream[i:i + 4] in (b"\x01\x00\x00\x00", b"\x04\x00\x00\x00")
             for d in (-1, 0, 1, 9, 17)}
    for cut in sorted(c for c in cuts if 0 <= c < len(stream)):
        report = verify_bytes(stream[:cut])
        if name == "remus" and report.ok:
            continue  # a Remus stream may legitimately stop at a checkpoint boundary
        assert len(report.errors) == 1 and report.broken, (cut, report.lines())
        assert "truncated" in report.errors[0].message or "ends" in report.errors[0].message, (cut, report.lines())


def _chunked(stream: bytes, sizes, **options):
    reader = V2Reader(payload="views", strict=True, colo=options.pop("colo", False))
    verifier = Verifier(**options)
    pos = 0
    sizes = iter(sizes)
    try:
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                size = next(sizes, 4096)
                reader.feed(stream[pos:pos + size] if pos < len(stream) else b"")
                pos += size
                continue
            verifier.feed_event(event)
            if isinstance(event, EndOfStream):
                break
    except StreamError as exc:
        verifier.stream_error(exc)
        return verifier.finish()
    return verifier.finish(reader.trailing_bytes + max(0, len(stream) - pos), event.offset)


def _lines(report):
    """The findings without their messages (a reader's truncation message counts what it still expected,
    which depends on how the input arrived)."""
    where = [(f.severity, f.offset, f.layer, f.index, f.record) for f in report.errors + report.warnings]
    return where, report.ok, report.broken


FEED_CASES = {
    "valid-pv": PV,
    "rule-errors": libxc([pv_info(8, 3), empty(0x10), page_data([(0, NOTAB), (0, NOTAB)])]),
    "broken": PV[:5000],
    "trailing": PV + b"tail",
    "remus": libxc(pv_checkpoint_records(2), end=False),
}


@pytest.mark.parametrize("name", sorted(FEED_CASES))
def test_whole_bytewise_and_chunked_feeding_agree(name):
    stream = FEED_CASES[name]
    whole = _lines(verify_bytes(stream))
    assert _lines(_chunked(stream, [len(stream)])) == whole
    assert _lines(_chunked(stream, [1] * (len(stream) + 1))) == whole


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FEED_CASES)), sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=40))
def test_random_chunks_agree(name, sizes):
    stream = FEED_CASES[name]
    assert _lines(_chunked(stream, sizes)) == _lines(verify_bytes(stream))


@pytest.mark.parametrize("name", sorted(FEED_CASES))
def test_fd_driver_agrees_with_in_memory(tmp_path, name):
    path = tmp_path / "stream"
    path.write_bytes(FEED_CASES[name])
    assert _lines(verify_path(path)) == _lines(verify_bytes(FEED_CASES[name]))


def test_fd_driver_on_a_pipe():
    read_end, write_end = os.pipe()
    stream = libxl_hvm(xenstore=b"k\0v\0")
    pid = os.fork()
    if pid == 0:  # a writer trickling the stream in small pieces
        os.close(read_end)
        for i in range(0, len(stream), 777):
            os.write(write_end, stream[i:i + 777])
        os._exit(0)
    os.close(write_end)
    try:
        report = verify_fd(read_end)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert report.ok and not report.warnings and report.format == "libxl"


def test_stop_at_end_does_not_wait_for_the_end_of_input():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, PV + b"the writer keeps the pipe open")
        report = verify_fd(read_end, "libxc", trailing=False)  # would block forever reading on to EOF
        assert report.ok and not report.warnings
    finally:
        os.close(read_end)
        os.close(write_end)


def test_wrong_marker_named_when_the_format_is_given():
    (finding,) = verify_bytes(b"\xff" * 7 + b"\xfe" + PV[8:], "libxc").errors
    assert finding.offset == 0 and "marker" in finding.message


def test_verifier_told_another_format_reports_it():
    reader = V2Reader()
    reader.feed(PV)
    reader.feed(b"")
    verifier = Verifier(fmt="libxl")
    while not isinstance(event := reader.next_event(), EndOfStream):
        verifier.feed_event(event)
    verifier.feed_event(event)
    (finding,) = verifier.finish().errors
    assert "a libxc stream where a libxl stream was expected" in finding.message


def test_findings_are_capped_and_counted():
    many = [page_data([(3, NOTAB), (3, NOTAB)]) for _ in range(DEFAULT_FINDING_CAP + 20)]
    report = verify_bytes(libxc(pv_records()[:6] + many + pv_records()[6:]))
    assert report.ok
    assert len(report.warnings) == DEFAULT_FINDING_CAP and report.dropped_warnings >= 20
    assert report.lines()[-1] == f"warning: ... and {report.dropped_warnings} more warnings"
    small = verify_bytes(libxc(pv_records()[:6] + many + pv_records()[6:]), cap=3)
    assert len(small.warnings) == 3


def test_hvm_stream_with_pfns_anywhere_is_fine():
    # HVM pfns are not bounded by the stream (Xen's restore accepts any); only the guest's memory limits them.
    report = verify_bytes(libxc([empty(0x10), page_data([(1 << 40, NOTAB)])] + [rec(TSC_INFO, bytes(24)),
                                                                               rec(9, b"ctx")], gtype=2))
    assert report.ok and not report.warnings, report.lines()


def test_verifier_not_shown_the_end_says_so():
    reader = V2Reader()
    reader.feed(PV[:5000])  # a driver that stops feeding half-way
    verifier = Verifier()
    while (event := reader.next_event()) is not NEED_DATA:
        verifier.feed_event(event)
    (finding,) = verifier.finish().errors
    assert "not shown the end of the stream" in finding.message


def _v2_samples():
    import json

    from tests.conftest import SAMPLES

    manifest = json.loads((SAMPLES / "v2" / "manifest.json").read_text())
    return [(SAMPLES / "v2" / name, facts) for name, facts in sorted(manifest.items())]


@pytest.mark.parametrize("path,facts", _v2_samples(), ids=[p.name for p, _ in _v2_samples()])
def test_committed_v2_samples(path, facts):
    """samples/v2: valid ones pass with no finding, invalid ones fail with the one error the manifest names."""
    report = verify_path(path, colo=False)
    if not facts.get("invalid"):
        assert report.ok and not report.warnings, report.lines()
        return
    (finding,) = report.errors
    assert finding.offset == facts["offset"] and facts["contains"] in finding.message, str(finding)


MUTATION_BASES = [PV, libxl_hvm(xenstore=b"k\0v\0"), libxl_checkpointed_pv(2), xl(libxl(pv_stream(2)))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(range(len(MUTATION_BASES))),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"])),
                      min_size=1, max_size=4))
def test_mutated_streams_give_findings_never_exceptions(base, edits):
    data = bytearray(MUTATION_BASES[base])
    for where, value, kind in edits:
        pos = int(where * len(data)) & ~(7 if value & 1 else 0)  # record headers sit at multiples of 8
        if kind == "set":
            data[pos] = value
        elif kind == "cut":
            del data[pos:pos + (8 if value < 128 else 4096)]
        else:
            data[pos:pos] = bytes([value]) * 8
    report = verify_bytes(bytes(data))
    assert all("\n" not in line for line in report.lines())
    assert report.ok or report.errors or report.dropped_errors


def test_ascending_run_detection_across_chunks():
    """Both as tuples and as the array('Q') a decoded PageData carries (the verifier's fast path)."""
    from array import array

    from xenstream.v2.verify_pages import RUN_CHUNK, is_ascending_run

    run = tuple(range(7, 7 + 3 * RUN_CHUNK + 5))
    swapped = run[:RUN_CHUNK * 2] + (run[RUN_CHUNK * 2 + 1], run[RUN_CHUNK * 2]) + run[RUN_CHUNK * 2 + 2:]
    for make in (tuple, lambda values: array("Q", values)):
        assert is_ascending_run(make(run))
        assert not is_ascending_run(make(swapped))
        assert is_ascending_run(make((5,))) and not is_ascending_run(make((5, 5)))


def test_decoded_page_data_takes_the_ascending_run_path():
    from xenstream.v2 import records
    from xenstream.v2.verify_pages import is_ascending_run

    head = records.PageData(pfns=range(100, 1124), types=[0] * 1024).pack()
    assert is_ascending_run(records.PageData.unpack(memoryview(head)).pfns)
