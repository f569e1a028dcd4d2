"""LegacyWriter against the byte layouts of the v1 spec (legacy-v1-stream.md sections 1-8, Appendix B)."""

import array
import io
import struct

import pytest

from xenstream.legacy import events as ev
from xenstream.legacy.delta_encode import DeltaEncoder, encode_delta
from xenstream.legacy.writer import LegacyWriter

PAGE = 4096


def _write(events, width=64) -> bytes:
    sink = io.BytesIO()
    writer = LegacyWriter(sink, width=width)
    for event in events:
        writer.write(event)
    return sink.getvalue()


def test_appendix_b_pv64_header_and_first_batch():
    vcpu_context = bytes(range(256)) * (0x1430 // 256) + bytes(0x1430 % 256)
    frames = tuple(range(0x100, 0x100 + 512))
    entries = array.array("Q", [0, 1, 0xC0001234])
    pages = memoryview(bytes(3 * PAGE))
    data = _write([
        ev.P2mSize(0x40000),
        ev.ExtendedInfo(0x1440, (ev.ExtendedInfoBlock(b"vcpu", vcpu_context), ev.ExtendedInfoBlock(b"extv", b""))),
        ev.P2mFrames(frames),
        ev.TscInfo(0, 123456789, 2_000_000, 1),
        ev.PageBatch(entries, pages),
    ])
    assert data[0x0000:0x0008] == bytes.fromhex("0000040000000000")
    assert data[0x0008:0x0010] == b"\xff" * 8
    assert data[0x0010:0x0014] == bytes.fromhex("40140000")
    assert data[0x0014:0x001C] == bytes.fromhex("7663707530140000")
    assert data[0x001C:0x144C] == vcpu_context
    assert data[0x144C:0x1454] == bytes.fromhex("6578747600000000")
    assert data[0x1454:0x2454] == struct.pack("<512Q", *frames)
    assert data[0x2454:0x2458] == bytes.fromhex("f9ffffff")
    assert data[0x2458:0x246C] == struct.pack("<IQII", 0, 123456789, 2_000_000, 1)
    assert data[0x246C:0x2470] == struct.pack("<i", 3)
    assert data[0x2470:0x2488] == bytes.fromhex("0000000000000000" "0100000000000000" "341200c000000000")
    assert len(data) == 0x2488 + 3 * PAGE


def test_appendix_b_hvm32_header_and_xtab_entries():
    entries = array.array("I", [0, 1, 0xF0000000, 0xF0000000])
    data = _write([
        ev.P2mSize(0x100000),
        ev.TscInfo(0, 1, 2, 3),
        ev.PageBatch(entries, memoryview(bytes(2 * PAGE))),
    ], width=32)
    assert data[0x00:0x04] == bytes.fromhex("00001000")
    assert data[0x04:0x08] == bytes.fromhex("f9ffffff")
    assert data[0x1C:0x20] == bytes.fromhex("04000000")
    assert data[0x20:0x30] == bytes.fromhex("00000000" "01000000" "000000f0" "000000f0")
    assert len(data) == 0x30 + 2 * PAGE


def test_entries_are_widened_or_narrowed_to_the_toolstack_word():
    entries = array.array("Q", [0x10000005, 0xF0000000])
    assert _write([ev.PageBatch(entries, None, compressed=True)], width=32) == struct.pack("<iII", 2, 0x10000005,
                                                                                         0xF0000000)
    entries32 = array.array("I", [0x10000005])
    assert _write([ev.PageBatch(entries32, None, compressed=True)], width=64) == struct.pack("<iQ", 1, 0x10000005)


def test_xl_header_layout():
    config = b'{"c_info": {}}\0'
    optional = struct.pack("<I", len(config)) + config
    data = _write([ev.XlHeader(1, 0, optional)])
    assert data[:32] == bytes.fromhex("58656e20736176656420646f6d61696e2c20786c20666f726d61740a2000200d")
    assert data[32:48] == bytes.fromhex("04030201" "01000000" "00000000") + struct.pack("<I", len(optional))
    assert data[48:] == optional


def test_other_wrappers():
    assert _write([ev.XendHeader(b"(domain)")]) == b"LinuxGuestRecord" + struct.pack(">i", 8) + b"(domain)"
    libvirt = _write([ev.LibvirtHeader(1, b"<domain/>\0")])
    assert libvirt[:16] == b"libvirt-xml\n \0 \r"
    assert libvirt[16:24] == struct.pack("<II", 1, 10)
    assert libvirt[24:64] == bytes(40) and libvirt[64:] == b"<domain/>\0"
    assert _write([ev.XenopsHeader()]) == b"XenSavedDomain\n"
    assert _write([ev.XlGoMessage()]) == b"domain is yours, you are cleared to unpause\0"


@pytest.mark.parametrize("width", [32, 64])
def test_chunk_layouts(width):
    word = "I" if width == 32 else "Q"
    cases = [
        (ev.EnableVerifyMode(), struct.pack("<i", -1)),
        (ev.VcpuInfo(64, (1, 1)), struct.pack("<iiQQ", -2, 64, 1, 1)),
        (ev.HvmParam(-3, 0xFEFFD000), struct.pack("<iIQ", -3, 0, 0xFEFFD000)),
        (ev.HvmParam(-21, 4, pad=7), struct.pack("<iIQ", -21, 7, 4)),
        (ev.LastCheckpoint(), struct.pack("<i", -9)),
        (ev.EnableCompression(), struct.pack("<i", -13)),
        (ev.CompressedData(b"\x00\x00"), struct.pack(f"<i{word}", -12, 2) + b"\x00\x00"),
        (ev.Toolstack(b"\x01\0\0\0\0\0\0\0"), struct.pack("<iI", -18, 8) + b"\x01" + bytes(7)),
        (ev.EndOfBody(), bytes(4)),
        (ev.UnmappedPfns((5, 9)), struct.pack(f"<I2{word}", 2, 5, 9)),
        (ev.VcpuXsave(0, 7, 3, b"abc"), struct.pack("<QQ", 7, 3) + b"abc"),
        (ev.HvmMagicPfns(1, 2, 3), struct.pack("<QQQ", 1, 2, 3)),
        (ev.HvmContext(b"ctx"), struct.pack("<I", 3) + b"ctx"),
        (ev.DeviceModelRecord0002(4), b"DeviceModelRecord0002" + struct.pack("<I", 4)),
        (ev.RemusDeviceModelState(4), b"RemusDeviceModelState" + struct.pack("<I", 4)),
        (ev.QemuDeviceModelRecord(), b"QemuDeviceModelRecord"),
        (ev.XenopsQemuRecord(4), b"QemuDeviceModelRecord\n" + struct.pack(">I", 4)),
        (ev.DeviceModelData(b"QEVM"), b"QEVM"),
    ]
    for event, expected in cases:
        assert _write([event], width=width) == expected, event


def test_tsc_info_is_packed_with_the_u64_at_payload_offset_4():
    assert _write([ev.TscInfo(3, 0x1122334455667788, 0xAABBCCDD, 9)]) == (
        bytes.fromhex("f9ffffff" "03000000" "8877665544332211" "ddccbbaa" "09000000"))


@pytest.mark.parametrize(("version", "oid_words"), [(1, 3), (0, 1)])
def test_tmem_layout(version, oid_words):
    page = bytes(range(256)) * 16
    oid = tuple(range(1, oid_words + 1))
    data = _write([
        ev.TmemHeader(version, 16, 1, 2, 3),
        ev.TmemPool(0, 0x01000001, 2, b"U" * 16),
        ev.TmemPage(0, oid, 5, page),
        ev.TmemPoolPagesEnd(0),
        ev.TmemEnd(),
        ev.TmemExtraStart(),
        ev.TmemInvalidation(0, oid, 5),
        ev.TmemExtraEnd(),
    ])
    expected = struct.pack("<iIIIIIII", -5, version, 16, 0xFFFFFFFF, 1, 2, 3, 0xFFFFFFFF)
    expected += struct.pack("<III", 0, 0x01000001, 2) + b"U" * 16
    expected += struct.pack(f"<{oid_words}QI", *oid, 5) + page
    expected += b"\xff" * 8 * oid_words
    expected += struct.pack("<I", 0xFFFFFFFF)
    expected += struct.pack(f"<iI{oid_words}QI", -6, 0, *oid, 5) + struct.pack("<I", 0xFFFFFFFF)
    assert data == expected


def test_extended_info_keeps_total_and_block_order_as_given():
    blocks = (ev.ExtendedInfoBlock(b"vcpu", bytes(0xAF0)), ev.ExtendedInfoBlock(b"xcnt", struct.pack("<I", 864)),
              ev.ExtendedInfoBlock(b"extv", b""))
    data = _write([ev.ExtendedInfo(0xB0C, blocks)], width=32)
    assert data[:8] == b"\xff\xff\xff\xff" + struct.pack("<I", 0xB0C)
    assert data[8:16] == b"vcpu" + struct.pack("<I", 0xAF0)
    assert data[16 + 0xAF0:] == b"xcnt" + struct.pack("<II", 4, 864) + b"extv" + bytes(4)


def test_derived_events_write_nothing():
    entries = array.array("Q", [1])
    derived = [
        ev.DecodedPages(entries, bytes(PAGE)),
        ev.DeviceModelEnd(4),
        ev.CheckpointEnd(1, True),
        ev.EndOfStream(1, "last-checkpoint"),
    ]
    assert _write(derived) == b""


def test_width_comes_from_detected_when_not_given():
    sink = io.BytesIO()
    writer = LegacyWriter(sink)
    with pytest.raises(ValueError, match="width unknown"):
        writer.write(ev.P2mSize(1))
    writer.write(ev.Detected(wrapper="none", width=32, guest="hvm"))
    writer.write(ev.P2mSize(0x100))
    assert sink.getvalue() == struct.pack("<I", 0x100)
    with pytest.raises(ValueError, match="32-bit toolstack"):
        writer.write(ev.Detected(wrapper="none", width=64, guest="hvm"))


def test_payload_must_match_the_entries():
    with pytest.raises(ValueError, match="announce"):
        _write([ev.PageBatch(array.array("Q", [1, 2]), memoryview(bytes(PAGE)))])


def test_invalid_width_rejected():
    with pytest.raises(ValueError):
        LegacyWriter(io.BytesIO(), width=16)


# ---- checkpoint compression (spec 6.3 and the Appendix B examples) ------------------------------------


def _words(values: dict) -> bytes:
    page = bytearray(PAGE)
    for index, value in values.items():
        page[index * 4:index * 4 + 4] = struct.pack("<I", value)
    return bytes(page)


def test_delta_words_0_to_2_changed():
    old = bytes(PAGE)
    new = _words({0: 1, 1: 2, 2: 3})
    encoded = encode_delta(new, old)
    assert encoded == b"\x03" + new[:12] + b"\xff" * 8 + b"\x85"
    assert len(encoded) == 22


def test_delta_only_word_1_changed():
    old = bytes(PAGE)
    encoded = encode_delta(_words({1: 0xDEADBEEF}), old)
    assert encoded == b"\x81\x01" + struct.pack("<I", 0xDEADBEEF) + b"\xff" * 8 + b"\x86"
    assert len(encoded) == 15


def test_delta_unchanged_and_every_word_changed():
    old = bytes(PAGE)
    assert encode_delta(old, old) == b"\x00"
    new = b"\x01" * PAGE
    encoded = encode_delta(new, old)
    expected = b"".join(b"\x7f" + new[i * 508:(i + 1) * 508] for i in range(8)) + b"\x08" + new[-32:]
    assert encoded == expected and len(encoded) == 4105


def test_sender_cache_full_then_delta_then_empty_and_page_tables_always_full():
    encoder = DeltaEncoder()
    first = bytes(PAGE)
    changed = _words({1: 5})
    assert encoder.encode(7, first, pagetable=False) == b"\x80" + first
    assert encoder.encode(7, changed, pagetable=False)[:2] == b"\x81\x01"
    assert encoder.encode(7, changed, pagetable=False) == b"\x00"
    assert encoder.encode(7, changed, pagetable=True) == b"\x80" + changed
    # a page-table send evicts the PFN: its next normal send is FULL again
    assert encoder.encode(7, changed, pagetable=False) == b"\x80" + changed


def test_sender_cache_is_lru_of_fixed_size():
    encoder = DeltaEncoder(cache_pages=2)
    page = bytes(PAGE)
    for pfn in (1, 2):
        encoder.encode(pfn, page, pagetable=False)
    encoder.encode(1, page, pagetable=False)  # 1 becomes most recently used
    encoder.encode(3, page, pagetable=False)  # evicts 2
    assert encoder.encode(1, page, pagetable=False) == b"\x00"
    assert encoder.encode(2, page, pagetable=False) == b"\x80" + page
