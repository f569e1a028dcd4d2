"""Every finding of the fuzz campaigns, kept: the input that showed it and the behaviour it now has.

F1 (restore target, first seconds of fuzzing; also `xenstream restore` on any libxl stream or xl save
file): the restore engine's event table had no entry for libxl records, so a KeyError escaped instead of
a restore (exit 2, "internal error"). Fixed in v2/restore.py: the libxl layer is the toolstack's and the
engine restores the libxc stream inside it.

F2 (legacy-compression target: 94 inputs/s where 1-byte chunks were drawn): a page whose Remus
compressed encoding arrives in many small COMPRESSED_DATA chunks was decoded from its first byte again
after every chunk, quadratic in the page's encoding: 0.33 s of CPU for one page sent a byte at a time,
~40 KiB of hostile input per page. Fixed in legacy/compression.py: the run scan resumes where it
stopped and a page is decoded once, when its encoding is complete.

F3 (restore target, input 65,536 on one simulated host): SimXen handed out domids by counting up
forever, so a long-lived host (the restore service keeps one for every connection) gave its 32,754th
guest the id of Xen itself (DOMID_XEN) and failed with an OverflowError (an internal error) at the
65,536th. Fixed in hv/sim/xen.py: as Xen, the next free domid, wrapping round below the reserved ids
(abi.DOMID_FIRST_RESERVED).

F4 (found reading the converter's spool while the campaign ran; the convert target's CPU cap flags the
input): the converter kept the spooled state's page types in one bytearray indexed by pfn, so a 52 KB
HVM Remus stream declaring p2m_size 0x0FFFFFFF with one checkpoint-2 page at pfn 0x0FFFFFFE made it
allocate 256 MiB and scan 268 million entries in Python (6 s of CPU, 285 MiB RSS). Fixed in
convert/transform.py: windows of 65536 pfns allocated when first touched (9 ms, 29 MiB).

F5 (legacy-parse target, the final campaign's first minutes, 8 inputs): a libxl TOOLSTACK blob whose
physmap names leave less than an entry header for the next entry made struct.error escape the v1
parser (and so `convert`, `inspect`, `restore` of v1 input: exit 2). The up-front size check counts
fixed-size entries only. Fixed in legacy/toolstack.py: each entry's header is checked before it is read.
"""

from __future__ import annotations

import array
import io
import pathlib
import struct
import subprocess
import sys
import tempfile

import pytest

from xenstream.convert.fuzz_targets import TARGETS, run_one
from xenstream.hv import abi
from xenstream.legacy import compression
from xenstream.legacy import events as lev
from xenstream.legacy.delta_encode import encode_delta
from xenstream.legacy.parser import parse_bytes
from xenstream.legacy.writer import LegacyWriter
from xenstream.hv.sim.xen import SimXen
from xenstream.v2.errors import StreamError
from xenstream.v2.libxl_records import LibxcContext, LibxlEnd
from xenstream.v2.restore import restore_new_domain
from xenstream.v2.writer import V2Writer

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz_corpus"


@pytest.fixture(scope="module")
def engine_stream() -> bytes:
    """A 64-bit PV guest saved by our v2 save engine (`fuzz_targets.seed_corpus`), as committed."""
    return (CORPUS / "restore" / "pv64-engine.libxc").read_bytes()


def wrap_libxl(libxc: bytes) -> bytes:
    out = io.BytesIO()
    writer = V2Writer(out)
    writer.libxl_header()
    writer.libxl_record(LibxcContext())
    writer.write(libxc)
    writer.libxl_record(LibxlEnd())
    return out.getvalue()


def _host() -> SimXen:
    return SimXen(capacity_frames=8192, high_memory=False)


def test_f1_restore_of_a_libxl_stream_restores_the_libxc_stream_inside(engine_stream):
    xen = _host()
    result = restore_new_domain(xen, [wrap_libxl(engine_stream)], max_vcpus=2, max_pages=1024)
    plain = restore_new_domain(xen, [engine_stream], max_vcpus=2, max_pages=1024)
    assert (result.width, result.levels, result.max_pfn, result.pages_written) == \
        (plain.width, plain.levels, plain.max_pfn, plain.pages_written)
    assert result.pages_written > 0


@pytest.mark.parametrize("sample", ["pv64-v3.xl", "hvm-v3.libxl", "pv64-remus.libxl", "bad-padding.libxl"])
def test_f1_libxl_samples_fail_cleanly_and_leave_nothing(sample):
    xen = _host()
    data = (ROOT / "samples" / "v2" / sample).read_bytes()
    with pytest.raises(StreamError) as caught:
        restore_new_domain(xen, [data], max_vcpus=2, max_pages=1024)
    assert caught.value.offset is not None
    assert not xen.domains
    assert set(xen.machine.owner) <= {abi.DOMID_XEN, 0xFFFF}


