"""`xenstream convert IN OUT`: paths, fd numbers and '-', the automatic output format, and no output file
left behind by a failed conversion."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.convert.v2state import convert_bytes, restored_state
from xenstream.convert.cli import main as xenstream_main
from xenstream.legacy.build import BuildOptions, build_stream


@pytest.fixture(scope="module")
def pv() -> bytes:
    return build_stream(BuildOptions(guest="pv", pages=30, holes=1))


def test_paths(tmp_path, pv):
    (tmp_path / "in.v1").write_bytes(pv)
    assert xenstream_main(["convert", str(tmp_path / "in.v1"), str(tmp_path / "out.v2")]) == 0
    assert (tmp_path / "out.v2").read_bytes() == convert_bytes(pv, tmp_path, fmt="libxc")[0]


def test_stdin_stdout(tmp_path, pv):
    proc = subprocess.run([sys.executable, "-m", "xenstream.convert", "convert", "-", "-", "-f", "libxl"],
                          input=pv, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == convert_bytes(pv, tmp_path, fmt="libxl")[0]


def test_fd_numbers(tmp_path, pv):
    (tmp_path / "in.v1").write_bytes(pv)
    with open(tmp_path / "in.v1", "rb") as fin, open(tmp_path / "out.v2", "wb") as fout:
        proc = subprocess.run([sys.executable, "-m", "xenstream.convert", "convert", str(fin.fileno()),
                               str(fout.fileno())], pass_fds=(fin.fileno(), fout.fileno()), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.v2").read_bytes() == convert_bytes(pv, tmp_path, fmt="libxc")[0]


@pytest.mark.parametrize("options, layer", [(dict(guest="pv", pages=30, holes=1), "libxc"),
                                            (dict(guest="pv", pages=30, holes=1, wrapper="xl"), "xl"),
                                            (dict(guest="hvm", pages=8, holes=1), "libxl")])
def test_automatic_format(tmp_path, options, layer):
    (tmp_path / "in.v1").write_bytes(build_stream(BuildOptions(**options)))
    assert xenstream_main(["convert", str(tmp_path / "in.v1"), str(tmp_path / "out.v2"), "--verify"]) == 0
    head = (tmp_path / "out.v2").read_bytes()[:8]
    assert head == {"libxc": b"\xff" * 8, "xl": b"Xen save", "libxl": b"LibxlFmt"}[layer]


def test_failure_leaves_no_output_file(tmp_path, pv, capsys):
    (tmp_path / "in.v1").write_bytes(pv[: len(pv) // 2])
    assert xenstream_main(["convert", str(tmp_path / "in.v1"), str(tmp_path / "out.v2")]) == 1
    assert not (tmp_path / "out.v2").exists()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "offset" in err


def test_checkpoints_option(tmp_path):
    stream = build_stream(BuildOptions(guest="pv", pages=30, holes=1, checkpoints=3))
    (tmp_path / "in.v1").write_bytes(stream)
    assert xenstream_main(["convert", str(tmp_path / "in.v1"), str(tmp_path / "out.v2"), "--checkpoints"]) == 0
    state = restored_state((tmp_path / "out.v2").read_bytes())
    assert state["record_types"].count(0x0E) == 3  # CHECKPOINT
