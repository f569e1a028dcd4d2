"""v1 support for `xenstream inspect`: the legacy inspector, plugged into inspect's table of inspectors.

Adds no command of its own. Discovered after `inspect` (commands register in name order), it adds the
v1 options to `xenstream inspect` and installs `xenstream.legacy.inspect` as its "v1" inspector: for a v1
image, the detected variant and the evidence for it, pages per type, chunks seen, checkpoints, vcpus and
the last tail's contents.
"""

from __future__ import annotations

from xenstream.convert.commands import inspect as inspect_command
from xenstream.legacy.inspect import inspect_fd

XL_OPTIONS = {"auto": None, "yes": True, "no": False}


def inspect_v1(fd: int, head: bytes, args):
    return inspect_fd(fd, width=args.width, guest=args.guest, xl=XL_OPTIONS[args.xl], head=head)


def register(subparsers) -> None:
    parser = subparsers.choices["inspect"]
    v1 = parser.add_argument_group("v1 (legacy) images; each option left out is detected from the first bytes")
    v1.add_argument("--width", type=int, choices=(32, 64), help="word size of the toolstack that saved it")
    v1.add_argument("--guest", choices=("pv", "hvm"), help="guest type")
    v1.add_argument("--xl", choices=tuple(XL_OPTIONS), default="auto", help="whether an xl header comes first")
    inspect_command.INSPECTORS["v1"] = inspect_v1
