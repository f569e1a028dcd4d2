"""The pieces of `xenstream serve` on their own: configuration, classification, the conversion core."""

from __future__ import annotations

import argparse
import ipaddress
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstream.convert.pipeline import convert_fds
from xenstream.convert.service_config import (
    ConfigError,
    DirectoryTarget,
    TcpAddress,
    UnixAddress,
    config_from_settings,
    merge_command_line,
    parse_destination,
    parse_socket_address,
)
from xenstream.convert.service_metrics import Metrics
from xenstream.convert.service_stream import LegacyUpgrade, V2Passthrough, classify
from xenstream.convert.transform import ConvertOptions
from tests.convert.v2state import has_end_record, restored_state
from xenstream.legacy import errors as legacy_errors
from xenstream.legacy import events as legacy_events
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.legacy.parser import parse_bytes
from xenstream.v2 import constants as C
from xenstream.v2 import errors as v2_errors
from xenstream.v2.events import EndOfStream, LibxcRecord, LibxlRecord
from xenstream.v2.reader import V2Reader
from xenstream.hv.abi import PAGE_SIZE
from xenstream.v2.synth import stream_bytes as v2_stream

LISTENER = {"listen": "9000", "destination": "dir:/srv/images"}


# ------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("text, expected", [
    ("9000", TcpAddress("127.0.0.1", 9000)),
    (":9000", TcpAddress("127.0.0.1", 9000)),
    ("0.0.0.0:9000", TcpAddress("0.0.0.0", 9000)),
    ("[::1]:9000", TcpAddress("::1", 9000)),
    ("unix:/run/x.sock", UnixAddress("/run/x.sock")),
    ("/run/x.sock", UnixAddress("/run/x.sock")),
])
def test_listen_addresses_default_to_loopback(text, expected):
    assert parse_socket_address(text, "listen") == expected


@pytest.mark.parametrize("text", ["host:port", "70000", "[::1]9000", "unix:"])
def test_bad_addresses_are_refused(text):
    with pytest.raises(ConfigError):
        parse_socket_address(text, "listen")


def test_destinations():
    assert parse_destination("dir:/srv/images") == DirectoryTarget("/srv/images")
    assert parse_destination("10.0.0.2:8002") == TcpAddress("10.0.0.2", 8002)
    with pytest.raises(ConfigError, match="absolute"):
        parse_destination("dir:images")
    with pytest.raises(ConfigError, match="port 0"):
        parse_destination("127.0.0.1:0")


def test_toml_shaped_settings_make_a_config():
    config = config_from_settings({
        "service": {"max_connections": 4, "allow": ["10.0.0.0/8", "::1"], "metrics": "9100"},
        "timeouts": {"idle": 5, "shutdown_grace": 2.5},
        "listener": [dict(LISTENER, name="a", format="libxl", width="32", guest="hvm")],
    })
    listener = config.listeners[0]
    assert (listener.name, listener.format, listener.width, listener.guest) == ("a", "libxl", 32, "hvm")
    assert config.metrics == TcpAddress("127.0.0.1", 9100)
    assert config.timeouts.idle == 5 and config.timeouts.shutdown_grace == 2.5 and config.timeouts.header == 10
    assert config.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize("settings, message", [
    ({"listener": []}, "no listener"),
    ({"listener": [{"listen": "1"}]}, "'destination' is required"),
    ({"listener": [dict(LISTENER, colour="red")]}, "unknown setting"),
    ({"listener": [dict(LISTENER, format="xl")]}, "format"),
    ({"listener": [dict(LISTENER, width=48)]}, "width"),
    ({"listener": [dict(LISTENER, name="a"), dict(LISTENER, name="a")]}, "unique"),
    ({"listener": [LISTENER], "service": {"max_connections": 0}}, "max_connections"),
    ({"listener": [LISTENER], "service": {"max_connections": True}}, "expected int"),
    ({"listener": [LISTENER], "timeouts": {"idle": -1}}, "positive"),
    ({"listener": [LISTENER], "service": {"allow": ["10.0.0.300/8"]}}, "allow"),
    ({"listener": [LISTENER], "service": {"metrics": "unix:/x"}}, "metrics"),
])
def test_bad_settings_are_refused_with_their_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        config_from_settings(settings)


