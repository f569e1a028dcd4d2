"""Fuzz targets: every way xenstream reads untrusted bytes, each with the properties that must hold.

A target is a function of the input bytes that returns normally when every property held and raises
otherwise: `Violation` for a broken property, or whatever unexpected exception escaped the code under
test (which is itself the finding). The properties, beyond "no crash":

* only the project's own error family escapes (`xenstream.legacy.errors` / `xenstream.v2.errors`),
  with an offset inside the input and a one-line message, and errors are the same whatever the chunking
  of the input (sans-IO parsers must not care how the bytes arrive);
* a conversion that raises never wrote END (no complete-looking output), and one that succeeds wrote a
  stream our strict verifier accepts;
* a restore that raises left no domain and no frame behind in the simulated hypervisor;
* the verifier never raises: every input gives a report, the same from memory and from an fd;
* each input stays under the caps of `Caps` (address space, seconds), enforced by `capped`.

The variant of each run (parser options, chunk size, output format, payload mode) is drawn from a CRC
of the input, so an input always replays the same way: a crashing file is its own regression test.

Targets: legacy-parse, legacy-compression, v2-read, v2-verify, convert, restore, restore-hvm (see `TARGETS`).
"""

from __future__ import annotations

import array
import contextlib
import os
import resource
import signal
import struct
import time
import zlib
from typing import Callable

import attrs

from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import AUTO_FORMAT, FORMATS, ConvertOptions
from xenstream.hv import abi
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy import constants as legacy_constants
from xenstream.legacy.compression import CheckpointDecoder, PageStore
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.legacy.events import PageBatch
from xenstream.legacy.parser import DONE, LegacyParser
from xenstream.legacy.parser import NEED_DATA as LEGACY_NEED_DATA
from xenstream.v2 import constants as C
from xenstream.v2.errors import StreamError as V2StreamError
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxcRecord, LibxlRecord, PagePayload
from xenstream.v2.reader import LAYERS, V2Reader
from xenstream.v2.restore import restore_new_domain
from xenstream.v2.restore_hvm import restore_hvm_new_domain
from xenstream.v2.verify import FORMATS as VERIFY_FORMATS
from xenstream.v2.verify import verify_bytes, verify_fd
from xenstream.v2.verify_report import Report
from xenstream.v2.writer import encode_page_data_header

PROJECT_ERRORS = (LegacyStreamError, V2StreamError)


class Violation(AssertionError):
    """A property of the target did not hold for this input."""


class InputTooSlow(BaseException):
    """Raised in the target by the per-input timer. A BaseException so `except Exception` cannot eat it."""


@attrs.frozen
class Caps:
    """Limits per input: address-space growth allowed over the process at start, and seconds of CPU."""

    memory_mib: int = 1024
    seconds: float = 2.0


def apply_memory_cap(caps: Caps) -> int:
    """Set RLIMIT_AS to the current address space plus the cap; returns the limit in bytes."""
    with open("/proc/self/status") as status:
        size_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kib * 1024 + caps.memory_mib * (1 << 20)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def _too_slow(_signum, _frame):
    raise InputTooSlow("the input ran past the CPU-time cap")


@contextlib.contextmanager
def capped(caps: Caps):
    """Run the body under the per-input time cap; a MemoryError under the address-space cap is a finding.

    The timer counts CPU time (ITIMER_PROF): wall time on a shared machine is noise, and SIGALRM belongs to
    libFuzzer's own (wall-clock) timeout, which stays as the backstop for a hang that holds the GIL.
    """
    previous = signal.signal(signal.SIGPROF, _too_slow)
    signal.setitimer(signal.ITIMER_PROF, caps.seconds)
    try:
        yield
    except MemoryError as exc:
        raise Violation(f"the input exceeded the memory cap ({caps.memory_mib} MiB): {exc!r}") from exc
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


# ------------------------------------------------------------------ shared checks


def _pick(data: bytes, salt: int, choices):
    """A choice that depends only on the input (and the salt), so a saved input replays identically."""
    return choices[zlib.crc32(data, salt) % len(choices)]


