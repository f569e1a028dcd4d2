"""`xenstream serve` and v1 Remus streams: the service as a subprocess, real loopback sockets.

A v1 Remus stream goes to a Remus secondary: by default the service forwards it in the form of
`xenstream convert --checkpoints`; a source breaking off inside a checkpoint leaves the destination
without END, and `restore:sim` then restores the last complete checkpoint.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.convert.service_harness import SinkServer, connect, running_service, send_stream
from tests.convert.v2state import has_end_record, restored_state
from xenstream.legacy import events as ev
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.legacy.parser import parse_bytes
from xenstream.v2 import constants as C

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "samples", "v1")
REMUS = build_stream(BuildOptions(guest="pv", pages=300, checkpoints=3, remus=True, seed=21))


def _config(remus_sink: SinkServer, refuse_sink: SinkServer) -> str:
    return f"""
[service]
restore_frames = 16384

[timeouts]
header = 2
idle = 5

[[listener]]
name = "remus"
listen = "127.0.0.1:0"
destination = "{remus_sink.address}"
format = "libxl"

[[listener]]
name = "refuse"
listen = "127.0.0.1:0"
destination = "{refuse_sink.address}"
format = "libxl"
remus = "refuse"

[[listener]]
name = "restore"
listen = "127.0.0.1:0"
destination = "restore:sim"
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("serve-remus"))
    sinks = {"remus": SinkServer(), "refuse": SinkServer()}
    with running_service(workdir, _config(sinks["remus"], sinks["refuse"]), sinks.values()) as service:
        yield service, sinks, workdir


