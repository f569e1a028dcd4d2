"""Xen's own verify-stream-v2 (xen-utils-4.17, Python 3) against our verifier on every sample of our suites.

Xen's script is loaded once in a child python3 and run over all samples (one process instead of hundreds).
Every sample must get the same verdict from both, except the two documented kinds of disagreement:

* XEN_VERIFIER_LACKS: our verifier rejects what Xen's verifier does not check at all (spec 6.1, last
  paragraph, and 6.2): Xen's restore code fails on these streams, so rejecting them is right.
* XEN_VERIFIER_WRONG: Xen's verifier rejects a stream that Xen's restore code accepts; we follow the
  restore code (spec section 8 gives each reason).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest

from tests.conftest import REPO
from tests.v2.test_verify import RULES, VALID
from tests.v2.test_verify_input import BROKEN
from xenstream.convert import compat_verify
from xenstream.v2.synth import stream_bytes
from xenstream.v2.verify import verify_bytes, verify_path

pytestmark = pytest.mark.interop

XEN_VERIFIER_LACKS = {
    # legality per guest type, phases, STATIC_DATA_END, mandatory records (spec A25)
    "hvm-record-in-pv", "pv-record-in-hvm", "page-data-before-static-data-end", "p2m-frames-before-static-data-end",
    "second-static-data-end", "v3-without-static-data-end", "no-pv-info", "no-p2m-frames", "no-hvm-context",
    "no-vcpu0-basic", "p2m-frames-before-pv-info", "shared-info-before-pv-info", "page-data-before-p2m-frames",
    # record contents Xen's restore checks and its verifier does not (spec 6.2, R8-R12, R18)
    "second-pv-info", "pv-info-width-8-levels-3", "pv-info-width-4-levels-4", "p2m-start-above-end",
    "p2m-frame-count-64bit", "p2m-frame-count-32bit", "pfn-above-p2m-range", "p2m-frame-pfn-above-range",
    "start-info-pfn-above-range", "gdt-frame-above-range", "cr3-above-range-64bit", "cr3-above-range-32bit-pae",
    "vcpu-id-not-below-max-vcpus", "vcpu-id-beyond-x86-pv-limit", "guest-type-mismatch", "basic-size-64bit", "basic-size-32bit", "extended-over-128", "xsave-under-16",
    "msrs-not-multiple-of-16", "p2m-frame-never-sent", "p2m-frame-resent-as-xtab", "start-info-never-sent",
    "start-info-is-a-page-table", "gdt-frame-is-a-page-table", "cr3-not-a-top-level-table",
    "cr3-resent-as-data-out-of-order", "user-cr1-not-a-table",
    # checkpoints, the libxl layer and the xl header (spec 4.6, 5, R16)
    "checkpoint-in-plain-stream", "libxl-record-before-libxc-context", "libxl-second-libxc-context",
    "emulator-record-in-pv", "checkpoint-end-out-of-phase", "xl-unknown-mandatory-flag",
    "xl-without-streamv2-libxc-payload",  # spec A24: Xen's verifier reads it as bare libxc; xl as a legacy stream
    # the stream as a file (spec 6.3) and its byte order (spec A14: Xen's endianness test is dead)
    "trailing-bytes", "big-endian-image",
}

XEN_VERIFIER_WRONG = {
    # spec A20: under Python 3 every non-empty EMULATOR_XENSTORE_DATA fails "Data not NUL terminated"
    "libxl-hvm-xenstore": "A20", "xenstore-after-context": "A20", "xenstore-key-characters": "A20",
    "xenstore-value-unprintable": "A20",
    # spec A13: Xen's verifier cannot follow checkpointed streams (no END, or libxl records after CHECKPOINT)
    "remus-libxc": "A13", "remus-libxl-pv": "A13", "colo-libxl-pv": "A13", "verify-in-checkpointed-stream": "A13",
    "remus-libxl-hvm-ending-with-end": "A13",
    # spec 1.3/A4: Xen's restore skips unknown optional records; its verifier rejects them (we warn)
    "unknown-optional-record": "A4",
}

# Xen's verifier raises DeprecationWarning on TOOLSTACK: "Script Error", exit 2 (spec A16); ours says 1.
XEN_EXIT_2 = {"toolstack"}

OPTIONS = {r[0]: r[2] for r in RULES} | {"colo-libxl-pv": {"colo": True}}


def _synth_samples():
    out = {}
    for guest in ("pv", "hvm"):
        for wrap in ("libxc", "libxl", "xl"):
            for version in (2, 3):
                # xenstore=False: a physmap record would hit A20
                out[f"synth-{guest}-{wrap}-v{version}"] = stream_bytes(guest=guest, pages=700, wrap=wrap, version=version,
                                                                      vcpus=2, xenstore=False)
    out["synth-pv-32bit"] = stream_bytes(guest="pv", pages=700, width=4)
    return out


SAMPLES = VALID | {r[0]: r[1] for r in RULES} | {b[0]: b[1] for b in BROKEN} | _synth_samples()

HARNESS = r"""
import importlib.machinery, json, sys, types
loader = importlib.machinery.SourceFileLoader("xen_verify_stream_v2", sys.argv[1])
script = types.ModuleType(loader.name)
loader.exec_module(script)
script.quiet = True
results = {}
for name, path, fmt in json.load(open(sys.argv[2])):
    script.fin = open(path, "rb", 0)
    try:
        results[name] = script.read_stream(fmt)
    finally:
        script.fin.close()
