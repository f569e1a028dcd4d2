"""`xenstream bench NAME ...`: run a registered benchmark (modules xenstream.convert.bench_<name>)."""

from __future__ import annotations

from xenstream.convert import bench


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (ratios to cat and peak RSS, measured in the same run)",
                                   description=__doc__.splitlines()[0].split(": ", 1)[1])
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, benchmark in sorted(bench.discover().items()):
        sub = benchmarks.add_parser(name, help=benchmark.help, description=benchmark.help)
        benchmark.add_arguments(sub)
        sub.set_defaults(func=_with_bytecode(benchmark.run))


def _with_bytecode(run):
    def run_compiled(args) -> int:
        bench.ensure_bytecode()
        return run(args)

    return run_compiled
