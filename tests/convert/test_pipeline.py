"""The pipeline's I/O: the same output whatever the fds are, payloads moved by the kernel where possible,
output produced as the input arrives, and --verify in the same pass."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.convert.v2state import convert_bytes, has_end_record
from xenstream.convert.pipeline import InlineVerifier, OutputVerificationFailed, convert_fds
from xenstream.convert.transform import ConvertOptions
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.legacy.errors import TruncatedStream


@pytest.fixture(scope="module")
def stream() -> bytes:
    return build_stream(BuildOptions(guest="pv", pages=600, holes=2, vcpus=2, live_iterations=1))


@pytest.fixture(scope="module")
def reference(stream, tmp_path_factory) -> bytes:
    data, _ = convert_bytes(stream, tmp_path_factory.mktemp("ref"), verify=False, fmt="libxl")
    return data


def _feeder(target, data: bytes, sizes=None) -> threading.Thread:
    """Write data to a pipe fd or a socket in chunks of the given sizes (then 64 KiB), then close it."""
    def run():
        view = memoryview(data)
        chunks = iter(sizes or [])
        try:
            while view:
                size = next(chunks, 1 << 16)
                if isinstance(target, socket.socket):
                    target.sendall(view[:size])
                else:
                    _write_all(target, view[:size])
                view = view[size:]
        finally:
            target.close() if isinstance(target, socket.socket) else os.close(target)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _drain(fd: int, into: bytearray) -> threading.Thread:
    def run():
        while chunk := os.read(fd, 1 << 16):
            into.extend(chunk)
        os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _pipe_to_pipe(data: bytes, options=ConvertOptions(fmt="libxl"), sizes=None, **kwargs):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    output = bytearray()
    feeder = _feeder(in_w, data, sizes)
    drain = _drain(out_r, output)
    try:
        result = convert_fds(in_r, out_w, options, **kwargs)
    finally:
        os.close(in_r)
        os.close(out_w)
        feeder.join()
        drain.join()
    return bytes(output), result


def test_file_to_file_uses_copy_file_range(stream, reference, tmp_path):
    data, result = convert_bytes(stream, tmp_path, verify=False, fmt="libxl")
    assert data == reference
    assert result.moved_by.get("copy_file_range", 0) > len(stream) // 2


def test_pipe_to_pipe_uses_splice(stream, reference):
    data, result = _pipe_to_pipe(stream)
    assert data == reference
    assert result.moved_by.get("splice", 0) > 0


def test_socket_input_to_file(stream, reference, tmp_path):
    ours, theirs = socket.socketpair()
    target = tmp_path / "out.v2"
    feeder = _feeder(theirs, stream)
    with open(target, "wb") as fout:
        convert_fds(ours.fileno(), fout.fileno(), ConvertOptions(fmt="libxl"))
    ours.close()
    feeder.join()
    assert target.read_bytes() == reference


def test_file_to_pipe_and_pipe_to_file(stream, reference, tmp_path):
    source = tmp_path / "in.v1"
    source.write_bytes(stream)
    out_r, out_w = os.pipe()
    output = bytearray()
    drain = _drain(out_r, output)
    with open(source, "rb") as fin:
        convert_fds(fin.fileno(), out_w, ConvertOptions(fmt="libxl"))
    os.close(out_w)
    drain.join()
    assert bytes(output) == reference
    in_r, in_w = os.pipe()
    feeder = _feeder(in_w, stream)
    with open(tmp_path / "out.v2", "wb") as fout:
        convert_fds(in_r, fout.fileno(), ConvertOptions(fmt="libxl"))
    os.close(in_r)
    feeder.join()
    assert (tmp_path / "out.v2").read_bytes() == reference


def test_output_is_written_as_produced(stream):
    """A reader of the output sees the first records while the input is still open and incomplete."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    done = threading.Event()
    go_on = threading.Event()

    def convert():
        try:
            convert_fds(in_r, out_w, ConvertOptions(fmt="libxl"))
        finally:
            done.set()

    def feed():
        _write_all(in_w, stream[:20000])  # headers and part of the first page batch
        go_on.wait()
        _write_all(in_w, stream[20000:])
        os.close(in_w)

    converter = threading.Thread(target=convert, daemon=True)
    feeder = threading.Thread(target=feed, daemon=True)
    converter.start()
    feeder.start()
    first = os.read(out_r, 64)
    assert first.startswith(b"LibxlFmt")
    assert not done.is_set()
    go_on.set()
    output = bytearray(first)
    drain = _drain(out_r, output)
    feeder.join()
    converter.join()
    os.close(out_w)
    drain.join()
    os.close(in_r)
    assert has_end_record(bytes(output))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=200))
def test_same_output_whatever_the_input_chunks(stream, reference, sizes):
    data, _ = _pipe_to_pipe(stream, sizes=sizes)
    assert data == reference


