"""`xenstream save` and `xenstream restore`: the command lines over the engines."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.v2 import engine_support as es
from xenstream.convert.cli import main
from xenstream.v2.events import EndOfStream
from xenstream.v2.reader import V2Reader

SPEC = "pv64:mem=2M,vcpus=2,seed=7"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def restore_report(capsys, path) -> dict:
    code, out, err = run(capsys, "restore", str(path), "--report", "json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def source() -> es.Source:
    return es.make_source(SPEC)


def test_save_writes_a_complete_v2_stream(tmp_path, capsys):
    path = tmp_path / "guest.v2"
    code, _, err = run(capsys, "save", "--guest", SPEC, "-o", str(path))
    assert code == 0 and "v2 stream" in err
    reader = V2Reader()
    reader.feed(path.read_bytes())
    reader.feed(b"")
    events = iter(reader.next_event, None)
    end = next(e for e in events if isinstance(e, EndOfStream))
    assert end.complete


def test_restore_report_describes_the_saved_guest(tmp_path, capsys, source):
    path = tmp_path / "guest.v2"
    assert run(capsys, "save", "--guest", SPEC, "-o", str(path))[0] == 0
    report = restore_report(capsys, path)
    layout = source.guest.layout
    assert report["guest_type"] == "pv"
    assert (report["guest_width"], report["levels"], report["p2m_size"]) == (8, 4, source.digest.p2m_size)
    assert (report["start_info_pfn"], report["store_pfn"], report["console_pfn"]) == (
        layout.start_info_pfn, layout.store_pfn, layout.console_pfn)
    pages = {p["pfn"]: p for p in report["pages"]}
    assert len(report["pages"]) == len(source.digest.pages)
    # Also the P2M frame lists: they hold the saving host's mfns as plain data (that host differs here).
    exempt = es.exempt_pfns(source.guest) | set(layout.fl_pfns) | {layout.fll_pfn}
    for page in source.digest.pages:
        entry = pages[page.pfn]
        assert (entry["type"], entry["pinned"]) == (page.type, page.pinned)
        if page.pfn not in exempt:
            assert entry["sha256"] == page.sha256
    assert report["vcpus"] == [{"id": v.id, "online": v.online, "sha256": v.sha256} for v in source.digest.vcpus]
    assert {p["type"] for p in report["pages"]} >= {"NOTAB", "L1TAB", "L2TAB", "L3TAB", "L4TAB"}
    assert any(p["pinned"] for p in report["pages"])


@pytest.mark.parametrize("width", ["64", "32"])
def test_legacy_save_restores_to_the_same_guest(tmp_path, capsys, source, width):
    v2_path, v1_path = tmp_path / "guest.v2", tmp_path / "guest.v1"
    assert run(capsys, "save", "--guest", SPEC, "-o", str(v2_path))[0] == 0
    code, _, err = run(capsys, "save", "--guest", SPEC, "-o", str(v1_path), "--legacy", "--toolstack-width", width)
    assert code == 0 and f"{width}-bit toolstack" in err
    from_v2, from_v1 = restore_report(capsys, v2_path), restore_report(capsys, v1_path)
    # Same guest, same (default-sized) restoring host: even the pages holding new mfns agree.
    assert from_v1 == from_v2


def test_restore_from_stdin_matches_the_file(tmp_path, capsys):
    path = tmp_path / "guest.v2"
    assert run(capsys, "save", "--guest", "pv32:mem=1M,vcpus=1,seed=5", "-o", str(path))[0] == 0
    from_file = restore_report(capsys, path)
    script = pathlib.Path(sys.executable).with_name("xenstream")
    with open(path, "rb") as stdin:
        piped = subprocess.run([str(script), "restore", "-", "--report", "json"], stdin=stdin,
                               capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == from_file


def test_text_report(tmp_path, capsys):
    path = tmp_path / "guest.v2"
    run(capsys, "save", "--guest", "pv32:mem=1M,vcpus=1,seed=3", "-o", str(path))
    code, out, _ = run(capsys, "restore", str(path))
    assert code == 0 and out.startswith("restored a pv32 guest") and "1 vcpus online" in out


def test_restore_of_a_bad_stream_fails_in_one_line(tmp_path, capsys):
    path = tmp_path / "guest.v2"
    run(capsys, "save", "--guest", "pv64:mem=1M,vcpus=1,seed=3", "-o", str(path))
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    code, out, err = run(capsys, "restore", str(path))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "truncated" in err


def test_save_with_a_bad_spec_fails(tmp_path, capsys):
    code, _, err = run(capsys, "save", "--guest", "sparc:mem=1M", "-o", str(tmp_path / "x"))
    assert code == 1 and "pv64: or pv32:" in err
    assert not (tmp_path / "x").exists()