def _check_error(exc: Exception, family, data: bytes, where: str) -> None:
    if not isinstance(exc, family):
        raise exc
    if not isinstance(exc.offset, int) or not 0 <= exc.offset <= len(data):
        raise Violation(f"{where}: {type(exc).__name__} offset {exc.offset!r} outside the {len(data)}-byte input: {exc}")
    if "\n" in str(exc):
        raise Violation(f"{where}: error message is not one line: {str(exc)!r}")


def _check_offsets(trace: list[tuple[str, int]], data: bytes, where: str) -> None:
    last = 0
    for name, offset in trace:
        if not last <= offset <= len(data):
            raise Violation(f"{where}: {name} at offset {offset} after {last} (input {len(data)} bytes)")
        last = offset


def _outcome(run: Callable[[list], None], family, data: bytes, where: str):
    """(trace, error) of one driven parse; error is (type name, offset) or None."""
    trace: list = []
    try:
        run(trace)
    except Exception as exc:  # noqa: BLE001 - sorted into ours (recorded) and anything else (re-raised)
        _check_error(exc, family, data, where)
        return trace, (type(exc).__name__, exc.offset)
    return trace, None


CHUNK_SIZES = (1 << 30, 4093, 509, 61, 7)


def _chunk_size(data: bytes, salt: int) -> int:
    size = _pick(data, salt, CHUNK_SIZES)
    # Small chunks only for small inputs: the per-feed cost times a 100 KiB input is most of the time of
    # an instrumented run (the parsers' own tests feed whole streams a byte at a time).
    return size if size >= 4093 or len(data) <= 8192 else 4093


# ------------------------------------------------------------------ legacy v1 parser


_WIDTH_CHOICES = (None, 32, 64)
_GUEST_CHOICES = (None, "pv", "hvm")
_XL_CHOICES = (None, True, False)


def _drive_legacy(data: bytes, chunk: int, trace: list, *, passthrough: bool, **options) -> None:
    parser = LegacyParser(passthrough=passthrough, **options)
    position = 0
    while True:
        event = parser.next_event()
        if event is LEGACY_NEED_DATA:
            piece = data[position:position + chunk]
            position += len(piece)
            parser.feed(piece)
            continue
        if event is DONE:
            return
        if type(event).__name__ != "PageData":  # pieces follow the chunking; everything else must not
            trace.append((type(event).__name__, event.offset))
        if passthrough and isinstance(event, PageBatch) and parser.payload_pending:
            # Like the pipeline: the buffered part through Python, the rest "moved" by the driver.
            while parser.payload_pending and parser.take_payload():
                pass
            moved = min(parser.payload_pending, len(data) - position)
            position += moved
            parser.consumed_externally(moved)
            if parser.payload_pending:
                parser.feed(b"")


def fuzz_legacy_parse(data: bytes) -> None:
    """The v1 parser: detection, then one forced variant in one payload mode, whole and chunked."""
    detected, detect_error = _outcome(lambda t: _drive_legacy(data, 1 << 30, t, passthrough=False),
                                      LegacyStreamError, data, "legacy detect")
    _check_offsets(detected, data, "legacy detect")
    options = dict(width=_pick(data, 1, _WIDTH_CHOICES), guest=_pick(data, 2, _GUEST_CHOICES),
                   xl=_pick(data, 3, _XL_CHOICES))
    passthrough = bool(_pick(data, 4, (0, 1)))
    if not passthrough:
        options["keep_all_pages"] = bool(_pick(data, 5, (0, 1)))
    chunk = _chunk_size(data, 6)
    whole = _outcome(lambda t: _drive_legacy(data, 1 << 30, t, passthrough=passthrough, **options),
                     LegacyStreamError, data, f"legacy {options}")
    pieces = _outcome(lambda t: _drive_legacy(data, chunk, t, passthrough=passthrough, **options),
                      LegacyStreamError, data, f"legacy {options} chunk {chunk}")
    _check_offsets(whole[0], data, f"legacy {options}")
    if whole != pieces:
        raise Violation(f"legacy {options} passthrough={passthrough}: fed whole gives {_tail(whole)}, "
                        f"in {chunk}-byte chunks {_tail(pieces)}")
    undecided = options["width"] is None and options["guest"] is None and options["xl"] is None
    if undecided and not passthrough and not options["keep_all_pages"] and (detected, detect_error) != whole:
        raise Violation(f"legacy detection differs between two identical runs: {_tail((detected, detect_error))} "
                        f"vs {_tail(whole)}")


