"""The legacy HVM save engine: v1 HVM images as Xen 4.5 + libxl wrote them, from simulated HVM guests,
and the way back: legacy save -> convert -> restore gives the guest a v2 save of the same seed gives."""

from __future__ import annotations

import pytest

from tests.v2 import hvm_support as hs
from xenstream.convert.commands.restore import legacy_chunks
from xenstream.hv import abi, hvm_params
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.legacy.save import LegacySaveError
from xenstream.legacy.save_hvm import PARAM_CHUNK_ORDER, save_hvm_legacy
from xenstream.v2 import constants as C
from xenstream.v2.snapshot_hvm import hvm_snapshot

SPEC = hs.SPEC
NOT_IN_V1 = {hvm_params.X87_FIP_WIDTH, hvm_params.MCA_CAP}


def parse(stream: bytes) -> list[ev.Event]:
    parser = LegacyParser()
    parser.feed(stream)
    parser.feed(b"")
    out = []
    while (event := parser.next_event()) is not DONE:
        assert event is not NEED_DATA
        out.append(event)
    return out


@pytest.fixture(scope="module", params=[64, 32])
def legacy(request):
    stream, xen, guest = hs.save_v1(SPEC, request.param)
    return request.param, stream, xen, guest


@pytest.fixture(scope="module")
def v2_reference():
    source = hs.saved(SPEC)
    xen, result = hs.restore(source.stream)
    return source, hvm_snapshot(xen, result.domid), result


def test_stream_shape_is_a_45_non_live_hvm_save(legacy):
    width, stream, xen, guest = legacy
    events = parse(stream)
    detected = events[0]
    assert (detected.width, detected.guest) == (width, "hvm")
    kinds = [type(e).__name__ for e in events[1:] if e.WIRE]
    batches = kinds.count("PageBatch")
    params = kinds.count("HvmParam")
    assert kinds[:2] == ["P2mSize", "TscInfo"] and kinds[2:2 + batches] == ["PageBatch"] * batches
    tail = (["VcpuInfo"] + ["HvmParam"] * params
            + ["Toolstack", "LastCheckpoint", "EndOfBody", "HvmMagicPfns", "HvmContext", "DeviceModelRecord0002"])
    assert kinds[2 + batches:2 + batches + len(tail)] == tail
    assert set(kinds[2 + batches + len(tail):]) == {"DeviceModelData"}


def test_batches_are_1024_aligned_raw_and_never_only_holes(legacy):
    width, stream, xen, guest = legacy
    batches = [e for e in parse(stream) if isinstance(e, ev.PageBatch)]
    digest = hvm_snapshot(xen, guest.domid)
    sent = []
    for batch in batches:
        live = [p for p, t in zip(batch.pfns, batch.types) if t != abi.PAGETYPE_XTAB]
        assert live and all(p // 1024 == live[0] // 1024 for p in live)
        assert all(e == c.XTAB_ENTRY for e, t in zip(batch.entries, batch.types) if t == abi.PAGETYPE_XTAB)
        sent += live
    assert sent == [page.pfn for page in digest.pages]
    payload = b"".join(bytes(b.payload) for b in batches)
    by_pfn = dict(zip(sent, (payload[i:i + 4096] for i in range(0, len(payload), 4096))))
    views = xen.map_foreign(guest.domid, sent)
    assert all(by_pfn[p] == bytes(v) for p, v in zip(sent, views))


def test_params_magic_pfns_context_and_device_model(legacy):
    width, stream, xen, guest = legacy
    domid = guest.domid
    events = parse(stream)
    chunks = [e for e in events if isinstance(e, ev.HvmParam)]
    expected = [cid for cid in PARAM_CHUNK_ORDER if xen.get_hvm_param(domid, c.HVM_PARAM_CHUNKS[cid])]
    assert [e.chunk_id for e in chunks] == expected
    assert all(e.value == xen.get_hvm_param(domid, e.param_index) for e in chunks)
    magic = next(e for e in events if isinstance(e, ev.HvmMagicPfns))
    assert (magic.ioreq_pfn, magic.bufioreq_pfn, magic.store_pfn) == tuple(
        xen.get_hvm_param(domid, i) for i in (hvm_params.IOREQ_PFN, hvm_params.BUFIOREQ_PFN, hvm_params.STORE_PFN))
    assert next(e for e in events if isinstance(e, ev.HvmContext)).data == xen.get_hvm_context(domid)
    qemu = b"".join(bytes(e.data) for e in events if isinstance(e, ev.DeviceModelData))
    assert qemu == guest.built.emulator.context
    toolstack = next(e for e in events if isinstance(e, ev.Toolstack)).libxl
    assert toolstack.width == width
    assert [(p.phys_offset, p.start_addr, p.size, p.name) for p in toolstack.entries] == [
        (p.phys_offset, p.start_addr, p.size, p.name + b"\0") for p in guest.built.emulator.physmap]
    online = [v for v in range(3) if xen.get_vcpu_online(domid, v)]
    assert next(e for e in events if isinstance(e, ev.VcpuInfo)).online == tuple(online)


@pytest.mark.parametrize("requested", [False, True])
def test_x87_fip_width_chunk_only_on_request(requested):
    import io
    xen, guest = hs.build("hvm:mem=1M,seed=8")
    xen.set_hvm_param(guest.domid, hvm_params.X87_FIP_WIDTH, 8)
    out = io.BytesIO()
    save_hvm_legacy(xen, guest.domid, out, suspend=hs.suspender(guest), emulator=lambda: guest.built.emulator,
                    x87_fip_width_chunk=requested)
    chunks = {e.chunk_id: e.value for e in parse(out.getvalue()) if isinstance(e, ev.HvmParam)}
    assert chunks.get(c.CHUNK_HVM_X87_FIP_WIDTH) == (8 if requested else None)


def _convert_and_restore(stream: bytes):
    chunks = list(legacy_chunks(stream[:64], [stream[64:]], fmt="libxl"))
    return hs.restore(b"", chunks=chunks)


def test_legacy_save_convert_restore_is_the_v2_guest(legacy, v2_reference):
    width, stream, _, _ = legacy
    source, reference, reference_result = v2_reference
    xen, result = _convert_and_restore(stream)
    digest = hvm_snapshot(xen, result.domid)
    assert digest.pages == reference.pages
    assert digest.context_sha256 == reference.context_sha256 and digest.vcpus_online == reference.vcpus_online
    assert [p for p in digest.params] == [p for p in reference.params if p[0] not in NOT_IN_V1]
    assert xen.get_tsc_info(result.domid) == source.xen.get_tsc_info(source.built.domid)
    assert (result.store_gfn, result.console_gfn) == (reference_result.store_gfn, reference_result.console_gfn)
    assert result.emulator_context == reference_result.emulator_context
    assert result.xenstore == reference_result.xenstore
    assert result.emulator_id == C.EMULATOR_UNKNOWN  # converted legacy streams name no emulator (spec 4.2)


def test_save_refuses_pv_domains_and_failed_suspends():
    import io

    from tests.v2 import engine_support as es
    pv = es.make_source("pv64:mem=1M,vcpus=1,seed=1")
    with pytest.raises(LegacySaveError):
        save_hvm_legacy(pv.xen, pv.guest.domid, io.BytesIO(), suspend=lambda: True, emulator=lambda: None)
    xen, guest = hs.build("hvm:mem=1M,seed=4")
    out = io.BytesIO()
    with pytest.raises(LegacySaveError):
        save_hvm_legacy(xen, guest.domid, out, suspend=lambda: False, emulator=lambda: guest.built.emulator)
    assert out.getvalue() == b""