def test_command_line_adds_listeners_and_overrides_service_values():
    args = argparse.Namespace(listen=["7000", "unix:/run/in.sock"], to=["dir:/a", "127.0.0.1:7001"], format="libxl",
                              width=None, guest="pv", max_connections=3, buffer_size=None, max_buffered=None,
                              metrics=None, allow=["127.0.0.0/8"], timeout_idle=9.0)
    config = config_from_settings(merge_command_line({"listener": [LISTENER], "service": {"max_connections": 8}},
                                                      args))
    assert [entry.listen for entry in config.listeners] == [
        TcpAddress("127.0.0.1", 9000), TcpAddress("127.0.0.1", 7000), UnixAddress("/run/in.sock")]
    assert config.listeners[2].format == "libxl" and config.listeners[2].guest == "pv"
    assert config.max_connections == 3 and config.timeouts.idle == 9.0
    with pytest.raises(ConfigError, match="--to"):
        merge_command_line({}, argparse.Namespace(listen=["1", "2"], to=["dir:/a"]))


def test_remus_setting_per_listener():
    config = config_from_settings({"listener": [LISTENER, dict(LISTENER, name="secondary", remus="refuse")]})
    assert [entry.remus for entry in config.listeners] == ["checkpoints", "refuse"]
    with pytest.raises(ConfigError, match="remus must be checkpoints or refuse"):
        config_from_settings({"listener": [dict(LISTENER, remus="spool")]})
    args = argparse.Namespace(listen=["7000"], to=["dir:/a"], remus="refuse")
    assert config_from_settings(merge_command_line({}, args)).listeners[0].remus == "refuse"


def test_allowlist():
    config = config_from_settings({"listener": [LISTENER], "service": {"allow": ["127.0.0.0/8", "2001:db8::/32"]}})
    assert config.peer_allowed("127.0.0.1")
    assert config.peer_allowed("::ffff:127.0.0.5")
    assert config.peer_allowed("2001:db8::1")
    assert not config.peer_allowed("10.0.0.1")
    assert not config.peer_allowed("::1")
    assert config_from_settings({"listener": [LISTENER]}).peer_allowed("192.0.2.1")


# ------------------------------------------------------------------------------------------ classification


def test_classify_by_signature():
    libxc, libxl, xl = (v2_stream(pages=8, wrap=wrap) for wrap in ("libxc", "libxl", "xl"))
    v1 = build_stream(BuildOptions(pages=32))
    v1_xl = build_stream(BuildOptions(pages=32, wrapper="xl"))
    for data, kind in ((libxc, "v2"), (libxl, "v2"), (xl, "v2"), (v1, "v1"), (v1_xl, "v1")):
        assert classify(data[:64], at_eof=False) == kind
    for data in (libxc, libxl, xl, v1_xl):
        assert classify(data[:7], at_eof=False) is None  # a prefix of a signature: wait for more
        assert classify(data[:7], at_eof=True) == "v1"  # too short for v2: the legacy parser says why
    assert classify(b"\x00", at_eof=False) == "v1"


# ------------------------------------------------------------------------------------------ conversion core


def _run(conversion, data: bytes, sizes) -> bytes:
    """Feed `data` in pieces through one reused buffer, as the service does; collect the output."""
    out = bytearray()
    scratch = bytearray(max(sizes) if sizes else 1)
    position, turn = 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)] if sizes else len(data)
        piece = data[position : position + size]
        scratch[: len(piece)] = piece
        for buffer in conversion.feed(memoryview(scratch)[: len(piece)]):
            out += buffer
        scratch[: len(piece)] = bytes(len(piece))  # the conversion must not keep views of it
        position += len(piece)
        turn += 1
    for buffer in conversion.finish():
        out += buffer
    return bytes(out)


def _offline(data: bytes, fmt: str, checkpoints: bool = False) -> bytes:
    with tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as target:
        source.write(data)
        source.seek(0)
        convert_fds(source.fileno(), target.fileno(), ConvertOptions(fmt=fmt, checkpoints=checkpoints))
        target.seek(0)
        return target.read()


