"""The shared conformance vectors: our events, applied as Xen 4.5's restorer applies a stream, must give the
final guest state the vectors specify (and not the state after checkpoint 1 alone)."""

import hashlib
import json
import random

import pytest

from tests.conftest import SHARED
from xenstream.hv.abi import PAGE_SIZE, PAGETYPE_BROKEN, PAGETYPE_XALLOC, PAGETYPE_XTAB
from xenstream.legacy import events as ev
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser, parse_bytes

VECTORS = SHARED / "vectors"
CASES = ["pv64-remus", "pv64-compressed"]
STREAM_SHA256 = {
    "pv64-compressed": "61f29f451d6e1aa57fed4c335c99288f6d6fe86788653360bade5c4299ed10a7",
    "pv64-remus": "db6babc30983de9567ebac2c3c556641f95ca977ed6dd41273ee40bb670bea0a",
}


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


class RestorerModel:
    """Guest state as the 4.5 restorer builds it: pages by pfn, then each checkpoint's tail."""

    def __init__(self):
        self.pages = {}  # pfn -> (type nibble, sha256 or None)
        self.verify = False
        self.tail = {"vcpus": {}, "shared_info_sha256": None}
        self.committed = []  # snapshot after each complete checkpoint

    def apply_pages(self, entries, payload):
        index = 0
        for entry in entries:
            page_type, pfn = entry >> 28, entry & 0x0FFFFFFF
            if page_type in (PAGETYPE_XTAB, PAGETYPE_XALLOC):
                continue
            if page_type == PAGETYPE_BROKEN:
                self.pages[pfn] = (page_type, None)
                continue
            page = payload[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
            index += 1
            if not self.verify:
                self.pages[pfn] = (page_type, sha(page))

    def handle(self, event):
        if isinstance(event, ev.PageBatch) and not event.compressed:
            self.apply_pages(event.entries, event.payload)
        elif isinstance(event, ev.DecodedPages):
            self.apply_pages(event.entries, event.payload)
        elif isinstance(event, ev.EnableVerifyMode):
            self.verify = True
        elif isinstance(event, ev.UnmappedPfns):
            for pfn in event.pfns:
                self.pages.pop(pfn, None)
            self.tail = {"vcpus": {}, "shared_info_sha256": None}
        elif isinstance(event, ev.VcpuBasic):
            self.tail["vcpus"][str(event.vcpu_id)] = {
                "id": event.vcpu_id, "basic_len": len(event.data), "basic_sha256": sha(event.data)
            }
        elif isinstance(event, ev.VcpuExtended):
            self.tail["vcpus"][str(event.vcpu_id)].update(
                extended_len=len(event.data), extended_sha256=sha(event.data)
            )
        elif isinstance(event, ev.VcpuXsave):
            self.tail["vcpus"][str(event.vcpu_id)].update(
                xsave_len=len(event.data), xsave_sha256=sha(event.data), xsave_mask=event.xfeature_mask
            )
        elif isinstance(event, ev.SharedInfo):
            self.tail["shared_info_sha256"] = sha(event.data)
        elif isinstance(event, ev.CheckpointEnd):
            self.committed.append(self.snapshot())

    def snapshot(self):
        lines = "".join(
            "%x:%x:%s\n" % (pfn, page_type, digest or "-") for pfn, (page_type, digest) in sorted(self.pages.items())
        )
        return {
            "pages": {"count": len(self.pages), "digest": sha(lines.encode())},
            "vcpus": json.loads(json.dumps(self.tail["vcpus"])),
            "shared_info_sha256": self.tail["shared_info_sha256"],
        }


def load(case):
    stream = VECTORS / f"{case}.v1"
    if not stream.exists():
        pytest.skip(f"conformance vector {stream} not present")
    data = stream.read_bytes()
    assert sha(data) == STREAM_SHA256[case]
    return data, json.loads((VECTORS / f"{case}.json").read_text())


def expected_state(state):
    return {
        "pages": {"count": state["pages"]["count"], "digest": state["pages"]["digest"]},
        "vcpus": state["vcpus"],
        "shared_info_sha256": state["shared_info_sha256"],
    }


def model_of(events):
    model = RestorerModel()
    for event in events:
        model.handle(event)
    return model


@pytest.mark.parametrize("case", CASES)
def test_final_state_is_the_last_complete_checkpoint(case):
    data, spec = load(case)
    converter = spec["converter"]
    events = parse_bytes(data, width=converter["width"], guest=converter["guest"], xl=converter["xl"])
    model = model_of(events)
    assert len(model.committed) == spec["checkpoints"]
    assert model.committed[-1] == expected_state(spec["final_state"])
    assert model.committed[0] == expected_state(spec["state_after_checkpoint_1"])
    assert model.committed[-1] != model.committed[0]
    end = events[-1]
    assert isinstance(end, ev.EndOfStream)
    assert end.last_checkpoint_complete and end.checkpoints == spec["checkpoints"]


@pytest.mark.parametrize("case", CASES)
def test_detection_agrees_with_the_converter_options(case):
    data, spec = load(case)
    parser = LegacyParser()
    parser.feed(data[:64])
    while (event := parser.next_event()) is not NEED_DATA and not isinstance(event, ev.Detected):
        pass
    detected = parser.detected
    assert detected.width == spec["converter"]["width"]
    assert detected.guest == spec["converter"]["guest"]
    assert detected.wrapper == "none"
    assert detected.guest_width == spec["guest_width"] and detected.pt_levels == spec["pt_levels"]
    assert all(evidence.source == "detected" for evidence in detected.evidence)


@pytest.mark.parametrize("case", CASES)
def test_header_facts(case):
    data, spec = load(case)
    events = parse_bytes(data)
    (p2m,) = [e for e in events if isinstance(e, ev.P2mSize)]
    (frames,) = [e for e in events if isinstance(e, ev.P2mFrames)]
    assert p2m.p2m_size == spec["p2m_size"]
    assert list(frames.frames) == spec["p2m_frames"]
    vcpu_infos = [e for e in events if isinstance(e, ev.VcpuInfo)]
    assert all(list(info.online) == spec["online_vcpus"] for info in vcpu_infos)
    assert vcpu_infos[-1].max_vcpu_id == spec["max_vcpu_id"]


@pytest.mark.parametrize("case", CASES)
def test_fed_in_random_chunks_gives_the_same_state(case):
    data, spec = load(case)
    rng = random.Random(case)
    parser = LegacyParser()
    model = RestorerModel()
    position = 0
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            size = rng.choice([1, 7, 512, 4093, 65536, 300000])
            parser.feed(data[position : position + size])
            position += size
            continue
        if event is DONE:
            break
        model.handle(event)
    assert model.committed[-1] == expected_state(spec["final_state"])


def test_stopping_after_checkpoint_one_would_be_wrong():
    """A truncated copy (inside checkpoint 2) ends cleanly, and commits checkpoint 1 only."""
    data, spec = load("pv64-remus")
    events = parse_bytes(data)
    (first_end,) = [e for e in events if isinstance(e, ev.CheckpointEnd) and e.index == 1]
    cut = first_end.offset + (len(data) - first_end.offset) // 2
    truncated = parse_bytes(data[:cut])
    end = truncated[-1]
    assert isinstance(end, ev.EndOfStream)
    assert not end.last_checkpoint_complete
    assert end.discarded_offset == first_end.offset and end.checkpoints == 1
    assert model_of(truncated).committed[-1] == expected_state(spec["state_after_checkpoint_1"])
