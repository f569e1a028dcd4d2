"""`xenstream serve` end to end: the service as a subprocess, real loopback sockets, real faults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.convert.service_harness import (
    ServiceProcess,
    SinkServer,
    closed_port,
    connect,
    metric_value,
    running_service,
    send_stream,
)
from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import ConvertOptions
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.v2.synth import stream_bytes as v2_stream


def offline_conversion(data: bytes, fmt: str) -> bytes:
    """What `xenstream`'s file pipeline makes of a v1 stream: the reference for the service's output."""
    with tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as target:
        source.write(data)
        source.seek(0)
        convert_fds(source.fileno(), target.fileno(), ConvertOptions(fmt=fmt))
        target.seek(0)
        return target.read()


def _config(workdir: str, tcp_sink: SinkServer, unix_sink: SinkServer, stall_sink: SinkServer) -> str:
    return f"""
[service]
max_connections = 24
buffer_size = 262144
metrics = "127.0.0.1:0"
restore_frames = 65536

[timeouts]
header = 2
idle = 1.5
connect = 2
min_rate = 20000
rate_window = 1
shutdown_grace = 5

[[listener]]
name = "tcp"
listen = "127.0.0.1:0"
destination = "{tcp_sink.address}"

[[listener]]
name = "unix"
listen = "unix:{workdir}/in.sock"
destination = "{unix_sink.address}"
format = "libxl"

[[listener]]
name = "dir"
listen = "0"
destination = "dir:{workdir}/out"

[[listener]]
name = "refused"
listen = "127.0.0.1:0"
destination = "127.0.0.1:{closed_port()}"

[[listener]]
name = "restore"
listen = "127.0.0.1:0"
destination = "restore:sim"

[[listener]]
name = "stall"
listen = "127.0.0.1:0"
destination = "{stall_sink.address}"
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("serve"))
    os.mkdir(os.path.join(workdir, "out"))
    sinks = {
        "tcp": SinkServer(),
        "unix": SinkServer(unix_path=os.path.join(workdir, "dest.sock")),
        "stall": SinkServer(stall=True),
    }
    config = _config(workdir, sinks["tcp"], sinks["unix"], sinks["stall"])
    with running_service(workdir, config, sinks.values()) as service:
        yield service, sinks, workdir


def _assert_healthy(service: ServiceProcess, sinks) -> None:
    """A fresh migration through the service still succeeds."""
    data = v2_stream(guest="pv", pages=64, wrap="libxc", seed=99)
    send_stream(service.addresses["tcp"], data)
    assert sinks["tcp"].next_stream() == data
    assert service.stream_result(service.last_conn())["result"] == "ok"


def _assert_truncated_prefix(received: bytes, complete: bytes) -> None:
    assert len(received) < len(complete)
    assert complete.startswith(received)


# ------------------------------------------------------------------------------------------ v1 conversion


@pytest.mark.parametrize("listener, fmt, options", [
    ("tcp", "libxc", BuildOptions(guest="pv", width=64, pages=700, live_iterations=1, seed=1)),
    ("unix", "libxl", BuildOptions(guest="hvm", width=64, pages=400, seed=2)),
    ("unix", "libxl", BuildOptions(guest="pv", width=32, pages=300, wrapper="xl", seed=3)),
])
def test_v1_stream_equals_the_offline_conversion(rig, listener, fmt, options):
    service, sinks, _ = rig
    data = build_stream(options)
    send_stream(service.addresses[listener], data)
    assert sinks[listener].next_stream() == offline_conversion(data, fmt)
    result = service.stream_result(service.last_conn())
    assert result["result"] == "ok"
    assert result["variant"] == f"v1-{options.guest}-{options.width}"
    assert result["bytes_in"] == len(data)
    assert result["pages"] > 0