V2_SAMPLES = [v2_stream(guest="pv", pages=40, wrap="libxc", seed=1), v2_stream(guest="hvm", pages=40, wrap="libxl", seed=2),
              v2_stream(guest="pv", pages=40, wrap="xl", seed=3),
              v2_stream(guest="hvm", pages=40, wrap="libxl", seed=4, checkpoints=2)]  # Remus: no END
V1_SAMPLES = [build_stream(BuildOptions(guest="pv", pages=40, seed=1)),
              build_stream(BuildOptions(guest="hvm", pages=40, seed=2, wrapper="xl"))]
V1_EXPECTED = {fmt: [_offline(data, fmt) for data in V1_SAMPLES] for fmt in ("libxc", "libxl")}
CHUNKS = st.lists(st.integers(1, 20000), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None)
@given(sample=st.sampled_from(range(len(V2_SAMPLES))), sizes=CHUNKS)
def test_v2_passthrough_is_the_identity_in_any_chunking(sample, sizes):
    data = V2_SAMPLES[sample]
    assert _run(V2Passthrough(1 << 20), data, sizes) == data


@settings(max_examples=25, deadline=None)
@given(sample=st.sampled_from(range(len(V1_SAMPLES))), fmt=st.sampled_from(("libxc", "libxl")), sizes=CHUNKS)
def test_v1_upgrade_equals_offline_conversion_in_any_chunking(sample, fmt, sizes):
    assert _run(LegacyUpgrade(fmt, None, None, 1 << 20), V1_SAMPLES[sample], sizes) == V1_EXPECTED[fmt][sample]


@pytest.mark.parametrize("data", V2_SAMPLES[:1] + [V1_SAMPLES[0]])
def test_one_byte_at_a_time(data):
    conversion = V2Passthrough(1 << 20) if data is V2_SAMPLES[0] else LegacyUpgrade("libxc", None, None, 1 << 20)
    expected = data if data is V2_SAMPLES[0] else V1_EXPECTED["libxc"][0]
    assert _run(conversion, data, [1]) == expected


def test_v2_end_is_held_back_until_the_input_ends():
    data = V2_SAMPLES[0]  # bare libxc: the last 8 bytes are END
    conversion = V2Passthrough(1 << 20)
    early = b"".join(bytes(b) for b in conversion.feed(data))
    assert early == data[:-8]
    assert b"".join(bytes(b) for b in conversion.finish()) == data[-8:]


def test_v1_end_is_held_back_until_the_input_ends():
    data, expected = V1_SAMPLES[0], V1_EXPECTED["libxc"][0]
    conversion = LegacyUpgrade("libxc", None, None, 1 << 20)
    early = b"".join(bytes(b) for b in conversion.feed(data))
    assert expected.startswith(early) and len(early) < len(expected)
    assert early + b"".join(bytes(b) for b in conversion.finish()) == expected


@pytest.mark.parametrize("cut", [1, 100, 5000, -9, -1])
def test_truncated_v2_fails_and_never_gives_out_the_end(cut):
    data = V2_SAMPLES[1]
    conversion = V2Passthrough(1 << 20)
    given_out = b"".join(bytes(b) for b in conversion.feed(data[:cut]))
    assert data.startswith(given_out) and len(given_out) <= len(data) - 8
    with pytest.raises(v2_errors.StreamError) as failure:
        conversion.finish()
    assert failure.value.offset is not None


@pytest.mark.parametrize("cut", [10, 4000, -20, -1])
def test_truncated_v1_fails_and_never_gives_out_the_end(cut):
    data, expected = V1_SAMPLES[0], V1_EXPECTED["libxc"][0]
    conversion = LegacyUpgrade("libxc", None, None, 1 << 20)
    given_out = b"".join(bytes(b) for b in conversion.feed(data[:cut]))
    assert expected.startswith(given_out) and len(given_out) < len(expected)
    with pytest.raises(legacy_errors.StreamError) as failure:
        conversion.finish()
    assert failure.value.offset is not None


def test_v2_bytes_after_the_end_are_refused():
    conversion = V2Passthrough(1 << 20)
    with pytest.raises(v2_errors.StreamError, match="after the end"):
        conversion.feed(V2_SAMPLES[0] + b"\0" * 8)