def _tail(outcome) -> str:
    trace, error = outcome
    return f"{len(trace)} events ending {trace[-3:]}, error {error}"


# ------------------------------------------------------------------ legacy compression decoder


def fuzz_legacy_compression(data: bytes) -> None:
    """The Remus delta decoder (spec 6) on its own: announced entries, previous pages, compressed bytes.

    Input layout: u8 n, then n entry bytes (type nibble << 4 | pfn), then a u16 bitmap of the pfns that
    have a previous content, then the compressed data. The same data decoded in one piece and in chunks
    must give the same pages and the same error.
    """
    if len(data) < 3:
        return
    count = data[0] % 32
    entry_bytes = data[1:1 + count]
    if len(entry_bytes) < count or len(data) < 3 + count:
        return
    (known,) = struct.unpack_from("<H", data, 1 + count)
    compressed = data[3 + count:]
    entries = array.array("Q", ((byte >> 4) << legacy_constants.TYPE_SHIFT | (byte & 0xF) for byte in entry_bytes))
    chunk = _pick(data, 7, (1 << 30, 4097, 1000, 13, 1 if len(data) <= 2048 else 3))
    whole = _decode(entries, known, compressed, len(compressed) or 1)
    pieces = _decode(entries, known, compressed, chunk)
    # Pages completed in the chunk that fails are not returned, so compare pages only when both succeed.
    if whole[1:] != pieces[1:] or (whole[1] is None and whole[0] != pieces[0]):
        raise Violation(f"compression decoder: whole {whole[1:]} / {len(whole[0])} bytes, "
                        f"in {chunk}-byte chunks {pieces[1:]} / {len(pieces[0])} bytes")


def _decode(entries, known: int, compressed: bytes, chunk: int):
    store = PageStore()
    for pfn in range(16):
        if known >> pfn & 1:
            store.put(pfn, bytes([pfn]) * abi.PAGE_SIZE)
    decoder = CheckpointDecoder(store)
    decoder.announce(entries)
    announced = decoder.pending
    out = bytearray()
    decoded = 0
    try:
        for start in range(0, len(compressed), chunk):
            done, pages = decoder.decode(memoryview(compressed)[start:start + chunk], start)
            if len(pages) != len(done) * abi.PAGE_SIZE:
                raise Violation(f"decoder returned {len(pages)} bytes for {len(done)} pages")
            decoded += len(done)
            out += pages
        decoder.finish(len(compressed))
    except LegacyStreamError as exc:
        _check_error(exc, LegacyStreamError, compressed, "compression decoder")
        return bytes(out), type(exc).__name__, exc.offset
    if decoded != announced:
        raise Violation(f"decoder finished cleanly with {decoded} of {announced} announced pages decoded")
    return bytes(out), None, None


# ------------------------------------------------------------------ v2 reader


def _drive_v2(data: bytes, chunk: int, trace: list, *, payload: str, **options) -> None:
    reader = V2Reader(payload=payload, **options)
    position = 0
    expected_payload = 0
    seen_payload = 0
    while True:
        if reader.payload_remaining:
            while reader.buffered and reader.payload_remaining:
                seen_payload += len(reader.take_payload())
            moved = min(reader.payload_remaining, len(data) - position)
            position += moved
            seen_payload += moved
            if moved:
                reader.payload_consumed(moved)
            if reader.payload_remaining:
                reader.feed(b"")
                position = len(data)
        event = reader.next_event()
        if event is NEED_DATA:
            piece = data[position:position + chunk]
            position += len(piece)
            reader.feed(piece)
            continue
        if isinstance(event, PagePayload):
            seen_payload += len(event.data)
            continue
        trace.append((type(event).__name__, event.offset))
        if isinstance(event, LibxcRecord) and event.type == C.REC_PAGE_DATA:
            if seen_payload != expected_payload:
                raise Violation(f"PAGE_DATA payloads: {seen_payload} bytes delivered, {expected_payload} announced")
            expected_payload += event.body.payload_length
        if isinstance(event, EndOfStream):
            if seen_payload != expected_payload:
                raise Violation(f"PAGE_DATA payloads: {seen_payload} bytes delivered, {expected_payload} announced")
            if reader.next_event() != event:
                raise Violation("the reader did not keep returning EndOfStream after the end")
            return


