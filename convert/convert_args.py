"""The conversion options shared by `convert-legacy-stream` and `xenstream convert` / `upgrade`.

Names and abbreviations follow Xen's converter (argparse accepts unique prefixes, so libxl's
``--guest`` means ``--guest-type``); what Xen requires (width, guest type, xl header) is detected here
when it is not given.
"""

from __future__ import annotations

from xenstream.convert.transform import FORMATS, ConvertOptions


def add_stream_options(parser, *, format_default: str | None = "libxc") -> None:
    parser.add_argument("-w", "--width", choices=("32", "64"), metavar="<32/64>",
                        help="legacy toolstack bitness (default: detected)")
    parser.add_argument("-g", "--guest-type", dest="gtype", choices=("pv", "hvm"), metavar="<pv/hvm>",
                        help="type of guest in the stream (default: detected)")
    parser.add_argument("-f", "--format", choices=FORMATS, default=format_default, metavar="<libxc|libxl>",
                        help="format of the outgoing stream" + (f" (default {format_default})" if format_default
                                                                else " (default: libxl for xl save files and HVM, else libxc)"))
    parser.add_argument("-x", "--xl", action="store_true", default=None,
                        help="an xl header is present in the stream (default: detected)")
    parser.add_argument("--skip-qemu", action="store_true", help="skip the qemu record after an HVM tail (libxc format)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="convert a Remus stream into a v2 checkpointed stream carrying every checkpoint "
                             "(default: the state of the last complete checkpoint)")
    parser.add_argument("--drop-tmem", action="store_true",
                        help="convert a stream with tmem chunks, dropping the tmem state (v2 cannot carry it)")
    parser.add_argument("--verify", action="store_true", help="verify the output in the same pass")


def parser_options(args) -> dict:
    """LegacyParser keyword arguments: None lets the parser detect."""
    return {"width": int(args.width) if args.width else None, "guest": args.gtype, "xl": args.xl}


def convert_options(args, *, fmt: str | None = None) -> ConvertOptions:
    return ConvertOptions(fmt=fmt or args.format, skip_qemu=args.skip_qemu, checkpoints=args.checkpoints,
                          drop_tmem=args.drop_tmem)
