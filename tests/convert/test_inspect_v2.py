"""`xenstream inspect` on v2 images: format dispatch, text and JSON reports, collapsed PAGE_DATA runs,
bad input as one error line with its offset and exit 1."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from tests.conftest import SAMPLES
from xenstream.convert import cli
from xenstream.convert.commands.inspect import detect_format
from xenstream.v2 import constants as C
from xenstream.v2.synth import stream_bytes
from xenstream.v2.xl_header import XlHeader

V2_SAMPLES = SAMPLES / "v2"


def inspect(capsys, *argv):
    code = cli.main(["inspect", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_detect_format():
    assert detect_format(XlHeader.with_config(b"{}\0").pack()) == "v2"
    assert detect_format(XlHeader(mandatory_flags=C.XL_FLAG_JSON).pack()) == "v1"
    assert detect_format(XlHeader.with_config(b"{}\0", byteorder=">").pack()) == "v2"
    assert detect_format(b"LibxlFmt" + bytes(8)) == "v2"
    assert detect_format(b"\xff" * 8 + b"XENF") == "v2"
    assert detect_format(struct.pack("<Q", 0x1000)) == "v1"
    assert detect_format(b"\xff" * 7 + b"\xfe" + b"XENF") == "v2"


def test_json_report_of_a_pv_image(capsys):
    code, out, _ = inspect(capsys, V2_SAMPLES / "pv64-v3.libxc", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["format"] == "v2"
    assert report["headers"]["domain"]["guest"] == "x86 PV"
    assert report["headers"]["libxc image header"]["version"] == 3
    # synth layout: pinned L4 at pfn 1, L3/L2/L1 at 2-4, the rest ordinary pages
    assert report["pages_by_type"] == {"NOTAB": 4, "L1TAB": 1, "L2TAB": 1, "L3TAB": 1, "L4TAB|PIN": 1}
    assert (report["pfn_min"], report["pfn_max"], report["data_pages"]) == (0, 7, 8)
    assert report["vcpus"] == {"0": {"BASIC": 5168, "EXTENDED": 64, "XSAVE": 592, "MSRS": 16},
                               "1": {"BASIC": 5168, "EXTENDED": 64, "XSAVE": 592, "MSRS": 16}}
    assert report["pv_info"] == {"guest_width": 8, "pt_levels": 4}
    assert report["end"] == {"complete": True, "offset": (V2_SAMPLES / "pv64-v3.libxc").stat().st_size, "checkpoints": 0}


def test_text_report_of_a_checkpointed_libxl_image(capsys):
    code, out, _ = inspect(capsys, V2_SAMPLES / "pv64-remus.libxl")
    assert code == 0
    assert "checkpoints: 3 (CHECKPOINT at " in out
    assert out.count("libxl CHECKPOINT_END") == 3
    assert "end: stopped at a checkpoint boundary (no END)" in out


def test_hvm_report(capsys):
    code, out, _ = inspect(capsys, V2_SAMPLES / "hvm-v3-xenstore.xl", "--json")
    report = json.loads(out)
    assert report["hvm_context"]["entries"] == {"entries": 3, "cpus": 1}
    assert report["hvm_params"] == {"1": 11, "5": 9, "6": 8, "17": 10}
    assert report["pages_by_type"] == {"NOTAB": 10, "XTAB": 2}
    assert [e["record"] for e in report["emulator"]] == ["EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT"]
    assert report["emulator"][0]["keys"] == 3
    assert report["headers"]["xl header"]["mandatory_flags"] == "JSON|STREAMv2"


def test_page_data_runs_collapse_unless_asked(capsys, tmp_path):
    path = tmp_path / "batched"
    path.write_bytes(stream_bytes(guest="hvm", pages=30, batch=4))  # 8 PAGE_DATA records in a row
    _, out, _ = inspect(capsys, path)
    assert out.count("libxc PAGE_DATA") == 1 and "PAGE_DATA x8" in out and "pages: 8 PAGE_DATA records" in out
    _, out, _ = inspect(capsys, path, "--all-records")
    assert sum("libxc PAGE_DATA " in line for line in out.splitlines()) == 8


@pytest.mark.parametrize(
    "name", sorted(n for n, facts in json.loads((V2_SAMPLES / "manifest.json").read_text()).items() if facts.get("invalid"))
)
def test_invalid_images_give_one_error_line_and_exit_1(capsys, name):
    facts = json.loads((V2_SAMPLES / "manifest.json").read_text())[name]
    code, out, err = inspect(capsys, V2_SAMPLES / name)
    assert code == 1
    assert err.count("\n") == 1 and f"offset {facts['offset']:#x}: " in err and facts["contains"] in err
    assert "Traceback" not in err + out
    assert f"ERROR at offset {facts['offset']:#x}" in out


def test_reads_stdin(tmp_path):
    data = (V2_SAMPLES / "hvm-v3.libxl").read_bytes()
    result = subprocess.run([sys.executable, "-m", "xenstream.convert.cli", "inspect", "-", "--json"],
                            input=data, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["end"]["complete"] is True


def test_trailing_bytes_are_reported(capsys, tmp_path):
    path = tmp_path / "trailing"
    path.write_bytes((V2_SAMPLES / "hvm-v3.libxc").read_bytes() + b"junk")
    code, out, _ = inspect(capsys, path, "--json")
    assert code == 0 and json.loads(out)["trailing_bytes"] == 4
