"""Xen's own convert-legacy-stream (xen-utils-4.17, run by Python 3) on our v1 samples.

The expectations are what Xen's converter does by its code (tools/python/scripts/convert-legacy-stream):

* it cannot detect anything, so it is run with the sample's ``-w`` width and ``-g`` guest type;
* it handles plain PV/HVM streams (live, debug, BROKEN pages, any width mix) and converts only the first
  checkpoint of a Remus stream, silently ignoring the rest of the input;
* it raises "todo" (exit 2) on TMEM and ENABLE_COMPRESSION, "Unrecognised chunk" on -21, and "Unrecognised
  Qemu sig" (exit 2) on every device-model record but DeviceModelRecord0002, unless ``-f libxc
  --skip-qemu`` tells it not to read that record;
* ``-x`` always fails under Python 3 ("No xl header": it compares the bytes read with a str magic); without
  ``-x`` a wrapper's first bytes are taken for ``p2m_size``;
* ``-f libxl`` rejects a physmap entry without name, and Xen's own verify-stream-v2 rejects every
  EMULATOR_XENSTORE_DATA record it produces under Python 3 ("Data not NUL terminated": int vs str).

Every accepted output is checked with Xen's verify-stream-v2. Edge streams no saver writes (built from a
sample's events with our writer) pin down the rest: an XTAB-only batch and a lone LPINTAB type convert
into output Xen's verifier rejects; duplicate PFNs in a batch and an xsave size other than "xcnt" - 16
are rejected by the converter; XALLOC entries pass.
"""

import array
import importlib.util
import io
import subprocess

import attrs
import pytest

from tests.conftest import REPO
from xenstream.legacy import events as ev
from xenstream.legacy.build import build_stream
from xenstream.legacy.parser import DONE, LegacyParser
from xenstream.legacy.writer import LegacyWriter

pytestmark = pytest.mark.interop

SAMPLES_DIR = REPO / "samples" / "v1"


