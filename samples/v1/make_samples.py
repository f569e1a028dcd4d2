"""Regenerate the v1 sample images in this folder and their README, deterministically.

    python samples/v1/make_samples.py          # rewrite the samples and README.md
    python samples/v1/make_samples.py --check  # exit 1 if any committed sample differs from a rebuild

Each sample is a small stream built by `xenstream.legacy.build` from the options in SAMPLES; what Xen's
own convert-legacy-stream (xen-utils-4.17, Python 3) does with each is in CONVERTER_OUTCOMES and is
asserted by tests/interop/test_legacy_samples_xen.py.
"""

import hashlib
import pathlib
import sys

import attrs

from xenstream.legacy.build import BuildOptions, PhysmapSpec, build_stream

HERE = pathlib.Path(__file__).resolve().parent

PV = dict(guest="pv", pages=18, holes=1, vcpus=1)
HVM = dict(guest="hvm", pages=8, holes=1, vcpus=1, device_model_size=1200)
VGA = PhysmapSpec(0xF0000000, 0xF0000000, 0x800000, b"vga")
ROM = PhysmapSpec(0xF1000000, 0xF1000000, 0x20000, b"xen.rom")
NAMELESS = PhysmapSpec(0xF2000000, 0xF2000000, 0x10000, None)


@attrs.frozen
class Sample:
    name: str
    options: BuildOptions
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}.v1"

    def build(self) -> bytes:
        return build_stream(self.options)


def _sample(name: str, description: str, base: dict, **overrides) -> Sample:
    return Sample(name, BuildOptions(seed=len(name) * 1009 + sum(map(ord, name)), **{**base, **overrides}),
                  description)


