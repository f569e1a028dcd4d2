"""Benchmarks for `xenstream bench NAME`: a registry, and timing of child processes with their peak RSS.

A benchmark lives in a module `xenstream.convert.bench_<name>` that calls `register(Benchmark(...))` at
import; `xenstream bench` imports every such module and offers one sub-command per benchmark. Each
measured program runs in its own child process so that its wall time and peak RSS are its own
(`os.wait4` gives the rusage of exactly that child). Benchmarks print ratios to a baseline measured in the
same run (such as `cat FILE > /dev/null`), never absolute targets baked into tests.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from typing import Callable

import attrs


@attrs.frozen
class Benchmark:
    name: str
    help: str
    add_arguments: Callable  # (argparse parser) -> None
    run: Callable  # (parsed args) -> exit code


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} registered twice")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def discover() -> dict[str, Benchmark]:
    """Import every xenstream.convert.bench_* module; each registers its benchmarks."""
    from xenstream import convert

    for module in pkgutil.iter_modules(convert.__path__):
        if module.name.startswith("bench_"):
            importlib.import_module(f"{convert.__name__}.{module.name}")
    return BENCHMARKS


@attrs.frozen
class Run:
    seconds: float
    max_rss_bytes: int
    returncode: int
    stdout: bytes


# A child's peak RSS as Linux counts it includes the high-water mark of the process it was forked from
# (kept across exec), so measured programs are forked by this small spawner, not by a big parent.
_SPAWNER = """
import os, sys, time
report_fd = int(sys.argv[1])
argv = sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(report_fd)
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(report_fd, f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}".encode())
"""


def measure(argv: list[str], capture: bool = True) -> Run:
    """Run argv as a child: its wall time, its own peak RSS, and its stdout when `capture` (otherwise
    stdout is /dev/null, as for `cat FILE > /dev/null`). stderr passes through."""
    read_end, write_end = os.pipe()
    try:
        spawner = subprocess.Popen([sys.executable, "-c", _SPAWNER, str(write_end), *argv], pass_fds=(write_end,),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
        os.close(write_end)
        stdout = spawner.stdout.read() if capture else b""
        spawner.wait()
        with os.fdopen(read_end, "rb") as result:
            read_end = None
            seconds, max_rss_kib, returncode = result.read().split()
    finally:
        if read_end is not None:
            os.close(read_end)
    if capture:
        spawner.stdout.close()
    return Run(seconds=float(seconds), max_rss_bytes=int(max_rss_kib) * 1024, returncode=int(returncode), stdout=stdout)


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1G', '512M', '4GiB', '1048576' -> bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