def test_f1_restore_command_on_an_xl_save_file_is_a_stream_error_not_a_crash():
    done = subprocess.run([sys.executable, "-m", "xenstream.convert", "restore",
                           str(ROOT / "samples" / "v2" / "pv64-v3.xl")], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "internal error" not in done.stderr
    assert "offset" in done.stderr


@pytest.mark.parametrize("path", sorted((CORPUS / "regressions").glob("*--*")) if (CORPUS / "regressions").is_dir() else [],
                         ids=lambda p: p.name)
def test_saved_finding_inputs_pass_their_target(path):
    """tests/fuzz_corpus/regressions/TARGET--NAME: each input a campaign found, run through its target."""
    target = TARGETS[path.name.split("--", 1)[0]]
    run_one(target, path.read_bytes())


def _many_runs_page() -> tuple[bytes, bytes, bytes]:
    """(previous, new, encoding): every other word changed, so 1024 runs of one word each."""
    previous = bytes(abi.PAGE_SIZE)
    new = bytearray(previous)
    for word in range(0, 1024, 2):
        new[4 * word:4 * word + 4] = b"\x01\x02\x03\x04"
    return previous, bytes(new), encode_delta(bytes(new), previous)


def _counting_decode_page(monkeypatch) -> list:
    calls = []
    real = compression.decode_page

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(compression, "decode_page", counted)
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 4097, 1 << 20])
def test_f2_a_page_fed_in_small_chunks_is_decoded_once(monkeypatch, chunk):
    previous, new, encoding = _many_runs_page()
    assert len(encoding) == 3072
    calls = _counting_decode_page(monkeypatch)
    store = compression.PageStore()
    store.put(7, previous)
    decoder = compression.CheckpointDecoder(store)
    decoder.announce(array.array("Q", [7]))
    out = b""
    for start in range(0, len(encoding), chunk):
        _entries, pages = decoder.decode(memoryview(encoding)[start:start + chunk], start)
        out += pages
    decoder.finish(len(encoding))
    assert out == new
    assert len(calls) == 1


def test_f2_a_remus_stream_with_one_byte_compressed_chunks_parses_the_same(monkeypatch):
    original = (ROOT / "samples" / "v1" / "pv64-remus-compressed.v1").read_bytes()
    events = parse_bytes(original)
    resplit = []
    for event in events:
        if isinstance(event, lev.CompressedData):
            resplit += [lev.CompressedData(bytes(event.data[i:i + 1])) for i in range(len(event.data))]
        else:
            resplit.append(event)
    out = io.BytesIO()
    LegacyWriter(out).write_all(resplit)
    stream = out.getvalue()
    assert len(stream) > len(original) + 28000 * 12  # one 12-byte chunk head per compressed byte
    calls = _counting_decode_page(monkeypatch)

    def decoded(evs):
        """Every decoded page in order (which chunk completes a page differs with the chunking)."""
        pages = [e for e in evs if isinstance(e, lev.DecodedPages)]
        return [entry for e in pages for entry in e.entries], b"".join(bytes(e.payload) for e in pages)

    expected = decoded(events)
    assert decoded(parse_bytes(stream)) == expected
    assert len(calls) == len(expected[0]) > 0


def test_f3_domids_wrap_below_the_reserved_ids_and_skip_live_domains():
    xen = SimXen(capacity_frames=4096, high_memory=False)
    kept = xen.create_domain()
    seen = {kept}
    for _ in range(abi.DOMID_FIRST_RESERVED):
        domid = xen.create_domain()
        assert 0 < domid < abi.DOMID_FIRST_RESERVED
        seen.add(domid)
        xen.destroy_domain(domid)
    assert len(seen) == abi.DOMID_FIRST_RESERVED - 1  # every valid id used once, 0 and the reserved never
    assert xen.create_domain() != kept  # the wrap skipped the live domain
    assert set(xen.machine.owner) <= {abi.DOMID_XEN, 0xFFFF, kept, *xen.domains}


F4_INPUT = CORPUS / "regressions" / "convert--f4-high-pfn-in-checkpoint-2"


def test_f4_one_high_pfn_in_a_later_checkpoint_converts_in_little_memory():
    """Under a 96 MiB address-space allowance (the old dense table alone needed 256 MiB)."""
    code = (
        "import os, sys\n"
        "from xenstream.convert.fuzz_targets import Caps, apply_memory_cap, reads_to_end\n"
        "from xenstream.convert.pipeline import convert_fds\n"
        "from xenstream.convert.transform import ConvertOptions\n"
        "fd_in = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fd_out = os.memfd_create('out')\n"
        "apply_memory_cap(Caps(memory_mib=96))\n"
        "result = convert_fds(fd_in, fd_out, ConvertOptions(fmt='libxl'), spool_dir=sys.argv[2])\n"
        "output = os.pread(fd_out, result.bytes_out, 0)\n"
        "print(result.summary.checkpoints, reads_to_end(output))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(F4_INPUT), tempfile.gettempdir()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].split() == ["2", "None"]  # both checkpoints folded, output reads to END


def test_f5_a_physmap_entry_header_past_the_end_of_the_toolstack_blob():
    from xenstream.legacy.errors import MalformedStream as LegacyMalformed
    from xenstream.legacy.toolstack import decode_libxl_toolstack

    name = b"x" * 29 + b"\0"
    blob = struct.pack("<II", 1, 2) + struct.pack("<QQQI", 0xF0000000, 0xF0000000, 0x800000, len(name)) + name
    blob += bytes(70 - len(blob))  # 4 bytes where entry 1's 28-byte header should start
    with pytest.raises(LegacyMalformed, match="physmap entry 1") as caught:
        decode_libxl_toolstack(blob, 32, 100)
    assert caught.value.offset == 100 + 8 + 28 + len(name)
