"""`xenstream bench hvm`: the v2 HVM save and restore engines on a simulated HVM guest, against `cat`.

A seeded HVM guest of --size is built in a child process, suspended and saved non-live as a v2 libxl
stream to a file in --dir (tmpfs by default; pages go out raw: nothing is normalised on this path); another child
restores that file from its fd (payloads straight into guest frames) into a fresh simulated host whose
RAM is made resident first. Each child times only the engine and reports its extra peak RSS (the
high-water mark reset just before the engine starts, minus the resident size then). Baselines, in the
same round: save vs ``cat FILE > COPY`` (both write a new file: the image is removed before each save),
restore vs ``cat FILE > /dev/null`` (the stream warm in the page cache for both).

A ratio is baseline time / engine time. Targets: both ratios >= 0.6 and extra RSS < 64 MiB.
"""

from __future__ import annotations

from xenstream.convert.bench import (
    Benchmark,
    add_engine_arguments,
    child_main,
    register,
    run_save_restore,
    timed_restore,
    timed_save,
)

TARGET_RATIO = 0.6
TARGET_EXTRA_RSS = 64 << 20


def run(args) -> int:
    return run_save_restore(__name__, args, "hvm", image_name="hvm.v2", scratch_prefix="xenstream-bench-hvm-",
                            label="hvm ", target_ratio=TARGET_RATIO, target_extra_rss=TARGET_EXTRA_RSS,
                            fresh_image=True)


# ------------------------------------------------------------------ children


def _child_save(spec_text: str, path: str) -> dict:
    from xenstream.convert.commands.save import suspend_callback
    from xenstream.convert.commands.save_hvm import build_suspendable_hvm
    from xenstream.hv.sim.builder_hvm import HvmGuestSpec
    from xenstream.v2.save_hvm import save_hvm_libxl
    from xenstream.v2.writer import V2Writer

    xen, guest = build_suspendable_hvm(HvmGuestSpec.parse(spec_text))
    result, seconds, extra_rss, size = timed_save(
        path, lambda fd: save_hvm_libxl(xen, guest.domid, V2Writer(fd), suspend_callback(guest),
                                        lambda: guest.built.emulator, payload_fd=fd))
    return {"seconds": seconds, "extra_rss": extra_rss, "bytes": size, "pages": result.pages_written}


def _child_restore(spec_text: str, path: str) -> dict:
    from xenstream.hv.sim.builder_hvm import HvmGuestSpec
    from xenstream.hv.sim.xen import SimXen
    from xenstream.v2.restore_hvm import restore_hvm_new_domain

    spec = HvmGuestSpec.parse(spec_text)
    xen = SimXen(capacity_frames=spec.nr_pages + 8192)
    return timed_restore(xen, path, lambda fd: restore_hvm_new_domain(xen, fd, max_vcpus=spec.vcpus,
                                                                      max_pages=spec.nr_pages + 16))


_CHILDREN = {"save": _child_save, "restore": _child_restore}

register(Benchmark(name="hvm", help="v2 HVM save and restore of a simulated guest vs cat (ratio and extra RSS)",
                   add_arguments=add_engine_arguments, run=run))

if __name__ == "__main__":
    child_main(_CHILDREN)
