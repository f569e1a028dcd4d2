"""Compressed Remus checkpoints (spec 6): word replacement against the previous content, chunk straddling,
the switch after checkpoint 1, and every way the encoding can be wrong."""

import array

import pytest

from tests.legacy import handbuilt as hb
from xenstream.legacy import events as ev
from xenstream.legacy.compression import CheckpointDecoder, PageStore, decode_page
from xenstream.legacy.errors import MalformedStream
from xenstream.legacy.parser import parse_bytes

OLD = bytes(range(256)) * 16
NEW_WORDS = b"ABCDEFGHIJKL"


def full(page: bytes) -> bytes:
    return b"\x80" + page


def test_spec_examples_decode_as_word_replacement():
    words_0_to_2 = b"\x03" + NEW_WORDS + b"\xff" * 8 + b"\x85"
    assert len(words_0_to_2) == 22
    page, end = decode_page(words_0_to_2, 0, OLD, 5, 0)
    assert end == 22 and page == NEW_WORDS + OLD[12:]
    only_word_1 = b"\x81\x01WXYZ" + b"\xff" * 8 + b"\x86"
    assert decode_page(only_word_1, 0, OLD, 5, 0) == (OLD[:4] + b"WXYZ" + OLD[8:], 15)
    assert decode_page(b"\x00", 0, OLD, 5, 0) == (OLD, 1)
    fresh = bytes(reversed(OLD))
    assert decode_page(full(fresh), 0, None, 5, 0) == (fresh, 4097)
    every_word = b"".join(b"\x7f" + fresh[i * 508 : (i + 1) * 508] for i in range(8)) + b"\x08" + fresh[4064:]
    assert len(every_word) == 4105
    assert decode_page(every_word, 0, OLD, 5, 0) == (fresh, 4105)


def test_no_xor_is_involved():
    page, _ = decode_page(b"\x01\x00\x00\x00\x00" + b"\xff" * 8 + b"\x87", 0, OLD, 1, 0)
    assert page[:4] == bytes(4)  # XOR with zero would have kept the old word


@pytest.mark.parametrize(
    "encoding,message",
    [
        (b"\x01AAAA\x80", "zero-length run"),
        (b"\xff" * 8 + b"\x89", "overruns 4096 bytes"),
        (b"\x7f" + bytes(508) + b"\xff" * 7 + b"\x7f" + bytes(508), "overruns 4096 bytes"),
    ],
)
def test_invalid_deltas(encoding, message):
    with pytest.raises(MalformedStream, match=message):
        decode_page(encoding, 0, OLD, 1, 100)


def test_a_page_may_straddle_chunks():
    store = PageStore()
    decoder = CheckpointDecoder(store)

    decoder.announce(array.array("Q", [0xF0000000, 3, 0xD0000004, 0x10000005]))
    assert decoder.pending == 2
    encoded = full(OLD) + full(bytes(4096))
    entries, pages = decoder.decode(memoryview(encoded[:3000]), 0)
    assert len(entries) == 0 and pages == b""
    entries, pages = decoder.decode(memoryview(encoded[3000:5000]), 3000)
    assert list(entries) == [3] and pages == OLD
    entries, pages = decoder.decode(memoryview(encoded[5000:]), 5000)
    assert list(entries) == [0x10000005] and pages == bytes(4096)
    decoder.finish(9000)
    assert store.get(3) == OLD


def compressed(stream: hb.Stream, data: bytes) -> hb.Stream:
    return stream.i32(-12).ulong(len(data)).raw(data)


def remus_compressed(width: int = 64, enable: bool = True) -> hb.Stream:
    """cp1 (Format A) + ENABLE_COMPRESSION; cp2 FULL pages straddling chunks; cp3 EMPTY, delta, page table."""
    s = hb.Stream(width).pv_header(16)
    s.batch([0, 1, 2], [hb.page(1), hb.page(2), hb.page(3)])
    if enable:
        s.i32(-13)
    s.end_body().pv_tail([0])
    s.mark("cp2").batch([0, 1])
    both = full(OLD) + full(hb.page(9))
    compressed(s, both[:2000])
    s.batch([0xF0000000, 0x10000002])
    compressed(s, both[2000:] + full(hb.page(4)))
    compressed(s, b"")
    s.end_body().pv_tail([0])
    s.mark("cp3").batch([0, 1, 0x10000002])
    compressed(s, b"\x00" + b"\x03" + NEW_WORDS + b"\xff" * 8 + b"\x85")
    compressed(s, full(hb.page(5)))
    return s.end_body().pv_tail([0])