def _load_catalogue():
    spec = importlib.util.spec_from_file_location("v1_make_samples", SAMPLES_DIR / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CATALOGUE = _load_catalogue()
SAMPLES = {sample.name: sample for sample in CATALOGUE.SAMPLES}


@attrs.frozen
class Outcome:
    """What the converter does: exit code and a fragment of its last stderr line; then, on success, whether
    Xen's verifier passes its output (``verify_error`` None) or the fragment of its error."""

    exit_code: int
    message: str = ""
    verify_error: str | None = None


OK = Outcome(0)
VERIFIER_PY3_BUG = Outcome(0, verify_error="Data not NUL terminated")
NO_XL_HEADER = Outcome(1, "StreamError: No xl header")
TODO = Outcome(2, "Please fix me")
QEMU_SIG = Outcome(2, "Please fix me")
PV_WRAPPED = Outcome(1, "Unexpected extended info marker")
HVM_WRAPPED = Outcome(1, "exceeded MAX_BATCH")

# Modes: "libxc" / "libxl" = -f; "+skip-qemu" adds --skip-qemu (HVM); "+x" adds -x.
ALL_OK_PV = {"libxc": OK, "libxl": OK}
ALL_OK_HVM = {"libxc": OK, "libxl": OK, "libxc+skip-qemu": OK}
EXPECTED = {
    "pv64": ALL_OK_PV,
    "pv32-tools32": ALL_OK_PV,
    "pv32-on-tools64": ALL_OK_PV,
    "pv64-on-tools32": ALL_OK_PV,
    "pv64-live": ALL_OK_PV,
    "pv64-verify": ALL_OK_PV,
    "pv64-broken-noxsave": ALL_OK_PV,
    "pv64-remus": ALL_OK_PV,
    "pv64-remus-compressed": {"libxc": TODO, "libxl": TODO},
    "pv64-tmem": {"libxc": TODO, "libxl": TODO},
    "pv64-xl": {"libxc": PV_WRAPPED, "libxl": PV_WRAPPED, "libxc+x": NO_XL_HEADER, "libxl+x": NO_XL_HEADER},
    "pv64-xl-migrate": {"libxc": PV_WRAPPED, "libxl": PV_WRAPPED, "libxc+x": NO_XL_HEADER,
                        "libxl+x": NO_XL_HEADER},
    "pv64-xend": {"libxc": PV_WRAPPED, "libxl": PV_WRAPPED},
    "pv64-libvirt": {"libxc": PV_WRAPPED, "libxl": PV_WRAPPED},
    "pv64-tmem-xen40": {"libxc": TODO, "libxl": TODO},
    "pv64-remus-xen40": ALL_OK_PV,
    "hvm64": ALL_OK_HVM,
    "hvm32-tools32": ALL_OK_HVM,
    "hvm64-qemu-record": {"libxc": QEMU_SIG, "libxl": QEMU_SIG, "libxc+skip-qemu": OK},
    "hvm64-remus-dm": {"libxc": QEMU_SIG, "libxl": QEMU_SIG, "libxc+skip-qemu": OK},
    "hvm64-xend": {"libxc": HVM_WRAPPED, "libxl": HVM_WRAPPED, "libxc+skip-qemu": HVM_WRAPPED},
    "hvm64-xenops": {"libxc": HVM_WRAPPED, "libxl": HVM_WRAPPED, "libxc+skip-qemu": HVM_WRAPPED},
    "hvm64-xl-text": {"libxc": HVM_WRAPPED, "libxl": HVM_WRAPPED, "libxc+skip-qemu": HVM_WRAPPED,
                      "libxc+x": NO_XL_HEADER, "libxl+x": NO_XL_HEADER},
    "hvm64-remus-compressed": {"libxc": TODO, "libxl": TODO, "libxc+skip-qemu": TODO},
    "hvm64-physmap": {"libxc": OK, "libxl": VERIFIER_PY3_BUG, "libxc+skip-qemu": OK},
    "hvm32-physmap": {"libxc": OK, "libxl": VERIFIER_PY3_BUG, "libxc+skip-qemu": OK},
    "hvm64-physmap-noname": {"libxc": OK, "libxl": Outcome(1, "No physmap info name"), "libxc+skip-qemu": OK},
    "hvm64-x87": {mode: Outcome(1, "Unrecognised chunk -21") for mode in ("libxc", "libxl", "libxc+skip-qemu")},
}

CASES = [(name, mode) for name, modes in EXPECTED.items() for mode in modes]


def test_every_sample_has_expectations():
    assert set(EXPECTED) == set(SAMPLES)


def _convert(xen_tools, tmp_path, data: bytes, *, width: int, guest: str, mode: str):
    source = tmp_path / "in.v1"
    target = tmp_path / "out.v2"
    source.write_bytes(data)
    fmt = mode.split("+")[0]
    command = [xen_tools["convert"], "-i", str(source), "-o", str(target), "-w", str(width),
               "-g", guest, "-f", fmt]
    if "+skip-qemu" in mode:
        command.append("--skip-qemu")
    if "+x" in mode:
        command.append("-x")
    result = subprocess.run(command, capture_output=True, env=xen_tools["env"], timeout=120)
    return result, target


def _verify(xen_tools, path, fmt: str):
    command = [xen_tools["verify"], "-i", str(path), "-f", fmt]
    return subprocess.run(command, capture_output=True, env=xen_tools["env"], timeout=120)


def _last_line(stream: bytes) -> str:
    lines = stream.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_xen_converter_on_sample(xen_tools, tmp_path, name, mode):
    sample = SAMPLES[name]
    expected = EXPECTED[name][mode]
    data = (SAMPLES_DIR / sample.filename).read_bytes()
    result, target = _convert(xen_tools, tmp_path, data, width=sample.options.width, guest=sample.options.guest,
                              mode=mode)
    stderr_tail = _last_line(result.stderr)
    assert result.returncode == expected.exit_code, stderr_tail
    if expected.exit_code:
        combined = result.stderr.decode(errors="replace")
        assert expected.message in combined, stderr_tail
        return
    verified = _verify(xen_tools, target, mode.split("+")[0])
    if expected.verify_error is None:
        assert verified.returncode == 0, _last_line(verified.stderr)
    else:
        assert verified.returncode == 1
        assert expected.verify_error in verified.stderr.decode(errors="replace")


def _strip_xl_header(data: bytes) -> bytes:
    optional_data_len = int.from_bytes(data[44:48], "little")
    return data[48 + optional_data_len:]


@pytest.mark.parametrize("name", ["pv64-xl", "hvm64-xl-text"])
def test_xl_samples_convert_once_xl_has_consumed_the_header(xen_tools, tmp_path, name):
    """What libxl does: xl reads the header, the converter gets the rest (-f libxl, no -x)."""
    sample = SAMPLES[name]
    data = _strip_xl_header((SAMPLES_DIR / sample.filename).read_bytes())
    result, target = _convert(xen_tools, tmp_path, data, width=sample.options.width, guest=sample.options.guest,
                              mode="libxl")
    assert result.returncode == 0, _last_line(result.stderr)
    assert _verify(xen_tools, target, "libxl").returncode == 0


@pytest.mark.parametrize("name", ["pv64-remus", "pv64-remus-xen40"])
def test_xen_converter_reads_only_the_first_remus_checkpoint(xen_tools, tmp_path, name):
    """A Remus stream (4.5, or 4.0 from before LAST_CHECKPOINT) converts to exactly what its first checkpoint
    alone converts to, though both restorers commit the last complete checkpoint."""
    sample = SAMPLES[name]
    whole = (SAMPLES_DIR / sample.filename).read_bytes()
    first_only = build_stream(attrs.evolve(sample.options, checkpoints=1, remus=True))
    assert whole.startswith(first_only) and len(whole) > len(first_only)
    outputs = []
    for index, data in enumerate((whole, first_only)):
        directory = tmp_path / str(index)
        directory.mkdir()
        result, target = _convert(xen_tools, directory, data, width=64, guest="pv", mode="libxl")
        assert result.returncode == 0, _last_line(result.stderr)
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1]


