"""Our converter against Xen 4.17's own convert-legacy-stream and verify-stream-v2, on every v1 sample.

* Wherever Xen's converter converts a sample correctly (exit 0 on a stream it fully understands), our
  output is byte-identical to its output, in libxc and libxl format, with the same options.
* xl save files: Xen's converter always fails on them under Python 3, so the reference is what it
  does with the header cut off (as xl does before calling it): our libxl output is the xl header with
  the STREAMV2 flag followed by exactly those bytes; our libxc output is those bytes alone.
* Where Xen's converter is wrong (Remus, and a Xen 4.0 stream that goes on after checkpoint 1: it silently
  converts checkpoint 1 and drops the rest, though the 4.0 and 4.5 restorers commit the last complete
  checkpoint), our output differs and carries the last complete checkpoint (tests/convert checks that
  state); Xen's output is then exactly ours for checkpoint 1 alone.
* Where the stream holds tmem (any format version), both converters refuse it; ours with drop_tmem is
  byte-identical to Xen's conversion of the same stream with the TMEM and TMEM_EXTRA chunks cut out.
* Every output of ours passes Xen's verify-stream-v2, except where Xen's verifier is itself wrong:
  under Python 3 it rejects every EMULATOR_XENSTORE_DATA record ("Data not NUL terminated": it
  compares an int with a str), and it does not know libxl checkpointed streams (after a libxc
  CHECKPOINT it keeps reading libxl records as libxc ones).

Which samples fall under which rule is read from the stream (FACTS), not from the sample's name.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess

import attrs
import pytest

from tests.conftest import REPO
from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import ConvertOptions
from xenstream.legacy import constants as lc
from xenstream.legacy import events as ev
from xenstream.legacy.build import build_stream
from xenstream.legacy.errors import UnsupportedStream
from xenstream.legacy.parser import parse_bytes
from xenstream.legacy.writer import LegacyWriter

pytestmark = pytest.mark.interop

SAMPLES_DIR = REPO / "samples" / "v1"


def _catalogue():
    spec = importlib.util.spec_from_file_location("v1_make_samples_for_convert", SAMPLES_DIR / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {sample.name: sample for sample in module.SAMPLES}


SAMPLES = _catalogue()
FORMATS = ("libxc", "libxl")
TMEM_EVENTS = (ev.TmemHeader, ev.TmemPool, ev.TmemPage, ev.TmemPoolPagesEnd, ev.TmemEnd, ev.TmemExtraStart,
               ev.TmemInvalidation, ev.TmemExtraEnd)


def _events(data: bytes) -> list:
    return parse_bytes(data)


@attrs.frozen
class Facts:
    """What a sample's stream holds, as our parser reads it."""

    tmem: bool  # TMEM / TMEM_EXTRA chunks: v2 has no place for them, so ours refuses them unless drop_tmem
    # LAST_CHECKPOINT: written by 4.1+ savers of a non-Remus stream. Without it (Remus, every Xen 4.0 save)
    # the end of input is the only end, so --checkpoints closes even a lone checkpoint with CHECKPOINT.
    last_checkpoint: bool


def _facts(data: bytes) -> Facts:
    events = _events(data)
    return Facts(tmem=any(isinstance(e, TMEM_EVENTS) for e in events),
                 last_checkpoint=any(isinstance(e, ev.LastCheckpoint) for e in events))


FACTS = {name: _facts((SAMPLES_DIR / sample.filename).read_bytes()) for name, sample in SAMPLES.items()}


def run_xen_converter(xen_tools, data: bytes, options, fmt: str, tmp_path, extra=()) -> tuple[int, bytes, str]:
    source = tmp_path / "xen-in.v1"
    target = tmp_path / "xen-out.v2"
    source.write_bytes(data)
    target.write_bytes(b"")
    proc = subprocess.run(
        ["python3", xen_tools["convert"], "-i", str(source), "-o", str(target), "-w", str(options.width),
         "-g", options.guest, "-f", fmt, *extra],
        env=xen_tools["env"], capture_output=True, text=True, timeout=120)
    return proc.returncode, target.read_bytes(), proc.stderr


def run_xen_verifier(xen_tools, data: bytes, fmt: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "ours-for-xen-verify.v2"
    path.write_bytes(data)
    return subprocess.run(["python3", xen_tools["verify"], "-i", str(path), "-f", fmt],
                          env=xen_tools["env"], capture_output=True, text=True, timeout=120)


def convert_ours(data: bytes, tmp_path, **options) -> bytes:
    source = tmp_path / "ours-in.v1"
    target = tmp_path / "ours-out.v2"
    source.write_bytes(data)
    with open(source, "rb") as fin, open(target, "wb") as fout:
        convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(**options), verify=True)
    return target.read_bytes()


def xl_header_length(data: bytes) -> int:
    return lc.XL_FIXED_SIZE + int.from_bytes(data[44:48], "little")


