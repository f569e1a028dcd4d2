"""`xenstream save --guest hvm:...` and `xenstream restore` of HVM images, v2 and v1, with the JSON report."""

from __future__ import annotations

import json

import pytest

from tests.v2 import hvm_support as hs
from xenstream.convert.cli import main
from xenstream.hv import hvm_context, hvm_params
from xenstream.v2.snapshot_hvm import hvm_snapshot

SPEC = "hvm:mem=2M,vcpus=2,seed=21"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("hvm-cli")
    paths = {"v2": base / "guest.v2", "v1": base / "guest.v1"}
    assert main(["-q", "save", "--guest", SPEC, "-o", str(paths["v2"])]) == 0
    assert main(["-q", "save", "--guest", SPEC, "--legacy", "-o", str(paths["v1"])]) == 0
    return paths


@pytest.fixture(scope="module")
def source():
    xen, guest = hs.build(SPEC)
    guest.suspend()
    return xen, guest, hvm_snapshot(xen, guest.domid)


def report(capsys, path) -> dict:
    code, out, err = run(capsys, "restore", str(path), "--report", "json")
    assert code == 0, err
    return json.loads(out)


def test_saves_announce_what_they_wrote(images, capsys, tmp_path):
    code, _, err = run(capsys, "save", "--guest", SPEC, "-o", str(tmp_path / "again.v2"))
    assert code == 0 and "v2 libxl stream" in err and "HVM context" in err
    assert (tmp_path / "again.v2").read_bytes() == images["v2"].read_bytes()
    assert images["v2"].read_bytes()[:8] == b"LibxlFmt"
    code, _, err = run(capsys, "save", "--guest", SPEC, "--legacy", "--toolstack-width", "32", "-o", str(tmp_path / "w32"))
    assert code == 0 and "v1 stream (32-bit toolstack)" in err


def test_v2_report_is_the_saved_guest(images, source, capsys):
    xen, guest, digest = source
    data = report(capsys, images["v2"])
    assert data["guest_type"] == "hvm" and data["p2m_size"] == digest.p2m_size
    cleared = {guest.built.layout.special[i] for i in (3, 4, 5, 7)}
    saved = {p.pfn: p.sha256 for p in digest.pages}
    restored = {p["pfn"]: p["sha256"] for p in data["pages"]}
    assert saved.keys() == restored.keys()
    assert {pfn for pfn in saved if saved[pfn] != restored[pfn]} <= cleared
    assert [(p["index"], p["value"]) for p in data["params"]] == list(digest.params)
    assert data["hvm_context"]["sha256"] == digest.context_sha256
    records = [(r["name"], r["instance"], r["length"]) for r in data["hvm_context"]["records"]]
    assert records == [(r.name, r.instance, r.length) for r in hvm_context.list_records(xen.get_hvm_context(guest.domid))]
    assert records[0][0] == "HEADER" and records[-1][0] == "END"
    assert data["store_pfn"] == xen.get_hvm_param(guest.domid, hvm_params.STORE_PFN)
    assert data["vcpus"] == [{"id": 0, "online": True}, {"id": 1, "online": True}]
    assert data["emulator"]["id"] == 2 and data["emulator"]["context_length"] == len(guest.built.emulator.context)
    assert data["emulator"]["xenstore"] == {k.decode(): v.decode() for k, v in guest.built.emulator.xenstore_pairs()}


def test_v1_image_restores_to_the_same_guest(images, capsys):
    v2, v1 = report(capsys, images["v2"]), report(capsys, images["v1"])
    assert v1["pages"] == v2["pages"] and v1["hvm_context"] == v2["hvm_context"]
    not_in_v1 = {hvm_params.X87_FIP_WIDTH, hvm_params.MCA_CAP}
    assert v1["params"] == [p for p in v2["params"] if p["index"] not in not_in_v1]
    assert v1["emulator"]["xenstore"] == v2["emulator"]["xenstore"]
    assert v1["emulator"]["context_sha256"] == v2["emulator"]["context_sha256"] and v1["emulator"]["id"] == 0


def test_text_report_and_pv_still_work(images, capsys, tmp_path):
    code, out, _ = run(capsys, "restore", str(images["v2"]))
    assert code == 0 and out.startswith("restored an HVM guest") and "3 xenstore keys" in out
    pv = tmp_path / "pv.v2"
    assert run(capsys, "save", "--guest", "pv64:mem=1M,seed=1", "-o", str(pv))[0] == 0
    code, out, _ = run(capsys, "restore", str(pv))
    assert code == 0 and out.startswith("restored a pv64 guest")


def test_corrupted_hvm_context_fails_in_one_line(images, capsys, tmp_path):
    data = bytearray(images["v2"].read_bytes())
    at = data.find(b"\x86\x12\x38\x54")  # the context's HEADER magic, little-endian
    assert at > 0
    data[at] ^= 0xFF
    path = tmp_path / "bad.v2"
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "restore", str(path))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "HVM context" in err and "bad magic" in err


def test_bad_hvm_spec_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "save", "--guest", "hvm:mem=1M,vcpus=0", "-o", str(tmp_path / "x"))
    assert code != 0 and "vcpus" in err and not (tmp_path / "x").exists()


def test_our_verifier_accepts_the_hvm_save(images, capsys):
    code, out, err = run(capsys, "verify", str(images["v2"]))
    assert code == 0 and "HVM stream" in out + err and "0 errors" in out + err
