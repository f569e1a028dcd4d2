"""`xenstream bench hvm`: the v2 HVM save and restore engines on a simulated HVM guest, against `cat`.

A seeded HVM guest of --size is built in a child process, suspended and saved non-live as a v2 libxl
stream to a file in --dir (pages go out raw: nothing is normalised on this path); another child
restores that file from its fd (payloads straight into guest frames) into a fresh simulated host whose
RAM is made resident first. Each child times only the engine and reports its extra peak RSS (the
high-water mark reset just before the engine starts, minus the resident size then). Baselines, in the
same round: save vs ``cat FILE > COPY``, restore vs ``cat FILE > /dev/null``.

A ratio is baseline time / engine time. Targets: both ratios >= 0.6 and extra RSS < 64 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from xenstream.convert.bench import Benchmark, human_size, measure, parse_size, register
from xenstream.hv.abi import PAGE_SIZE

TARGET_RATIO = 0.6
TARGET_EXTRA_RSS = 64 << 20


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="1G", help="guest memory (default 1G)")
    parser.add_argument("--dir", help="scratch directory (default: a new temporary directory)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the best of each program counts (default 2)")


def run(args) -> int:
    size = parse_size(args.size)
    spec = f"hvm:mem={size // (1 << 20)}M,vcpus=2,seed=1"
    scratch = args.dir or tempfile.mkdtemp(prefix="xenstream-bench-hvm-")
    os.makedirs(scratch, exist_ok=True)
    image, copy = os.path.join(scratch, "hvm.v2"), os.path.join(scratch, "copy.v2")
    best: dict[str, float] = {}
    extra: dict[str, int] = {}
    stream_bytes = 0
    try:
        for _ in range(max(1, args.repeat)):
            saved = _child("save", spec, image)
            write = measure(["sh", "-c", 'cat "$0" > "$1"', image, copy], capture=False)
            os.unlink(copy)
            restored = _child("restore", spec, image)
            read = measure(["cat", image], capture=False)
            for name, seconds in (("save", saved["seconds"]), ("restore", restored["seconds"]),
                                  ("cat>file", write.seconds), ("cat>null", read.seconds)):
                best[name] = min(best.get(name, seconds), seconds)
            extra["save"] = max(extra.get("save", 0), saved["extra_rss"])
            extra["restore"] = max(extra.get("restore", 0), restored["extra_rss"])
            stream_bytes = saved["bytes"]
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    failures = 0
    for name, baseline in (("save", "cat>file"), ("restore", "cat>null")):
        ratio = best[baseline] / best[name]
        ok = ratio >= TARGET_RATIO and extra[name] < TARGET_EXTRA_RSS
        failures += not ok
        print(f"hvm {name:8s} {human_size(size)} guest, {human_size(stream_bytes)} stream: {best[name]:.2f} s, "
              f"{baseline} {best[baseline]:.2f} s, ratio {ratio:.2f}x (target >= {TARGET_RATIO}), "
              f"extra RSS {human_size(max(extra[name], 0))} (target < {human_size(TARGET_EXTRA_RSS)})"
              f"{'' if ok else '  MISSED'}")
    # Context for the restore: it fills fresh memory, which cat > /dev/null never does.
    print(f"hvm restore vs cat>file (fresh destination pages too): ratio {best['cat>file'] / best['restore']:.2f}x")
    return 1 if failures else 0


def _child(action: str, spec: str, path: str) -> dict:
    completed = subprocess.run([sys.executable, "-m", __name__, action, spec, path], capture_output=True, timeout=3600)
    if completed.returncode:
        raise RuntimeError(f"bench {action} child failed: {completed.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(completed.stdout)


# ------------------------------------------------------------------ children


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the resident-set high-water mark to the current RSS


def _child_save(spec_text: str, path: str) -> dict:
    from xenstream.convert.commands.save_hvm import build_suspendable_hvm
    from xenstream.hv.sim.builder_hvm import HvmGuestSpec
    from xenstream.v2.save_hvm import save_hvm_libxl
    from xenstream.v2.writer import V2Writer

    xen, guest = build_suspendable_hvm(HvmGuestSpec.parse(spec_text))

    def suspend() -> bool:
        guest.suspend()
        return True

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _reset_peak()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        result = save_hvm_libxl(xen, guest.domid, V2Writer(fd), suspend, lambda: guest.built.emulator, payload_fd=fd)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"seconds": seconds, "extra_rss": (peak - before) * 1024, "bytes": size, "pages": result.pages_written}


def _child_restore(spec_text: str, path: str) -> dict:
    from xenstream.hv.sim.builder_hvm import HvmGuestSpec
    from xenstream.hv.sim.xen import SimXen
    from xenstream.v2.restore_hvm import restore_hvm_new_domain

    spec = HvmGuestSpec.parse(spec_text)
    xen = SimXen(capacity_frames=spec.nr_pages + 8192)
    memory = xen.machine.memview
    for offset in range(0, len(memory), PAGE_SIZE):  # the host's RAM exists before the restore starts
        memory[offset] = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        _reset_peak()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        restore_hvm_new_domain(xen, fd, max_vcpus=spec.vcpus, max_pages=spec.nr_pages + 16)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    finally:
        os.close(fd)
    return {"seconds": seconds, "extra_rss": (peak - before) * 1024}


_CHILDREN = {"save": _child_save, "restore": _child_restore}

register(Benchmark(name="hvm", help="v2 HVM save and restore of a simulated guest vs cat (ratio and extra RSS)",
                   add_arguments=add_arguments, run=run))

if __name__ == "__main__":
    from xenstream.convert import logsetup

    logsetup.configure(verbosity=-1)
    print(json.dumps(_CHILDREN[sys.argv[1]](sys.argv[2], sys.argv[3])))
