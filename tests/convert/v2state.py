"""What a v2 restore commits from a stream, as digests comparable with the conformance vectors' final_state.

Pages: the last copy of every pfn wins (type and content); vcpu and shared-info records: the last one
of each kind per vcpu. Read with our V2Reader in views mode; only used by tests.
"""

from __future__ import annotations

import hashlib

from xenstream.hv.abi import pagetype_has_data
from xenstream.v2 import constants as C
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxcRecord, LibxlRecord, PagePayload
from xenstream.v2.reader import V2Reader

_VCPU_KINDS = {C.REC_X86_PV_VCPU_BASIC: "basic", C.REC_X86_PV_VCPU_EXTENDED: "extended",
               C.REC_X86_PV_VCPU_XSAVE: "xsave"}


def restored_state(data: bytes) -> dict:
    reader = V2Reader(layer="auto", payload="views")
    reader.feed(data)
    reader.feed(b"")
    pages: dict[int, tuple[int, str | None]] = {}
    vcpus: dict[int, dict] = {}
    shared_info = None
    libxl_records = []
    pending_pfns: list[int] = []
    record_types = []
    end = None
    while True:
        event = reader.next_event()
        assert event is not NEED_DATA
        if isinstance(event, LibxcRecord):
            record_types.append(event.type)
            if event.type == C.REC_PAGE_DATA:
                body = event.body
                for pfn, page_type in zip(body.pfns, body.types):
                    if not pagetype_has_data(page_type):
                        pages[pfn] = (page_type, None)
                pending_pfns = [(p, t) for p, t in zip(body.pfns, body.types) if pagetype_has_data(t)]
            elif event.type in _VCPU_KINDS:
                vcpus.setdefault(event.body.vcpu_id, {})[_VCPU_KINDS[event.type]] = hashlib.sha256(event.body.context).hexdigest()
            elif event.type == C.REC_SHARED_INFO:
                shared_info = hashlib.sha256(event.body.data).hexdigest()
        elif isinstance(event, PagePayload):
            for i in range(event.page_count):
                pfn, page_type = pending_pfns[event.first_page + i]
                pages[pfn] = (page_type, hashlib.sha256(event.page(i)).hexdigest())
        elif isinstance(event, LibxlRecord):
            libxl_records.append(event.type)
        elif isinstance(event, EndOfStream):
            end = event
            break
    lines = "".join("%x:%x:%s\n" % (pfn, t, sha or "-") for pfn, (t, sha) in sorted(pages.items()))
    return {
        "pages": pages,
        "digest": hashlib.sha256(lines.encode()).hexdigest(),
        "vcpus": vcpus,
        "shared_info_sha256": shared_info,
        "record_types": record_types,
        "libxl_records": libxl_records,
        "end": end,
    }


def vector_vcpus(final_state: dict) -> dict[int, dict]:
    return {int(vcpu_id): {kind: entry[f"{kind}_sha256"] for kind in ("basic", "extended", "xsave")
                           if entry.get(f"{kind}_sha256")}
            for vcpu_id, entry in final_state["vcpus"].items()}


def convert_bytes(data: bytes, tmp_path, *, verify: bool = True, parser_options: dict | None = None, **options):
    """Run the pipeline file -> file; returns (output bytes, ConvertResult)."""
    from xenstream.convert.pipeline import convert_fds
    from xenstream.convert.transform import ConvertOptions

    source = tmp_path / "in.v1"
    target = tmp_path / "out.v2"
    source.write_bytes(data)
    with open(source, "rb") as fin, open(target, "wb") as fout:
        result = convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(**options), verify=verify,
                             **(parser_options or {}))
    return target.read_bytes(), result


def partial_output(data: bytes, tmp_path, **options) -> tuple[bytes, Exception]:
    """Convert input that must fail; returns what was written before the failure and the exception."""
    from xenstream.convert.pipeline import convert_fds
    from xenstream.convert.transform import ConvertOptions

    source = tmp_path / "bad.v1"
    target = tmp_path / "bad.v2"
    source.write_bytes(data)
    with open(source, "rb") as fin, open(target, "wb") as fout:
        try:
            convert_fds(fin.fileno(), fout.fileno(), ConvertOptions(**options))
        except Exception as exc:  # noqa: BLE001 - the caller asserts the type
            return target.read_bytes(), exc
    raise AssertionError("conversion unexpectedly succeeded")


def has_end_record(data: bytes) -> bool:
    """Whether the (possibly cut) v2 stream reaches its outermost END."""
    from xenstream.v2.errors import StreamError

    reader = V2Reader(layer="auto", payload="views", strict=False)  # structure only, as Xen reads it
    reader.feed(data)
    reader.feed(b"")
    try:
        while True:
            event = reader.next_event()
            if isinstance(event, EndOfStream):
                return event.complete
    except StreamError:
        return False
