"""Checkpointed (Remus) v2 streams: the sender keeps checkpointing, the receiver commits only complete
checkpoints and fails over to the last one wherever the stream breaks (spec 4.7, 5.10)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.v2 import engine_support as es
from tests.v2.live_support import migrate, start_guest
from xenstream.v2 import constants as C
from xenstream.v2.checkpoint import CheckpointRestorer
from xenstream.v2.errors import TruncatedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord
from xenstream.v2.libxl_records import LibxlHeader
from xenstream.v2.reader import V2Reader
from xenstream.v2.verify import verify_bytes

SPEC = "pv64:mem=4M,vcpus=2,seed=31"


@pytest.fixture(scope="module", params=[True, False], ids=["libxl", "libxc"])
def checkpointed(request):
    return migrate(start_guest(SPEC), "uniform:rate=20000", libxl=request.param, checkpoints=3, interval=0.01)


def restore(run, stream: bytes, chunk: int = 1 << 16, head: int = 0):
    """Feed `head` bytes at once, the rest `chunk` bytes at a time."""
    xen = es.new_host(run.spec, 1)
    domid = xen.create_domain(max_vcpus=run.spec.vcpus, max_pages=run.spec.nr_pages)
    restorer = CheckpointRestorer(xen, domid, store_evtchn=es.STORE_EVTCHN, console_evtchn=es.CONSOLE_EVTCHN)
    if head:
        restorer.feed(stream[:head])
    for start in range(head, len(stream), chunk):
        restorer.feed(stream[start:start + chunk])
    return xen, restorer.finish()


def restore_reading_into_targets(run, stream: bytes, chunk: int):
    """Drive the restorer as `receive_from_fd` does: payload bytes go into `payload_targets()` when it offers
    some (at most `chunk` at a time, like a short readv), everything else through feed()."""
    xen = es.new_host(run.spec, 1)
    domid = xen.create_domain(max_vcpus=run.spec.vcpus, max_pages=run.spec.nr_pages)
    restorer = CheckpointRestorer(xen, domid, store_evtchn=es.STORE_EVTCHN, console_evtchn=es.CONSOLE_EVTCHN)
    position, direct = 0, 0
    while position < len(stream):
        targets = restorer.payload_targets()
        if targets:
            moved = 0
            for target in targets:
                take = min(len(target), chunk - moved, len(stream) - position - moved)
                target[:take] = stream[position + moved:position + moved + take]
                moved += take
                if moved == chunk or position + moved == len(stream):
                    break
            restorer.payload_filled(moved)
            direct += moved
        else:
            moved = min(chunk, len(stream) - position)
            restorer.feed(stream[position:position + moved])
        position += moved
    return xen, restorer.finish(), direct


def boundaries(stream: bytes) -> tuple[list[int], list[int]]:
    """Offsets where records (and headers) begin, plus the end; and the offsets where each checkpoint
    becomes complete (after CHECKPOINT in a bare libxc stream, after CHECKPOINT_END in a libxl one)."""
    reader = V2Reader(layer="auto", payload="views", strict=True)
    reader.feed(stream)
    reader.feed(b"")
    starts, commits, libxl = [], [], False
    pending = False
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            raise AssertionError("whole stream fed")
        if isinstance(event, (Header, LibxcRecord, LibxlRecord, EndOfStream)):
            if pending:
                commits.append(event.offset)
                pending = False
            starts.append(event.offset)
        if isinstance(event, Header) and event.header.__class__.__name__ == "LibxlHeader":
            libxl = True
        if isinstance(event, LibxcRecord) and event.type == C.REC_CHECKPOINT and not libxl:
            pending = True
        if isinstance(event, LibxlRecord) and event.type == C.LIBXL_REC_CHECKPOINT_END:
            pending = True
        if isinstance(event, EndOfStream):
            return starts, commits


def test_sender_writes_checkpoints_and_no_end(checkpointed):
    assert checkpointed.result.checkpoints == 3 == len(checkpointed.suspended)
    report = verify_bytes(checkpointed.stream, checkpointed=True)
    assert report.ok, report.errors
    _, records = boundaries(checkpointed.stream)
    assert len(records) == 3


def test_whole_stream_fails_over_to_the_last_checkpoint(checkpointed):
    xen, outcome = restore(checkpointed, checkpointed.stream)
    assert (outcome.checkpoints, outcome.failover) == (3, True)
    es.assert_same_guest(checkpointed.suspended[-1][0], es.restored_digest(xen, outcome.result),
                         es.exempt_pfns(checkpointed.guest))
    es.assert_start_info(xen, outcome.result, checkpointed.suspended[-1][1], checkpointed.guest.layout)


@pytest.mark.parametrize("chunk", [5000, 1 << 20])
def test_payloads_read_into_the_guest_give_the_same_outcome(checkpointed, chunk):
    """receive_from_fd's way: the first checkpoint's page payloads land in the guest's frames directly."""
    xen, outcome, direct = restore_reading_into_targets(checkpointed, checkpointed.stream, chunk)
    assert direct > 0
    assert (outcome.checkpoints, outcome.failover) == (3, True)
    es.assert_same_guest(checkpointed.suspended[-1][0], es.restored_digest(xen, outcome.result),
                         es.exempt_pfns(checkpointed.guest))
    es.assert_start_info(xen, outcome.result, checkpointed.suspended[-1][1], checkpointed.guest.layout)


