"""The parser's input buffer: fed bytes objects, taken as memoryviews, never compacted by copying.

Fed chunks are kept as they came (immutable ``bytes``), so a memoryview handed out in an event stays
valid for as long as the event lives and no later feed can disturb it. A request that fits in the
current chunk costs no copy; one that straddles chunks joins exactly the chunks it needs, once. Chunks
are dropped as soon as they are consumed, so the buffer holds no more than what was fed and not yet
parsed.
"""

from __future__ import annotations

from collections import deque


class InputBuffer:
    def __init__(self) -> None:
        self._head = b""
        self._pos = 0
        self._rest: deque[bytes] = deque()
        self._available = 0
        self.offset = 0  # stream offset of the next unconsumed byte
        self.eof = False

    @property
    def available(self) -> int:
        return self._available

    def feed(self, data) -> None:
        if not data:
            self.eof = True
            return
        if self.eof:
            raise ValueError("data fed after end of input")
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer; ours must not change under views
        self._available += len(data)
        if self._pos == len(self._head) and not self._rest:
            self._head, self._pos = data, 0
        else:
            self._rest.append(data)

    def _gather(self, n: int) -> None:
        """Make the head hold at least n unconsumed bytes (n <= available), joining only what is needed."""
        if len(self._head) - self._pos >= n:
            return
        pieces = [memoryview(self._head)[self._pos :]]
        have = len(pieces[0])
        while have < n:
            chunk = self._rest.popleft()
            pieces.append(chunk)
            have += len(chunk)
        self._head, self._pos = b"".join(pieces), 0

    def take(self, n: int) -> memoryview:
        """Consume exactly n bytes (the caller checked `available`)."""
        self._gather(n)
        view = memoryview(self._head)[self._pos : self._pos + n]
        self._advance(n)
        return view

    def take_upto(self, n: int) -> memoryview:
        """Consume up to n bytes without joining: at most what the current chunk holds."""
        if self._pos == len(self._head):
            if not self._rest:
                return memoryview(b"")
            self._head, self._pos = self._rest.popleft(), 0
        size = min(n, len(self._head) - self._pos)
        view = memoryview(self._head)[self._pos : self._pos + size]
        self._advance(size)
        return view

    def peek(self, n: int) -> memoryview:
        """Up to n unconsumed bytes, not consumed."""
        n = min(n, self._available)
        self._gather(n)
        return memoryview(self._head)[self._pos : self._pos + n]

    def _advance(self, n: int) -> None:
        self._pos += n
        self._available -= n
        self.offset += n
        if self._pos == len(self._head):
            # drop our reference at once: views handed out keep what they need alive on their own
            self._head, self._pos = (self._rest.popleft(), 0) if self._rest else (b"", 0)

    def skip_external(self, n: int) -> None:
        """Count n bytes the driver moved itself (only when nothing is buffered)."""
        if n and self._available:
            raise ValueError(f"{self._available} payload bytes are still buffered; take them first")
        self.offset += n
