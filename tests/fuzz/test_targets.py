"""The fuzz targets, mutators and the `xenstream fuzz` command, without atheris.

The committed corpus passes every target; the targets do catch what they claim to (a domain left
behind, END in a failed conversion, a slow input, an error outside our family); the structure-aware
mutators find the fields where our own writers put them; the command replays and fuzzes (random engine).
"""

from __future__ import annotations

import pathlib
import random
import struct
import subprocess
import sys

import pytest

from xenstream.convert import fuzz_targets as ft
from xenstream.convert.fuzz_mutators import compression_layout, mutate, v1_layout, v2_layout
from xenstream.legacy.events import PageBatch
from xenstream.legacy.parser import parse_bytes
from xenstream.v2 import constants as C
from xenstream.v2.errors import MalformedStream
from xenstream.v2.events import LibxcRecord

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz_corpus"


def _corpus(name: str) -> list[pathlib.Path]:
    return sorted((CORPUS / name).iterdir())


@pytest.mark.parametrize("name", list(ft.TARGETS))
def test_committed_corpus_passes_its_target(name):
    files = _corpus(name)
    assert files, f"no committed corpus for {name}"
    for path in files:
        ft.run_one(ft.TARGETS[name], path.read_bytes())


@pytest.mark.parametrize("name", list(ft.TARGETS))
def test_structure_aware_mutations_pass_their_target(name):
    """A short burst of the campaign in the test suite: 60 mutants of every committed seed, seeded."""
    target = ft.TARGETS[name]
    rng = random.Random(f"{name}-9")
    seeds = [p.read_bytes() for p in _corpus(name)]
    for _ in range(60):
        ft.run_one(target, mutate(rng.choice(seeds), target.kind, rng))


# ------------------------------------------------------------------ the properties catch what they claim


def test_restore_target_reports_a_domain_left_behind(monkeypatch):
    def leaky(xen, source, **kwargs):
        xen.create_domain(max_vcpus=1)
        raise MalformedStream("made up", 0)

    monkeypatch.setattr(ft, "restore_new_domain", leaky)
    with pytest.raises(ft.Violation, match="left"):
        ft.fuzz_restore(b"\0" * 64)
    ft._reset_host()


def test_convert_target_reports_end_written_before_an_error(monkeypatch):
    complete = (CORPUS / "v2-read" / "pv64-v3.libxc").read_bytes()

    def writes_then_fails(fd_in, fd_out, options, **kwargs):
        import os

        os.write(fd_out, complete)
        raise MalformedStream("made up", 1)

    monkeypatch.setattr(ft, "convert_fds", writes_then_fails)
    with pytest.raises(ft.Violation, match="after writing END"):
        ft.fuzz_convert(b"\0" * 64)


def test_wrote_end_tells_complete_from_cut_output():
    complete = (CORPUS / "v2-read" / "pv64-v3.libxc").read_bytes()
    assert ft.wrote_end(complete)
    assert not ft.wrote_end(complete[:-8])
    assert not ft.wrote_end(b"")


