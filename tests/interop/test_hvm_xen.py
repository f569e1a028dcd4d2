"""Our HVM saves against Xen 4.17's own tools.

* verify-stream-v2 accepts our v2 HVM saves: the bare libxc stream, and the libxl stream. Under Python 3
  Xen's verifier rejects every EMULATOR_XENSTORE_DATA record ("Data not NUL terminated": it compares an
  int with a str), so the libxl stream it checks is one whose device model has no xenstore keys; the
  record itself is checked by our own reader in tests/v2.
* convert-legacy-stream converts our legacy HVM saves (32- and 64-bit toolstacks, libxc and libxl
  output) byte-identically to our converter, and its output verifies.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.v2 import hvm_support as hs
from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import ConvertOptions
from xenstream.hv.emulator import EmulatorState
from xenstream.v2.snapshot_hvm import hvm_snapshot

pytestmark = pytest.mark.interop

SPEC = "hvm:mem=2M,vcpus=2,seed=13"


def verify(xen_tools, data: bytes, fmt: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"verify-{fmt}.v2"
    path.write_bytes(data)
    return subprocess.run(["python3", xen_tools["verify"], "-i", str(path), "-f", fmt, "-v"],
                          env=xen_tools["env"], capture_output=True, text=True, timeout=120)


def test_xen_verifies_our_bare_libxc_hvm_save(xen_tools, tmp_path):
    xen, guest = hs.build(SPEC)
    proc = verify(xen_tools, hs.save_v2(xen, guest, libxl=False), "libxc", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x86 HVM" in proc.stdout and "HVM context" in proc.stdout and "HVM params" in proc.stdout


def test_xen_verifies_our_libxl_hvm_save(xen_tools, tmp_path):
    xen, guest = hs.build(SPEC)
    stream = hs.save_v2(xen, guest, emulator=EmulatorState(context=guest.built.emulator.context))
    proc = verify(xen_tools, stream, "libxl", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Emulator context" in proc.stdout


@pytest.mark.parametrize("width", [64, 32])
@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
def test_xen_converts_our_legacy_hvm_save_like_we_do(xen_tools, tmp_path, width, fmt):
    stream, _, _ = hs.save_v1(SPEC, width)
    source = tmp_path / "in.v1"
    source.write_bytes(stream)
    theirs = tmp_path / "xen.v2"
    proc = subprocess.run(["python3", xen_tools["convert"], "-i", str(source), "-o", str(theirs), "-w", str(width),
                           "-g", "hvm", "-f", fmt], env=xen_tools["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ours = tmp_path / "ours.v2"
    with open(source, "rb") as fin, open(ours, "wb") as fout:
        convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(fmt=fmt), verify=True)
    assert ours.read_bytes() == theirs.read_bytes()
    if fmt == "libxc":  # libxl output carries EMULATOR_XENSTORE_DATA, which Xen's verifier cannot read
        checked = verify(xen_tools, theirs.read_bytes(), fmt, tmp_path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    else:  # and Xen's conversion restores to the guest a v2 save of the same seed gives
        source = hs.saved(SPEC)
        xen, result = hs.restore(theirs.read_bytes(), SPEC)
        ref_xen, ref = hs.restore(source.stream, SPEC)
        ours_digest, ref_digest = hvm_snapshot(xen, result.domid), hvm_snapshot(ref_xen, ref.domid)
        assert ours_digest.pages == ref_digest.pages and ours_digest.context_sha256 == ref_digest.context_sha256
        assert result.xenstore == ref.xenstore and result.emulator_context == ref.emulator_context


def test_xen_cannot_convert_the_4_5_4_x87_chunk_which_we_carry(xen_tools, tmp_path):
    """4.5.4+ savers wrote HVM_X87_FIP_WIDTH (-21); Xen's converter stops at it, ours maps it to param 36."""
    import io

    from xenstream.hv import hvm_params
    from xenstream.legacy.save_hvm import save_hvm_legacy
    xen, guest = hs.build(SPEC)
    xen.set_hvm_param(guest.domid, hvm_params.X87_FIP_WIDTH, 8)
    out = io.BytesIO()
    save_hvm_legacy(xen, guest.domid, out, suspend=hs.suspender(guest), emulator=lambda: guest.built.emulator,
                    x87_fip_width_chunk=True)
    source = tmp_path / "x87.v1"
    source.write_bytes(out.getvalue())
    proc = subprocess.run(["python3", xen_tools["convert"], "-i", str(source), "-o", str(tmp_path / "xen.v2"),
                           "-w", "64", "-g", "hvm", "-f", "libxl"], env=xen_tools["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Unrecognised chunk" in proc.stdout + proc.stderr
    ours = tmp_path / "ours.v2"
    with open(source, "rb") as fin, open(ours, "wb") as fout:
        convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(fmt="libxl"), verify=True)
    restored_xen, result = hs.restore(ours.read_bytes(), SPEC)
    assert restored_xen.get_hvm_param(result.domid, hvm_params.X87_FIP_WIDTH) == 8
