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

import os
import shutil
import tempfile

from xenstream.convert.bench import (
    Benchmark,
    child_main,
    make_resident,
    parse_size,
    register,
    report_save_restore,
    save_restore_rounds,
    timed_engine,
)

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
    try:
        best, extra, stream_bytes = save_restore_rounds(__name__, spec, image, copy, args.repeat, fresh_image=False)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    failures = report_save_restore("hvm ", size, stream_bytes, best, extra, TARGET_RATIO, TARGET_EXTRA_RSS)
    return 1 if failures else 0


# ------------------------------------------------------------------ children


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
        result, seconds, extra_rss = timed_engine(
            lambda: save_hvm_libxl(xen, guest.domid, V2Writer(fd), suspend, lambda: guest.built.emulator, payload_fd=fd))
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"seconds": seconds, "extra_rss": extra_rss, "bytes": size, "pages": result.pages_written}


def _child_restore(spec_text: str, path: str) -> dict:
    from xenstream.hv.sim.builder_hvm import HvmGuestSpec
    from xenstream.hv.sim.xen import SimXen
    from xenstream.v2.restore_hvm import restore_hvm_new_domain

    spec = HvmGuestSpec.parse(spec_text)
    xen = SimXen(capacity_frames=spec.nr_pages + 8192)
    make_resident(xen.machine.memview)
    fd = os.open(path, os.O_RDONLY)
    try:
        _, seconds, extra_rss = timed_engine(
            lambda: restore_hvm_new_domain(xen, fd, max_vcpus=spec.vcpus, max_pages=spec.nr_pages + 16))
    finally:
        os.close(fd)
    return {"seconds": seconds, "extra_rss": extra_rss}


_CHILDREN = {"save": _child_save, "restore": _child_restore}

register(Benchmark(name="hvm", help="v2 HVM save and restore of a simulated guest vs cat (ratio and extra RSS)",
                   add_arguments=add_arguments, run=run))

if __name__ == "__main__":
    child_main(_CHILDREN)
