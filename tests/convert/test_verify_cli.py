"""`xenstream verify` and the `verify-stream-v2` drop-in as command lines: arguments, output, exit codes."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys

import pytest

from tests.v2.test_verify_input import BROKEN
from tests.v2.verify_builder import (
    PAGE_DATA, TSC_INFO, VCPU_XSAVE, emulator, EMU_CONTEXT, hvm_stream, libxl, libxl_checkpointed_pv, libxl_hvm,
    page_data, pv_stream, vcpu, xl, NOTAB,
)
from tests.v2.test_verify import pv
from xenstream.convert import cli

XENSTREAM = [sys.executable, "-m", "xenstream.convert"]
DROP_IN = [sys.executable, "-m", "xenstream.convert.compat_verify"]


def run(argv, stdin=None, **kw):
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=120, **kw)


@pytest.fixture
def files(tmp_path):
    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)
    return write


def test_verify_valid_file(files):
    done = run(XENSTREAM + ["verify", files("s", xl(libxl(pv_stream())))])
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == ["valid: xl v3 PV stream, 13 records, 4 pages; 0 errors, 0 warnings"]


def test_verify_reports_each_finding_on_one_line_and_exits_1(files):
    stream = pv(vcpu(VCPU_XSAVE, 0, bytes(8)), page_data([(3, NOTAB), (3, NOTAB)]))
    done = run(XENSTREAM + ["verify", files("s", stream)])
    assert done.returncode == 1
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("error: offset 0x") and "libxc record 6 (X86_PV_VCPU_XSAVE)" in lines[0]
    assert all(line.startswith("warning: offset 0x") for line in lines[1:-1])
    assert any("appears more than once" in line for line in lines[1:-1])
    assert lines[-1].startswith("INVALID: libxc v3 PV stream") and lines[-1].endswith(f"1 errors, {len(lines) - 2} warnings")


def test_verify_json(files):
    done = run(XENSTREAM + ["verify", "--json", files("s", libxl_checkpointed_pv(2))])
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert report["valid"] and report["format"] == "libxl" and report["checkpoints"] == 2
    assert report["pages"] == 4 + 1  # the first checkpoint's 4 pages, then one dirty page
    assert report["errors"] == [] and report["warnings"] == []


def test_verify_json_errors(files):
    done = run(XENSTREAM + ["verify", "--json", files("s", pv_stream()[:-3])])
    assert done.returncode == 1
    (error,) = json.loads(done.stdout)["errors"]
    assert error["offset"] == len(pv_stream()) - 8 and "truncated" in error["message"]


def test_verify_stdin_and_fd(files):
    stream = libxl_hvm(xenstore=b"k\0v\0")
    assert run(XENSTREAM + ["verify", "-"], stdin=stream).returncode == 0
    fd = os.open(files("s", stream), os.O_RDONLY)
    try:
        done = subprocess.run(XENSTREAM + ["verify", str(fd)], pass_fds=(fd,), capture_output=True, timeout=60)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("fmt,expected", [("auto", 0), ("xl", 0), ("libxl", 1), ("libxc", 1)])
def test_verify_format_option(files, fmt, expected):
    done = run(XENSTREAM + ["verify", "--format", fmt, files("s", xl(libxl(pv_stream())))])
    assert done.returncode == expected, done.stdout


def test_verify_checkpointed_option(files):
    path = files("s", libxl_checkpointed_pv(2))
    assert run(XENSTREAM + ["verify", "--checkpointed", "yes", path]).returncode == 0
    done = run(XENSTREAM + ["verify", "--checkpointed", "no", path])
    assert done.returncode == 1 and b"not checkpointed" in done.stdout


def test_verify_max_vcpus_option(files):
    path = files("s", pv_stream(vcpus=2))
    assert run(XENSTREAM + ["verify", "--max-vcpus", "2", path]).returncode == 0
    assert run(XENSTREAM + ["verify", "--max-vcpus", "1", path]).returncode == 1


def test_verify_missing_file_is_one_line():
    done = run(XENSTREAM + ["verify", "/nonexistent/stream"])
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1 and b"Traceback" not in done.stderr


@pytest.mark.parametrize("stream,offset,fragment", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_bad_input_is_one_line_with_its_offset_and_exit_1(files, stream, offset, fragment, capsys):
    assert cli.main(["verify", files("s", stream)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    error_lines = [line for line in out.splitlines() if line.startswith("error")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"error: offset {offset:#x}: ") and fragment in error_lines[0]


def _limit_memory():
    limit = 96 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("claim", [
    struct.pack("<II", PAGE_DATA, 0x08000000) + struct.pack("<II", 0x00FFFFFF, 0),  # a pfn array of 128 MiB
    struct.pack("<II", TSC_INFO, 0x07FFFFF8),  # a body of almost 128 MiB
    struct.pack("<II", PAGE_DATA, 0xFFFFFFF8),  # past the limit
])
def test_claimed_lengths_do_not_allocate(files, claim):
    """Within a 96 MiB address space (the command itself maps ~40 MiB): a claim near 128 MiB that were
    allocated would fail with MemoryError; claims are checked, never allocated."""
    stream = pv_stream()[:40] + claim + bytes(4096)
    done = subprocess.run(XENSTREAM + ["verify", files("s", stream)], capture_output=True, timeout=60,
                          preexec_fn=_limit_memory)
    assert done.returncode == 1, done.stderr
    assert b"Traceback" not in done.stderr and b"MemoryError" not in done.stdout + done.stderr


# ---- the drop-in ----------------------------------------------------------------------------------

def test_drop_in_defaults_to_libxc_on_stdin():
    assert run(DROP_IN, stdin=pv_stream()).returncode == 0
    done = run(DROP_IN, stdin=libxl(pv_stream()))
    assert done.returncode == 1 and done.stderr.startswith(b"Stream Error:\nerror: offset 0x0")


@pytest.mark.parametrize("flag", ["-i", "--in"])
def test_drop_in_input_path_or_fd(files, flag):
    path = files("s", libxl(hvm_stream(), [emulator(EMU_CONTEXT, b"ctx")]))
    assert run(DROP_IN + [flag, path, "-f", "libxl"]).returncode == 0
    fd = os.open(path, os.O_RDONLY)
    try:
        done = subprocess.run(DROP_IN + [flag, str(fd), "--format", "libxl"], pass_fds=(fd,), capture_output=True)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr


def test_drop_in_verbose_summarises_like_xens_script(files):
    done = run(DROP_IN + ["-i", files("s", pv(page_data([(3, NOTAB)]), page_data([(2, NOTAB)]))), "-v"])
    assert done.returncode == 0
    lines = done.stdout.decode().splitlines()
    assert lines[:3] == ["Libxc Image Header: Version 3, little endian", "Domain Header: x86 PV from Xen 4.17",
                         "Libxc Record: X86_PV_INFO, length 8"]
    assert "Squashed 3 Page Data records together" in lines
    assert lines[-1] == "Libxc Record: END, length 0"


def test_drop_in_verbose_prints_warnings(files):
    done = run(DROP_IN + ["-i", files("s", pv(page_data([(3, NOTAB), (3, NOTAB)]))), "-v"])
    assert done.returncode == 0
    assert any(line.startswith("Warning: offset 0x") and "appears more than once" in line
               for line in done.stdout.decode().splitlines())


def test_drop_in_quiet_prints_nothing(files):
    done = run(DROP_IN + ["-i", files("s", pv_stream()[:100]), "-q", "-v"])
    assert (done.returncode, done.stdout, done.stderr) == (1, b"", b"")


def test_drop_in_error_is_one_line_per_finding(files):
    done = run(DROP_IN + ["-i", files("s", pv_stream()[:100])])
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        "Stream Error:", "error: offset 0x58: libxc record 2 (X86_MSR_POLICY): truncated libxc X86_MSR_POLICY record: "
        "needs 24 bytes, input ends after 12"]


def test_drop_in_syslog(files):
    done = run(DROP_IN + ["-i", files("s", pv_stream()[:100]), "--syslog"])
    assert done.returncode == 1 and b"Stream Error:" in done.stderr


def test_drop_in_xl_format(files):
    path = files("s", xl(libxl(pv_stream())))
    assert run(DROP_IN + ["-i", path, "-f", "xl"]).returncode == 0
    assert run(DROP_IN + ["-i", path, "-f", "libxl"]).returncode == 1


def test_drop_in_internal_error_exits_2(files, monkeypatch):
    from xenstream.convert import compat_verify

    def broken(*args, **kwargs):
        raise ZeroDivisionError("our bug")

    monkeypatch.setattr(compat_verify, "verify_fd", broken)
    assert compat_verify.main(["-i", files("s", pv_stream())]) == 2


def test_drop_in_bad_option_is_a_usage_error():
    assert run(DROP_IN + ["-f", "json"]).returncode == 2


def test_drop_in_exits_1_on_toolstack_where_xens_script_exits_2(files):
    """Spec A16: Xen's script raises DeprecationWarning on TOOLSTACK ("Script Error", exit 2); the stream is
    invalid, not our bug, so the drop-in exits 1."""
    from tests.v2.verify_builder import TOOLSTACK, rec as record

    done = run(DROP_IN + ["-i", files("s", pv(record(TOOLSTACK, b"blob")))])
    assert done.returncode == 1 and b"TOOLSTACK is obsolete" in done.stderr


def test_verify_trailing_bytes_and_stop_at_end(files):
    path = files("s", xl(libxl(pv_stream())) + b"migration go message")
    done = run(XENSTREAM + ["verify", path])
    assert done.returncode == 1 and b"20 bytes after the end of the stream" in done.stdout
    assert run(XENSTREAM + ["verify", "--stop-at-end", path]).returncode == 0
