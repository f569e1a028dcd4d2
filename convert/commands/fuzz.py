"""`xenstream fuzz TARGET|all [--time N]`: coverage-guided fuzzing of everything that reads untrusted bytes.

Targets (see xenstream.convert.fuzz_targets): legacy-parse, legacy-compression, v2-read, v2-verify,
convert, restore, restore-hvm; `all` shares --time between them. Each target runs in its own child process under
atheris (libFuzzer over instrumented Python; `pip install atheris`, an optional dependency imported only
here, only when fuzzing) with a structure-aware custom mutator (xenstream.convert.fuzz_mutators) half
the time and libFuzzer's byte mutations the other half. Seeds: the committed corpus
(tests/fuzz_corpus/TARGET, in a checkout), samples/, and streams our writers build on the spot.

Caps per input: --memory-mib of address space over the child's size at start (RLIMIT_AS, plus
libFuzzer's RSS limit) and --seconds of CPU (SIGPROF timer in the target, libFuzzer's wall-clock
timeout as a backstop). Any escaping exception, broken property, slow or oversized input is a finding:
its input is saved under --artifacts, the child restarts for the rest of the budget, and the command
exits 1. `--replay PATH...` runs saved inputs (files or folders) through the target without atheris;
`--engine random` fuzzes without atheris (mutations only, no coverage feedback); `--replay --coverage`
prints the line+branch coverage (coverage.py) of the code each target exercises. The cffi pagetable kernels
run uninstrumented (libFuzzer's C coverage needs clang); `--kernels python` fuzzes their instrumented
pure-Python twins instead.

Prints one line per target (inputs executed, coverage edges and features, corpus size, findings) and,
with --summary-line, one closing line over all targets.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

import attrs

from xenstream.convert import edge

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
CORPUS_ROOT = CHECKOUT / "tests" / "fuzz_corpus"
SAMPLE_DIRS = {"v1": CHECKOUT / "samples" / "v1", "v2": CHECKOUT / "samples" / "v2"}
_SAMPLE_SUFFIXES = (".md", ".py", ".json")
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")
CHILD_GRACE = 30  # seconds a child may run past its budget (start-up, final stats) before it counts as hung


def register(subparsers) -> None:
    parser = subparsers.add_parser("fuzz", help="coverage-guided fuzzing of the parsers, verifier, converter, restore",
                                   description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("target", help="a target name, or 'all'")
    parser.add_argument("--time", type=float, default=60.0, metavar="N", help="seconds of fuzzing in total (default 60)")
    parser.add_argument("--runs", type=int, default=0, metavar="N", help="stop each target after N inputs (0: no limit)")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris",
                        help="atheris: coverage-guided (needs atheris); random: structure-aware mutation only")
    parser.add_argument("--kernels", choices=("cffi", "python"), default="cffi",
                        help="pagetable kernels of the children: the compiled ones (run, not instrumented: no "
                             "clang here for libFuzzer's C coverage) or their pure-Python twins (instrumented)")
    parser.add_argument("--memory-mib", type=int, default=1024, metavar="M", help="address-space cap per target process")
    parser.add_argument("--seconds", type=float, default=2.0, metavar="S", help="CPU-time cap per input")
    parser.add_argument("--work", metavar="DIR", help="where the growing corpus and findings go (default: a temp dir)")
    parser.add_argument("--artifacts", metavar="DIR", help="where failing inputs are saved (default: WORK/findings)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0: from the clock)")
    parser.add_argument("--replay", nargs="*", metavar="PATH",
                        help="run these inputs (files or folders; none: the committed corpus) and stop")
    parser.add_argument("--coverage", action="store_true",
                        help="with --replay: line coverage of the code each target exercises (needs coverage.py)")
    parser.add_argument("--summary-line", action="store_true", help="end with one line over all targets")
    parser.add_argument("--json", metavar="FILE", help="also write the per-target figures as JSON")
    parser.set_defaults(func=run)


@attrs.define
class Figures:
    target: str
    inputs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    findings: list = attrs.Factory(list)

    def line(self) -> str:
        status = f"{len(self.findings)} finding(s): {', '.join(self.findings[:3])}" if self.findings else "no findings"
        return (f"fuzz {self.target}: {self.inputs} inputs in {self.seconds:.0f} s, cov {self.cov} ft {self.ft}, "
                f"corpus {self.corpus}, slowest {self.slowest * 1000:.0f} ms: {status}")


def run(args) -> int:
    return edge.run("xenstream fuzz", lambda: _run(args))


def _run(args) -> int:
    from xenstream.convert.fuzz_targets import TARGETS

    names = list(TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise edge.UsageError(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}, all")
    if args.replay is not None:
        return _replay(names, args)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="xenstream-fuzz-"))
    share = args.time / len(names)
    results = []
    for name in names:
        figures = _fuzz_target(name, share, work, args)
        print(figures.line(), flush=True)
        results.append(figures)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([attrs.asdict(f) for f in results], indent=2) + "\n")
    findings = sum(len(f.findings) for f in results)
    if args.summary_line:
        print(f"fuzz summary: {len(results)} targets, {sum(f.inputs for f in results)} inputs, "
              f"{findings} findings ({'FAIL' if findings else 'ok'}); work dir {work}", flush=True)
    return 1 if findings else 0


# ------------------------------------------------------------------ seeds


def seed_dirs(name: str, kind: str) -> list[pathlib.Path]:
    dirs = [CORPUS_ROOT / name]
    sample = SAMPLE_DIRS.get(kind)
    if sample is not None:
        dirs.append(sample)
    return [d for d in dirs if d.is_dir()]


def _inputs_of(paths) -> list[pathlib.Path]:
    files = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(_SAMPLE_SUFFIXES))
        elif path.is_file():
            files.append(path)
    return files


def _prepare_corpus(name: str, work: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The growing corpus (first: libFuzzer writes there) and the read-only seed folders."""
    from xenstream.convert.fuzz_targets import TARGETS, seed_corpus

    target = TARGETS[name]
    growing = work / name / "corpus"
    built = work / name / "built-seeds"
    for folder in (growing, built):
        folder.mkdir(parents=True, exist_ok=True)
    if not any(built.iterdir()):
        try:
            seeds = seed_corpus(target)
        except Exception as exc:  # noqa: BLE001 - a writer under change must not stop fuzzing the readers
            print(f"fuzz {name}: seeds from the writers unavailable ({type(exc).__name__}: {exc}); "
                  "using the committed corpus", file=sys.stderr, flush=True)
            seeds = {}
        for seed_name, data in seeds.items():
            (built / seed_name).write_bytes(data)
    return growing, [built, *seed_dirs(name, target.kind)]


