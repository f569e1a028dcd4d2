"""Xen's own tools against our engines: every v2 stream the save engine writes passes verify-stream-v2, and
every v1 stream the legacy engine writes converts with Xen's convert-legacy-stream into a stream our
restore engine turns back into the same guest."""

from __future__ import annotations

import io
import subprocess

import pytest

from tests.v2 import engine_support as es
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.legacy.save import save_pv_legacy
from xenstream.v2.snapshot import snapshot

pytestmark = pytest.mark.interop

GUESTS = ["pv64:mem=4M,vcpus=2,seed=51", "pv32:mem=4M,vcpus=3,online=2,seed=52", "pv64:mem=5M,vcpus=1,seed=53"]


def verify(xen_tools, path) -> subprocess.CompletedProcess:
    return subprocess.run([xen_tools["verify"], "-i", str(path)], env=xen_tools["env"], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("spec", GUESTS)
def test_saved_streams_pass_xen_verifier(xen_tools, tmp_path, spec):
    source = es.make_source(spec)
    path = tmp_path / "guest.v2"
    path.write_bytes(source.stream)
    result = verify(xen_tools, path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_hop_stream_passes_xen_verifier(xen_tools, tmp_path):
    source = es.make_source(GUESTS[1])
    xen, result = es.restore(source.stream, source.spec)
    resumed = PvGuest(xen, result.domid, source.guest.layout)
    resumed.resume_new_domain()
    path = tmp_path / "second.v2"
    path.write_bytes(es.save_guest(xen, resumed))
    completed = verify(xen_tools, path)
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("width", [64, 32])
@pytest.mark.parametrize("spec", GUESTS[:2])
def test_legacy_saves_convert_with_xen_and_restore(xen_tools, tmp_path, spec, width):
    parsed = GuestSpec.parse(spec)
    xen = es.new_host(parsed)
    built = build_guest(xen, parsed)
    guest = PvGuest(xen, built.domid, built.layout)
    out = io.BytesIO()
    save_pv_legacy(xen, guest.domid, out, toolstack_width=width, suspend=es.suspend_of(guest))
    digest = snapshot(PvGuestView.open(xen, guest.domid))
    v1, v2 = tmp_path / "guest.v1", tmp_path / "guest.v2"
    v1.write_bytes(out.getvalue())
    converted = subprocess.run([xen_tools["convert"], "-i", str(v1), "-o", str(v2), "-w", str(width), "-g", "pv"],
                               env=xen_tools["env"], capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    assert verify(xen_tools, v2).returncode == 0
    target_xen, result = es.restore(v2.read_bytes(), parsed)
    es.assert_same_guest(digest, es.restored_digest(target_xen, result), es.exempt_pfns(guest))
    es.assert_p2m_bijection(target_xen, result)