# Samples Xen's converter handles correctly: plain streams without wrappers, tmem, compression, -21,
# device-model signatures other than 0002 and nameless physmap entries.
IDENTICAL = ["pv64", "pv32-tools32", "pv32-on-tools64", "pv64-on-tools32", "pv64-live", "pv64-verify",
             "pv64-broken-noxsave", "hvm64", "hvm32-tools32", "hvm64-physmap", "hvm32-physmap"]
IDENTICAL_LIBXC = ["hvm64-physmap-noname"]  # libxc format drops the blob Xen's libxl format rejects


@pytest.mark.parametrize("name", IDENTICAL_LIBXC)
def test_byte_identical_to_xen_libxc_only(xen_tools, tmp_path, name):
    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    code, theirs, stderr = run_xen_converter(xen_tools, data, sample.options, "libxc", tmp_path)
    assert code == 0, stderr
    assert convert_ours(data, tmp_path, fmt="libxc") == theirs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", IDENTICAL)
def test_byte_identical_to_xen(xen_tools, tmp_path, name, fmt):
    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    code, theirs, stderr = run_xen_converter(xen_tools, data, sample.options, fmt, tmp_path)
    assert code == 0, stderr
    assert convert_ours(data, tmp_path, fmt=fmt) == theirs


@pytest.mark.parametrize("name", ["hvm64", "hvm32-tools32", "hvm64-qemu-record", "hvm64-physmap-noname"])
def test_skip_qemu_identical_to_xen(xen_tools, tmp_path, name):
    """Xen's converter reads no device-model record with --skip-qemu (so it takes streams whose record it
    cannot read) and, in libxc format, drops the TOOLSTACK blob (so a nameless physmap entry is no error)."""
    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    code, theirs, stderr = run_xen_converter(xen_tools, data, sample.options, "libxc", tmp_path, ["--skip-qemu"])
    assert code == 0, stderr
    assert convert_ours(data, tmp_path, fmt="libxc", skip_qemu=True) == theirs


@pytest.mark.parametrize("name", ["hvm64", "hvm32-tools32", "hvm64-physmap-noname"])
def test_skip_qemu_without_device_model_record_identical_to_xen(xen_tools, tmp_path, name):
    """A bare libxc HVM stream has no device-model record (libxl / xend append it): Xen's converter
    converts it with --skip-qemu, and so do we, byte for byte."""
    from xenstream.legacy import events as ev
    from xenstream.legacy.parser import parse_bytes

    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    dm = next(e for e in parse_bytes(data) if isinstance(e, ev.DeviceModelRecord))
    bare = data[: dm.offset]
    code, theirs, stderr = run_xen_converter(xen_tools, bare, sample.options, "libxc", tmp_path, ["--skip-qemu"])
    assert code == 0, stderr
    assert convert_ours(bare, tmp_path, fmt="libxc", skip_qemu=True) == theirs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["pv64-xl", "pv64-xl-migrate", "hvm64-xl-text"])
def test_xl_save_file_is_xen_output_behind_the_header(xen_tools, tmp_path, name, fmt):
    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    cut = xl_header_length(data)
    code, theirs, stderr = run_xen_converter(xen_tools, data[cut:], sample.options, fmt, tmp_path)
    assert code == 0, stderr
    ours = convert_ours(data, tmp_path, fmt=fmt)
    if fmt == "libxc":  # no xl header in front of a bare libxc stream: xl could not read it
        assert ours == theirs
        return
    assert ours[:36] == data[:36]
    assert int.from_bytes(ours[36:40], "little") == int.from_bytes(data[36:40], "little") | lc.XL_FLAG_STREAMV2
    assert ours[40:cut] == data[40:cut]
    assert ours[cut:] == theirs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["pv64-remus", "pv64-remus-xen40"])
def test_remus_differs_where_xen_drops_checkpoints(xen_tools, tmp_path, name, fmt):
    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    code, theirs, _ = run_xen_converter(xen_tools, data, sample.options, fmt, tmp_path)
    assert code == 0  # it "succeeds", having read only checkpoint 1
    ours = convert_ours(data, tmp_path, fmt=fmt)
    assert ours != theirs
    # What it wrote is checkpoint 1 converted correctly: ours on checkpoint 1 alone, byte for byte.
    first_only = build_stream(attrs.evolve(sample.options, checkpoints=1, remus=True))
    assert data.startswith(first_only) and len(data) > len(first_only)
    assert convert_ours(first_only, tmp_path, fmt=fmt) == theirs
    # Checkpoint 1 streams through identically; the later checkpoints' pages and closing records follow.
    common = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    assert common > len(theirs) // 2


