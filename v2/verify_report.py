"""What a verification finds: one `Finding` per problem, gathered in a `Report`.

A finding names where it was seen (byte offset, record index, record name) and what is wrong, and
renders as one line. Errors make a stream invalid; warnings are legal but suspicious and kept apart.
"""

from __future__ import annotations

import attrs

ERROR = "error"
WARNING = "warning"

# Rule findings are collected, not fatal; a stream that trips the same rule a million times
# must not grow the report without bound.
DEFAULT_FINDING_CAP = 100


@attrs.frozen
class Finding:
    severity: str
    offset: int | None
    layer: str | None  # "libxc", "libxl" or "xl"
    index: int | None  # the record's index within its layer (as V2Reader counts); None for headers
    record: str  # record type name, or what else was being read ("image header", "end of input")
    message: str

    def __str__(self) -> str:
        where = "offset ?" if self.offset is None else f"offset {self.offset:#x}"
        which = f"{self.layer} {self.record}" if self.layer else self.record
        if self.index is not None:
            which = f"{self.layer} record {self.index} ({self.record})"
        return f"{self.severity}: {where}: {which}: {self.message}"

    def to_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class Report:
    """Everything one verification found. `ok` is the verdict: no errors (warnings allowed)."""

    errors: list[Finding] = attrs.field(factory=list)
    warnings: list[Finding] = attrs.field(factory=list)
    cap: int = DEFAULT_FINDING_CAP
    dropped_errors: int = 0
    dropped_warnings: int = 0
    broken: bool = False  # the stream could not be parsed past the first error
    format: str | None = None  # libxc | libxl | xl
    guest_type: str | None = None
    version: int | None = None
    checkpoints: int = 0
    records: int = 0
    pages: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.dropped_errors

    def add(self, finding: Finding) -> None:
        if finding.severity == ERROR:
            if len(self.errors) < self.cap:
                self.errors.append(finding)
            else:
                self.dropped_errors += 1
        elif len(self.warnings) < self.cap:
            self.warnings.append(finding)
        else:
            self.dropped_warnings += 1

    def lines(self) -> list[str]:
        out = [str(f) for f in self.errors]
        if self.dropped_errors:
            out.append(f"error: ... and {self.dropped_errors} more errors")
        out += [str(f) for f in self.warnings]
        if self.dropped_warnings:
            out.append(f"warning: ... and {self.dropped_warnings} more warnings")
        return out

    def to_dict(self) -> dict:
        return {
            "valid": self.ok,
            "format": self.format,
            "guest_type": self.guest_type,
            "version": self.version,
            "records": self.records,
            "pages": self.pages,
            "checkpoints": self.checkpoints,
            "bytes": self.bytes_read,
            "broken": self.broken,
            "errors": [f.to_dict() for f in self.errors],
            "warnings": [f.to_dict() for f in self.warnings],
            "dropped_errors": self.dropped_errors,
            "dropped_warnings": self.dropped_warnings,
        }
