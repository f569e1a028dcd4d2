"""What the stream walker asks of the input, and how each demand is met from an `InputBuffer`.

The walker (`xenstream.legacy.walk`) is a generator: it yields events, and demands for bytes. The parser
meets a demand when the buffer can (returning the bytes to the walker), or answers NEED_DATA to its own
caller. `attempt` returns `NOT_YET` while more input could still arrive, and raises `InputEnded` when
the input ended without enough bytes.
"""

from __future__ import annotations

import attrs

from xenstream.legacy.buffer import InputBuffer

NOT_YET = object()


class InputEnded(Exception):
    """The input ended inside an element: `what`, needing `need` bytes of which `have` were there."""

    def __init__(self, what: str, need: int | None, have: int, offset: int):
        super().__init__(what)
        self.what = what
        self.need = need
        self.have = have
        self.offset = offset

    def message(self) -> str:
        need = f"{self.need} bytes" if self.need is not None else "more bytes"
        return f"input ends inside {self.what} (needs {need}, {self.have} present)"


@attrs.frozen
class Read:
    """Exactly n bytes, as a memoryview."""

    n: int
    what: str

    def attempt(self, buffer: InputBuffer):
        if buffer.available >= self.n:
            return buffer.take(self.n)
        if buffer.eof:
            raise InputEnded(self.what, self.n, buffer.available, buffer.offset)
        return NOT_YET


@attrs.frozen
class ReadOrEnd:
    """Exactly n bytes, or None when the input ends cleanly right here."""

    n: int
    what: str

    def attempt(self, buffer: InputBuffer):
        if buffer.available >= self.n:
            return buffer.take(self.n)
        if buffer.eof:
            if not buffer.available:
                return None
            raise InputEnded(self.what, self.n, buffer.available, buffer.offset)
        return NOT_YET


@attrs.frozen
class Peek:
    """Up to n bytes, not consumed; fewer only at the end of input."""

    n: int

    def attempt(self, buffer: InputBuffer):
        if buffer.available >= self.n or buffer.eof:
            return bytes(buffer.peek(self.n))
        return NOT_YET


@attrs.frozen
class ReadSome:
    """n bytes, or what is left at the end of input (possibly nothing)."""

    n: int

    def attempt(self, buffer: InputBuffer):
        if buffer.available >= self.n:
            return buffer.take(self.n)
        if buffer.eof:
            return buffer.take(buffer.available)
        return NOT_YET