def test_v2_rule_violation_stops_the_stream_before_the_bad_record_is_given_out():
    data = bytearray(V2_SAMPLES[0])
    data[16:20] = (99).to_bytes(4, "little")  # domain header: an invalid guest type
    conversion = V2Passthrough(1 << 20)
    with pytest.raises(v2_errors.StreamError):
        conversion.feed(bytes(data))


def test_buffering_limit_refuses_an_oversized_record():
    huge_record = (0x0B).to_bytes(4, "little") + (8 << 20).to_bytes(4, "little")  # TOOLSTACK of 8 MiB
    data = V2_SAMPLES[0][:40] + huge_record + bytes(1 << 20)
    conversion = V2Passthrough(1 << 16)
    with pytest.raises(v2_errors.StreamError, match="buffering limit"):
        conversion.feed(data)


def test_device_model_state_beyond_the_buffering_limit_is_refused():
    # The parser hands the state out in 1 MiB pieces; the transformer keeps all of them until the end.
    data = build_stream(BuildOptions(guest="hvm", pages=32, device_model_size=1_600_000))
    assert _run(LegacyUpgrade("libxc", None, None, 2 << 20), data, [1 << 16])  # fits
    with pytest.raises(legacy_errors.UnsupportedStream, match="device-model state"):
        _run(LegacyUpgrade("libxc", None, None, (1 << 20) + (128 << 10)), data, [1 << 16])


def test_element_count_is_bounded():
    conversion = LegacyUpgrade("libxc", None, None, 1 << 20)
    conversion.ELEMENT_LIMIT = 3  # a real stream has a few dozen
    with pytest.raises(legacy_errors.UnsupportedStream, match="elements besides page batches"):
        _run(conversion, V1_SAMPLES[0], [4096])


def test_remus_streams_are_refused_when_the_listener_says_so():
    data = build_stream(BuildOptions(guest="pv", pages=32, checkpoints=3))
    conversion = LegacyUpgrade("libxc", None, None, 1 << 20, remus="refuse")
    with pytest.raises(legacy_errors.UnsupportedStream, match='remus = "refuse"'):
        conversion.feed(data)
        conversion.finish()


# Remus streams: more than one record's worth of pages per later checkpoint (PV), HVM with device-model
# state, compressed checkpoints.
REMUS_SAMPLES = [build_stream(BuildOptions(guest="pv", pages=200, checkpoints=3, remus=True, seed=11)),
                 build_stream(BuildOptions(guest="hvm", pages=60, checkpoints=3, remus=True, seed=12)),
                 build_stream(BuildOptions(guest="pv", pages=60, checkpoints=3, compression=True, seed=13))]
REMUS_EXPECTED = {fmt: [_offline(data, fmt, checkpoints=True) for data in REMUS_SAMPLES] for fmt in ("libxc", "libxl")}


@settings(max_examples=15, deadline=None)
@given(sample=st.sampled_from(range(len(REMUS_SAMPLES))), fmt=st.sampled_from(("libxc", "libxl")), sizes=CHUNKS)
def test_remus_stream_becomes_the_checkpointed_conversion(sample, fmt, sizes):
    assert _run(LegacyUpgrade(fmt, None, None, 1 << 20), REMUS_SAMPLES[sample], sizes) == REMUS_EXPECTED[fmt][sample]


def _record_offsets(data: bytes, layer: type, record_type: int) -> list[int]:
    reader = V2Reader(layer="auto", payload="views")
    reader.feed(data)
    reader.feed(b"")
    offsets = []
    while not isinstance(event := reader.next_event(), EndOfStream):
        if isinstance(event, layer) and event.type == record_type:
            offsets.append(event.offset)
    return offsets


def test_remus_conversion_holds_at_most_a_record_of_pages():
    """A later checkpoint's records leave as their pages arrive: just before checkpoint 2 ends, all of
    its records but the last two (1024 entries each) are out."""
    data = build_stream(BuildOptions(guest="pv", pages=12000, checkpoints=2, remus=True, seed=11))
    first, second = _checkpoint_ends(data)
    assert second - first > 1100 * PAGE_SIZE  # more than one record of pages in checkpoint 2
    expected = _offline(data, "libxc", checkpoints=True)
    conversion = LegacyUpgrade("libxc", None, None, 1 << 20)
    sent = b"".join(bytes(buffer) for buffer in conversion.feed(data[: second - 1]))
    assert expected.startswith(sent)
    checkpoint_2_closed_at = _record_offsets(expected, LibxcRecord, C.REC_CHECKPOINT)[1]
    assert 0 < checkpoint_2_closed_at - len(sent) < 2 * 1024 * PAGE_SIZE