SAMPLES = (
    _sample("pv64", "2 VCPUs, XSAVE, libxl TOOLSTACK (no physmap), non-live: an `xl save` body "
            "without the xl header", PV, vcpus=2, pages=19),
    _sample("pv32-tools32", "PAE guest, 4-byte ulongs throughout", PV, width=32),
    _sample("pv32-on-tools64", "PAE guest; its top L2 keeps present PTEs with frame 0 in Xen's "
            "compat M2P slots", PV, guest_width=32),
    _sample("pv64-on-tools32", "p2m frame list of 4-byte entries", PV, width=32,
            guest_width=64),
    _sample("pv64-live", "live migration: 3 iterations, TSC_INFO before the final one, 2 of 4 VCPUs online",
            PV, live_iterations=3, vcpus=2, max_vcpus=4, pages=19),
    _sample("pv64-verify", "debug migration: ENABLE_VERIFY_MODE then a second full pass", PV, verify_pass=True),
    _sample("pv64-broken-noxsave", "host without XSAVE (no \"xcnt\"), 2 BROKEN pages", PV, xsave=False,
            broken_pages=2),
    _sample("pv64-xl", "xl 4.5 save file: xl header with JSON config (mandatory flag 1)", PV, wrapper="xl"),
    _sample("pv64-xl-migrate", "xl migration capture: xl header, stream, then the 44-byte \"go\" message",
            PV, wrapper="xl", go_message=True),
    _sample("pv64-remus", "Remus: 3 checkpoints, no LAST_CHECKPOINT, checkpoint 1 a live migration", PV,
            checkpoints=3),
    _sample("pv64-remus-compressed", "Remus with checkpoint compression: ENABLE_COMPRESSION in checkpoint 1, "
            "checkpoints 2-3 in Format B with COMPRESSED_DATA (FULL, EMPTY and delta pages)", PV,
            checkpoints=3, compression=True),
    _sample("pv64-tmem", "tmem: TMEM before the first batch, TMEM_EXTRA before TSC_INFO (live)", PV, tmem=True,
            live_iterations=2),
    _sample("pv64-xend", "xend `xm save`: LinuxGuestRecord header, no TOOLSTACK", PV, wrapper="xend",
            toolstack=False),
    _sample("pv64-libvirt", "libvirt libxl driver save: libvirt-xml header (version 1) before the v1 stream",
            PV, wrapper="libvirt"),
    _sample("pv64-tmem-xen40", "Xen 4.0 saver, live, tmem: TMEM format version 0 (8-byte object ids in TMEM "
            "and TMEM_EXTRA), no \"xcnt\", 32-byte extended contexts with leftover filler, no LAST_CHECKPOINT",
            PV, xen_version=(4, 0), tmem=True, live_iterations=2, xsave=False, toolstack=False),
    _sample("pv64-remus-xen40", "Xen 4.0 (xend-era) Remus: 3 checkpoints, no \"xcnt\"; 4.0 had no LAST_CHECKPOINT, "
            "so only the end of input ends it and a 4.0 restore commits the last complete checkpoint", PV,
            xen_version=(4, 0), checkpoints=3, xsave=False, toolstack=False),
    _sample("hvm64", "HVM parameter chunks, libxl DeviceModelRecord0002", HVM),
    _sample("hvm32-tools32", "HVM parameter chunks, DeviceModelRecord0002", HVM, width=32),
    _sample("hvm64-qemu-record", "xend-style QemuDeviceModelRecord (no length, runs to end of input), "
            "no TOOLSTACK", HVM, toolstack=False, device_model="QemuDeviceModelRecord"),
    _sample("hvm64-xend", "xend `xm save` of an HVM guest: LinuxGuestRecord header, QemuDeviceModelRecord",
            HVM, wrapper="xend", toolstack=False, device_model="QemuDeviceModelRecord"),
    _sample("hvm64-remus-dm", "xend-era Remus: 2 checkpoints, each with a RemusDeviceModelState record", HVM,
            checkpoints=2, toolstack=False, device_model="RemusDeviceModelState"),
    _sample("hvm64-xenops", "XenServer xenopsd: XenSavedDomain signature, \"QemuDeviceModelRecord\\n\" + "
            "big-endian length", HVM, wrapper="xenops", toolstack=False, device_model="XenopsQemuRecord"),
    _sample("hvm64-xl-text", "xl 4.1-4.4 save file: xl header with config text (no flags)", HVM,
            wrapper="xl-text"),
    _sample("hvm64-remus-compressed", "HVM Remus with compression: 2 checkpoints, DeviceModelRecord0002 after "
            "each tail", HVM, checkpoints=2, compression=True),
    _sample("hvm64-physmap", "libxl TOOLSTACK with 2 physmap entries, 64-bit layout (4 leaked bytes after "
            "each name, here non-zero)", HVM, physmap=(VGA, ROM), physmap_gap=b"\xa5\x5a\x00\x7f"),
    _sample("hvm32-physmap", "libxl TOOLSTACK with 2 physmap entries, 32-bit layout (no gap)", HVM, width=32,
            physmap=(VGA, ROM)),
    _sample("hvm64-physmap-noname", "libxl TOOLSTACK with a physmap entry without name (namelen 0)", HVM,
            physmap=(VGA, NAMELESS)),
    _sample("hvm64-x87", "Xen 4.5.4+ HVM_X87_FIP_WIDTH chunk (-21)", HVM, x87_fip_width=4),
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _readme(built: dict) -> str:
    lines = [
        "# v1 (legacy) sample streams",
        "",
        "Small streams in the Xen 4.0-4.5 legacy format, one per variant, written by `xenstream.legacy.build`",
        "(seeded, so `python samples/v1/make_samples.py` rebuilds them byte for byte; `--check` compares).",
        "Widths are the saving toolstack's word size; PV guests use their own word size for page tables and",
        "VCPU contexts. `xenstream.legacy.parser.LegacyParser` reads every one with no options (detection),",
        "and writing its events back reproduces the file (tests/legacy/test_roundtrip.py). What Xen's own",
        "`convert-legacy-stream` does with each is listed after the table.",
        "",
        "| file | bytes | what it holds | sha256 |",
        "|---|---|---|---|",
    ]
    for sample in SAMPLES:
        data = built[sample.name]
        o = sample.options
        shape = f"{o.width}-bit tools, {o.guest.upper()}"
        if o.guest == "pv":
            shape += f" {o.guest_word_bytes * 8}-bit guest"
        lines.append(f"| `{sample.filename}` | {len(data)} | {shape}: {sample.description} | `{sha256(data)}` |")
    lines += ["", "## Xen 4.17 `convert-legacy-stream` on these samples", ""]
    lines += CONVERTER_NOTES
    return "\n".join(lines) + "\n"


CONVERTER_NOTES = [
    "Asserted by `tests/interop/test_legacy_samples_xen.py` (run with `-w <width> -g <pv|hvm>`; outputs",
    "checked with Xen's `verify-stream-v2`). Accepted and verified with `-f libxc` and `-f libxl` (HVM also",
    "with `-f libxc --skip-qemu`): `pv64`, `pv32-tools32`, `pv32-on-tools64`, `pv64-on-tools32`, `pv64-live`,",
    "`pv64-verify`, `pv64-broken-noxsave`, `hvm64`, `hvm32-tools32`. `pv64-remus` and `pv64-remus-xen40` are",
    "accepted, but only their checkpoint 1 is converted: the rest of the input is silently ignored (a 4.0 or",
    "4.5 restore commits the last complete checkpoint).",
    "",
    "Rejected, by design or by Xen's Python 3 bugs:",
    "",
    "- any xl header (`pv64-xl`, `pv64-xl-migrate`, `hvm64-xl-text`): with `-x` it fails with \"No xl header\"",
    "  (it compares the bytes read with a str magic); without `-x` the header is taken as `p2m_size`. The",
    "  same streams with the header cut off (as xl does before calling the converter) are accepted.",
    "- `pv64-remus-compressed`, `hvm64-remus-compressed`: ENABLE_COMPRESSION raises \"todo\" (exit 2).",
    "- `pv64-tmem`, `pv64-tmem-xen40`: TMEM raises \"todo\" (exit 2), whatever its format version.",
    "- `hvm64-x87`: \"Unrecognised chunk -21\" (exit 1).",
    "- `hvm64-qemu-record`, `hvm64-remus-dm`: \"Unrecognised Qemu sig\" (exit 2) unless `-f libxc --skip-qemu`,",
    "  which converts them without the device-model state.",
    "- `pv64-xend`, `pv64-libvirt`, `hvm64-xend`, `hvm64-xenops`: wrappers it does not know (garbage `p2m_size`).",
    "- `hvm64-physmap-noname`: `-f libxl` fails with \"No physmap info name\"; `-f libxc` drops the blob.",
    "- `hvm64-physmap`, `hvm32-physmap` with `-f libxl`: converted correctly, but Xen's verifier rejects every",
    "  EMULATOR_XENSTORE_DATA record under Python 3 (\"Data not NUL terminated\": it compares an int with a",
    "  str). With `-f libxc` the blob is dropped and the output verifies.",
]


def main(argv: list[str]) -> int:
    built = {sample.name: sample.build() for sample in SAMPLES}
    readme = _readme(built)
    if "--check" in argv:
        stale = [s.filename for s in SAMPLES if (HERE / s.filename).read_bytes() != built[s.name]]
        if (HERE / "README.md").read_text() != readme:
            stale.append("README.md")
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    for sample in SAMPLES:
        (HERE / sample.filename).write_bytes(built[sample.name])
    (HERE / "README.md").write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
