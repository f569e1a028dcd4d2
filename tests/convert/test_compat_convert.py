"""`convert-legacy-stream` used the way libxl uses it: a child process with inherited pipe fds
(``--in FD --out FD --width 64 --guest hvm --format libxl``), whose output a restore-side reader consumes
while it is produced; exit codes 0 / 1 / 2 as Xen's converter."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.convert.v2state import convert_bytes, has_end_record
from xenstream.convert import compat_convert
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.v2.errors import StreamError
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxlRecord
from xenstream.v2.reader import V2Reader

SCRIPT = Path(sys.executable).parent / "convert-legacy-stream"


def command() -> list[str]:
    if SCRIPT.exists():
        return [str(SCRIPT)]
    return [sys.executable, "-c", "import sys; from xenstream.convert.compat_convert import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def hvm_stream() -> bytes:
    return build_stream(BuildOptions(guest="hvm", pages=300, holes=2, device_model_size=2000))


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_like_libxl(stream: bytes, args: list[str], *, hold_back: int = 0):
    """Start the helper on two pipes; feed the stream, holding back its last `hold_back` bytes until the
    reader has seen the first libxl records. Returns (events, output bytes, exit code, stderr, seen_early)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    proc = subprocess.Popen([*command(), "--in", str(in_r), "--out", str(out_w), *args],
                            pass_fds=(in_r, out_w), stderr=subprocess.PIPE)
    os.close(in_r)
    os.close(out_w)
    release = threading.Event()
    if not hold_back:
        release.set()

    def feed():
        try:
            _write_all(in_w, stream[: len(stream) - hold_back])
            release.wait(30)
            _write_all(in_w, stream[len(stream) - hold_back:])
        except BrokenPipeError:
            pass
        finally:
            os.close(in_w)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    reader = V2Reader(layer="auto", payload="views")
    events, output = [], bytearray()
    seen_early = False
    try:
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                chunk = os.read(out_r, 1 << 16)
                output += chunk
                reader.feed(chunk)
                continue
            events.append(event)
            if isinstance(event, LibxlRecord) and not release.is_set():
                seen_early = True  # a libxl record arrived while the end of the input was still held back
                release.set()
            if isinstance(event, EndOfStream):
                break
    except StreamError as error:
        events.append(error)
    release.set()
    while chunk := os.read(out_r, 1 << 16):
        output += chunk
    os.close(out_r)
    feeder.join()
    stderr = proc.stderr.read().decode()
    return events, bytes(output), proc.wait(timeout=60), stderr, seen_early


def test_libxl_invocation_streams_through_pipes(hvm_stream, tmp_path):
    events, output, code, stderr, seen_early = run_like_libxl(
        hvm_stream, ["--width", "64", "--guest", "hvm", "--format", "libxl"], hold_back=len(hvm_stream) // 3)
    assert code == 0, stderr
    assert seen_early
    assert events[-1].complete
    expected, _ = convert_bytes(hvm_stream, tmp_path, fmt="libxl")
    assert output == expected


@pytest.mark.parametrize("spelling", [["-w", "64", "-g", "hvm", "-f", "libxl"],
                                      ["--width=64", "--guest-type=hvm", "--format=libxl"],
                                      ["--wid", "64", "--gu", "hvm", "--form", "libxl"],
                                      ["--format", "libxl"]])
def test_option_spellings_and_detection(hvm_stream, tmp_path, spelling):
    _, output, code, stderr, _ = run_like_libxl(hvm_stream, spelling)
    assert code == 0, stderr
    expected, _ = convert_bytes(hvm_stream, tmp_path, fmt="libxl")
    assert output == expected


def test_paths_instead_of_fds(hvm_stream, tmp_path):
    source, target = tmp_path / "in.v1", tmp_path / "out.v2"
    source.write_bytes(hvm_stream)
    proc = subprocess.run([*command(), "-i", str(source), "-o", str(target), "-f", "libxc"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == convert_bytes(hvm_stream, tmp_path, fmt="libxc")[0]


def test_bad_stream_exits_1_with_one_line_and_no_end(hvm_stream):
    cut = hvm_stream[: len(hvm_stream) - 700]
    _, output, code, stderr, _ = run_like_libxl(cut, ["--width", "64", "--guest", "hvm", "--format", "libxl"])
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("convert-legacy-stream: ")
    assert not has_end_record(output)


def test_missing_required_options_exit_1(capsys):
    assert compat_convert.main(["-i", "0"]) == 1
    assert "usage" in capsys.readouterr().err


def test_internal_error_exits_2(monkeypatch, tmp_path, hvm_stream):
    source = tmp_path / "in.v1"
    source.write_bytes(hvm_stream)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(compat_convert, "convert_fds", broken)
    assert compat_convert.main(["-i", str(source), "-o", str(tmp_path / "out.v2")]) == 2


def test_syslog_and_verbose_accepted(hvm_stream, tmp_path):
    source, target = tmp_path / "in.v1", tmp_path / "out.v2"
    source.write_bytes(hvm_stream)
    proc = subprocess.run([*command(), "-i", str(source), "-o", str(target), "-v", "--syslog"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
