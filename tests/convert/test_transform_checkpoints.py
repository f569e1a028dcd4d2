"""Remus (checkpointed) and compressed v1 streams, against the independent conformance vectors.

The vectors' ``final_state`` is what the Xen 4.5 restorer commits (the last complete checkpoint); the
v2 output, restored (last copy of every pfn wins), must give exactly that state by default and with
``--checkpoints``. Input cut inside checkpoint 2 must give ``state_after_checkpoint_1``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SHARED
from tests.convert.v2state import convert_bytes, has_end_record, partial_output, restored_state, vector_vcpus
from xenstream.legacy import events as ev
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.legacy.parser import parse_bytes
from xenstream.v2 import constants as C

VECTORS = SHARED / "vectors"
NAMES = ["pv64-remus", "pv64-compressed"]


def load(name: str) -> tuple[bytes, dict]:
    path = VECTORS / f"{name}.v1"
    if not path.exists():
        pytest.skip(f"conformance vector {path} not present")
    return path.read_bytes(), json.loads((VECTORS / f"{name}.json").read_text())


def assert_state(data: bytes, expected: dict) -> None:
    state = restored_state(data)
    assert state["digest"] == expected["pages"]["digest"]
    assert len(state["pages"]) == expected["pages"]["count"]
    assert state["shared_info_sha256"] == expected["shared_info_sha256"]
    assert state["vcpus"] == vector_vcpus(expected)


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize("name", NAMES)
def test_default_output_is_last_complete_checkpoint(tmp_path, name, fmt):
    stream, vector = load(name)
    data, result = convert_bytes(stream, tmp_path, fmt=fmt)
    assert result.summary.checkpoints == vector["checkpoints"]
    assert result.report.ok, result.report.lines()
    assert_state(data, vector["final_state"])
    state = restored_state(data)
    assert C.REC_CHECKPOINT not in state["record_types"]
    assert state["record_types"].count(C.REC_END) == 1 and state["end"].complete


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_mode_carries_every_checkpoint(tmp_path, name, fmt):
    stream, vector = load(name)
    data, result = convert_bytes(stream, tmp_path, fmt=fmt, checkpoints=True)
    assert result.report.ok, result.report.lines()
    assert_state(data, vector["final_state"])
    state = restored_state(data)
    assert state["record_types"].count(C.REC_CHECKPOINT) == vector["checkpoints"]
    assert state["record_types"][-1] == C.REC_END
    if fmt == "libxl":
        assert state["libxl_records"].count(C.LIBXL_REC_CHECKPOINT_END) == vector["checkpoints"]
        assert state["libxl_records"][-1] == C.LIBXL_REC_END


def _checkpoint_ends(stream: bytes) -> list[int]:
    return [e.offset for e in parse_bytes(stream) if isinstance(e, ev.CheckpointEnd)]


@pytest.mark.parametrize("checkpoints", [False, True])
def test_cut_inside_checkpoint_2_gives_checkpoint_1(tmp_path, checkpoints):
    stream, vector = load("pv64-remus")
    first, second = _checkpoint_ends(stream)[:2]
    for cut in (first, first + 1, first + 4, (first + second) // 2, second - 1):
        data, result = convert_bytes(stream[:cut], tmp_path, checkpoints=checkpoints)
        assert result.summary.checkpoints == 1
        assert_state(data, vector["state_after_checkpoint_1"])
        if cut > first:
            assert result.summary.discarded_checkpoint_offset == first


def test_cut_inside_checkpoint_1_fails_without_end(tmp_path):
    stream, _ = load("pv64-remus")
    first = _checkpoint_ends(stream)[0]
    written, error = partial_output(stream[: first - 100], tmp_path)
    assert type(error).__name__ == "TruncatedStream"
    assert not has_end_record(written)


@pytest.mark.parametrize("guest", ["pv", "hvm"])
def test_both_modes_agree_on_built_remus_streams(tmp_path, guest):
    """Streams of our own builder (3 checkpoints, compression): both modes restore the same state."""
    base = dict(guest=guest, pages=24 if guest == "pv" else 10, holes=1, checkpoints=3, compression=True)
    stream = build_stream(BuildOptions(**base))
    last_state, _ = convert_bytes(stream, tmp_path)
    every, _ = convert_bytes(stream, tmp_path, checkpoints=True)
    first_only, _ = convert_bytes(stream[: _checkpoint_ends(stream)[0]], tmp_path)
    assert restored_state(last_state)["digest"] == restored_state(every)["digest"]
    assert restored_state(last_state)["digest"] != restored_state(first_only)["digest"]


@pytest.mark.parametrize("checkpoints", [False, True])
def test_hvm_remus_closes_with_the_last_checkpoints_context_and_device_model(tmp_path, checkpoints):
    from xenstream.v2.events import LibxcRecord, LibxlRecord
    from xenstream.v2.reader import V2Reader

    stream = build_stream(BuildOptions(guest="hvm", pages=10, holes=1, checkpoints=3, device_model_size=900))
    events = parse_bytes(stream)
    contexts = [bytes(e.data) for e in events if isinstance(e, ev.HvmContext)]
    models, current = [], b""
    for event in events:
        if isinstance(event, ev.DeviceModelData):
            current += bytes(event.data)
        elif isinstance(event, ev.DeviceModelEnd):
            models.append(current)
            current = b""
    assert len(contexts) == 3 and len(set(models)) > 1
    data, _ = convert_bytes(stream, tmp_path, fmt="libxl", checkpoints=checkpoints)
    reader = V2Reader(layer="auto", payload="views")
    reader.feed(data)
    reader.feed(b"")
    written_contexts, written_models = [], []
    while True:
        event = reader.next_event()
        if isinstance(event, LibxcRecord) and event.type == C.REC_HVM_CONTEXT:
            written_contexts.append(event.body.data)
        elif isinstance(event, LibxlRecord) and event.type == C.LIBXL_REC_EMULATOR_CONTEXT:
            written_models.append(event.body.data)
        elif type(event).__name__ == "EndOfStream":
            break
    if checkpoints:
        assert written_contexts == contexts and written_models == models
    else:
        assert written_contexts == contexts[-1:] and written_models == models[-1:]


@pytest.fixture(scope="module")
def remus_stream() -> bytes:
    return build_stream(BuildOptions(guest="pv", pages=24, holes=1, checkpoints=3, compression=True, seed=7))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=1.0))
def test_cut_anywhere(remus_stream, tmp_path, fraction):
    """Cut anywhere: inside checkpoint 1 it fails without END; later, the output is exactly the state
    of the last checkpoint complete before the cut."""
    ends = _checkpoint_ends(remus_stream)
    cut = int(fraction * len(remus_stream))
    complete = [end for end in ends if end <= cut]
    if not complete:
        written, error = partial_output(remus_stream[:cut], tmp_path)
        assert type(error).__name__ in ("TruncatedStream", "DetectionError")
        assert not has_end_record(written)
        return
    data, result = convert_bytes(remus_stream[:cut], tmp_path)
    reference, _ = convert_bytes(remus_stream[: complete[-1]], tmp_path)
    assert result.summary.checkpoints == len(complete)
    assert restored_state(data)["digest"] == restored_state(reference)["digest"]


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize("guest", ["pv", "hvm"])
def test_checkpoints_mode_on_a_stream_with_last_checkpoint_writes_its_tail_once(tmp_path, guest, fmt):
    """LAST_CHECKPOINT in checkpoint 1 ends the stream there: with --checkpoints the output is the plain
    conversion (one set of closing records, then END), not the vcpu/shared-info/HVM records twice."""
    stream = build_stream(BuildOptions(guest=guest, pages=24 if guest == "pv" else 12, holes=1, vcpus=2))
    assert any(isinstance(e, ev.LastCheckpoint) for e in parse_bytes(stream))
    plain, _ = convert_bytes(stream, tmp_path, fmt=fmt)
    every, result = convert_bytes(stream, tmp_path, fmt=fmt, checkpoints=True)
    types = restored_state(every)["record_types"]
    closing = C.REC_X86_PV_VCPU_BASIC if guest == "pv" else C.REC_HVM_CONTEXT
    assert types.count(closing) == (2 if guest == "pv" else 1)
    assert every == plain
    assert result.report.ok, result.report.lines()