def _offline_checkpoints(data: bytes, workdir: str) -> bytes:
    """`xenstream convert --checkpoints -f libxl`, the command itself."""
    source, target = os.path.join(workdir, "offline.v1"), os.path.join(workdir, "offline.v2")
    with open(source, "wb") as handle:
        handle.write(data)
    subprocess.run([sys.executable, "-m", "xenstream.convert", "-q", "convert", "--checkpoints", "-f", "libxl",
                    source, target], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(target, "rb") as handle:
        return handle.read()


def _checkpoint_ends(data: bytes) -> list[int]:
    return [event.offset for event in parse_bytes(data) if isinstance(event, ev.CheckpointEnd)]


def _send_and_reset(address: str, data: bytes) -> None:
    """Send, then break the connection off with a reset (a primary that died). A reset discards what
    the service has not read yet, so it comes once the service had a moment to read everything."""
    with connect(address) as sock:
        sock.sendall(data)
        time.sleep(1.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("name", ["built", "pv64-remus"])
def test_remus_stream_is_forwarded_as_the_checkpointed_conversion(rig, name):
    service, sinks, workdir = rig
    if name == "built":
        data = REMUS
    else:
        with open(os.path.join(SAMPLES, f"{name}.v1"), "rb") as handle:
            data = handle.read()
    send_stream(service.addresses["remus"], data)
    received = sinks["remus"].next_stream()
    result = service.stream_result(service.last_conn())
    assert result["result"] == "ok", result
    assert received == _offline_checkpoints(data, workdir)
    state = restored_state(received)
    assert state["record_types"].count(C.REC_CHECKPOINT) == len(_checkpoint_ends(data))
    assert state["libxl_records"][-1] == C.LIBXL_REC_END


@pytest.mark.parametrize("how", ["end of input", "reset"])
def test_source_breaking_off_inside_a_checkpoint_gives_no_end(rig, how):
    service, sinks, workdir = rig
    ends = _checkpoint_ends(REMUS)
    cut = (ends[1] + ends[2]) // 2  # inside checkpoint 3
    if how == "reset":
        _send_and_reset(service.addresses["remus"], REMUS[:cut])
    else:
        send_stream(service.addresses["remus"], REMUS[:cut])
    received = sinks["remus"].next_stream()
    result = service.stream_result(service.last_conn())
    assert result["result"] == ("bad_stream" if how == "end of input" else "source_reset"), result
    assert not has_end_record(received)
    # The two complete checkpoints arrived whole, as the offline conversion writes them.
    complete = _offline_checkpoints(REMUS[: ends[1]], workdir)
    state = restored_state(received)
    assert state["libxl_records"].count(C.LIBXL_REC_CHECKPOINT_END) == 2
    assert C.REC_END not in state["record_types"]
    closed = len(complete) - 2 * 8 - 8  # offline: ... CHECKPOINT_END, then libxc END and libxl END
    assert received[:closed] == complete[:closed]
    if how == "end of input":
        assert "inside checkpoint 3" in result["error"]


@pytest.mark.parametrize("how", ["end of input", "reset"])
def test_broken_off_right_after_checkpoint_1_still_closes_it(rig, how):
    """Checkpoint 2 has begun but not one of its elements is complete: checkpoint 1 is still closed."""
    service, sinks, _ = rig
    first = _checkpoint_ends(REMUS)[0]
    if how == "reset":
        _send_and_reset(service.addresses["remus"], REMUS[: first + 6])
    else:
        send_stream(service.addresses["remus"], REMUS[: first + 6])
    received = sinks["remus"].next_stream()
    result = service.stream_result(service.last_conn())["result"]
    assert result == ("bad_stream" if how == "end of input" else "source_reset")
    state = restored_state(received)
    assert state["libxl_records"].count(C.LIBXL_REC_CHECKPOINT_END) == 1
    assert not has_end_record(received)


def _restored(service, conn: int) -> dict:
    return service.wait_log(lambda e: e.get("conn") == conn and e.get("event") == "restored from the last "
                            "complete checkpoint")


@pytest.mark.parametrize("how", ["end of input", "reset"])
def test_restore_fails_over_to_the_last_complete_checkpoint(rig, how):
    service, _, _ = rig
    ends = _checkpoint_ends(REMUS)
    # Reference: the stream stopping cleanly after checkpoint 2 (a complete stream, ending with END).
    send_stream(service.addresses["restore"], REMUS[: ends[1]])
    reference = service.stream_result(service.last_conn())
    assert reference["result"] == "ok", reference
    assert reference["destination"].endswith(", 2 checkpoints")
    cut = (ends[1] + ends[2]) // 2
    if how == "reset":
        _send_and_reset(service.addresses["restore"], REMUS[:cut])
    else:
        send_stream(service.addresses["restore"], REMUS[:cut])
    conn = service.last_conn()
    failover = _restored(service, conn)
    assert failover["checkpoints"] == 2
    assert failover["restored"].split(":", 1)[1] == reference["destination"].split(":", 1)[1]
    assert service.stream_result(conn)["result"] != "ok"


def test_restore_of_a_stream_broken_inside_checkpoint_1_fails(rig):
    service, _, _ = rig
    send_stream(service.addresses["restore"], REMUS[: _checkpoint_ends(REMUS)[0] // 2])
    conn = service.last_conn()
    assert service.stream_result(conn)["result"] == "bad_stream"
    assert not [e for e in service.logs() if e.get("conn") == conn and e.get("event", "").startswith("restored")]


def test_refusing_listener_refuses_with_a_logged_reason(rig):
    service, sinks, _ = rig
    send_stream(service.addresses["refuse"], REMUS)
    result = service.stream_result(service.last_conn())
    assert result["result"] == "bad_stream"
    assert 'remus = "refuse"' in result["error"]
    assert not has_end_record(sinks["refuse"].next_stream())
    # A stream with a single checkpoint is not Remus: it goes through.
    plain = build_stream(BuildOptions(guest="pv", pages=50, seed=22))
    send_stream(service.addresses["refuse"], plain)
    assert service.stream_result(service.last_conn())["result"] == "ok"
    assert has_end_record(sinks["refuse"].next_stream())
