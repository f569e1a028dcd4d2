"""Restoring from a regular file with payloads read by worker threads (v2/positional_fill.py) gives the
guest that in-order reading from a pipe gives, keeps a page sent twice at its later copy, reports a
payload cut short by its record, and hands a worker's I/O error to the engine's thread."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

from tests.v2 import engine_support as es
from tests.v2 import hvm_support as hs
from xenstream.hv import abi
from xenstream.hv.sim.builder_hvm import HvmGuestSpec
from xenstream.v2 import constants as C
from xenstream.v2 import positional_fill
from xenstream.v2.errors import TruncatedStream
from xenstream.v2.restore import restore_new_domain
from xenstream.v2.restore_hvm import restore_hvm_new_domain
from xenstream.v2.snapshot_hvm import hvm_snapshot

PV_SPEC = "pv64:mem=24M,vcpus=2,seed=21"


@pytest.fixture(scope="module")
def pv_source() -> es.Source:
    return es.make_source(PV_SPEC)


def _through(stream: bytes, kind: str, restore_fd):
    """restore_fd(fd) with `stream` behind a regular file or a pipe; (result, the fd's position afterwards)."""
    if kind == "file":
        with tempfile.TemporaryFile() as file:
            file.write(stream)
            file.seek(0)
            assert positional_fill.usable(file.fileno())
            result = restore_fd(file.fileno())
            return result, os.lseek(file.fileno(), 0, os.SEEK_CUR)
    read_end, write_end = os.pipe()
    assert not positional_fill.usable(read_end)

    def feed() -> None:
        with os.fdopen(write_end, "wb") as out:
            try:
                out.write(stream)
            except BrokenPipeError:
                pass

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        return restore_fd(read_end), None
    finally:
        os.close(read_end)
        writer.join()


def _restore_pv(source: es.Source, stream: bytes, kind: str):
    xen = es.new_host(source.spec, 1)

    def run(fd: int):
        return restore_new_domain(xen, fd, max_vcpus=source.spec.vcpus, max_pages=source.spec.nr_pages,
                                  store_evtchn=es.STORE_EVTCHN, console_evtchn=es.CONSOLE_EVTCHN)

    result, position = _through(stream, kind, run)
    return xen, result, position


def test_pv_restore_from_a_file_equals_restore_from_a_pipe(pv_source):
    file_xen, from_file, position = _restore_pv(pv_source, pv_source.stream, "file")
    pipe_xen, from_pipe, _ = _restore_pv(pv_source, pv_source.stream, "pipe")
    assert position == len(pv_source.stream)
    assert from_file.pages_written == from_pipe.pages_written == pv_source.spec.nr_pages
    restored = es.restored_digest(file_xen, from_file)
    assert restored == es.restored_digest(pipe_xen, from_pipe)
    es.assert_same_guest(pv_source.digest, restored, es.exempt_pfns(pv_source.guest))


def _with_page_resent(stream: bytes) -> tuple[bytes, int]:
    """`stream` with each PAGE_DATA record followed at once by a copy whose pages are all changed (their
    pfns overlap the record just submitted, which a worker may still be reading); and how many."""
    headers, records = es.split(stream)
    out, copies = [], 0
    for record in records:
        out.append(record)
        if record.type == C.REC_PAGE_DATA:
            pfns, types = es.page_data_entries(record.body)
            if all(t == abi.PAGETYPE_NOTAB for t in types):
                head = 8 + 8 * len(pfns)
                changed = bytearray(record.body)
                for k in range(len(pfns)):
                    changed[head + k * abi.PAGE_SIZE] ^= 0x5A
                out.append(es.Record(record.type, bytes(changed)))
                copies += 1
    return es.join(headers, out), copies


def test_pv_page_sent_twice_keeps_its_later_copy(pv_source):
    stream, copies = _with_page_resent(pv_source.stream)
    assert copies >= 2
    file_xen, from_file, _ = _restore_pv(pv_source, stream, "file")
    pipe_xen, from_pipe, _ = _restore_pv(pv_source, stream, "pipe")
    restored = es.restored_digest(file_xen, from_file)
    assert restored == es.restored_digest(pipe_xen, from_pipe)
    assert restored.pages != pv_source.digest.pages  # the later (changed) copies were kept


@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_pv_payload_cut_short_names_its_record(pv_source, kind):
    headers, records = es.split(pv_source.stream)
    stream = pv_source.stream
    offsets, position = [], len(headers)
    for record in records:
        offsets.append(position)
        position += 8 + len(record.body) + (-len(record.body) & 7)
    third = [offsets[i] for i, r in enumerate(records) if r.type == C.REC_PAGE_DATA][2]
    cut = third + 8 + 5000 + 3 * abi.PAGE_SIZE
    xen = es.new_host(pv_source.spec, 1)
    with pytest.raises(TruncatedStream) as caught:
        _through(stream[:cut], kind, lambda fd: restore_new_domain(
            xen, fd, max_vcpus=pv_source.spec.vcpus, max_pages=pv_source.spec.nr_pages))
    assert caught.value.offset == third
    assert "truncated PAGE_DATA payload" in str(caught.value)
    assert not xen.domains, "the half-built domain was left behind"


def test_hvm_restore_from_a_file_equals_restore_from_a_pipe():
    saved = hs.saved()
    spec = HvmGuestSpec.parse(hs.SPEC)
    results = {}
    for kind in ("file", "pipe"):
        xen = hs.host(spec, seed=99)
        result, _ = _through(saved.stream, kind, lambda fd: restore_hvm_new_domain(
            xen, fd, max_vcpus=spec.vcpus, max_pages=spec.nr_pages + 16))
        results[kind] = (hvm_snapshot(xen, result.domid), result.pages_written, result.emulator_context)
    assert results["file"] == results["pipe"]
    assert results["file"][1] > 1000  # pages were restored at all


def test_a_worker_io_error_reaches_the_engine_thread():
    read_end, write_end = os.pipe()
    os.close(write_end)
    fill = positional_fill.PositionalFill(read_end)  # preadv on a pipe: ESPIPE in the worker
    try:
        fill.submit([memoryview(bytearray(4096))], 0, 123, (0, 0))
        with pytest.raises(OSError):
            fill.wait()
    finally:
        fill.close()
        os.close(read_end)


def test_overlapping_payloads_are_read_in_submission_order(monkeypatch):
    events = []

    def slow_read(fd, buffers, offset):
        events.append(("start", offset))
        if offset == 0:
            time.sleep(0.2)  # without the overlap rule the second payload would start meanwhile
        events.append(("end", offset))
        return 0

    monkeypatch.setattr(positional_fill, "_read_into", slow_read)
    with tempfile.TemporaryFile() as file:
        fill = positional_fill.PositionalFill(file.fileno())
        try:
            fill.submit([memoryview(bytearray(8))], 0, 0, (10, 20))
            fill.submit([memoryview(bytearray(8))], 4096, 0, (20, 30))  # shares pfn 20
            fill.wait()
        finally:
            fill.close()
    assert events == [("start", 0), ("end", 0), ("start", 4096), ("end", 4096)]


def test_disjoint_payloads_are_read_at_once(monkeypatch):
    both_running = threading.Barrier(2, timeout=5)

    def meet(fd, buffers, offset):
        both_running.wait()  # raises BrokenBarrierError (handed to wait()) if they ran one after the other
        return 0

    monkeypatch.setattr(positional_fill, "_read_into", meet)
    with tempfile.TemporaryFile() as file:
        fill = positional_fill.PositionalFill(file.fileno())
        try:
            fill.submit([memoryview(bytearray(8))], 0, 0, (0, 9))
            fill.submit([memoryview(bytearray(8))], 4096, 0, (10, 19))
            fill.wait()
        finally:
            fill.close()


def _late_reads(monkeypatch) -> None:
    """Workers start each payload 50 ms late, as a busy host would: whatever the engine's own thread writes
    into guest memory meanwhile must not be overwritten by an earlier payload still to be read."""
    real = positional_fill._read_into

    def late(fd, buffers, offset):
        time.sleep(0.05)
        return real(fd, buffers, offset)

    monkeypatch.setattr(positional_fill, "_read_into", late)


def _with_last_page_resent(stream: bytes) -> tuple[bytes, int]:
    """`stream` (bare libxc) with each PAGE_DATA record of at least 4 data pages followed by a one-page
    PAGE_DATA resending its last data page, changed. That page lies beyond what the head read brings, so
    a worker reads it; the small record's whole payload comes with its head, so the engine's own thread
    copies it, possibly while the worker has yet to write the earlier copy."""
    headers, records = es.split(stream)
    out, copies = [], 0
    for record in records:
        out.append(record)
        if record.type != C.REC_PAGE_DATA:
            continue
        pfns, types = es.page_data_entries(record.body)
        data = [k for k, t in enumerate(types) if abi.pagetype_has_data(t)]
        if len(data) < 4 or types[data[-1]] != abi.PAGETYPE_NOTAB:
            continue
        at = 8 + 8 * len(pfns) + (len(data) - 1) * abi.PAGE_SIZE
        page = bytearray(record.body[at:at + abi.PAGE_SIZE])
        page[0] ^= 0x5A
        head = es.set_page_entry(bytes(16), 0, pfns[data[-1]], abi.PAGETYPE_NOTAB)  # one entry
        out.append(es.Record(record.type, (1).to_bytes(4, "little") + head[4:] + bytes(page)))
        copies += 1
    return es.join(headers, out), copies


def test_pv_page_resent_while_its_first_copy_is_still_being_read(pv_source, monkeypatch):
    stream, copies = _with_last_page_resent(pv_source.stream)
    assert copies >= 2
    pipe_xen, from_pipe, _ = _restore_pv(pv_source, stream, "pipe")
    _late_reads(monkeypatch)
    file_xen, from_file, _ = _restore_pv(pv_source, stream, "file")
    restored = es.restored_digest(file_xen, from_file)
    assert restored == es.restored_digest(pipe_xen, from_pipe)
    assert restored.pages != pv_source.digest.pages  # the later (changed) copies were kept


def test_hvm_page_resent_while_its_first_copy_is_still_being_read(monkeypatch):
    saved = hs.saved(libxl=False)
    spec = HvmGuestSpec.parse(hs.SPEC)
    stream, copies = _with_last_page_resent(saved.stream)
    assert copies >= 2
    results = {}
    for kind in ("pipe", "file"):
        if kind == "file":
            _late_reads(monkeypatch)
        xen = hs.host(spec, seed=99)
        result, _ = _through(stream, kind, lambda fd: restore_hvm_new_domain(
            xen, fd, max_vcpus=spec.vcpus, max_pages=spec.nr_pages + 16))
        results[kind] = hvm_snapshot(xen, result.domid)
    assert results["file"] == results["pipe"]
    assert results["file"].pages != saved.digest.pages  # the later (changed) copies were kept
