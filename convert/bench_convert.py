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
import sys

from xenstream.convert.bench import (
    Benchmark,
    add_stream_arguments,
    human_size,
    measure,
    parse_size,
    register,
    run_sizes,
    scratch_directory,
    synthesise_pv64_v1,
    verdict,
    with_stream,
)

TARGET_RATIO = 0.95
TARGET_VERIFY_RATIO = 1 / 1.15
TARGET_RSS = 48 << 20
XEN_CONVERTER = "/usr/lib/xen-4.17/bin/convert-legacy-stream"
XEN_PYTHONPATH = "/usr/lib/xen-4.17/lib/python"
DISK_MARGIN = 256 << 20


def add_arguments(parser) -> None:
    add_stream_arguments(parser, each="command", dir_help="scratch directory (default: a new directory in /dev/shm "
                                                          "if it has room, else in TMPDIR)")
    parser.add_argument("--no-xen", action="store_true", help="do not run Xen's converter even when installed")


def run(args) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    return run_sizes(args, lambda scratch, size, repeat: _bench_size(scratch, size, repeat, args),
                     scratch=None if args.dir else scratch_directory("xenstream-bench-", 2 * max(sizes)))


def _bench_size(scratch: str, size: int, repeat: int, args) -> int:
    source = os.path.join(scratch, f"pv64-{human_size(size).replace(' ', '')}.v1")
    target = os.path.join(scratch, "out.v2")
    xen = not args.no_xen and os.path.exists(XEN_CONVERTER)
    return with_stream("convert", source, size, 2 * size + DISK_MARGIN, synthesise_pv64_v1,
                       lambda: _compare(source, target, repeat, xen), args.keep, scratch_files=(target,))


def _ours() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "convert-legacy-stream")
    if os.path.exists(script):
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m xenstream.convert.compat_convert"


def _plain_python() -> str:
    """The interpreter itself for Xen's converter, not a `python3` found on PATH: a version-manager shim
    (pyenv's is a shell script) would add its own start-up, about 0.07 s here, to Xen's times only."""
    for candidate in (os.path.join(sys.base_prefix, "bin", "python3"), sys.executable):
        if os.access(candidate, os.X_OK):
            return candidate
    return "python3"


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
    xen_command = f"PYTHONPATH={XEN_PYTHONPATH} {shlex.quote(_plain_python())} {XEN_CONVERTER} -w 64 -g pv"
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
                line += f" (target {target_ratio:.2f}x: {verdict(ratio >= target_ratio)})"
                line += f"; peak RSS {human_size(rss)} (target under {human_size(TARGET_RSS)}: "
                line += f"{verdict(rss < TARGET_RSS)})"
            else:
                line += f"; peak RSS {human_size(rss)}"
            print(line)
            seconds[name] = best.seconds
        if "ours" in seconds and "xen" in seconds:
            speedup = seconds["xen"] / seconds["ours"]
            print(f"    ours vs Xen's converter  {speedup:.2f}x as fast "
                  f"(target never slower: {verdict(speedup >= 1)})")
    return 1 if failures else 0


register(Benchmark(name="convert", help="converting 1 GiB and 4 GiB 64-bit PV v1 streams file->file and "
                   "pipe->pipe, against cat and Xen's converter", add_arguments=add_arguments, run=run))
