"""The legacy v1 stream's error family: one typed exception per kind of bad input, each with a byte offset."""


class StreamError(Exception):
    """Bad v1 input. `offset` is the byte offset in the stream where the problem was found."""

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
    """Well-formed, but a variant or feature this implementation does not handle."""


class DetectionError(StreamError):
    """The variant could not be decided from the bytes; the message names the option to pass."""