def test_cut_at_every_record_boundary_restores_the_last_complete_checkpoint(checkpointed):
    run = checkpointed
    starts, commits = boundaries(run.stream)
    exempt = es.exempt_pfns(run.guest)
    for cut in starts:
        complete = sum(c <= cut for c in commits)
        if not complete:
            with pytest.raises(TruncatedStream):
                restore(run, run.stream[:cut])
            continue
        xen, outcome = restore(run, run.stream[:cut])
        assert outcome.checkpoints == complete, cut
        es.assert_same_guest(run.suspended[complete - 1][0], es.restored_digest(xen, outcome.result), exempt)


@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_cut_anywhere_inside_a_later_checkpoint_restores_the_previous_one(checkpointed, data):
    run = checkpointed
    _, commits = boundaries(run.stream)
    cut = data.draw(st.integers(commits[0], len(run.stream) - 1))
    # Byte-at-a-time feeding only for the tail of a short cut (the whole prefix byte by byte takes minutes).
    chunk = data.draw(st.sampled_from([1, 4096, 1 << 20])) if cut - commits[0] < 20_000 else 1 << 16
    complete = sum(c <= cut for c in commits)
    xen, outcome = restore(run, run.stream[:cut], chunk=chunk, head=commits[0])
    assert outcome.checkpoints == complete and outcome.failover
    es.assert_same_guest(run.suspended[complete - 1][0], es.restored_digest(xen, outcome.result),
                         es.exempt_pfns(run.guest))


def test_plain_live_stream_goes_straight_through():
    run = migrate(start_guest(SPEC), "uniform:rate=5000", libxl=True)
    xen, outcome = restore(run, run.stream)
    assert (outcome.checkpoints, outcome.failover, outcome.reason) == (0, False, "END")
    es.assert_same_guest(run.suspended[-1][0], es.restored_digest(xen, outcome.result), es.exempt_pfns(run.guest))


def test_a_plain_stream_cut_short_is_an_error():
    run = migrate(start_guest(SPEC), "idle")
    with pytest.raises(TruncatedStream):
        restore(run, run.stream[:-8])


def test_end_after_a_checkpoint_completes_it_and_drops_records_after_the_last_checkpoint(checkpointed):
    run = checkpointed
    starts, commits = boundaries(run.stream)
    libxl = run.stream.startswith(LibxlHeader().pack())
    tail = es._RECORD.pack(C.REC_END, 0) + (es._RECORD.pack(C.LIBXL_REC_END, 0) if libxl else b"")
    # END right at the second commit point: a clean end after checkpoint 2.
    xen, outcome = restore(run, run.stream[:commits[1]] + tail)
    assert (outcome.checkpoints, outcome.failover, outcome.reason) == (2, False, "END")
    es.assert_same_guest(run.suspended[1][0], es.restored_digest(xen, outcome.result), es.exempt_pfns(run.guest))
    # END after some records of checkpoint 3: those are dropped, checkpoint 2 stands.
    inside = next(s for s in starts if s > commits[1] + 4096)
    assert inside < commits[2]
    xen, outcome = restore(run, run.stream[:inside] + tail)
    assert (outcome.checkpoints, outcome.failover) == (2, False)
    es.assert_same_guest(run.suspended[1][0], es.restored_digest(xen, outcome.result), es.exempt_pfns(run.guest))
