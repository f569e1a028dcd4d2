"""`xenstream bench legacy-parse`: the v1 parser reading a 64-bit PV stream from a pipe, against `cat | cat`.

For each size a 64-bit PV v1 stream is synthesised (xenstream.legacy.build) into a scratch directory and
read once into the page cache. Then, best of --repeat runs each, in the same run:

* baseline: ``cat FILE | cat > /dev/null``
* parser:   ``cat FILE | python -m xenstream.convert.bench_legacy_child read|splice`` — the child
  drives `LegacyParser` in passthrough mode the way a converter would: events from the parser, page data
  moved by the driver itself (`take_payload` / `consumed_externally`), either read into one reused
  buffer (a user-space copy, like cat's) or spliced to /dev/null (a converter's zero-copy path).

Both pipelines are timed as wholes (the parser's includes interpreter start-up; the child also reports
its parsing time alone) and the child reports its own peak RSS.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from xenstream.convert.bench import (
    Benchmark,
    add_stream_arguments,
    human_size,
    measure,
    register,
    run_sizes,
    synthesise_pv64_v1,
    verdict,
    with_stream,
)

TARGET_RATIO = 0.8
TARGET_RSS = 64 << 20
DISK_MARGIN = 256 << 20


def add_arguments(parser) -> None:
    add_stream_arguments(parser, each="pipeline")


def run(args) -> int:
    return run_sizes(args, lambda scratch, size, repeat: _bench_size(scratch, size, repeat, args.keep))


def _bench_size(scratch: str, size: int, repeat: int, keep: bool) -> int:
    path = os.path.join(scratch, f"pv64-{human_size(size).replace(' ', '')}.v1")
    return with_stream("legacy-parse", path, size, size + DISK_MARGIN, synthesise_pv64_v1,
                       lambda: _compare(path, repeat), keep)


def _compare(path: str, repeat: int) -> int:
    size = os.path.getsize(path)
    quoted = shlex.quote(path)
    baseline = ["sh", "-c", f"cat {quoted} | cat > /dev/null"]
    measure(["cat", path], capture=False)  # into the page cache
    cats = [measure(baseline, capture=False) for _ in range(repeat)]
    best_cat = min(c.seconds for c in cats)
    gb = size / 1e9
    print(f"legacy-parse {human_size(size)} 64-bit PV v1 stream through a pipe, best of {repeat}")
    print(f"  cat FILE | cat > /dev/null        {best_cat:7.3f} s  {gb / best_cat:6.2f} GB/s")
    failures = 0
    for mode, what in (("read", "page data read by the driver"), ("splice", "page data spliced to /dev/null")):
        child = f"{shlex.quote(sys.executable)} -m xenstream.convert.bench_legacy_child {mode}"
        runs = [measure(["sh", "-c", f"cat {quoted} | {child}"]) for _ in range(repeat)]
        if any(r.returncode != 0 for r in runs):
            print(f"  parser ({what}): failed (exit {max(r.returncode for r in runs)})")
            failures += 1
            continue
        reports = [json.loads(r.stdout) for r in runs]
        best_whole = min(r.seconds for r in runs)
        best_parse = min(rep["seconds"] for rep in reports)
        rss = max(rep["max_rss_bytes"] for rep in reports)
        ratio = best_cat / best_whole
        print(f"  cat FILE | parser, {mode:6}         {best_whole:7.3f} s  {gb / best_whole:6.2f} GB/s  ratio to cat "
              f"{ratio:.2f}x (target {TARGET_RATIO}x: {verdict(ratio >= TARGET_RATIO)}); {what}")
        print(f"    of which parsing               {best_parse:7.3f} s  (the rest: interpreter start-up, imports); "
              f"{reports[0]['events']} events")
        print(f"    parser peak RSS                {human_size(rss)} (target under {human_size(TARGET_RSS)}: "
              f"{verdict(rss < TARGET_RSS)})")
    return 1 if failures else 0


register(Benchmark(name="legacy-parse", help="the v1 parser on 1 GiB and 4 GiB 64-bit PV streams from a pipe, "
                   "against cat | cat", add_arguments=add_arguments, run=run))
