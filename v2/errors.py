"""The v2 stream's error family: one typed exception per kind of bad input, each with a byte offset."""


class StreamError(Exception):
    """Bad v2 input. `offset` is the byte offset in the stream where the problem was found."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"offset {self.offset:#x}: {self.message}"


class TruncatedStream(StreamError):
    """The input ended before the stream did."""


class MalformedStream(StreamError):
    """A field holds a value the format does not allow."""


class UnsupportedStream(StreamError):
    """Well-formed, but a feature or version this implementation does not handle."""
