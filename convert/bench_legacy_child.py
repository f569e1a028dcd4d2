"""The measured side of `xenstream bench legacy-parse`: parse a v1 stream from stdin, print JSON.

    python -m xenstream.convert.bench_legacy_child [read|splice] < STREAM

Kept apart from the benchmark's registration so that the child imports only the parser: interpreter
start-up counts against it in the comparison with `cat | cat`.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import stat
import sys
import time

from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser

READ_SIZE = 1 << 16  # what a pipe holds by default
PAYLOAD_BUFFER = 4 << 20  # one batch of 1024 pages
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, Linux
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size


def parse_fd(fd: int, payload: str = "read") -> dict:
    """Parse a v1 stream from fd as a converter would drive the parser.

    Page data past what the parser buffered is moved by the driver: ``payload="read"`` reads it into one
    reused buffer (a copy into user space, as `cat` does), ``"splice"`` splices it to /dev/null (what
    a converter's pipeline does towards its output fd: no copy at all).
    """
    sink = os.open(os.devnull, os.O_WRONLY) if payload == "splice" else None
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)  # fewer wake-ups per batch, as any pipe reader may ask
        except OSError:
            pass
    parser = LegacyParser(passthrough=True)
    scratch = memoryview(bytearray(PAYLOAD_BUFFER))
    events = payload_bytes = 0
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            got = os.readv(fd, [scratch[:READ_SIZE]])
            parser.feed(scratch[:got])  # the parser keeps its own copy of what it was fed
            continue
        if event is DONE:
            break
        events += 1
        pending = parser.payload_pending
        if pending:
            payload_bytes += pending
            while parser.take_payload():
                pass
            rest = parser.payload_pending
            while rest:
                if sink is None:
                    got = os.readv(fd, [scratch[: min(rest, PAYLOAD_BUFFER)]])
                else:
                    got = os.splice(fd, sink, rest)
                if not got:
                    break  # the parser reports the truncation on the next call
                parser.consumed_externally(got)
                rest -= got
    return {"events": events, "payload_bytes": payload_bytes}


def main() -> None:
    start = time.perf_counter()
    result = parse_fd(sys.stdin.fileno(), sys.argv[1] if len(sys.argv) > 1 else "read")
    result["seconds"] = time.perf_counter() - start
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
