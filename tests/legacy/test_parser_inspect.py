"""The v1 inspect data model (legacy/inspect.py) over hand-built streams and the shared vectors."""

import json
import os

import pytest

from tests.conftest import SHARED
from tests.legacy import handbuilt as hb
from tests.legacy.test_compression import remus_compressed
from xenstream.legacy.inspect import inspect_events, inspect_fd
from xenstream.legacy.parser import parse_bytes


def inspect_bytes(tmp_path, data: bytes, **options):
    path = tmp_path / "stream.v1"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return inspect_fd(fd, **options)
    finally:
        os.close(fd)


def test_pv_report(tmp_path):
    report = inspect_bytes(tmp_path, hb.minimal_pv(xcnt=80).bytes())
    assert report.ok
    assert report.variant == {"wrapper": "none", "width": 64, "guest": "pv", "guest_width": 8, "pt_levels": 4}
    assert [e["what"] for e in report.evidence] == ["wrapper", "width", "guest", "guest_width"]
    assert dict(report.pages_by_type) == {"NOTAB": 2, "L1TAB": 1, "L4TAB|PIN": 1, "XTAB": 1, "BROKEN": 1}
    assert dict(report.chunks) == {"TSC_INFO": 1, "VCPU_INFO": 1, "TOOLSTACK": 1, "LAST_CHECKPOINT": 1}
    (checkpoint,) = report.checkpoints
    assert (checkpoint.batches, checkpoint.page_entries, checkpoint.data_pages, checkpoint.last) == (1, 6, 4, True)
    assert report.tail == {
        "unmapped_pfns": 2, "vcpu_records": {0: {"basic": 0x1430, "extended": 128, "xsave": 64}},
        "shared_info_bytes": 4096,
    }
    assert report.end["reason"] == "last-checkpoint" and report.checkpointed == "no"
    text = "\n".join(report.lines())
    assert "PV 64-bit guest, 4-level paging, 64-bit toolstack" in text
    json.dumps(report.to_dict())


def test_hvm_report_with_wrapper_and_trailing_bytes(tmp_path):
    data = hb.Stream().xl_header().raw(hb.minimal_hvm().bytes()).raw(hb.GO).bytes()
    report = inspect_bytes(tmp_path, data)
    assert report.wrapper["kind"] == "xl" and report.wrapper["config_json"]
    assert report.hvm_params["HVM_X87_FIP_WIDTH"] == 0x1000 + 21
    assert report.toolstack["physmap"] == [
        {"phys_offset": "0xf0000000", "start_addr": "0xf1000000", "size": "0x800000", "name": "vga"}
    ]
    assert report.tail["device_model"] == "DeviceModelRecord0002" and report.tail["device_model_bytes"] == 10
    assert report.go_message
    assert inspect_bytes(tmp_path, hb.minimal_hvm(last=False).bytes()).checkpointed == "unknown"


def test_compressed_checkpoints_report(tmp_path):
    report = inspect_bytes(tmp_path, remus_compressed().bytes())
    assert [c.compressed for c in report.checkpoints] == [False, True, True]
    assert report.checkpointed == "yes"
    assert report.checkpoints[1].compressed_bytes == 2 * 4097 + 4097
    assert report.end == {
        "reason": "end-of-input", "complete_checkpoints": 3, "last_checkpoint_complete": True,
        "offset": len(remus_compressed().bytes()),
    }


def test_a_bad_stream_reports_what_was_seen_and_the_error(tmp_path):
    stream = hb.minimal_pv()
    data = stream.bytes()[: stream.marks["tail"] + 2]
    report = inspect_bytes(tmp_path, data)
    assert not report.ok and "unmapped pfn count" in report.error
    assert report.error_offset == stream.marks["tail"]
    assert report.checkpoints[0].batches == 1
    assert report.to_dict()["ok"] is False


def test_the_same_report_from_events():
    data = hb.minimal_pv().bytes()
    report = inspect_events(parse_bytes(data))
    assert report.chunks["TOOLSTACK"] == 1


@pytest.mark.parametrize("case", ["pv64-remus", "pv64-compressed"])
def test_vectors_report(tmp_path, case):
    path = SHARED / "vectors" / f"{case}.v1"
    if not path.exists():
        pytest.skip("vectors absent")
    spec = json.loads((SHARED / "vectors" / f"{case}.json").read_text())
    fd = os.open(path, os.O_RDONLY)
    report = inspect_fd(fd)
    os.close(fd)
    assert len(report.checkpoints) == spec["checkpoints"]
    assert report.vcpus == {"max_vcpu_id": spec["max_vcpu_id"], "online": spec["online_vcpus"]}
    assert report.p2m_size == spec["p2m_size"]


def run_cli(*argv) -> int:
    from xenstream.convert.cli import main

    return main(["inspect", *argv])


def test_cli_inspect_v1_text_and_json(tmp_path, capsys):
    path = tmp_path / "s.v1"
    path.write_bytes(hb.minimal_hvm(32).bytes())
    assert run_cli(str(path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("legacy v1 stream: HVM, 32-bit toolstack, wrapper none")
    assert "HVM_X87_FIP_WIDTH" in out
    assert run_cli("--json", str(path)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "v1" and report["variant"]["width"] == 32 and report["ok"]
    assert report["pages_by_type"] == {"NOTAB": 2, "XALLOC": 1, "XTAB": 1}


def test_cli_inspect_v1_options_decide_what_bytes_cannot(tmp_path, capsys):
    path = tmp_path / "s.v1"
    stream = hb.Stream(64).ulong(0x20).vcpu_info(0, 1).i32(-9).end_body().hvm_tail().dm_record()
    path.write_bytes(stream.bytes())
    assert run_cli(str(path)) == 1
    captured = capsys.readouterr()
    assert "--guest" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert run_cli("--guest", "hvm", "--width", "64", "--xl", "no", str(path)) == 0
    assert "variant" not in capsys.readouterr().err


def test_cli_inspect_v1_bad_stream_prints_what_was_read_and_one_error_line(tmp_path, capsys):
    path = tmp_path / "s.v1"
    stream = hb.minimal_pv()
    path.write_bytes(stream.bytes()[: stream.marks["vcpu_info"] + 6])
    assert run_cli(str(path)) == 1
    captured = capsys.readouterr()
    assert "page entries by type" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"xenstream: offset {stream.marks['vcpu_info'] + 4:#x}: input ends inside")
