"""Rebuild the v2 sample images, manifest.json and README.md deterministically with our writer.

    python samples/v2/make_samples.py [OUTDIR]      (default: the directory of this script)

Valid samples come from ``xenstream.v2.synth``; each invalid one is a valid sample with one deliberate
defect, and the manifest records the error that defect must produce (class, offset of the element at fault,
a fragment of the message), derived from where the defect was put, not from running a reader.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
import sys

from xenstream.v2 import constants as C
from xenstream.v2.synth import stream_bytes

IMAGE_AND_DOMAIN_HEADERS = 24 + 16

# name -> (synth options, description, Xen 4.17 verify-stream-v2 format and verdict)
VALID = {
    "pv64-v3.libxc": (
        dict(guest="pv", width=8, pages=8, vcpus=2, version=3, wrap="libxc"),
        "64-bit PV guest, bare libxc stream v3: X86_PV_INFO, CPUID and MSR policies, STATIC_DATA_END, "
        "P2M_FRAMES, 8 pages (pinned L4 at pfn 1, L3/L2/L1 at 2-4), TSC_INFO, SHARED_INFO, "
        "2 vcpus x (BASIC, EXTENDED, XSAVE, MSRS), END",
        ("libxc", "accept"),
    ),
    "pv32-v2.libxc": (
        dict(guest="pv", width=4, pages=8, vcpus=1, version=2, wrap="libxc"),
        "32-bit PV (PAE) guest, libxc stream v2 (Xen 4.6-4.13 layout: no static section, no policies): "
        "8 pages with a pinned L3 at pfn 1, 1 vcpu (BASIC 2800 bytes, EXTENDED, XSAVE), END",
        ("libxc", "accept"),
    ),
    "hvm-v3.libxc": (
        dict(guest="hvm", pages=12, vcpus=2, version=3, wrap="libxc"),
        "HVM guest, bare libxc stream v3: policies, STATIC_DATA_END, 12 pfns of which 2 XTAB holes "
        "(10 pages of data), TSC_INFO, HVM_CONTEXT (HEADER, 2 CPU entries, END), HVM_PARAMS (4), END",
        ("libxc", "accept"),
    ),
    "hvm-v3.libxl": (
        dict(guest="hvm", pages=12, vcpus=1, version=3, wrap="libxl", xenstore=False),
        "HVM guest in a libxl stream: libxl header, LIBXC_CONTEXT, the libxc stream, "
        "EMULATOR_CONTEXT (qemu upstream), libxl END",
        ("libxl", "accept"),
    ),
    "pv64-v3.xl": (
        dict(guest="pv", width=8, pages=16, vcpus=1, version=3, wrap="xl"),
        "64-bit PV guest as `xl save` writes it: xl header (JSON config), libxl stream, libxc stream",
        ("xl", "accept"),
    ),
    "hvm-v3-xenstore.xl": (
        dict(guest="hvm", pages=12, vcpus=1, version=3, wrap="xl"),
        "HVM guest as `xl save` writes it, with EMULATOR_XENSTORE_DATA (3 physmap keys) before "
        "EMULATOR_CONTEXT",
        ("xl", "reject: Xen 4.17's verifier fails every non-empty EMULATOR_XENSTORE_DATA under Python 3 "
               "('Data not NUL terminated', spec 8 A20)"),
    ),
    "pv64-remus.libxl": (
        dict(guest="pv", width=8, pages=16, vcpus=1, version=3, wrap="libxl", checkpoints=3),
        "checkpointed (Remus) 64-bit PV libxl stream: 3 checkpoints, each libxc memory + TSC/SHARED_INFO/"
        "vcpu records + CHECKPOINT, then libxl CHECKPOINT_END; no END (as Xen writes it); readers report "
        "EndOfStream(complete=False, checkpoints=3)",
        ("libxl", "reject: Xen's verifier cannot follow checkpointed libxl streams; it parses libxl "
                  "CHECKPOINT_END as a libxc record (spec 8 A13)"),
    ),
}


def _u32le(value: int) -> bytes:
    return struct.pack("<I", value)


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def _invalid(valid: dict[str, bytes]) -> dict[str, tuple[bytes, str, dict]]:
    pv = valid["pv64-v3.libxc"]
    libxl = valid["hvm-v3.libxl"]
    first_record = IMAGE_AND_DOMAIN_HEADERS  # X86_PV_INFO
    first_page_data = _first_record_of_type(pv, C.REC_PAGE_DATA)
    emulator_context = len(libxl) - 8 - 8 - _padded(len(b"QEVM\0\0\0\x03") + 61 + 8)
    emulator_length = struct.unpack_from("<I", libxl, emulator_context + 4)[0]
    return {
        "bad-marker.bin": (
            _patch(pv, 7, b"\xfe"),
            "pv64-v3.libxc with the last marker byte 0xFE: no v2 header is recognised",
            dict(error="UnsupportedStream", offset=0, contains="not a v2 stream"),
        ),
        "bad-id.libxc": (
            _patch(pv, 8, b"XENG"),
            "image header id 'XENG'",
            dict(error="MalformedStream", offset=0, contains="image header id 0x58454e47"),
        ),
        "bad-version.libxc": (
            _patch(pv, 12, struct.pack(">I", 4)),
            "image header version 4",
            dict(error="MalformedStream", offset=0, contains="version 4"),
        ),
        "reserved-domain-header.libxc": (
            _patch(pv, 24 + 6, b"\x01\x00"),
            "domain header reserved field = 1",
            dict(error="MalformedStream", offset=24, contains="domain header reserved field not zero"),
        ),
        "truncated-page-data.libxc": (
            pv[: first_page_data + 8 + 8 + 8 * 8 + 3 * 4096 + 100],
            "pv64-v3.libxc cut 100 bytes into the 4th page of the first PAGE_DATA record",
            dict(error="TruncatedStream", offset=first_page_data, contains="PAGE_DATA payload"),
        ),
        "length-over-limit.libxc": (
            _patch(pv, first_record + 4, _u32le(0xF0000000)),
            "X86_PV_INFO claims a 3.75 GiB body (limit 128 MiB)",
            dict(error="MalformedStream", offset=first_record, contains="exceeds the 134217728 byte limit",
                 xen_check=False),
        ),
        "length-past-end.libxc": (
            _patch(pv, first_record + 4, _u32le(C.RECORD_LENGTH_MAX)),
            "X86_PV_INFO claims a 128 MiB body, more than the file holds",
            dict(error="TruncatedStream", offset=first_record, contains="truncated libxc X86_PV_INFO record"),
        ),
        "unknown-record.libxc": (
            pv[:first_record] + _u32le(0x13) + _u32le(0) + pv[first_record:],
            "a record of the reserved mandatory type 0x13 right after the domain header",
            dict(error="MalformedStream", offset=first_record, contains="unknown mandatory libxc record type 0x13"),
        ),
        "bad-padding.libxl": (
            _patch(libxl, emulator_context + 8 + emulator_length, b"\x01"),
            "hvm-v3.libxl with a non-zero padding byte after the EMULATOR_CONTEXT body",
            dict(error="MalformedStream", offset=emulator_context + 8 + emulator_length, contains="non-zero padding"),
        ),
    }


def _padded(length: int) -> int:
    return length + (-length & 7)


def _first_record_of_type(data: bytes, wanted: int) -> int:
    """Offset of the first libxc record of a type in a bare libxc stream, walking the record headers."""
    offset = IMAGE_AND_DOMAIN_HEADERS
    while True:
        rtype, length = struct.unpack_from("<II", data, offset)
        if rtype == wanted:
            return offset
        offset += 8 + _padded(length)


def build() -> dict[str, tuple[bytes, str, dict]]:
    valid = {name: stream_bytes(**options) for name, (options, _, _) in VALID.items()}
    samples = {
        name: (valid[name], description, {"xen_format": xen[0], "xen_verify": xen[1]})
        for name, (_, description, xen) in VALID.items()
    }
    for name, (data, description, expect) in _invalid(valid).items():
        samples[name] = (data, description, {"invalid": True, **expect})
    return samples


def _readme(samples, manifest) -> str:
    lines = [
        "# v2 sample images",
        "",
        "Small v2/v3 streams written by our own writer (`xenstream.v2.synth` over `V2Writer`). Rebuild them",
        "byte for byte with `python samples/v2/make_samples.py`; `manifest.json` holds the same facts for",
        "the tests (tests/v2/test_samples.py, tests/interop/test_v2_samples_xen.py).",
        "",
        "Page contents are deterministic pseudo-random data; page tables hold no present entries.",
        "",
        "## Valid samples",
        "",
        "| file | holds | Xen 4.17 `verify-stream-v2` | sha256 |",
        "|---|---|---|---|",
    ]
    for name, (data, description, facts) in samples.items():
        if not facts.get("invalid"):
            lines.append(f"| `{name}` ({len(data)} bytes) | {description} | `-f {facts['xen_format']}`: "
                         f"{facts['xen_verify']} | `{manifest[name]['sha256']}` |")
    lines += [
        "",
        "## Invalid samples",
        "",
        "Each must make `xenstream inspect` (and every reader) fail with one line naming the offset, exit 1.",
        "",
        "| file | defect | error at offset | message contains | sha256 |",
        "|---|---|---|---|---|",
    ]
    for name, (data, description, facts) in samples.items():
        if facts.get("invalid"):
            lines.append(f"| `{name}` | {description} | {facts['error']} at {facts['offset']:#x} | "
                         f"`{facts['contains']}` | `{manifest[name]['sha256']}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[1]) if len(argv) > 1 else pathlib.Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    samples = build()
    manifest = {}
    for name, (data, description, facts) in samples.items():
        (out / name).write_bytes(data)
        manifest[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "description": description, **facts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(_readme(samples, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
