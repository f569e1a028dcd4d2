"""`xenstream bench verify`: the strict verifier against `cat FILE > /dev/null` on large PV streams.

For each size, a PV `xl save` file is synthesised (xenstream.v2.synth) into a scratch directory, read once
to bring it into the page cache, then `cat` and the verifier each run in their own child process, best of
--repeat runs. The verifier child reports the time spent verifying (excluding interpreter start-up and
imports); the parent measures both children's wall time and peak RSS.
"""

from __future__ import annotations

import json
import os
import sys
import time

from xenstream.convert.bench import (
    Benchmark,
    add_stream_arguments,
    human_size,
    measure,
    register,
    run_sizes,
    verdict,
    with_stream,
)
from xenstream.hv.abi import PAGE_SIZE

TARGET_RATIO = 0.5
TARGET_RSS = 64 << 20
DISK_MARGIN = 256 << 20


def add_arguments(parser) -> None:
    add_stream_arguments(parser, each="program")


def run(args) -> int:
    return run_sizes(args, lambda scratch, size, repeat: _bench_size(scratch, size, repeat, args.keep))


def _bench_size(scratch: str, size: int, repeat: int, keep: bool) -> int:
    path = os.path.join(scratch, f"pv-{human_size(size).replace(' ', '')}.xl")
    return with_stream("verify", path, size, size + DISK_MARGIN, _synthesise, lambda: _compare(path, repeat), keep)


def _synthesise(path: str, size: int) -> None:
    from xenstream.v2.synth import write_stream

    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        written = write_stream(fd, guest="pv", pages=size // PAGE_SIZE, wrap="xl", vcpus=4)
    finally:
        os.close(fd)
    print(f"synthesised {path}: {human_size(written)} PV xl save file in {time.perf_counter() - start:.1f} s")


def _compare(path: str, repeat: int) -> int:
    size = os.path.getsize(path)
    cat = ["cat", path]
    verifier = [sys.executable, "-m", "xenstream.convert.bench_verify", "--child", path]
    measure(cat, capture=False)  # into the page cache
    cats = [measure(cat, capture=False) for _ in range(repeat)]
    runs = [measure(verifier) for _ in range(repeat)]
    for r in runs:
        if r.returncode != 0:
            print(f"verify {human_size(size)}: the verifier failed (exit {r.returncode})")
            return 1
    reports = [json.loads(r.stdout) for r in runs]
    best_cat = min(c.seconds for c in cats)
    best_run = min(runs, key=lambda r: r.seconds)
    best_verify = min(rep["seconds"] for rep in reports)
    rss = max(r.max_rss_bytes for r in runs)
    ratio = best_cat / best_verify
    whole = best_cat / best_run.seconds
    gbps = size / 1e9
    print(f"verify {human_size(size)} PV stream from the page cache: {'valid' if reports[0]['ok'] else 'INVALID'}, "
          f"best of {repeat}")
    print(f"  cat FILE > /dev/null     {best_cat:7.3f} s  {gbps / best_cat:6.2f} GB/s")
    print(f"  verifier, verifying      {best_verify:7.3f} s  {gbps / best_verify:6.2f} GB/s  "
          f"ratio to cat {ratio:.2f}x (target {TARGET_RATIO}x: {verdict(ratio >= TARGET_RATIO)})")
    print(f"  verifier, whole process  {best_run.seconds:7.3f} s  {gbps / best_run.seconds:6.2f} GB/s  "
          f"ratio to cat {whole:.2f}x (includes {best_run.seconds - best_verify:.2f} s of interpreter start-up)")
    print(f"  verifier peak RSS        {human_size(rss)} (target under {human_size(TARGET_RSS)}: "
          f"{verdict(rss < TARGET_RSS)})")
    return 0 if reports[0]["ok"] else 1


register(Benchmark(name="verify", help="the strict verifier against cat on 1 GiB and 4 GiB PV streams",
                   add_arguments=add_arguments, run=run))


def _child(path: str) -> None:
    """Verify one file; print {"ok", "seconds"} as JSON (seconds: verifying only, imports excluded)."""
    from xenstream.v2.verify import verify_path

    start = time.perf_counter()
    report = verify_path(path)
    print(json.dumps({"ok": report.ok, "seconds": time.perf_counter() - start}))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2])