def _xen_verifier_is_wrong(name: str, fmt: str, checkpoints: bool) -> str | None:
    sample = SAMPLES[name]
    if fmt == "libxl" and sample.options.guest == "hvm" and sample.options.toolstack and sample.options.physmap:
        return "Data not NUL terminated"
    if fmt == "libxl" and checkpoints and not FACTS[name].last_checkpoint:
        # Our output is a libxl checkpointed stream; the libxl record after CHECKPOINT, read as a libxc one:
        # EMULATOR_CONTEXT (3) as P2M_FRAMES, CHECKPOINT_END (4) as X86_PV_VCPU_BASIC.
        if sample.options.guest == "hvm":
            return "Length expected to be a multiple of 8"
        return "X86_PV_VCPU_basic record length must be at least 8 bytes"
    return None


CONVERTIBLE = sorted(name for name in SAMPLES if not FACTS[name].tmem)
TMEM = sorted(name for name in SAMPLES if FACTS[name].tmem)


@pytest.mark.parametrize("checkpoints", [False, True], ids=["last-state", "checkpoints"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CONVERTIBLE)
def test_every_output_passes_xens_verifier(xen_tools, tmp_path, name, fmt, checkpoints):
    data = (SAMPLES_DIR / SAMPLES[name].filename).read_bytes()
    ours = convert_ours(data, tmp_path, fmt=fmt, checkpoints=checkpoints)
    verify_fmt = "xl" if SAMPLES[name].options.wrapper in ("xl", "xl-text") and fmt == "libxl" else fmt
    proc = run_xen_verifier(xen_tools, ours, verify_fmt, tmp_path)
    known = _xen_verifier_is_wrong(name, fmt, checkpoints)
    if known:
        assert proc.returncode != 0 and known in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


def _without_tmem(data: bytes) -> bytes:
    sink = io.BytesIO()
    LegacyWriter(sink).write_all(e for e in _events(data) if not isinstance(e, TMEM_EVENTS))
    return sink.getvalue()


def test_tmem_samples_include_both_format_versions():
    versions = {e.version for name in TMEM for e in _events((SAMPLES_DIR / SAMPLES[name].filename).read_bytes())
                if isinstance(e, ev.TmemHeader)}
    assert versions == {0, 1}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", TMEM)
def test_tmem_refused_unless_dropped_then_identical_to_xen_without_it(xen_tools, tmp_path, name, fmt):
    sample = SAMPLES[name]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    with pytest.raises(UnsupportedStream, match=r"chunk TMEM \(-5\)"):
        convert_ours(data, tmp_path, fmt=fmt)
    stripped = _without_tmem(data)
    assert len(stripped) < len(data)
    code, theirs, stderr = run_xen_converter(xen_tools, stripped, sample.options, fmt, tmp_path)
    assert code == 0, stderr
    assert convert_ours(data, tmp_path, fmt=fmt, drop_tmem=True) == theirs


@pytest.mark.parametrize("checkpoints", [False, True], ids=["last-state", "checkpoints"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", TMEM)
def test_tmem_dropped_output_passes_xens_verifier(xen_tools, tmp_path, name, fmt, checkpoints):
    data = (SAMPLES_DIR / SAMPLES[name].filename).read_bytes()
    ours = convert_ours(data, tmp_path, fmt=fmt, drop_tmem=True, checkpoints=checkpoints)
    proc = run_xen_verifier(xen_tools, ours, fmt, tmp_path)
    known = _xen_verifier_is_wrong(name, fmt, checkpoints)
    if known:
        assert proc.returncode != 0 and known in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("checkpoints", [False, True], ids=["last-state", "checkpoints"])
@pytest.mark.parametrize("name", ["pv64-remus", "pv64-compressed"])
def test_conformance_vector_outputs_pass_xens_verifier(xen_tools, tmp_path, name, checkpoints):
    from tests.conftest import SHARED

    path = SHARED / "vectors" / f"{name}.v1"
    if not path.exists():
        pytest.skip(f"{path} not present")
    ours = convert_ours(path.read_bytes(), tmp_path, fmt="libxc", checkpoints=checkpoints)
    proc = run_xen_verifier(xen_tools, ours, "libxc", tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", [
    dict(guest="pv", pages=3000, holes=5, vcpus=3, live_iterations=2),
    dict(guest="pv", width=32, guest_width=32, pages=2500, holes=4, broken_pages=3),
    dict(guest="hvm", pages=2600, holes=40, device_model_size=50000),
], ids=["pv64-live-3000", "pv32-2500", "hvm64-2600"])
def test_byte_identical_on_multi_batch_streams(xen_tools, tmp_path, options, fmt):
    """Streams of many batches (partial last batches, HVM XTAB runs, the kernel's payload moves)."""
    from xenstream.legacy.build import BuildOptions

    built = BuildOptions(**options)
    data = build_stream(built)
    code, theirs, stderr = run_xen_converter(xen_tools, data, built, fmt, tmp_path)
    assert code == 0, stderr
    assert convert_ours(data, tmp_path, fmt=fmt) == theirs
