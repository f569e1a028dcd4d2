"""The libxl layer's and the xl header's rules (spec 4, 5, 6.2, 6.4), over the reader's decoded records.

The reader already enforces the framing and the hand-over between layers (LIBXC_CONTEXT, CHECKPOINT /
CHECKPOINT_END, COLO's CHECKPOINT_STATE); what is left here is what libxl's and xl's restore code check
on top, plus the spec's softer expectations as warnings.
"""

from __future__ import annotations

import re
from typing import Callable, ClassVar

import attrs

from xenstream.v2 import constants as C
from xenstream.v2.libxl_records import libxl_record_name
from xenstream.v2.verify_report import ERROR, WARNING

Report = Callable[[str, int | None, int | None, str, str], None]

EMULATOR_RECORDS = frozenset({C.LIBXL_REC_EMULATOR_XENSTORE_DATA, C.LIBXL_REC_EMULATOR_CONTEXT})
# Spec 4.2: key characters are alphanumeric plus -/_@; values should be printable ASCII.
_KEY_CHARS = re.compile(rb"[A-Za-z0-9\-/_@]+")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


@attrs.define
class LibxlRules:
    report: Report
    guest: int = 0  # told by the verifier once the libxc domain header is known
    legacy: bool = False
    libxc_contexts: int = 0
    in_checkpoint: bool = False  # between a libxc CHECKPOINT and CHECKPOINT_END
    checkpointed: bool = False  # a libxc CHECKPOINT has been seen
    group: set = attrs.field(factory=set)  # emulator record types seen since the libxc stream handed over

    def header(self, offset: int, header) -> None:
        self.legacy = header.legacy

    def libxc_checkpoint(self) -> None:
        self.in_checkpoint = True
        self.checkpointed = True
        self.group = set()

    def record(self, offset: int, index: int, rtype: int, length: int, body) -> None:
        name = libxl_record_name(rtype)
        if rtype != C.LIBXL_REC_LIBXC_CONTEXT and not self.libxc_contexts:
            self._error(offset, index, name, "record before LIBXC_CONTEXT (libxl writes LIBXC_CONTEXT first)")
        handler = self._HANDLERS.get(rtype)
        if handler is not None:
            handler(self, offset, index, name, length, body)

    def _error(self, offset, index, name, message):
        self.report(ERROR, offset, index, name, message)

    def _warn(self, offset, index, name, message):
        self.report(WARNING, offset, index, name, message)

    def _libxc_context(self, offset, index, name, length, body):
        self.libxc_contexts += 1
        if self.libxc_contexts > 1:
            self._error(offset, index, name, "second LIBXC_CONTEXT (libxl writes exactly one)")

    def _end(self, offset, index, name, length, body):
        if not self.checkpointed:  # a checkpointed stream's emulator state came with each CHECKPOINT_END
            self._hvm_group_complete(offset, index, name, "stream")

    def _checkpoint_end(self, offset, index, name, length, body):
        self._hvm_group_complete(offset, index, name, "checkpoint")
        self.in_checkpoint = False
        self.group = set()

    def _hvm_group_complete(self, offset, index, name, what):
        if self.guest == C.DOMAIN_TYPE_X86_HVM and C.LIBXL_REC_EMULATOR_CONTEXT not in self.group:
            self._warn(offset, index, name, f"no EMULATOR_CONTEXT in this HVM {what} (libxl always writes one)")

    def _checkpoint_state(self, offset, index, name, length, body):
        if body.control_id != C.CHECKPOINT_STATE_NEW:
            state = C.CHECKPOINT_STATE_NAMES.get(body.control_id, f"{body.control_id:#x}")
            self._error(offset, index, name, f"control id {state}: the forward stream carries only NEW (0)")

    def _emulator(self, offset, index, name, length, body) -> bool:
        """Checks common to both emulator records; False when the body is not worth looking at."""
        if self.guest == C.DOMAIN_TYPE_X86_PV:
            self._error(offset, index, name, "emulator record in a PV stream (libxl's restore fails)")
            return False
        if body.emulator_id not in C.EMULATOR_NAMES:
            self._error(offset, index, name, f"emulator id {body.emulator_id:#x} is not 0, 1 or 2")
        elif body.emulator_id == C.EMULATOR_UNKNOWN and not self.legacy:
            self._warn(offset, index, name, "emulator id 0 (unknown) outside a stream converted from legacy")
        if body.index:
            self._warn(offset, index, name, f"emulator index {body.index} (libxl always writes 0)")
        return True

    def _emulator_context(self, offset, index, name, length, body):
        if not self._emulator(offset, index, name, length, body):
            return
        if C.LIBXL_REC_EMULATOR_CONTEXT in self.group:
            self._warn(offset, index, name, "second EMULATOR_CONTEXT in one group")
        self.group.add(C.LIBXL_REC_EMULATOR_CONTEXT)

    def _xenstore(self, offset, index, name, length, body):
        if not self._emulator(offset, index, name, length, body):
            return
        if self.group:
            self._warn(offset, index, name, "EMULATOR_XENSTORE_DATA after EMULATOR_CONTEXT (libxl writes it first)")
        self.group.add(C.LIBXL_REC_EMULATOR_XENSTORE_DATA)
        data = body.data
        if not data:
            self._warn(offset, index, name, "no key/value data (libxl writes the record only when it has some)")
            return
        if not data.endswith(b"\0"):
            self._error(offset, index, name, "data not NUL terminated")
            return
        strings = data[:-1].split(b"\0")
        if len(strings) % 2:
            self._error(offset, index, name, f"key {strings[-1][:40]!r} has no value (odd number of strings)")
            return
        for key, value in zip(strings[0::2], strings[1::2]):
            if not key:
                self._error(offset, index, name, "empty key (libxl's restore fails)")
            elif key.startswith(b"/"):
                self._error(offset, index, name, f"key {key[:40]!r} is absolute (libxl's restore fails)")
            elif not _KEY_CHARS.fullmatch(key):
                self._warn(offset, index, name, f"key {key[:40]!r} has characters outside A-Za-z0-9-/_@")
            if not _PRINTABLE.fullmatch(value):
                self._warn(offset, index, name, f"value of {key[:40]!r} is not printable ASCII")

    _HANDLERS: ClassVar[dict] = {}