def test_one_byte_at_a_time():
    small = build_stream(BuildOptions(guest="hvm", pages=8, holes=1, device_model_size=300))
    whole, _ = _pipe_to_pipe(small)
    trickled, _ = _pipe_to_pipe(small, sizes=[1] * len(small))
    assert trickled == whole


def test_truncated_pipe_input(stream):
    with pytest.raises(TruncatedStream):
        _pipe_to_pipe(stream[: len(stream) - 5000])


def test_verify_in_the_same_pass(stream, reference, tmp_path):
    data, result = convert_bytes(stream, tmp_path, verify=True, fmt="libxl")
    assert data == reference
    assert result.report.ok and result.report.records > 10


def test_inline_verifier_reports_bad_output(reference):
    verifier = InlineVerifier(checkpointed=False)
    verifier.feed(reference[:200])
    verifier.feed(b"\x55" * 64)  # garbage where the next record header should be
    report = verifier.finish()
    assert not report.ok


def test_verify_failure_keeps_end_out(stream, tmp_path, monkeypatch):
    """An error the inline verifier finds before the end stops the conversion before END is written."""
    from xenstream.v2 import records

    original = records.X86PvInfo.pack
    monkeypatch.setattr(records.X86PvInfo, "pack", lambda self: original(self)[:2] + b"\x01" + original(self)[3:])
    source, target = tmp_path / "in.v1", tmp_path / "out.v2"
    source.write_bytes(stream)
    with open(source, "rb") as fin, open(target, "wb") as fout:
        with pytest.raises(OutputVerificationFailed, match="reserved"):
            convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(), verify=True)
    assert not has_end_record(target.read_bytes())


def test_verify_failure_only_end_can_settle_keeps_end_out(stream, tmp_path, monkeypatch):
    """A rule checked only at END (vcpu 0's BASIC record is mandatory) still keeps END out of the
    output: the closing records are held until the verifier has passed the whole stream."""
    from xenstream.convert import transform

    handlers = dict(transform.Transformer._HANDLERS)
    handlers[transform.ev.VcpuBasic] = transform.Transformer._ignored
    monkeypatch.setattr(transform.Transformer, "_HANDLERS", handlers)
    source, target = tmp_path / "in.v1", tmp_path / "out.v2"
    source.write_bytes(stream)
    with open(source, "rb") as fin, open(target, "wb") as fout:
        with pytest.raises(OutputVerificationFailed, match="BASIC"):
            convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(fmt="libxl"), verify=True)
    written = target.read_bytes()
    assert written and not has_end_record(written)


def test_falls_back_when_the_kernel_refuses(stream, reference, tmp_path):
    """An O_APPEND output refuses copy_file_range and sendfile: the reused buffer takes over, same bytes."""
    source, target = tmp_path / "in.v1", tmp_path / "out.v2"
    source.write_bytes(stream)
    fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with open(source, "rb") as fin:
        result = convert_fds(fin.fileno(), fd_out, ConvertOptions(fmt="libxl"))
    os.close(fd_out)
    assert target.read_bytes() == reference
    assert result.moved_by.get("buffered", 0) > len(stream) // 2


def test_verify_stops_at_end_of_libxc_stream(tmp_path):
    """libxc format copies the device-model record after END, as Xen's converter does; --verify checks
    the v2 stream up to END and does not take that record for trailing garbage."""
    hvm = build_stream(BuildOptions(guest="hvm", pages=8, holes=1, device_model_size=500))
    data, result = convert_bytes(hvm, tmp_path, verify=True, fmt="libxc")
    assert result.report.ok, result.report.lines()
    assert b"DeviceModelRecord0002" in data[-600:]


@pytest.mark.parametrize("blocking_in,blocking_out", [(False, True), (True, False), (False, False)])
def test_non_blocking_fds_are_waited_on(stream, reference, blocking_in, blocking_out):
    """A pipe another process left in O_NONBLOCK mode (the flag belongs to the shared open file) makes
    read, write and splice fail with EAGAIN whenever the peer is slower: the pipeline waits for the fd
    instead of dying with BlockingIOError, and the output is the same."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.set_blocking(in_r, blocking_in)
    os.set_blocking(out_w, blocking_out)
    output = bytearray()
    late = threading.Event()

    def feed():
        late.wait(5)  # the converter meets an empty input pipe first
        _write_all(in_w, stream)
        os.close(in_w)

    def drain():
        late.wait(5)  # and a full output pipe
        while chunk := os.read(out_r, 1 << 12):
            output.extend(chunk)
        os.close(out_r)

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    timer = threading.Timer(0.3, late.set)
    timer.start()
    try:
        convert_fds(in_r, out_w, ConvertOptions(fmt="libxl"))
    finally:
        late.set()
        os.close(in_r)
        os.close(out_w)
        for thread in threads:
            thread.join(10)
    assert bytes(output) == reference