def test_v1_stream_to_a_directory(rig):
    service, _, _ = rig
    data = build_stream(BuildOptions(guest="pv", pages=200, seed=4))
    send_stream(service.addresses["dir"], data)
    result = service.stream_result(service.last_conn())
    assert result["destination"].endswith(".libxc")
    with open(result["destination"], "rb") as handle:
        assert handle.read() == offline_conversion(data, "libxc")


@pytest.mark.parametrize("width", [64, 32])
def test_v1_stream_restored_into_the_simulated_host(rig, width):
    service, _, _ = rig
    data = build_stream(BuildOptions(guest="pv", width=width, pages=400, seed=5))
    send_stream(service.addresses["restore"], data)
    result = service.stream_result(service.last_conn())
    assert result["result"] == "ok"
    assert result["destination"].startswith("simulated domain ")
    assert f"pv{width}, p2m_size " in result["destination"]
    assert "400 pages populated" in result["destination"]


def test_restore_refusing_a_stream_fails_it(rig):
    service, sinks, _ = rig
    send_stream(service.addresses["restore"], build_stream(BuildOptions(guest="hvm", pages=100, seed=6)))
    result = service.stream_result(service.last_conn())
    assert result["result"] == "bad_stream"
    assert "HVM" in result["error"]
    _assert_healthy(service, sinks)


# ------------------------------------------------------------------------------------------ v2 passthrough


@pytest.mark.parametrize("wrap, guest", [("libxc", "pv"), ("libxl", "hvm"), ("xl", "pv")])
def test_v2_stream_passes_through_unchanged(rig, wrap, guest):
    service, sinks, _ = rig
    data = v2_stream(guest=guest, pages=300, wrap=wrap, seed=3)
    send_stream(service.addresses["tcp"], data)
    assert sinks["tcp"].next_stream() == data
    result = service.stream_result(service.last_conn())
    assert result["result"] == "ok"
    assert result["variant"] == f"v2-{wrap}"
    assert result["bytes_in"] == result["bytes_out"] == len(data)
    assert result["pages"] > 0


def test_unix_listener_to_unix_destination(rig):
    service, sinks, _ = rig
    data = v2_stream(guest="hvm", pages=128, wrap="libxl", seed=4)
    send_stream(service.addresses["unix"], data)
    assert sinks["unix"].next_stream() == data
    result = service.stream_result(service.last_conn())
    assert result["peer"] == f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"


def test_directory_destination_writes_one_complete_file(rig):
    service, _, workdir = rig
    data = v2_stream(guest="pv", pages=200, wrap="libxl", seed=5)
    send_stream(service.addresses["dir"], data)
    result = service.stream_result(service.last_conn())
    assert result["result"] == "ok"
    path = result["destination"]
    assert os.path.dirname(path) == os.path.join(workdir, "out")
    with open(path, "rb") as handle:
        assert handle.read() == data
    assert not [name for name in os.listdir(os.path.dirname(path)) if name.startswith(".")]