LibxlRules._HANDLERS = {
    C.LIBXL_REC_END: LibxlRules._end,
    C.LIBXL_REC_LIBXC_CONTEXT: LibxlRules._libxc_context,
    C.LIBXL_REC_EMULATOR_XENSTORE_DATA: LibxlRules._xenstore,
    C.LIBXL_REC_EMULATOR_CONTEXT: LibxlRules._emulator_context,
    C.LIBXL_REC_CHECKPOINT_END: LibxlRules._checkpoint_end,
    C.LIBXL_REC_CHECKPOINT_STATE: LibxlRules._checkpoint_state,
}


def check_xl_header(offset: int, header, report: Report) -> None:
    """What xl's restore checks beyond the reader (spec 5): byte order, STREAMv2, the stored config."""
    name = "header"
    if header.byteorder != "<":
        report(ERROR, offset + 32, None, name, "written in big-endian order: xl on x86 refuses a byte-order mismatch")
    if not header.streamv2:
        report(ERROR, offset + 36, None, name, "mandatory flags lack STREAMv2: xl reads the payload as a legacy stream")
    if header.optional_flags:
        report(WARNING, offset + 40, None, name, f"optional flags {header.optional_flags:#x} set (none are defined)")
    config = header.config
    if config is None:
        report(WARNING, offset + 44, None, name, "no stored domain configuration (xl always writes one)")
    elif header.mandatory_flags & C.XL_FLAG_JSON and not config.endswith(b"\0"):
        report(WARNING, offset + 48, None, name, "JSON configuration not NUL terminated (xl includes the NUL)")