def _checkpoint_ends(data: bytes) -> list[int]:
    return [event.offset for event in parse_bytes(data) if isinstance(event, legacy_events.CheckpointEnd)]


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize("where", ["inside checkpoint 3", "just after checkpoint 1"])
def test_remus_source_breaking_off_inside_a_checkpoint_gets_no_end(fmt, where):
    data = REMUS_SAMPLES[1]
    ends = _checkpoint_ends(data)
    cut = (ends[1] + ends[2]) // 2 if where == "inside checkpoint 3" else ends[0] + 4
    complete = 2 if where == "inside checkpoint 3" else 1
    conversion = LegacyUpgrade(fmt, None, None, 1 << 20)
    out = b"".join(bytes(buffer) for buffer in conversion.feed(data[:cut]))
    with pytest.raises(legacy_errors.TruncatedStream, match=f"keeps checkpoint {complete}") as caught:
        conversion.finish()
    out += b"".join(bytes(buffer) for buffer in caught.value.output)
    # Everything up to the last complete checkpoint's CHECKPOINT (libxl: CHECKPOINT_END), as the
    # offline conversion has it.
    reference = _offline(data[: ends[complete - 1]], fmt, checkpoints=True)
    closed = (_record_offsets(reference, LibxcRecord, C.REC_CHECKPOINT) if fmt == "libxc" else
              _record_offsets(reference, LibxlRecord, C.LIBXL_REC_CHECKPOINT_END))[-1] + 8
    state = restored_state(out)
    assert state["record_types"].count(C.REC_CHECKPOINT) == complete and C.REC_END not in state["record_types"]
    if fmt == "libxl":
        assert state["libxl_records"].count(C.LIBXL_REC_CHECKPOINT_END) == complete
    assert not has_end_record(out)
    assert out[:closed] == reference[:closed]


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_render_prometheus_text():
    metrics = Metrics()
    metrics.add("xenstream_bytes_in_total", 123456789, listener="a")
    metrics.add("xenstream_connections_failed_total", listener="a", reason="bad_stream")
    metrics.observe_duration(0.3, listener="a")
    text = metrics.render()
    assert 'xenstream_bytes_in_total{listener="a"} 123456789\n' in text
    assert 'xenstream_connections_failed_total{listener="a",reason="bad_stream"} 1\n' in text
    assert "xenstream_connections_active 0\n" in text
    assert 'xenstream_conversion_seconds_bucket{listener="a",le="0.1"} 0\n' in text
    assert 'xenstream_conversion_seconds_bucket{listener="a",le="0.5"} 1\n' in text
    assert 'xenstream_conversion_seconds_count{listener="a"} 1\n' in text
    assert "# TYPE xenstream_conversion_seconds histogram\n" in text


# ------------------------------------------------------------------------------------------ command line


def test_serve_command_line_checks_its_configuration(capsys, tmp_path):
    from xenstream.convert.cli import main

    assert main(["serve", "--listen", "9000"]) == 1
    assert "--to" in capsys.readouterr().err
    config = tmp_path / "serve.toml"
    config.write_text('[service]\nmax_connections = 5\n[[listener]]\nlisten = "unix:/run/in.sock"\n'
                      'destination = "restore:sim"\n')
    assert main(["serve", "--config", str(config), "--listen", "[::1]:7000", "--to", "dir:/srv", "--check-config"]) == 0
    shown = capsys.readouterr().out
    assert "max_connections=5" in shown and "RestoreTarget()" in shown and "TcpAddress(host='::1', port=7000)" in shown
    config.write_text("[service\n")
    assert main(["serve", "--config", str(config)]) == 1
    assert "serve.toml" in capsys.readouterr().err
    assert main(["serve", "--listen", "0", "--to", f"dir:{tmp_path}/missing"]) == 1
    assert "not a writable directory" in capsys.readouterr().err