def test_directory_destination_keeps_no_file_of_a_bad_stream(rig):
    service, _, workdir = rig
    data = v2_stream(guest="pv", pages=200, wrap="libxl", seed=6)
    before = set(os.listdir(os.path.join(workdir, "out")))
    send_stream(service.addresses["dir"], data[: len(data) // 2])
    assert service.stream_result(service.last_conn())["result"] == "bad_stream"
    assert set(os.listdir(os.path.join(workdir, "out"))) == before


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_source_killed_mid_stream(rig, version):
    service, sinks, _ = rig
    if version == "v1":
        data = build_stream(BuildOptions(guest="pv", pages=2000, seed=7))
        expected = offline_conversion(data, "libxc")
    else:
        data = expected = v2_stream(guest="pv", pages=2000, wrap="libxc", seed=7)
    path = os.path.join(rig[2], "killed-source.bin")
    with open(path, "wb") as handle:
        handle.write(data)
    host, port = service.addresses["tcp"].rsplit(":", 1)
    sender = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys, time\n"
         f"s = socket.create_connection(({host!r}, {port}))\n"
         f"s.sendall(open({path!r}, 'rb').read()[:{len(data) // 2}])\n"
         "print('sent', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE)
    try:
        assert sender.stdout.readline().strip() == b"sent"
        time.sleep(0.2)
    finally:
        sender.kill()
        sender.wait(10)
    _assert_truncated_prefix(sinks["tcp"].next_stream(), expected)
    result = service.stream_result(service.last_conn())
    assert result["result"] == "bad_stream"
    assert isinstance(result["offset"], int) and result["offset"] <= len(data) // 2
    assert result["bytes_in"] == len(data) // 2
    _assert_healthy(service, sinks)


def test_garbage_input_is_refused_without_touching_the_destination(rig):
    service, sinks, _ = rig
    garbage = bytes((i * 37 + 11) & 0xFF for i in range(100_000))
    reply = send_stream(service.addresses["tcp"], garbage)
    assert reply == b""
    result = service.stream_result(service.last_conn())
    assert result["result"] == "bad_stream"
    assert isinstance(result["offset"], int)
    assert result["bytes_out"] == 0
    assert sinks["tcp"].streams.empty()
    _assert_healthy(service, sinks)


def test_destination_refusing_closes_the_source(rig):
    service, sinks, _ = rig
    data = v2_stream(guest="pv", pages=2000, wrap="libxc", seed=8)
    started = time.monotonic()
    send_stream(service.addresses["refused"], data)  # returns once the service closed the connection
    assert time.monotonic() - started < 10
    assert service.stream_result(service.last_conn())["result"] == "destination_refused"
    _assert_healthy(service, sinks)


def test_destination_stalling_closes_the_source(rig):
    service, sinks, _ = rig
    data = v2_stream(guest="pv", pages=16384, wrap="libxc", seed=9)  # 64 MiB: more than any socket buffers
    started = time.monotonic()
    send_stream(service.addresses["stall"], data)
    assert time.monotonic() - started < 15
    result = service.stream_result(service.last_conn())
    assert result["result"] == "destination_stalled"
    assert 0 < result["bytes_out"] < len(data)
    _assert_healthy(service, sinks)


def test_slow_loris_source_is_dropped(rig):
    service, sinks, _ = rig
    data = v2_stream(guest="pv", pages=64, wrap="libxc", seed=10)
    with connect(service.addresses["tcp"]) as sock:
        sock.sendall(data[:1000])
        closed = False
        for i in range(1000, 1060):  # one byte every 0.1 s: far below min_rate; bounded at 6 s
            try:
                sock.sendall(data[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed = True
            sock.setblocking(True)
            if closed:
                break
        assert closed
    result = service.stream_result(service.last_conn())
    assert result["result"] == "source_slow"
    _assert_truncated_prefix(sinks["tcp"].next_stream(), data)
    _assert_healthy(service, sinks)


def test_connection_closed_without_data_is_no_failure(rig):
    service, sinks, _ = rig
    before = service.last_conn()
    connect(service.addresses["tcp"]).close()
    conn = service.wait_log(lambda e: e.get("event") == "accepted" and e["conn"] > before)["conn"]
    entry = service.wait_log(lambda e: e.get("conn") == conn and e.get("event") == "closed without data")
    assert entry["result"] == "empty" and entry["level"] == "info"
    _assert_healthy(service, sinks)


def test_silent_source_times_out_before_its_header(rig):
    service, sinks, _ = rig
    with connect(service.addresses["tcp"]) as sock:
        started = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(1) == b""  # the service hangs up on us
        assert time.monotonic() - started < 5
    assert service.stream_result(service.last_conn())["result"] == "source_timeout"
    _assert_healthy(service, sinks)


# ------------------------------------------------------------------------------------------ operations


def test_concurrent_migrations_are_all_correct(rig):
    """16 good migrations at once, with two bad ones among them that must disturb none of the others."""
    service, sinks, _ = rig
    before = service.last_conn()
    v1 = [build_stream(BuildOptions(guest=("pv", "hvm")[i % 2], pages=256 + i, seed=100 + i)) for i in range(8)]
    v2 = [v2_stream(guest=("pv", "hvm")[i % 2], pages=256 + i, wrap=("libxc", "libxl")[i // 2 % 2], seed=200 + i)
          for i in range(8)]
    truncated = v2_stream(guest="pv", pages=300, wrap="libxc", seed=300)
    garbage = bytes(range(256)) * 64
    streams = v1 + v2 + [truncated[: len(truncated) // 2], garbage]
    expected = [offline_conversion(data, "libxc") for data in v1] + v2
    errors: list = []

    def migrate(data: bytes) -> None:
        try:
            send_stream(service.addresses["tcp"], data)
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(data,)) for data in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    received = [sinks["tcp"].next_stream() for _ in range(len(expected) + 1)]  # garbage never reaches it
    complete = [data for data in received if data in expected]
    assert sorted(complete) == sorted(expected)
    (partial,) = [data for data in received if data not in expected]
    _assert_truncated_prefix(partial, truncated)
    results = [service.stream_result(conn)["result"] for conn in range(before + 1, before + 19)]
    assert sorted(results) == ["bad_stream"] * 2 + ["ok"] * 16


def test_metrics_count_streams_bytes_and_failures(rig):
    service, sinks, _ = rig
    before = service.metrics()
    data = v2_stream(guest="pv", pages=32, wrap="libxc", seed=11)
    send_stream(service.addresses["tcp"], data)
    sinks["tcp"].next_stream()
    send_stream(service.addresses["tcp"], b"\0" * 64)
    service.stream_result(service.last_conn())
    after = service.metrics()
    assert metric_value(after, "xenstream_connections_total", listener="tcp") == \
        metric_value(before, "xenstream_connections_total", listener="tcp") + 2
    assert metric_value(after, "xenstream_bytes_in_total", listener="tcp") >= \
        metric_value(before, "xenstream_bytes_in_total", listener="tcp") + len(data) + 64
    assert metric_value(after, "xenstream_connections_failed_total", listener="tcp", reason="bad_stream") == \
        metric_value(before, "xenstream_connections_failed_total", listener="tcp", reason="bad_stream") + 1
    assert metric_value(after, "xenstream_pages_total", listener="tcp") >= \
        metric_value(before, "xenstream_pages_total", listener="tcp") + 32
    assert metric_value(after, "xenstream_connections_active") == 0
    assert "xenstream_conversion_seconds_count" in after
    assert service.http_get("/healthz") == (200, "ok\n")
    assert service.http_get("/nothing")[0] == 404


# ------------------------------------------------------------------------------------------ own instances


def _small_service(tmp_path, sink: SinkServer, listen: str = "127.0.0.1:0", grace: float = 1.5,
                   **service_settings) -> ServiceProcess:
    settings = "\n".join(f"{key} = {value}" for key, value in service_settings.items())
    config = f"""
[service]
{settings}

[timeouts]
shutdown_grace = {grace}
idle = 10

[[listener]]
name = "tcp"
listen = "{listen}"
destination = "{sink.address}"
"""
    return ServiceProcess(str(tmp_path), config).start()


def test_allowlist_refuses_other_sources(tmp_path):
    sink = SinkServer()
    service = _small_service(tmp_path, sink, allow='["192.0.2.0/24"]')
    try:
        assert send_stream(service.addresses["tcp"], v2_stream(pages=16)) == b""
        refused = service.wait_log(lambda e: e.get("event") == "connection refused")
        assert refused["reason"] == "allowlist"
        assert sink.streams.empty()
        assert service.stop() == 0
    finally:
        service.kill()
        sink.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_loopback_listener_with_an_allowlist_that_admits_it(tmp_path):
    sink = SinkServer()
    service = _small_service(tmp_path, sink, listen="[::1]:0", allow='["::1/128"]')
    try:
        assert service.addresses["tcp"].startswith("[::1]:")
        data = v2_stream(pages=16, seed=15)
        send_stream(service.addresses["tcp"], data)
        assert sink.next_stream() == data
        assert service.stream_result(1)["peer"].startswith("[::1]:")
        assert service.stop() == 0
    finally:
        service.kill()
        sink.close()


def test_connection_limit_refuses_the_extra_connection(tmp_path):
    sink = SinkServer()
    service = _small_service(tmp_path, sink, max_connections=1)
    try:
        data = v2_stream(pages=16, seed=12)
        with connect(service.addresses["tcp"]) as holder:
            holder.sendall(data[:100])
            service.wait_log(lambda e: e.get("event") == "accepted")
            with connect(service.addresses["tcp"]) as extra:
                extra.settimeout(5)
                assert extra.recv(1) == b""
            assert service.wait_log(lambda e: e.get("event") == "connection refused")["reason"] == "limit"
            holder.sendall(data[100:])
            holder.shutdown(socket.SHUT_WR)
            assert sink.next_stream() == data
        assert service.stop() == 0
    finally:
        service.kill()
        sink.close()


def test_sigterm_lets_streams_finish_then_aborts_the_late_ones(tmp_path):
    sink = SinkServer()
    service = _small_service(tmp_path, sink)
    try:
        finishing = v2_stream(pages=64, seed=13)
        late = v2_stream(pages=64, seed=14)
        with connect(service.addresses["tcp"]) as first, connect(service.addresses["tcp"]) as second:
            first.sendall(finishing[:5000])
            second.sendall(late[:5000])
            service.wait_log(lambda e: e.get("event") == "accepted" and e.get("conn") == 2)
            service.proc.send_signal(15)
            service.wait_log(lambda e: e.get("event") == "stopping")
            with pytest.raises(OSError):  # no longer accepting
                connect(service.addresses["tcp"], timeout=2).close()
            first.sendall(finishing[5000:])
            first.shutdown(socket.SHUT_WR)
            assert sink.next_stream() == finishing
            # the second one never finishes: aborted at the end of the grace period, without END
            assert service.proc.wait(10) == 0
        _assert_truncated_prefix(sink.next_stream(), late)
        results = {e["conn"]: e["result"] for e in service.results()}
        assert results == {1: "ok", 2: "aborted"}
    finally:
        service.kill()
        sink.close()


def test_slow_destination_slows_the_source(tmp_path):
    """Backpressure end to end: the service buffers nothing of its own, so the sender has to wait."""
    sink = SinkServer(rate=32 << 20)
    service = _small_service(tmp_path, sink)
    try:
        data = v2_stream(guest="pv", pages=16384, wrap="libxc", seed=17)  # 64 MiB, about 2 s at the sink's pace
        started = time.monotonic()
        with connect(service.addresses["tcp"], timeout=30) as sock:
            sock.sendall(data)
            sent_after = time.monotonic() - started
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        assert sink.next_stream() == data
        # Kernel socket buffers on the way hold a few MiB at most; all the rest had to wait for the sink.
        assert sent_after > 0.8
        assert service.peak_rss() < 100 << 20
        assert service.stop() == 0
    finally:
        service.kill()
        sink.close()


def test_second_sigterm_cuts_the_grace_period_short(tmp_path):
    sink = SinkServer()
    service = _small_service(tmp_path, sink, grace=8)
    try:
        data = v2_stream(pages=64, seed=16)
        with connect(service.addresses["tcp"]) as stuck:
            stuck.sendall(data[:5000])
            service.wait_log(lambda e: e.get("event") == "accepted")
            service.proc.send_signal(15)
            service.wait_log(lambda e: e.get("event") == "stopping")
            started = time.monotonic()
            service.proc.send_signal(15)
            assert service.proc.wait(10) == 0
            assert time.monotonic() - started < 5  # well before the 8 s grace period ends
        _assert_truncated_prefix(sink.next_stream(), data)
        assert [e["result"] for e in service.results()] == ["aborted"]
    finally:
        service.kill()
        sink.close()