# ------------------------------------------------------------------ one target


def _fuzz_target(name: str, seconds: float, work: pathlib.Path, args) -> Figures:
    growing, seeds = _prepare_corpus(name, work)
    artifacts = pathlib.Path(args.artifacts) if args.artifacts else work / "findings"
    artifacts.mkdir(parents=True, exist_ok=True)
    figures = Figures(name)
    deadline = time.monotonic() + seconds
    restarts = 0
    while True:
        left = deadline - time.monotonic()
        if left < 1 or (args.runs and figures.inputs >= args.runs):
            break
        before = {p.name for p in artifacts.iterdir()}
        stats = work / name / f"stats-{restarts}.json"
        command = [sys.executable, "-m", "xenstream.convert.commands.fuzz", "--child", name,
                   "--engine", args.engine, "--time", str(int(left)), "--runs", str(max(0, args.runs - figures.inputs) if args.runs else 0),
                   "--memory-mib", str(args.memory_mib), "--seconds", str(args.seconds),
                   "--seed", str(args.seed + restarts if args.seed else 0), "--stats", str(stats),
                   "--artifacts", str(artifacts), str(growing), *map(str, seeds)]
        log_path = work / name / f"child-{restarts}.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            environment = dict(os.environ, XENSTREAM_KERNELS=args.kernels)
            try:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                            timeout=left + CHILD_GRACE).returncode
            except subprocess.TimeoutExpired:  # run() has killed it
                returncode = None
        figures.seconds += time.monotonic() - started
        _absorb(figures, log_path.read_text(errors="replace"), stats)
        new = sorted({p.name for p in artifacts.iterdir()} - before)
        figures.findings += [str(artifacts / n) for n in new if any(kind in n for kind in ARTIFACT_PREFIXES)]
        if returncode == 0:
            break
        if not new:
            what = "hung past its budget, killed" if returncode is None else f"exit {returncode}"
            figures.findings.append(f"{log_path} ({what}, no input saved)")
        restarts += 1
    figures.corpus = sum(1 for p in growing.iterdir() if p.is_file())
    return figures