# ---- edge cases the saver does not write, built from a sample's events with our writer -------------------


def _sample_events(name: str) -> list:
    parser = LegacyParser()
    parser.feed((SAMPLES_DIR / SAMPLES[name].filename).read_bytes())
    parser.feed(b"")
    events = []
    while (event := parser.next_event()) is not DONE:
        events.append(event)
    return events


def _rewrite(events, replace) -> bytes:
    """The stream of `events` with `replace(event)` (a list of events) written for each one."""
    sink = io.BytesIO()
    writer = LegacyWriter(sink)
    for event in events:
        writer.write_all(replace(event))
    return sink.getvalue()


def _before_end_of_body(extra):
    inserted = []

    def replace(event):
        if isinstance(event, ev.EndOfBody) and not inserted:
            inserted.append(event)
            return [*extra, event]
        return [event]

    return replace


def _batch(entries, pages: int) -> ev.PageBatch:
    return ev.PageBatch(array.array("Q", entries), memoryview(bytes(4096 * pages)))


def _first_xsave_size_off_by(delta: int):
    changed = []

    def replace(event):
        if isinstance(event, ev.VcpuXsave) and not changed:
            changed.append(event)
            return [attrs.evolve(event, size=event.size + delta)]
        return [event]

    return replace


EDGES = {
    # a batch of XTAB entries only (the saver drops it): converted into an empty PAGE_DATA, which Xen's
    # verifier rejects
    "xtab-only-batch": ("hvm64", _before_end_of_body([_batch([0xF0000000] * 3, 0)]),
                        Outcome(0, verify_error="PAGE_DATA record must be at least")),
    "xalloc-entry": ("hvm64", _before_end_of_body([_batch([0xE0000001, 2], 1)]), OK),
    "duplicate-pfn": ("hvm64", _before_end_of_body([_batch([3, 3], 2)]), Outcome(1, "Duplicate pfns in batch")),
    # LPINTAB without a table type: the restorer treats it as NOTAB, the converter passes it on, and
    # Xen's verifier rejects type 8
    "lpintab-alone": ("pv64", _before_end_of_body([_batch([0x80000005], 1)]),
                      Outcome(0, verify_error="Invalid type value")),
    "xsave-size-mismatch": ("pv64", _first_xsave_size_off_by(-8), Outcome(1, "AssertionError")),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
def test_xen_converter_on_edge_streams(xen_tools, tmp_path, edge):
    name, replace, expected = EDGES[edge]
    sample = SAMPLES[name]
    data = _rewrite(_sample_events(name), replace)
    assert data != (SAMPLES_DIR / sample.filename).read_bytes()
    result, target = _convert(xen_tools, tmp_path, data, width=sample.options.width, guest=sample.options.guest,
                              mode="libxl")
    assert result.returncode == expected.exit_code, _last_line(result.stderr)
    if expected.exit_code:
        assert expected.message in result.stderr.decode(errors="replace")
        return
    verified = _verify(xen_tools, target, "libxl")
    if expected.verify_error is None:
        assert verified.returncode == 0, _last_line(verified.stderr)
    else:
        assert verified.returncode == 1 and expected.verify_error in verified.stderr.decode(errors="replace")
