"""`xenstream bench convert`: converting 64-bit PV v1 streams, against cat and Xen's converter, same run.

For each size a 64-bit PV v1 stream is synthesised (xenstream.legacy.build) into a scratch directory
(tmpfs when it has room, so that the figures are the programs' and not the disk's) and read once into
the page cache. Then, best of --repeat runs each, the commands of a shape taking turns:

* file -> file:  ``cat IN > OUT``  vs  ``convert-legacy-stream -i IN -o OUT``  (and ``--verify``)
* pipe -> pipe:  ``cat IN | cat | cat > OUT``  vs  ``cat IN | convert-legacy-stream -i 0 -o 1 | cat > OUT``
* Xen 4.17's ``convert-legacy-stream -w 64 -g pv`` in both shapes, when installed.

Our converter runs as the console script libxl would exec, so its times include interpreter start-up.
Peak RSS is that of the measured process tree (the converter dominates it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time

from xenstream.convert.bench import Benchmark, human_size, measure, parse_size, register
from xenstream.hv.abi import PAGE_SIZE

TARGET_RATIO = 0.95
TARGET_VERIFY_RATIO = 1 / 1.15
TARGET_RSS = 48 << 20
XEN_CONVERTER = "/usr/lib/xen-4.17/bin/convert-legacy-stream"
XEN_PYTHONPATH = "/usr/lib/xen-4.17/lib/python"
DISK_MARGIN = 256 << 20


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default="1G,4G", help="comma-separated stream sizes (default 1G,4G)")
    parser.add_argument("--dir", help="scratch directory (default: a new directory in /dev/shm if it has room, "
                                      "else in TMPDIR)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command; the best counts (default 3)")
    parser.add_argument("--no-xen", action="store_true", help="do not run Xen's converter even when installed")
    parser.add_argument("--keep", action="store_true", help="keep the generated streams")


def run(args) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    scratch = args.dir or _scratch_directory(max(sizes))
    os.makedirs(scratch, exist_ok=True)
    failures = 0
    try:
        for size in sizes:
            failures += _bench_size(scratch, size, max(1, args.repeat), args)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failures else 0


def _scratch_directory(size: int) -> str:
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size + DISK_MARGIN:
        return tempfile.mkdtemp(prefix="xenstream-bench-", dir="/dev/shm")
    return tempfile.mkdtemp(prefix="xenstream-bench-")


def _bench_size(scratch: str, size: int, repeat: int, args) -> int:
    source = os.path.join(scratch, f"pv64-{human_size(size).replace(' ', '')}.v1")
    free = shutil.disk_usage(scratch).free
    if not os.path.exists(source) and free < 2 * size + DISK_MARGIN:
        print(f"convert {human_size(size)}: skipped, {human_size(free)} free in {scratch} "
              f"(needs {human_size(2 * size + DISK_MARGIN)})")
        return 0
    target = os.path.join(scratch, "out.v2")
    try:
        if not os.path.exists(source):
            _synthesise(source, size)
        return _compare(source, target, repeat, xen=not args.no_xen and os.path.exists(XEN_CONVERTER))
    finally:
        for path in (target,) if args.keep else (target, source):
            if os.path.exists(path):
                os.unlink(path)


def _synthesise(path: str, size: int) -> None:
    from xenstream.legacy.build import BuildOptions, write_stream

    start = time.perf_counter()
    with open(path, "wb") as sink:
        write_stream(sink, BuildOptions(width=64, guest="pv", pages=size // PAGE_SIZE, vcpus=4, seed=1))
    print(f"synthesised {path}: {human_size(os.path.getsize(path))} 64-bit PV v1 stream "
          f"in {time.perf_counter() - start:.1f} s")


def _ours() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "convert-legacy-stream")
    if os.path.exists(script):
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m xenstream.convert.compat_convert"


def _interleaved(commands: dict[str, str], target: str, repeat: int) -> dict:
    """Each command `repeat` times, taking turns (cat, ours, ..., cat, ours, ...) so that a burst of load
    from elsewhere falls on all of them alike. Per command: (best run, peak RSS) or (None, exit code)."""
    runs: dict[str, list] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            if os.path.exists(target):
                os.unlink(target)
            runs[name].append(measure(["sh", "-c", command], capture=False))
    results = {}
    for name, measured in runs.items():
        failed = [r for r in measured if r.returncode != 0]
        if failed:
            results[name] = (None, failed[0].returncode)
        else:
            results[name] = (min(measured, key=lambda r: r.seconds), max(r.max_rss_bytes for r in measured))
    return results


def _compare(source: str, target: str, repeat: int, xen: bool) -> int:
    size = os.path.getsize(source)
    gb = size / 1e9
    src, out = shlex.quote(source), shlex.quote(target)
    ours = _ours()
    xen_command = f"PYTHONPATH={XEN_PYTHONPATH} python3 {XEN_CONVERTER} -w 64 -g pv"
    measure(["cat", source], capture=False)  # into the page cache
    shapes = {
        "file -> file": {
            "baseline": f"cat {src} > {out}",
            "ours": f"{ours} -i {src} -o {out}",
            "ours --verify": f"{ours} --verify -i {src} -o {out}",
            "xen": f"{xen_command} -i {src} -o {out}",
        },
        "pipe -> pipe": {
            "baseline": f"cat {src} | cat | cat > {out}",
            "ours": f"cat {src} | {ours} -i 0 -o 1 | cat > {out}",
            "xen": f"cat {src} | {xen_command} -i 0 -o 1 | cat > {out}",
        },
    }
    print(f"convert {human_size(size)} 64-bit PV v1 stream, best of {repeat}")
    failures = 0
    for shape, commands in shapes.items():
        if not xen:
            commands.pop("xen")
        results = _interleaved(commands, target, repeat)
        base, _ = results.pop("baseline")
        seconds = {}
        print(f"  {shape}")
        print(f"    cat                      {base.seconds:7.3f} s  {gb / base.seconds:6.2f} GB/s")
        for name, (best, rss) in results.items():
            if best is None:
                print(f"    {name:24} failed (exit {rss})")
                failures += name != "xen"
                continue
            ratio = base.seconds / best.seconds
            target_ratio = TARGET_VERIFY_RATIO if name == "ours --verify" else TARGET_RATIO
            line = (f"    {name:24} {best.seconds:7.3f} s  {gb / best.seconds:6.2f} GB/s  "
                    f"{ratio:.2f}x cat's throughput")
            if name.startswith("ours"):
                line += f" (target {target_ratio:.2f}x: {'met' if ratio >= target_ratio else 'MISSED'})"
                line += f"; peak RSS {human_size(rss)} (target under {human_size(TARGET_RSS)}: "
                line += f"{'met' if rss < TARGET_RSS else 'MISSED'})"
            else:
                line += f"; peak RSS {human_size(rss)}"
            print(line)
            seconds[name] = best.seconds
        if "ours" in seconds and "xen" in seconds:
            speedup = seconds["xen"] / seconds["ours"]
            print(f"    ours vs Xen's converter  {speedup:.2f}x as fast "
                  f"(target never slower: {'met' if speedup >= 1 else 'MISSED'})")
    return 1 if failures else 0


register(Benchmark(name="convert", help="converting 1 GiB and 4 GiB 64-bit PV v1 streams file->file and "
                   "pipe->pipe, against cat and Xen's converter", add_arguments=add_arguments, run=run))
