"""`xenstream serve` into `restore:sim`: a v2 stream the checkpoint-aware restore rejects is logged with the
bad record's offset in the stream the service received (xl header and libxl layer included)."""

from __future__ import annotations

import re

import pytest

from tests.convert.service_harness import running_service, send_stream
from tests.v2.live_support import migrate, start_guest
from tests.v2.test_checkpoint_offsets import CORRUPTIONS, SPEC, XL_CONFIG, target_record, walk
from xenstream.v2.xl_header import XlHeader

CONFIG = """
[service]
restore_frames = 16384

[timeouts]
header = 2
idle = 5

[[listener]]
name = "restore"
listen = "127.0.0.1:0"
destination = "restore:sim"
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    run = migrate(start_guest(SPEC), "uniform:rate=20000", libxl=True, checkpoints=3, interval=0.01)
    run.stream = XlHeader.with_config(XL_CONFIG).pack() + run.stream
    with running_service(str(tmp_path_factory.mktemp("serve-offsets")), CONFIG, []) as service:
        yield service, run


@pytest.mark.parametrize("checkpoint,corruption", [(1, "pte"), (2, "vcpu_id"), (2, "pte")])
def test_restore_error_is_logged_at_the_offset_in_the_received_stream(rig, checkpoint, corruption):
    service, run = rig
    _, corrupt, message = CORRUPTIONS[corruption]
    target = target_record(run, walk(run.stream), checkpoint, corruption)
    try:
        send_stream(service.addresses["restore"], corrupt(run, target))
    except OSError:
        pass  # the service may close the connection at the bad record, before everything was sent
    result = service.stream_result(service.last_conn())
    assert result["result"] == "bad_stream", result
    assert re.search(message, result["error"]), result
    assert result["offset"] == target, result