_DONE = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")


def _absorb(figures: Figures, log: str, stats: pathlib.Path) -> None:
    """Inputs from libFuzzer's final stats (or our own counter), coverage from its last status line."""
    executed = [int(n) for n in _EXECUTED.findall(log)]
    ours = json.loads(stats.read_text()) if stats.exists() else {}
    figures.inputs += executed[-1] if executed else ours.get("inputs", 0)
    figures.slowest = max(figures.slowest, ours.get("slowest", 0.0))
    status = _DONE.findall(log)
    if status:
        figures.cov = max(figures.cov, int(status[-1][1]))
        figures.ft = max(figures.ft, int(status[-1][2]))


# ------------------------------------------------------------------ replay


def _replay(names: list[str], args) -> int:
    from xenstream.convert.fuzz_targets import TARGETS, Caps, run_one

    _quiet_logs()
    caps = Caps(memory_mib=args.memory_mib, seconds=args.seconds)
    failures = 0
    for name in names:
        target = TARGETS[name]
        files = _inputs_of(args.replay or seed_dirs(name, target.kind))
        if len(names) > 1 and args.replay:  # folders per target: a campaign's WORK, or a corpus root
            roots = [pathlib.Path(p) / name for p in args.replay]
            files = _inputs_of([*roots, *(r / "corpus" for r in roots), *(r / "built-seeds" for r in roots),
                                *seed_dirs(name, target.kind)])
        measure = _line_coverage(name) if args.coverage else None
        slowest = 0.0
        for path in files:
            try:
                slowest = max(slowest, run_one(target, path.read_bytes(), caps))
            except BaseException as exc:  # noqa: BLE001 - every escape is a finding to print
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures += 1
                print(f"fuzz {name}: {path}: {type(exc).__name__}: {exc}", flush=True)
        covered = f", {_coverage_figure(measure)}" if measure is not None else ""
        print(f"fuzz {name}: replayed {len(files)} inputs, slowest {slowest * 1000:.0f} ms{covered}", flush=True)
    return 1 if failures else 0


def _line_coverage(name: str):
    """A started coverage.py measurement of the modules in COVERAGE[name]."""
    import coverage

    paths = []
    for module in COVERAGE[name]:
        spec = importlib.util.find_spec(module)
        if spec.submodule_search_locations:
            paths += [f"{location}/*" for location in spec.submodule_search_locations]
        else:
            paths.append(spec.origin)
    measure = coverage.Coverage(include=paths, branch=True, data_file=None)
    measure.start()
    return measure


def _coverage_figure(measure) -> str:
    import io

    measure.stop()
    percent = measure.report(file=io.StringIO())
    data = measure.get_data()
    lines = sum(len(data.lines(f) or ()) for f in data.measured_files())
    return f"line+branch coverage {percent:.1f}% ({lines} lines run in {len(data.measured_files())} modules)"


# ------------------------------------------------------------------ the child process


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


# What each target instruments (module-name prefixes): the code it exists to exercise.
COVERAGE = {
    "legacy-parse": ("xenstream.legacy",),
    "legacy-compression": ("xenstream.legacy.compression",),
    "v2-read": ("xenstream.v2.reader", "xenstream.v2.records", "xenstream.v2.libxl_records", "xenstream.v2.xl_header"),
    "v2-verify": ("xenstream.v2",),
    "convert": ("xenstream.convert.transform", "xenstream.convert.pipeline", "xenstream.convert.fdmove",
                "xenstream.legacy", "xenstream.v2.writer", "xenstream.v2.records", "xenstream.v2.libxl_records"),
    "restore": ("xenstream.v2.restore", "xenstream.v2.reader", "xenstream.v2.records", "xenstream.v2.positional_fill",
                "xenstream.hv"),
    "restore-hvm": ("xenstream.v2.restore_hvm", "xenstream.v2.reader", "xenstream.v2.records",
                    "xenstream.v2.libxl_records", "xenstream.v2.positional_fill", "xenstream.hv"),
}