def fuzz_v2_read(data: bytes) -> None:
    """The v2 reader in one layer, payload mode and strictness: whole and chunked must agree."""
    options = dict(layer=_pick(data, 11, LAYERS), strict=bool(_pick(data, 12, (0, 1))),
                   colo=bool(_pick(data, 13, (0, 0, 1))))
    payload = _pick(data, 14, ("views", "passthrough"))
    chunk = _chunk_size(data, 15)
    whole = _outcome(lambda t: _drive_v2(data, 1 << 30, t, payload=payload, **options), V2StreamError, data,
                     f"v2 {options} {payload}")
    pieces = _outcome(lambda t: _drive_v2(data, chunk, t, payload=payload, **options), V2StreamError, data,
                      f"v2 {options} {payload} chunk {chunk}")
    _check_offsets(whole[0], data, f"v2 {options}")
    if whole != pieces:
        raise Violation(f"v2 {options} {payload}: fed whole gives {_tail(whole)}, in {chunk}-byte chunks {_tail(pieces)}")


# ------------------------------------------------------------------ v2 verifier


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("xenstream-fuzz", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fuzz_v2_verify(data: bytes) -> None:
    """The verifier never raises; from memory (views) and from an fd (passthrough) it agrees."""
    options = dict(checkpointed=_pick(data, 21, (None, True, False)), colo=bool(_pick(data, 22, (0, 0, 1))),
                   guest=_pick(data, 23, (None, "pv", "hvm")), max_vcpus=_pick(data, 24, (None, 1, 64)))
    fmt = _pick(data, 25, VERIFY_FORMATS)
    in_memory = verify_bytes(data, fmt, **options)
    fd = _memfd(data)
    try:
        from_fd = verify_fd(fd, fmt, **options)
    finally:
        os.close(fd)
    for report in (in_memory, from_fd):
        if not isinstance(report, Report):
            raise Violation(f"verifier returned {report!r}")
        for line in report.lines():
            if "\n" in line:
                raise Violation(f"verifier finding is not one line: {line!r}")
    # The same verdict and the same first error (where and what record); the wording may differ in detail
    # (views count whole pages still expected, passthrough counts bytes).
    if in_memory.ok != from_fd.ok or _first_error(in_memory) != _first_error(from_fd):
        raise Violation(f"verify {fmt} {options}: in memory {in_memory.lines()[:1]} ok={in_memory.ok}, "
                        f"from an fd {from_fd.lines()[:1]} ok={from_fd.ok}")


def _first_error(report: Report):
    if not report.errors:
        return None
    first = report.errors[0]
    return first.offset, first.layer, first.index, first.record


# ------------------------------------------------------------------ converter


def wrote_end(output: bytes) -> bool:
    """Whether the bytes hold a libxc or libxl END record: what makes a v2 stream look complete."""
    reader = V2Reader(layer="auto", strict=False)
    reader.feed(output)
    reader.feed(b"")
    try:
        while True:
            event = reader.next_event()
            if isinstance(event, LibxcRecord) and event.type == C.REC_END:
                return True
            if isinstance(event, LibxlRecord) and event.type == C.LIBXL_REC_END:
                return True
            if isinstance(event, EndOfStream):
                return event.complete
    except V2StreamError:
        return False


def reads_to_end(output: bytes) -> str | None:
    """Why the strict reader cannot follow the output to a complete END (None: it can)."""
    reader = V2Reader(layer="auto", strict=True)
    reader.feed(output)
    reader.feed(b"")
    try:
        while not isinstance(event := reader.next_event(), EndOfStream):
            pass
    except V2StreamError as exc:
        return str(exc)
    return None if event.complete else "the output stops at a checkpoint, without END"


def fuzz_convert(data: bytes) -> None:
    """v1 bytes in, v2 bytes out, through the real fd pipeline (memfds).

    A conversion that raises must not have written END. One that succeeds must have written a stream
    the strict reader follows to its END: framing, lengths, padding, reserved fields. (Whether the guest
    state it carries would restore is the verifier's question: a v1 stream whose vcpu context names a
    bad cr3 converts faithfully, and `convert --verify` rejects it.)
    """
    options = ConvertOptions(fmt=_pick(data, 31, (*FORMATS, AUTO_FORMAT)), checkpoints=bool(_pick(data, 32, (0, 1))),
                             drop_tmem=bool(_pick(data, 33, (0, 1))), skip_qemu=bool(_pick(data, 34, (0, 0, 1))))
    fd_in = _memfd(data)
    fd_out = os.memfd_create("xenstream-fuzz-out", os.MFD_CLOEXEC)
    spool = os.environ.get("TMPDIR", "/tmp")
    try:
        try:
            convert_fds(fd_in, fd_out, options, spool_dir=spool)
            failure = None
        except PROJECT_ERRORS as exc:
            _check_error(exc, PROJECT_ERRORS, data, f"convert {options}")
            failure = exc
        size = os.lseek(fd_out, 0, os.SEEK_END)
        output = os.pread(fd_out, size, 0) if size else b""
    finally:
        os.close(fd_in)
        os.close(fd_out)
    if failure is not None:
        if wrote_end(output):
            raise Violation(f"convert {options} raised {failure!r} after writing END ({len(output)} bytes out)")
        return
    broken = reads_to_end(output)
    if broken:
        raise Violation(f"convert {options} accepted the input but wrote a stream the reader cannot follow: {broken}")


# ------------------------------------------------------------------ restore engine


_HOST_FRAMES = 8192
_host: SimXen | None = None


def _sim_host() -> SimXen:
    """One simulated host for all inputs (building one per input would dominate); it must stay empty."""
    global _host
    if _host is None:
        _host = SimXen(capacity_frames=_HOST_FRAMES, high_memory=False)
    return _host


def _leftovers(xen: SimXen) -> str | None:
    if xen.domains:
        return f"domains {sorted(xen.domains)} left behind"
    owners = set(xen.machine.owner) - {abi.DOMID_XEN, 0xFFFF}
    if owners:
        return f"frames still owned by domains {sorted(owners)}"
    return None


def fuzz_restore(data: bytes) -> None:
    """The PV restore engine on the simulated Xen: a failed restore leaves nothing behind. Inputs are fed in
    chunks, or (chosen by the input) read from a regular file, where worker threads fill the payloads."""
    _restore_leaves_nothing(data, restore_new_domain, "restore", max_pages=1024)


def fuzz_restore_hvm(data: bytes) -> None:
    """The HVM restore engine on the simulated Xen, under the same property as fuzz_restore."""
    _restore_leaves_nothing(data, restore_hvm_new_domain, "restore-hvm", max_pages=1024 + 64)


def _restore_leaves_nothing(data: bytes, restore, where: str, *, max_pages: int) -> None:
    xen = _sim_host()
    chunk = _chunk_size(data, 41)
    max_vcpus = _pick(data, 42, (1, 2, 4))
    from_file = _pick(data, 43, (False, True))
    fd = _memfd(data) if from_file else None
    try:
        source = fd if fd is not None else (data[i:i + chunk] for i in range(0, len(data), chunk))
        result = restore(xen, source, max_vcpus=max_vcpus, max_pages=max_pages, store_evtchn=1, console_evtchn=2)
    except PROJECT_ERRORS as exc:
        _check_error(exc, V2StreamError, data, where)
        left = _leftovers(xen)
        if left:
            _reset_host()
            raise Violation(f"{where} raised {exc!r} and left {left}") from exc
        return
    except BaseException:
        _reset_host()  # the finding is reported by the caller; the next input needs a clean host
        raise
    finally:
        if fd is not None:
            os.close(fd)
    xen.destroy_domain(result.domid)
    left = _leftovers(xen)
    if left:
        _reset_host()
        raise Violation(f"after destroying the restored domain: {left}")


def _reset_host() -> None:
    global _host
    _host = None


# ------------------------------------------------------------------ registry


@attrs.frozen
class Target:
    name: str
    run: Callable[[bytes], None]
    kind: str  # which structure-aware mutator fits: "v1", "v2" or "compression"
    max_len: int  # libFuzzer -max_len: room for the largest seed and some growth


TARGETS = {target.name: target for target in (
    Target("legacy-parse", fuzz_legacy_parse, "v1", 1 << 18),
    Target("legacy-compression", fuzz_legacy_compression, "compression", 1 << 15),
    Target("v2-read", fuzz_v2_read, "v2", 1 << 18),
    Target("v2-verify", fuzz_v2_verify, "v2", 1 << 18),
    Target("convert", fuzz_convert, "v1", 1 << 18),
    Target("restore", fuzz_restore, "v2", 1 << 19),
    Target("restore-hvm", fuzz_restore_hvm, "v2", 1 << 19),
)}


def run_one(target: Target, data: bytes, caps: Caps = Caps()) -> float:
    """Run one input under the caps; returns its seconds. Raises the finding, if any."""
    started = time.monotonic()
    with capped(caps):
        target.run(data)
    return time.monotonic() - started




# ------------------------------------------------------------------ seeds from our own writers


def _v1_seeds() -> dict[str, bytes]:
    from xenstream.legacy.build import BuildOptions, build_stream

    pv = dict(guest="pv", pages=18, holes=1, vcpus=1)
    hvm = dict(guest="hvm", pages=8, holes=1, vcpus=1, device_model_size=64)
    shapes = {
        "pv64-2vcpu": dict(pv, vcpus=2, max_vcpus=3, pages=19),
        "pv32": dict(pv, width=32, pages=14),
        "pv64-remus-compressed": dict(pv, checkpoints=3, compression=True),
        "pv64-tmem-live": dict(pv, tmem=True, live_iterations=1),
        "pv64-xl-go": dict(pv, wrapper="xl", go_message=True, broken_pages=1),
        "hvm64-remus": dict(hvm, checkpoints=2, toolstack=False, device_model="RemusDeviceModelState"),
        "hvm32-xenops": dict(hvm, width=32, wrapper="xenops", toolstack=False, device_model="XenopsQemuRecord"),
    }
    return {f"{name}.v1": build_stream(BuildOptions(seed=index, **shape)) for index, (name, shape) in enumerate(shapes.items())}


def _v2_seeds() -> dict[str, bytes]:
    from xenstream.v2.synth import stream_bytes

    shapes = {
        "pv64-v3.libxc": dict(guest="pv", pages=7, vcpus=2),
        "pv32-v2.libxc": dict(guest="pv", pages=7, width=4, version=2),
        "hvm-v3.xl": dict(guest="hvm", pages=8, wrap="xl"),
        "pv64-remus.libxl": dict(guest="pv", pages=7, wrap="libxl", checkpoints=2),
    }
    return {name: stream_bytes(seed=index, **shape) for index, (name, shape) in enumerate(shapes.items())}


def _restore_seeds() -> dict[str, bytes]:
    """Streams the engine restores completely: saved by our v2 save engine from guests built on the simulator."""
    import io

    from xenstream.hv.sim.builder import GuestSpec, build_guest
    from xenstream.hv.sim.guest import PvGuest
    from xenstream.v2.libxl_records import LibxcContext, LibxlEnd
    from xenstream.v2.save import save_pv
    from xenstream.v2.writer import V2Writer

    seeds = {}
    for name, text in (("pv64-engine.libxc", "pv64:mem=256K,vcpus=2,seed=3"), ("pv32-engine.libxc", "pv32:mem=256K,seed=4")):
        spec = GuestSpec.parse(text)
        xen = SimXen(capacity_frames=4 * spec.nr_pages + 4096, high_memory=False)
        built = build_guest(xen, spec)
        guest = PvGuest(xen, built.domid, built.layout)
        out = io.BytesIO()

        def suspend(guest=guest) -> bool:
            guest.suspend()
            return True

        save_pv(xen, guest.domid, V2Writer(out), suspend)
        seeds[name] = out.getvalue()
    # The same stream inside a libxl stream, as `xl save` and libxl migration carry it.
    wrapped = io.BytesIO()
    writer = V2Writer(wrapped)
    writer.libxl_header()
    writer.libxl_record(LibxcContext())
    writer.write(seeds["pv64-engine.libxc"])
    writer.libxl_record(LibxlEnd())
    seeds["pv64-engine.libxl"] = wrapped.getvalue()
    return seeds


def _restore_hvm_seeds() -> dict[str, bytes]:
    """An HVM guest saved by our v2 HVM engine, thinned to fit a fuzzer's input: the first 16 RAM pages and
    every special page (the records restore checks against them stay); bare and inside a libxl stream."""
    import io

    from xenstream.hv.sim.builder_hvm import HvmGuest, HvmGuestSpec, build_hvm_guest
    from xenstream.v2.save_hvm import save_hvm, save_hvm_libxl
    from xenstream.v2.writer import V2Writer

    spec = HvmGuestSpec.parse("hvm:mem=1M,vcpus=2,seed=5")
    seeds = {}
    for name, libxl in (("hvm-engine.libxc", False), ("hvm-engine.libxl", True)):
        xen = SimXen(capacity_frames=spec.nr_pages + 4096, high_memory=False)
        guest = HvmGuest(xen, build_hvm_guest(xen, spec))

        def suspend(guest=guest) -> bool:
            guest.suspend()
            return True

        out = io.BytesIO()
        if libxl:
            save_hvm_libxl(xen, guest.domid, V2Writer(out), suspend, lambda guest=guest: guest.built.emulator)
        else:
            save_hvm(xen, guest.domid, V2Writer(out), suspend)
        seeds[name] = _thinned(out.getvalue(), lambda gfn: gfn < 16 or gfn >= spec.nr_pages)
    return seeds


def _thinned(stream: bytes, keep) -> bytes:
    """`stream` with each PAGE_DATA record cut to the data pages of the gfns `keep` accepts (records left
    with none dropped); every other record and the headers as they are."""
    reader = V2Reader(layer="auto")
    reader.feed(stream)
    reader.feed(b"")
    out, position = bytearray(), 0
    while not isinstance(event := reader.next_event(), EndOfStream):
        if not (isinstance(event, LibxcRecord) and event.type == C.REC_PAGE_DATA):
            continue
        out += stream[position:event.offset]
        position = event.offset + 8 + event.length + (-event.length & 7)
        head = event.offset + 16 + 8 * len(event.body.pfns)
        pfns, types, pages, data_index = [], [], [], 0
        for pfn, page_type in zip(event.body.pfns, event.body.types):
            has_data = abi.pagetype_has_data(page_type)
            if has_data and keep(pfn):
                pfns.append(pfn)
                types.append(page_type)
                pages.append(stream[head + data_index * abi.PAGE_SIZE:head + (data_index + 1) * abi.PAGE_SIZE])
            data_index += has_data
        if pfns:
            out += encode_page_data_header(pfns, types) + b"".join(pages)
    return bytes(out + stream[position:])


def _compression_seeds() -> dict[str, bytes]:
    from xenstream.legacy.delta_encode import encode_delta

    def previous(pfn: int) -> bytes:
        return bytes([pfn]) * abi.PAGE_SIZE

    changed = bytearray(previous(3))
    changed[100:140] = bytes(range(40))
    changed[4000:4004] = b"\x01\x02\x03\x04"
    pages = {
        "full-empty-delta": ([0x00, 0x11, 0x03], 0b1010, [b"\x80" + bytes(range(256)) * 16, encode_delta(previous(1), previous(1)),
                                                          encode_delta(bytes(changed), previous(3))]),
        "delta-only": ([0x03], 0b1000, [encode_delta(bytes(changed), previous(3))]),
        "pagetable-full": ([0x12, 0x24], 0, [b"\x80" + bytes(4096), b"\x80" + b"\xff" * 4096]),
    }
    return {name: bytes([len(entries)]) + bytes(entries) + struct.pack("<H", known) + b"".join(encoded)
            for name, (entries, known, encoded) in pages.items()}


_SEEDS = {"v1": _v1_seeds, "v2": _v2_seeds, "compression": _compression_seeds}


def seed_corpus(target: Target) -> dict[str, bytes]:
    """Small valid inputs for the target, written by our own writers (name -> bytes)."""
    if target.name == "restore":
        return _restore_seeds()
    if target.name == "restore-hvm":
        return _restore_hvm_seeds()
    return _SEEDS[target.kind]()
