"""`xenstream bench engines`: the v2 save and restore engines on a simulated guest, against `cat`.

A seeded PV guest of --size is built in a child process, suspended and saved non-live to a file in
--dir (tmpfs by default, see bench.scratch_directory); another child restores that file (read from its
fd: payloads go straight into guest frames) into a fresh simulated host whose RAM is made resident
first (the simulator maps host memory lazily; a real host's memory exists, so first-touch page faults
are not the engine's cost). Each child times
only the engine (not the interpreter, imports or the guest build) and reports its own extra peak RSS:
the high-water mark reset just before the engine starts (Linux clear_refs) minus the resident size at
that moment, which already holds the guest memory. The baselines run in the same round, in the page
cache state the engines saw:

* save vs ``cat FILE > COPY`` (the same bytes written to a file on the same filesystem),
* restore vs ``cat FILE > /dev/null`` (the same bytes read).

A ratio is baseline time / engine time (>= 0.5 means at least half as fast as cat). Targets: both
ratios >= 0.5 and extra RSS < 64 MiB.
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

TARGET_RATIO = 0.5
TARGET_EXTRA_RSS = 64 << 20


def add_arguments(parser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--width", choices=("pv64", "pv32"), default="pv64", help="guest kind (default pv64)")


def run(args) -> int:
    # fresh_image: both writers start from a new file, as cat does.
    return run_save_restore(__name__, args, args.width, image_name="guest.v2", scratch_prefix="xenstream-bench-",
                            label="", target_ratio=TARGET_RATIO, target_extra_rss=TARGET_EXTRA_RSS, fresh_image=True)


# ------------------------------------------------------------------ children


def _child_save(spec_text: str, path: str) -> dict:
    from xenstream.convert.commands.save import build_suspendable, suspend_callback
    from xenstream.hv.sim.builder import GuestSpec
    from xenstream.v2.save import save_pv
    from xenstream.v2.writer import V2Writer

    xen, guest = build_suspendable(GuestSpec.parse(spec_text))
    result, seconds, extra_rss, _ = timed_save(
        path, lambda fd: save_pv(xen, guest.domid, V2Writer(fd), suspend_callback(guest), payload_fd=fd))
    return {"seconds": seconds, "extra_rss": extra_rss, "bytes": result.bytes_written}


def _child_restore(spec_text: str, path: str) -> dict:
    from xenstream.hv.sim.builder import GuestSpec
    from xenstream.hv.sim.xen import SimXen
    from xenstream.v2.restore import restore_new_domain

    spec = GuestSpec.parse(spec_text)
    xen = SimXen(capacity_frames=2 * spec.nr_pages + 8192)
    return timed_restore(xen, path, lambda fd: restore_new_domain(xen, fd, max_vcpus=spec.vcpus,
                                                                  max_pages=spec.nr_pages))


_CHILDREN = {"save": _child_save, "restore": _child_restore}

register(Benchmark(name="engines", help="v2 save and restore of a simulated guest vs cat (ratio and extra RSS)",
                   add_arguments=add_arguments, run=run))

if __name__ == "__main__":
    child_main(_CHILDREN)