def _not_covered(target: str) -> list[str]:
    """Every xenstream module outside the target's COVERAGE prefixes (atheris excludes by exact name)."""
    import pkgutil

    covered = COVERAGE[target]
    names = []
    for package in ("xenstream.hv", "xenstream.hv.sim", "xenstream.v2", "xenstream.legacy", "xenstream.convert",
                    "xenstream.convert.commands"):
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if not m.ispkg]
    return [n for n in names if not any(n == c or n.startswith(c + ".") for c in covered)]


class _Counter:
    """Inputs run and the slowest, written to a JSON file every few seconds (libFuzzer exits without notice)."""

    def __init__(self, path: str):
        self.path = path
        self.inputs = 0
        self.slowest = 0.0
        self._written = 0.0

    def count(self, seconds: float) -> None:
        self.inputs += 1
        self.slowest = max(self.slowest, seconds)
        now = time.monotonic()
        if now - self._written > 2:
            self.write()
            self._written = now

    def write(self) -> None:
        with open(self.path, "w") as out:
            json.dump({"inputs": self.inputs, "slowest": self.slowest}, out)


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xenstream-fuzz-child")
    parser.add_argument("--child", required=True)
    parser.add_argument("--engine", default="atheris")
    parser.add_argument("--time", type=int, required=True)
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--memory-mib", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("corpus", nargs="+")
    args = parser.parse_args(argv)
    _quiet_logs()
    if args.engine == "atheris":
        import atheris

        # Coverage of the code under test only: instrumenting the standard library, attrs, or modules
        # the target merely passes through costs start-up and speed, and dilutes the feedback.
        with atheris.instrument_imports(include=["xenstream"], exclude=_not_covered(args.child)):
            importlib.import_module("xenstream.convert.fuzz_targets")
    from xenstream.convert.fuzz_mutators import mutate
    from xenstream.convert.fuzz_targets import TARGETS, Caps, apply_memory_cap, run_one

    target = TARGETS[args.child]
    caps = Caps(memory_mib=args.memory_mib, seconds=args.seconds)
    counter = _Counter(args.stats)

    def one_input(data: bytes) -> None:
        try:
            seconds = run_one(target, data, caps)
        except BaseException:
            counter.write()
            raise
        counter.count(seconds)

    if args.engine == "random":
        return _random_engine(target, args, caps, counter, one_input, mutate)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if not data or rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate(data, target.kind, rng, max_size)

    libfuzzer = [sys.argv[0], f"-max_total_time={args.time}", f"-timeout={max(10, int(args.seconds * 5))}",
                 f"-rss_limit_mb={args.memory_mib + 512}", f"-max_len={target.max_len}", "-print_final_stats=1",
                 # A custom mutator turns length control off; on, inputs start short and grow as coverage asks.
                 "-len_control=100",
                 f"-artifact_prefix={args.artifacts.rstrip('/')}/{target.name}-", "-reload=0", "-print_pcs=0"]
    if args.runs:
        libfuzzer.append(f"-runs={args.runs}")
    if args.seed:
        libfuzzer.append(f"-seed={args.seed}")
    apply_memory_cap(caps)
    atheris.Setup(libfuzzer + args.corpus, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
    return 0


def _random_engine(target, args, caps, counter, one_input, mutate) -> int:
    """No coverage feedback: seeds, then structure-aware and byte mutations of random corpus entries."""
    from xenstream.convert.fuzz_targets import apply_memory_cap

    apply_memory_cap(caps)
    rng = random.Random(args.seed or time.time_ns())
    corpus = [p.read_bytes() for p in _inputs_of(args.corpus)]
    deadline = time.monotonic() + args.time
    queue = list(corpus)
    while time.monotonic() < deadline and not (args.runs and counter.inputs >= args.runs):
        data = queue.pop() if queue else _byte_mutation(mutate(rng.choice(corpus), target.kind, rng), rng)
        try:
            one_input(data)
        except BaseException as exc:  # noqa: BLE001 - saved and reported like libFuzzer's crash files
            if isinstance(exc, KeyboardInterrupt):
                raise
            import hashlib

            path = pathlib.Path(args.artifacts) / f"{target.name}-crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            print(f"finding: {type(exc).__name__}: {exc}\nsaved {path}", flush=True)
            counter.write()
            return 1
    counter.write()
    print(f"stat::number_of_executed_units: {counter.inputs}", flush=True)
    return 0


def _byte_mutation(data: bytes, rng: random.Random) -> bytes:
    if not data or rng.random() < 0.5:
        return data
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4))):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
