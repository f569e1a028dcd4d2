"""samples/v2: the committed images are what make_samples.py builds, the valid ones read to their end, the
invalid ones fail with the error their defect was designed to produce."""

from __future__ import annotations

import hashlib
import json
import runpy
import sys

import pytest

from tests.conftest import SAMPLES
from tests.v2.codec_strategies import chunked, read_events
from xenstream.v2 import errors

SAMPLE_DIR = SAMPLES / "v2"
MANIFEST = json.loads((SAMPLE_DIR / "manifest.json").read_text())
VALID = sorted(name for name, facts in MANIFEST.items() if not facts.get("invalid"))
INVALID = sorted(name for name, facts in MANIFEST.items() if facts.get("invalid"))


def test_generator_rebuilds_identical_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_samples.py", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SAMPLE_DIR / "make_samples.py"), run_name="__main__")
    assert done.value.code == 0
    for name in [*MANIFEST, "manifest.json", "README.md"]:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_sha256_as_listed(name):
    data = (SAMPLE_DIR / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == MANIFEST[name]["sha256"]
    assert MANIFEST[name]["sha256"] in (SAMPLE_DIR / "README.md").read_text()


@pytest.mark.parametrize("name", VALID)
def test_valid_samples_read_to_the_end(name):
    data = (SAMPLE_DIR / name).read_bytes()
    events = read_events(chunked(data, [4093]))
    end = events[-1]
    assert end.offset == len(data)
    assert end.complete == ("remus" not in name)


@pytest.mark.parametrize("name", INVALID)
@pytest.mark.parametrize("payload", ["views", "passthrough"])
def test_invalid_samples_fail_as_designed(name, payload):
    facts = MANIFEST[name]
    data = (SAMPLE_DIR / name).read_bytes()
    with pytest.raises(errors.StreamError) as info:
        if payload == "views":
            read_events([data])
        else:
            from xenstream.v2.events import EndOfStream
            from xenstream.v2.reader import V2Reader

            reader = V2Reader(payload="passthrough")
            reader.feed(data)
            reader.feed(b"")
            while not isinstance(reader.next_event(), EndOfStream):
                reader.take_payload()
    assert type(info.value).__name__ == facts["error"]
    assert info.value.offset == facts["offset"]
    assert facts["contains"] in info.value.message