def test_errors_outside_our_family_escape_the_targets(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(ft, "verify_bytes", broken)
    with pytest.raises(KeyError):
        ft.fuzz_v2_verify(b"\xff" * 8)


def test_error_offset_outside_the_input_is_a_violation():
    with pytest.raises(ft.Violation, match="outside"):
        ft._check_error(MalformedStream("x", 100), MalformedStream, b"\0" * 10, "test")


def test_the_time_cap_interrupts_a_busy_input():
    def spin(data):
        while True:
            pass

    with pytest.raises(ft.InputTooSlow):
        ft.run_one(ft.Target("spin", spin, "v2", 1), b"", ft.Caps(seconds=0.2))


def test_the_memory_cap_turns_a_big_allocation_into_a_violation():
    code = ("from xenstream.convert import fuzz_targets as ft\n"
            "caps = ft.Caps(memory_mib=64)\n"
            "ft.apply_memory_cap(caps)\n"
            "try:\n"
            "    ft.run_one(ft.Target('big', lambda d: bytearray(256 << 20), 'v2', 1), b'', caps)\n"
            "except ft.Violation as exc:\n"
            "    print('violation', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "violation the input exceeded the memory cap" in done.stdout, done.stderr


def test_inputs_replay_the_same_variant():
    data = (CORPUS / "legacy-parse" / "pv32.v1").read_bytes()
    assert ft._pick(data, 3, (1, 2, 3, 4, 5)) == ft._pick(bytes(data), 3, (1, 2, 3, 4, 5))
    picks = {ft._pick(p.read_bytes(), 1, (0, 1, 2)) for p in _corpus("legacy-parse")}
    assert len(picks) > 1, "every seed takes the same variant"


# ------------------------------------------------------------------ mutators find the fields


def test_v2_layout_maps_record_heads_where_the_reader_finds_them():
    data = (CORPUS / "v2-read" / "pv64-v3.libxc").read_bytes()
    layout = v2_layout(data)
    types = [f for f in layout.fields if f.kind == "type"]
    from xenstream.v2.reader import V2Reader

    reader = V2Reader()
    reader.feed(data)
    reader.feed(b"")
    records = []
    while not isinstance(event := reader.next_event(), ft.EndOfStream):
        if isinstance(event, LibxcRecord):
            records.append(event)
    # The domain header's type field, then one per record.
    assert [f.offset for f in types[1:]] == [r.offset for r in records]
    for field, record in zip(types[1:], records):
        assert struct.unpack_from("<I", data, field.offset)[0] == record.type
    page_data = next(r for r in records if r.type == C.REC_PAGE_DATA)
    count = next(f for f in layout.fields if f.offset == page_data.offset + 8)
    assert count.kind == "count" and struct.unpack_from("<I", data, count.offset)[0] == len(page_data.body.pfns)


def test_v1_layout_maps_batch_counts_and_pfn_type_entries():
    data = (CORPUS / "legacy-parse" / "pv32.v1").read_bytes()
    layout = v1_layout(data)
    batches = [e for e in parse_bytes(data) if isinstance(e, PageBatch)]
    chunks = {f.offset for f in layout.fields if f.kind == "chunk"}
    assert {b.offset for b in batches} <= chunks
    first = batches[0]
    entry = next(f for f in layout.fields if f.kind == "pfn_type" and f.offset == first.offset + 4)
    assert entry.size == 4  # a 32-bit toolstack's pfn_type entries
    assert struct.unpack_from("<I", data, entry.offset)[0] == first.entries[0]
    assert layout.elements[0][0] == 0 and layout.elements[-1][1] == len(data)


def test_compression_layout_walks_the_run_markers():
    data = (CORPUS / "legacy-compression" / "full-empty-delta").read_bytes()
    markers = [f.offset for f in compression_layout(data).fields if f.kind == "marker"]
    head = 3 + data[0]
    assert markers[:3] == [head, head + 4097, head + 4098]  # FULL page, EMPTY page, then the delta's runs


def test_field_mutation_changes_one_field_only():
    data = (CORPUS / "v2-read" / "pv32-v2.libxc").read_bytes()
    rng = random.Random(5)
    changed_outside = 0
    for _ in range(200):
        out = mutate(data, "v2", rng)
        if len(out) == len(data):
            diff = [i for i in range(len(data)) if out[i] != data[i]]
            fields = v2_layout(data).fields
            if diff and not any(f.offset <= diff[0] < f.offset + f.size for f in fields):
                changed_outside += 1
    assert changed_outside == 0


def test_mutation_is_deterministic_for_a_seed():
    data = (CORPUS / "legacy-parse" / "hvm32-xenops.v1").read_bytes()
    assert [mutate(data, "v1", random.Random(7)) for _ in range(3)] == [mutate(data, "v1", random.Random(7))] * 3
    assert len({mutate(data, "v1", random.Random(seed)) for seed in range(20)}) > 10


# ------------------------------------------------------------------ the command


def _xenstream(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenstream.convert", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_fuzz_command_does_not_import_atheris():
    code = "import sys, xenstream.convert.commands.fuzz, xenstream.convert.fuzz_targets; print('atheris' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_fuzz_command_replays_the_committed_corpus():
    done = _xenstream("fuzz", "v2-read", "--replay")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replayed" in done.stdout


def test_fuzz_command_random_engine_runs_and_summarises(tmp_path):
    done = _xenstream("fuzz", "legacy-compression", "--engine", "random", "--time", "4", "--work", str(tmp_path),
                      "--summary-line", "--seed", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("fuzz summary: 1 targets, ") and "0 findings (ok)" in summary
    inputs = int(summary.split("targets, ")[1].split(" inputs")[0])
    assert inputs > 10


def test_fuzz_command_rejects_an_unknown_target():
    done = _xenstream("fuzz", "nonsense", "--replay")
    assert done.returncode == 1
    assert "unknown target" in done.stderr


def test_restore_hvm_target_reports_a_domain_left_behind(monkeypatch):
    def leaky(xen, source, **kwargs):
        xen.create_domain(max_vcpus=1, hvm=True)
        raise MalformedStream("made up", 0)

    monkeypatch.setattr(ft, "restore_hvm_new_domain", leaky)
    with pytest.raises(ft.Violation, match="left"):
        ft.fuzz_restore_hvm(b"\0" * 64)
    ft._reset_host()


@pytest.mark.parametrize("name", ["restore", "restore-hvm"])
def test_restore_targets_seeds_restore_whole_both_ways(name):
    """The committed seeds restore completely, fed in chunks and read from a file (the target picks one
    of the two per input: both must start from inputs that get all the way through)."""
    restore = ft.restore_new_domain if name == "restore" else ft.restore_hvm_new_domain
    for path in _corpus(name):
        data = path.read_bytes()
        for source in ("chunks", "file"):
            xen = ft.SimXen(capacity_frames=8192, high_memory=False)
            fd = ft._memfd(data) if source == "file" else None
            try:
                result = restore(xen, fd if fd is not None else [data], max_vcpus=4, max_pages=1100,
                                 store_evtchn=1, console_evtchn=2)
            finally:
                if fd is not None:
                    import os

                    os.close(fd)
            assert result.pages_written > 0, (path.name, source)