print(json.dumps(results))
"""


def _format(data: bytes) -> str:
    return "xl" if data.startswith(b"Xen saved") else "libxl" if data.startswith(b"LibxlFmt") else "libxc"


@pytest.fixture(scope="module")
def xen_verdicts(xen_tools, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xen-verify")
    jobs = []
    for name, data in SAMPLES.items():
        path = workdir / name
        path.write_bytes(data)
        jobs.append((name, str(path), _format(data)))
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    (workdir / "harness.py").write_text(HARNESS)
    done = subprocess.run(["python3", str(workdir / "harness.py"), xen_tools["verify"], str(workdir / "jobs.json")],
                          env=xen_tools["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), workdir


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_same_verdict_as_xen_or_a_documented_difference(xen_verdicts, name):
    verdicts, _ = xen_verdicts
    xen_rc = verdicts[name]
    ours = verify_bytes(SAMPLES[name], **OPTIONS.get(name, {}))
    if name in XEN_EXIT_2:
        assert (xen_rc, ours.ok) == (2, False)
    elif name in XEN_VERIFIER_WRONG:
        assert xen_rc == 1 and ours.ok, (XEN_VERIFIER_WRONG[name], ours.lines())
    elif name in XEN_VERIFIER_LACKS:
        assert xen_rc == 0 and not ours.ok, ours.lines()
    else:
        assert (xen_rc == 0) == ours.ok, (xen_rc, ours.lines())


def test_xen_accepts_every_valid_sample_it_can_read(xen_verdicts):
    verdicts, _ = xen_verdicts
    valid = [n for n in SAMPLES if verify_bytes(SAMPLES[n], **OPTIONS.get(n, {})).ok and n not in XEN_VERIFIER_WRONG]
    assert len(valid) > 30
    assert {n: verdicts[n] for n in valid if verdicts[n]} == {}


def test_xen_rejects_every_invalid_sample_it_checks(xen_verdicts):
    verdicts, _ = xen_verdicts
    invalid = [n for n in SAMPLES if not verify_bytes(SAMPLES[n], **OPTIONS.get(n, {})).ok
               and n not in XEN_VERIFIER_LACKS]
    assert len(invalid) > 30
    assert {n: verdicts[n] for n in invalid if verdicts[n] == 0} == {}


# The drop-in has no options for what the stream cannot say (checkpointed or not, COLO, vcpu count).
DROP_IN = sorted(n for n in set(SAMPLES) - set(XEN_VERIFIER_WRONG) - set(XEN_VERIFIER_LACKS) - XEN_EXIT_2
                 if not OPTIONS.get(n))


@pytest.mark.parametrize("name", DROP_IN)
def test_our_drop_in_exits_like_xens_script(xen_verdicts, name, capsys):
    verdicts, workdir = xen_verdicts
    rc = compat_verify.main(["-i", str(workdir / name), "-f", _format(SAMPLES[name]), "-q"])
    assert rc == verdicts[name]
    assert capsys.readouterr().out == ""


def test_drop_in_accepts_what_xens_restore_accepts_and_says_so(xen_verdicts):
    """Spec A20 and A13: where Xen's script is wrong, the drop-in follows Xen's restore code and exits 0."""
    verdicts, workdir = xen_verdicts
    for name in ("libxl-hvm-xenstore", "remus-libxl-pv", "remus-libxc"):
        assert verdicts[name] == 1
        assert compat_verify.main(["-i", str(workdir / name), "-f", _format(SAMPLES[name]), "-q"]) == 0


# ---- streams Xen itself wrote: its convert-legacy-stream's output on our v1 samples ---------------------

V1_SAMPLES = REPO / "samples" / "v1"
CONVERTED = [  # (sample, -f, extra converter options): what Xen's converter handles (test_legacy_samples_xen.py)
    *[(name, fmt, ()) for name in ("pv64", "pv32-tools32", "pv32-on-tools64", "pv64-on-tools32", "pv64-live",
                                   "pv64-verify", "pv64-broken-noxsave", "pv64-remus") for fmt in ("libxc", "libxl")],
    *[(name, fmt, ()) for name in ("hvm64", "hvm32-tools32", "hvm64-physmap", "hvm32-physmap") for fmt in ("libxc", "libxl")],
    *[(name, "libxc", ("--skip-qemu",)) for name in ("hvm64", "hvm64-qemu-record", "hvm64-remus-dm")],
]


def _sample_options(name: str):
    spec = importlib.util.spec_from_file_location("v1_make_samples_for_verify", V1_SAMPLES / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(s.options for s in module.SAMPLES if s.name == name)


@pytest.mark.parametrize("name,fmt,extra", CONVERTED, ids=[f"{n}-{f}{''.join(e)}" for n, f, e in CONVERTED])
def test_xens_converter_output_passes_the_strict_verifier(xen_tools, tmp_path, name, fmt, extra):
    options = _sample_options(name)
    target = tmp_path / "out.v2"
    done = subprocess.run([xen_tools["convert"], "-i", str(V1_SAMPLES / f"{name}.v1"), "-o", str(target),
                           "-w", str(options.width), "-g", options.guest, "-f", fmt, *extra],
                          env=xen_tools["env"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    # In -f libxc mode without --skip-qemu the converter copies the device-model record after the libxc END
    # (what libxl would read next): only the verifier that stops at END, like the drop-in, accepts that file.
    trailing_qemu = fmt == "libxc" and options.guest == "hvm" and not extra
    report = verify_path(target, fmt, trailing=not trailing_qemu)
    assert report.ok and not report.warnings, report.lines()
    assert report.version == 3 and report.checkpoints == 0
    if trailing_qemu:
        assert [e.message for e in verify_path(target, fmt).errors] == [
            f"{len(target.read_bytes()) - report.bytes_read} bytes after the end of the stream"]
