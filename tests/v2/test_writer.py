"""V2Writer and the pure encoders: framing, padding, writev onto fds (partial writes, > IOV_MAX buffers),
the split PAGE_DATA form, byte accounting."""

from __future__ import annotations

import io
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstream.hv.abi import PAGE_SIZE
from xenstream.v2 import constants as C
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.synth import write_stream
from xenstream.v2.writer import V2Writer, encode_page_data_header, encode_record, page_data_payload_length
from xenstream.v2.xl_header import XlHeader


@settings(max_examples=100, deadline=None)
@given(record_type=st.integers(0, 0xFFFFFFFF), body=st.binary(max_size=40))
def test_encode_record_framing(record_type, body):
    out = encode_record(record_type, body)
    assert len(out) % 8 == 0 and len(out) - 8 - len(body) < 8
    assert struct.unpack_from("<II", out) == (record_type, len(body))
    assert out[8 : 8 + len(body)] == body and not any(out[8 + len(body) :])


def test_encode_record_refuses_oversized_body():
    class Huge:
        def __len__(self):
            return C.RECORD_LENGTH_MAX + 1

    with pytest.raises(ValueError):
        encode_record(9, Huge())


def test_page_data_needs_no_padding():
    for count, types in ((1, [0]), (3, [0, 0xF, 0xD]), (5, [0xF] * 5)):
        head = encode_page_data_header(range(count), types)
        length = struct.unpack_from("<I", head, 4)[0]
        assert length == len(head) - 8 + page_data_payload_length(types)
        assert length % 8 == 0


@pytest.mark.parametrize(
    "pfns, types", [([], []), ([1], [5]), ([1], [8]), ([1, 2], [0]), ([1 << 52], [0]), ([1], [16])]
)
def test_page_data_header_rejects_bad_input(pfns, types):
    with pytest.raises(ValueError):
        encode_page_data_header(pfns, types)


def test_page_data_payload_size_is_checked():
    w = V2Writer(io.BytesIO())
    with pytest.raises(ValueError):
        w.page_data([1, 2], [0, 0], [bytes(PAGE_SIZE)])


def fd_output(write) -> bytes:
    path = f"/tmp/xenstream-writer-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = V2Writer(fd)
        write(writer)
        assert writer.position == os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1 << 26)
    finally:
        os.close(fd)
        os.unlink(path)


def file_output(write) -> bytes:
    sink = io.BytesIO()
    writer = V2Writer(sink)
    write(writer)
    assert writer.position == len(sink.getvalue())
    return sink.getvalue()


def many_pages(writer):
    pages = [bytes([i & 0xFF]) * PAGE_SIZE for i in range(1100)]  # more buffers than IOV_MAX
    writer.page_data(range(1100), [0] * 1100, pages)


def test_fd_and_file_objects_give_identical_bytes():
    assert fd_output(many_pages) == file_output(many_pages)


@pytest.mark.parametrize("options", [dict(guest="pv", pages=40, wrap="xl"), dict(guest="hvm", pages=40, wrap="libxl", checkpoints=2)])
def test_synth_streams_are_deterministic_on_fds_and_files(tmp_path, options):
    sink = io.BytesIO()
    written = write_stream(sink, **options)
    path = tmp_path / "stream"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert write_stream(fd, **options) == written == len(sink.getvalue())
    finally:
        os.close(fd)
    assert path.read_bytes() == sink.getvalue()


def test_partial_writev_is_resumed(monkeypatch):
    real_writev = os.writev
    calls = []

    def stingy_writev(fd, buffers):
        calls.append(len(buffers))
        budget = 1000
        limited = []
        for b in buffers:
            take = memoryview(b)[:budget]
            limited.append(take)
            budget -= len(take)
            if not budget:
                break
        return real_writev(fd, limited)

    expected = file_output(many_pages)
    monkeypatch.setattr(os, "writev", stingy_writev)
    assert fd_output(many_pages) == expected
    assert len(calls) > len(expected) // 1000 and max(calls) <= 1024


def test_split_page_data_form_matches_writev_form():
    pfns, types = [3, 4, 5], [0, 0xF, 0x9]
    payload = b"\x11" * PAGE_SIZE + b"\x22" * PAGE_SIZE

    def whole(w):
        w.page_data(pfns, types, [payload[:PAGE_SIZE], payload[PAGE_SIZE:]])

    def split(w):
        n = w.page_data_header(pfns, types)
        assert n == len(payload)
        w._file.write(payload)  # the caller moves the payload itself
        w.payload_written(n)

    assert file_output(split) == file_output(whole)


def test_positions_are_aligned_per_layer():
    sink = io.BytesIO()
    w = V2Writer(sink)
    w.xl_header(XlHeader.with_config(b"abc"))  # 55 bytes: the libxl stream starts unaligned
    w.libxl_header()
    w.libxl_record(L.LibxcContext())
    w.image_header()
    w.domain_header(R.DomainHeader(guest_type=2))
    for record in (R.HvmContext(b"x" * 13), R.HvmParams([(1, 2)]), R.X86TscInfo()):
        w.record(record)
        assert w.stream_position("libxc") % 8 == 0 and w.stream_position("libxl") % 8 == 0
    assert w.position % 8 != 0
    assert w.stream_position("xl") == w.position


def test_nothing_is_written_implicitly():
    out = file_output(lambda w: (w.image_header(), w.domain_header(R.DomainHeader(guest_type=1)), w.record(R.X86PvInfo(8, 4))))
    assert len(out) == 24 + 16 + 16 and out.endswith(encode_record(2, R.X86PvInfo(8, 4).pack()))


def test_page_data_only_through_page_data_methods():
    w = V2Writer(io.BytesIO())
    with pytest.raises(TypeError):
        w.record(R.PageData([1], [0]))
    with pytest.raises(TypeError):
        w.record(R.Toolstack(b"obsolete"))
