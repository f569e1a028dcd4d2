"""Benchmarks for `xenstream bench NAME`: a registry, and timing of child processes with their peak RSS.

A benchmark lives in a module `xenstream.convert.bench_<name>` that calls `register(Benchmark(...))` at
import; `xenstream bench` imports every such module and offers one sub-command per benchmark. Each
measured program runs in its own child process so that its wall time and peak RSS are its own
(`os.wait4` gives the rusage of exactly that child). Benchmarks print ratios to a baseline measured in the
same run (such as `cat FILE > /dev/null`), never absolute targets baked into tests.

Also here, what several benchmarks share: streams of several sizes synthesised into a scratch directory
(`add_stream_arguments`, `run_sizes`, `with_stream`), and engines timed inside a child process with
their extra peak RSS, against cat (`timed_engine`, `child_main`, `save_restore_rounds`).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import attrs

from xenstream.hv.abi import PAGE_SIZE


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


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ------------------------------------------------------------------ streams of several sizes in a scratch directory


def add_stream_arguments(parser, each: str,
                         dir_help: str = "scratch directory for the streams (default: a new temporary directory)") -> None:
    """--sizes, --dir, --repeat, --keep: the options of a benchmark over synthesised streams of several sizes
    (`each`: what runs --repeat times, for the help)."""
    parser.add_argument("--sizes", default="1G,4G", help="comma-separated stream sizes (default 1G,4G)")
    parser.add_argument("--dir", help=dir_help)
    parser.add_argument("--repeat", type=int, default=3, help=f"runs of each {each}; the best counts (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the generated streams")


def run_sizes(args, bench_size: Callable, scratch: str | None = None) -> int:
    """bench_size(scratch, size, repeat) for each of --sizes, in --dir or `scratch` (removed afterwards
    unless --keep) or a new temporary directory; 1 when any size failed."""
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    scratch = args.dir or scratch or tempfile.mkdtemp(prefix="xenstream-bench-")
    os.makedirs(scratch, exist_ok=True)
    failures = 0
    try:
        for size in sizes:
            failures += bench_size(scratch, size, max(1, args.repeat))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failures else 0


def with_stream(label: str, path: str, size: int, needed: int, synthesise: Callable, compare: Callable, keep: bool,
                scratch_files: tuple[str, ...] = ()) -> int:
    """compare() on the stream at `path`, synthesised there first unless it exists; skipped (0) when the
    scratch directory has fewer than `needed` bytes free. The stream (unless `keep`) and `scratch_files`
    are removed afterwards."""
    free = shutil.disk_usage(os.path.dirname(path)).free
    if not os.path.exists(path) and free < needed:
        print(f"{label} {human_size(size)}: skipped, {human_size(free)} free in {os.path.dirname(path)} "
              f"(needs {human_size(needed)})")
        return 0
    try:
        if not os.path.exists(path):
            synthesise(path, size)
        return compare()
    finally:
        for leftover in scratch_files if keep else (*scratch_files, path):
            if os.path.exists(leftover):
                os.unlink(leftover)


def synthesise_pv64_v1(path: str, size: int) -> None:
    """A 64-bit PV v1 stream of about `size` bytes (xenstream.legacy.build), timed and reported."""
    from xenstream.legacy.build import BuildOptions, write_stream

    start = time.perf_counter()
    with open(path, "wb") as sink:
        write_stream(sink, BuildOptions(width=64, guest="pv", pages=size // PAGE_SIZE, vcpus=4, seed=1))
    print(f"synthesised {path}: {human_size(os.path.getsize(path))} 64-bit PV v1 stream "
          f"in {time.perf_counter() - start:.1f} s")


def ensure_bytecode() -> None:
    """Byte-compile our modules where their cache is missing or stale, as `pip install .` or any first run does.

    Without it, a checkout run with PYTHONDONTWRITEBYTECODE set (or an editable install never run
    before) compiles every module from source at each start: 0.03-0.05 s added to every timed process,
    which no installed xenstream pays."""
    import compileall

    import xenstream.convert
    import xenstream.hv
    import xenstream.legacy
    import xenstream.v2

    for package in (xenstream.hv, xenstream.legacy, xenstream.v2, xenstream.convert):
        for directory in package.__path__:
            # compileall skips a module whose cache records its source's current mtime and size, the
            # same test the import system makes: only missing or stale caches are written.
            compileall.compile_dir(directory, quiet=2)


# ------------------------------------------------------------------ engines timed inside a child process


def json_child(module: str, *argv: str) -> dict:
    """Run `python -m module argv...` (a benchmark's child, see child_main) and return the JSON it prints."""
    completed = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, timeout=3600)
    if completed.returncode:
        raise RuntimeError(f"bench {argv[0]} child failed: {completed.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(completed.stdout)


def child_main(children: dict[str, Callable]) -> None:
    """A benchmark module run as a child: quiet logs, children[argv[1]](*argv[2:]) printed as JSON."""
    from xenstream.convert import logsetup

    logsetup.configure(verbosity=-1)
    print(json.dumps(children[sys.argv[1]](*sys.argv[2:])))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def timed_engine(call: Callable) -> tuple[object, float, int]:
    """(call(), its seconds, its extra peak RSS in bytes): the resident-set high-water mark is reset just
    before (Linux clear_refs) and the resident size at that moment, which already holds the guest, is
    subtracted."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the resident-set high-water mark to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    return result, seconds, (_status_kib("VmHWM") - before) * 1024


def timed_save(path: str, save: Callable[[int], object]) -> tuple[object, float, int, int]:
    """`save(fd)` timed (timed_engine) writing a new file at `path`: its result, seconds, extra peak RSS
    and the size of the file it wrote. For the "save" child of a save/restore benchmark."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        result, seconds, extra_rss = timed_engine(lambda: save(fd))
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return result, seconds, extra_rss, size


def timed_restore(xen, path: str, restore: Callable[[int], object]) -> dict:
    """The "restore" child's figures: `restore(fd)` of the image at `path` into the simulated host `xen`,
    timed (timed_engine) after the host's RAM is made resident."""
    make_resident(xen.machine.memview)
    fd = os.open(path, os.O_RDONLY)
    try:
        _, seconds, extra_rss = timed_engine(lambda: restore(fd))
    finally:
        os.close(fd)
    return {"seconds": seconds, "extra_rss": extra_rss}


def make_resident(memory) -> None:
    """Touch every page of a simulated host's RAM: a real host's memory exists before a restore starts
    (the simulator maps host memory lazily, and first-touch faults are not the engine's cost)."""
    for offset in range(0, len(memory), PAGE_SIZE):
        memory[offset] = 0


def add_engine_arguments(parser) -> None:
    """--size, --dir, --repeat: the options of a save/restore benchmark (see run_save_restore)."""
    parser.add_argument("--size", default="1G", help="guest memory (default 1G)")
    parser.add_argument("--dir", help="scratch directory (default: a new directory in /dev/shm if it has room, "
                                      "else in TMPDIR)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the best of each program counts (default 2)")


SCRATCH_MARGIN = 256 << 20


def scratch_directory(prefix: str, needed: int) -> str:
    """A new scratch directory on tmpfs (/dev/shm) when it has `needed` bytes free, else in TMPDIR.

    On a disk, the writeback of the last gigabyte written runs on the same two cores as whatever is
    timed next, and lands on one program or the other by chance; in memory the figures are the
    programs' own."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > needed + SCRATCH_MARGIN:
        return tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")
    return tempfile.mkdtemp(prefix=prefix)


def run_save_restore(module: str, args, guest_kind: str, *, image_name: str, scratch_prefix: str, label: str,
                     target_ratio: float, target_extra_rss: int, fresh_image: bool) -> int:
    """A save/restore benchmark: a seeded `guest_kind` guest of --size, saved to and restored from
    `image_name` in --dir by the module's "save" and "restore" children (child_main), against cat, in
    --repeat rounds; the figures printed with `label` before them. 1 when a target was missed."""
    size = parse_size(args.size)
    spec = f"{guest_kind}:mem={size // (1 << 20)}M,vcpus=2,seed=1"
    scratch = args.dir or scratch_directory(scratch_prefix, 2 * size)  # the image and cat's copy
    os.makedirs(scratch, exist_ok=True)
    image, copy = os.path.join(scratch, image_name), os.path.join(scratch, "copy.v2")
    try:
        best, extra, stream_bytes = _save_restore_rounds(module, spec, image, copy, args.repeat, fresh_image)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    failures = _report_save_restore(label, size, stream_bytes, best, extra, target_ratio, target_extra_rss)
    # Neither time includes the child's interpreter start-up and imports (nor building the guest): shown apart.
    startup = min(measure([sys.executable, "-c", f"import {module}"], capture=False).seconds for _ in range(2))
    print(f"{label}python start-up and the bench module's imports (not in any time above): {startup:.2f} s")
    return 1 if failures else 0


def _save_restore_rounds(module: str, spec: str, image: str, copy: str, repeat: int,
                         fresh_image: bool) -> tuple[dict, dict, int]:
    """`repeat` rounds of: the module's "save" child writing `image`, ``cat image > copy``, its "restore"
    child reading `image`, ``cat image > /dev/null``. Returns the best seconds of save, restore, cat>file
    and cat>null, the largest extra RSS of save and restore, and the stream's size (from the save child's
    "bytes"). `fresh_image`: remove the image before each save, so that it and cat both write a new file."""
    best: dict[str, float] = {}
    extra: dict[str, int] = {}
    stream_bytes = 0
    for _ in range(max(1, repeat)):
        if fresh_image and os.path.exists(image):
            os.unlink(image)
        saved = json_child(module, "save", spec, image)
        write = measure(["sh", "-c", 'cat "$0" > "$1"', image, copy], capture=False)
        os.unlink(copy)
        restored = json_child(module, "restore", spec, image)
        read = measure(["cat", image], capture=False)
        for name, seconds in (("save", saved["seconds"]), ("restore", restored["seconds"]),
                              ("cat>file", write.seconds), ("cat>null", read.seconds)):
            best[name] = min(best.get(name, seconds), seconds)
        extra["save"] = max(extra.get("save", 0), saved["extra_rss"])
        extra["restore"] = max(extra.get("restore", 0), restored["extra_rss"])
        stream_bytes = saved["bytes"]
    return best, extra, stream_bytes


def _report_save_restore(prefix: str, size: int, stream_bytes: int, best: dict, extra: dict, target_ratio: float,
                        target_extra_rss: int) -> int:
    """Print save vs cat>file and restore vs cat>null (ratios, extra RSS, verdicts); the number missed."""
    failures = 0
    for name, baseline in (("save", "cat>file"), ("restore", "cat>null")):
        ratio = best[baseline] / best[name]
        ok = ratio >= target_ratio and extra[name] < target_extra_rss
        failures += not ok
        print(f"{prefix}{name:8s} {human_size(size)} guest, {human_size(stream_bytes)} stream: {best[name]:.2f} s, "
              f"{baseline} {best[baseline]:.2f} s, ratio {ratio:.2f}x (target >= {target_ratio}), "
              f"extra RSS {human_size(max(extra[name], 0))} (target < {human_size(target_extra_rss)})"
              f"{'' if ok else '  MISSED'}")
    # Context for the restore: it fills fresh memory, which cat > /dev/null never does.
    print(f"{prefix}restore vs cat>file (fresh destination pages too): ratio {best['cat>file'] / best['restore']:.2f}x")
    return failures
