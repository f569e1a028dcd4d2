"""Command lines load structlog only when they have something to say (xenstream.hv.lazylog): a default
run of the libxl helper that converts cleanly never imports it, and what a run does say still comes out
in the configured format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from xenstream.hv import lazylog

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "samples", "v1", "pv64-xl.v1")

_PROBE = """
import sys
from xenstream.convert import compat_convert
status = compat_convert.main(sys.argv[1:])
print("structlog" in sys.modules, status)
"""


def _run_helper(tmp_path, *options: str) -> tuple[str, str]:
    out = tmp_path / "out.v2"
    done = subprocess.run([sys.executable, "-c", _PROBE, "-i", SAMPLE, "-o", str(out), *options],
                          capture_output=True, text=True, timeout=120)
    return done.stdout.strip(), done.stderr


def test_a_quiet_conversion_never_imports_structlog(tmp_path):
    stdout, stderr = _run_helper(tmp_path)
    assert stdout == "False 0"
    assert stderr == ""


def test_a_verbose_conversion_loads_structlog_and_logs(tmp_path):
    stdout, stderr = _run_helper(tmp_path, "-v")
    assert stdout == "True 0"
    assert "converted" in stderr and "bytes_out=" in stderr


def test_xenstream_json_logs_still_come_out(tmp_path):
    out = tmp_path / "out.v2"
    done = subprocess.run([sys.executable, "-m", "xenstream.convert.cli", "--log-format", "json", "-v", "convert",
                           SAMPLE, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(line["event"] == "stream variant" and line["level"] == "info" for line in lines)


@pytest.fixture
def deferred(monkeypatch):
    """A deferred configuration that records whether it ran, as if structlog were not loaded yet."""
    ran = []
    monkeypatch.setattr(lazylog, "_threshold", None)
    monkeypatch.setattr(lazylog, "_pending_configuration", None)
    monkeypatch.delitem(sys.modules, "structlog", raising=False)
    lazylog.defer_configuration(30, lambda: ran.append(True))
    yield ran
    # (the real structlog module object is restored by monkeypatch)


def test_calls_below_the_level_are_dropped_without_loading_anything(deferred):
    log = lazylog.get_logger("probe").bind(conn=1)
    log.info("not said")
    log.debug("not said either")
    assert deferred == []
    assert "structlog" not in sys.modules


def test_the_first_call_at_the_level_runs_the_configuration(deferred):
    import structlog.testing

    sys.modules.pop("structlog", None)  # (imported for capture_logs; pretend it is not loaded yet)
    with structlog.testing.capture_logs() as captured:
        lazylog.get_logger("probe").bind(conn=7).warning("said", n=1)
    assert deferred == [True]
    assert captured == [{"event": "said", "log_level": "warning", "conn": 7, "n": 1}]
