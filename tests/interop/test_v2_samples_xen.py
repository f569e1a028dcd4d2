"""Xen 4.17's own verify-stream-v2 on our samples: it accepts every valid sample it can verify, fails the
two it cannot for the documented reasons (spec 8 A13, A20), and rejects the invalid ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import SAMPLES
from tests.v2.test_worked_example import worked_example

SAMPLE_DIR = SAMPLES / "v2"
MANIFEST = json.loads((SAMPLE_DIR / "manifest.json").read_text())
VALID = sorted(name for name, facts in MANIFEST.items() if not facts.get("invalid"))
INVALID = sorted(name for name, facts in MANIFEST.items() if facts.get("invalid") and facts.get("xen_check", True))


def xen_verify(xen_tools, path, fmt):
    return subprocess.run(
        [sys.executable, xen_tools["verify"], "-f", fmt, "-i", str(path)],
        env=xen_tools["env"], capture_output=True, text=True, timeout=120,
    )


@pytest.mark.interop
@pytest.mark.parametrize("name", VALID)
def test_xen_verifier_on_valid_samples(xen_tools, name):
    facts = MANIFEST[name]
    result = xen_verify(xen_tools, SAMPLE_DIR / name, facts["xen_format"])
    if facts["xen_verify"] == "accept":
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0
        reason = {"A20": "Data not NUL terminated", "A13": "X86_PV_VCPU_basic record length"}
        expected = next(text for key, text in reason.items() if key in facts["xen_verify"])
        assert expected in result.stdout + result.stderr


@pytest.mark.interop
@pytest.mark.parametrize("name", INVALID)
def test_xen_verifier_rejects_invalid_samples(xen_tools, name):
    fmt = "libxl" if name.endswith(".libxl") else "libxc"
    result = xen_verify(xen_tools, SAMPLE_DIR / name, fmt)
    assert result.returncode != 0, result.stdout


@pytest.mark.interop
@pytest.mark.parametrize("wrap", ["libxc", "libxl", "xl"])
def test_xen_verifier_accepts_the_worked_example(xen_tools, tmp_path, wrap):
    path = tmp_path / f"example.{wrap}"
    path.write_bytes(worked_example(wrap))
    assert xen_verify(xen_tools, path, wrap).returncode == 0