@pytest.mark.parametrize("width", [32, 64])
def test_compressed_checkpoints_decode_to_ordinary_pages(width):
    stream = remus_compressed(width)
    events = parse_bytes(stream.bytes())
    batches = [e for e in events if isinstance(e, ev.PageBatch)]
    assert [b.compressed for b in batches] == [False, True, True, True]
    assert all(b.payload is None and b.payload_length == 0 for b in batches[1:])
    decoded = [e for e in events if isinstance(e, ev.DecodedPages)]
    # the first chunk holds less than one page: nothing is complete until the second
    assert [list(d.entries) for d in decoded] == [[0, 1, 0x10000002], [0, 1], [0x10000002]]
    assert [d.pfns for d in decoded] == [[0, 1, 2], [0, 1], [2]]
    assert decoded[0].payload == OLD + hb.page(9) + hb.page(4)
    assert decoded[1].payload == OLD + NEW_WORDS + hb.page(9)[12:]  # EMPTY keeps cp2's page 0
    assert decoded[2].payload == hb.page(5)
    data = [e for e in events if isinstance(e, ev.CompressedData)]
    assert [len(d.data) for d in data] == [2000, 2 * 4097 - 2000 + 4097, 0, 23, 4097]
    assert data[0].offset == stream.marks["cp2"] + 4 + 2 * (width // 8)
    assert [e.index for e in events if isinstance(e, ev.CheckpointEnd)] == [1, 2, 3]


def test_compression_takes_effect_only_after_checkpoint_one():
    s = hb.Stream(64).pv_header(16).batch([0], [hb.page(1)]).end_body().pv_tail([0])
    s.batch([0], [hb.page(2)]).i32(-13).end_body().pv_tail([0])  # marker in checkpoint 2: no effect
    s.batch([0], [hb.page(3)]).end_body().pv_tail([0])
    batches = [e for e in parse_bytes(s.bytes()) if isinstance(e, ev.PageBatch)]
    assert [(b.compressed, bytes(b.payload)) for b in batches] == [
        (False, hb.page(1)), (False, hb.page(2)), (False, hb.page(3))
    ]


def test_compressed_data_in_an_uncompressed_checkpoint_is_malformed():
    s = hb.Stream(64).pv_header(16).batch([0], [hb.page(1)])
    compressed(s, full(OLD))
    with pytest.raises(MalformedStream, match="not compressed"):
        parse_bytes(s.bytes())


def test_delta_against_a_page_only_sent_uncompressed():
    """The saver never does this (its cache starts empty); the receiver's memory would still allow it."""
    s = hb.Stream(64).pv_header(16).batch([0], [OLD]).i32(-13).end_body().pv_tail([0])
    s.mark("cp2").batch([0])
    compressed(s, b"\x03" + NEW_WORDS + b"\xff" * 8 + b"\x85")
    s.end_body().pv_tail([0])
    with pytest.raises(MalformedStream, match="never sent since compression was enabled") as caught:
        parse_bytes(s.bytes())
    assert caught.value.offset == s.marks["cp2"] + 4 + 8 + 4 + 8
    decoded = [e for e in parse_bytes(s.bytes(), keep_all_pages=True) if isinstance(e, ev.DecodedPages)]
    assert decoded[0].payload == NEW_WORDS + OLD[12:]


def test_more_pages_than_announced():
    s = hb.Stream(64).pv_header(16).batch([0], [OLD]).i32(-13).end_body().pv_tail([0])
    s.batch([0])
    compressed(s, full(OLD) + full(OLD))
    with pytest.raises(MalformedStream, match="more pages than"):
        parse_bytes(s.bytes())


@pytest.mark.parametrize("encoded", [b"", full(OLD)[:100]])
def test_pages_missing_at_the_end_of_the_body(encoded):
    s = hb.Stream(64).pv_header(16).batch([0], [OLD]).i32(-13).end_body().pv_tail([0])
    s.batch([0])
    compressed(s, encoded)
    s.mark("end").end_body().pv_tail([0])
    with pytest.raises(MalformedStream, match="not decoded") as caught:
        parse_bytes(s.bytes())
    assert caught.value.offset == s.marks["end"]
