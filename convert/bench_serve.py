"""`xenstream bench serve`: concurrent v1 -> v2 conversions through `xenstream serve` on loopback,
against the same byte streams through a trivial relay, measured in the same run.

One v1 PV stream of --size bytes is synthesised (xenstream.legacy.build). Then, alternately through
each program (the trivial relay, the service; --repeat times, best run counts), --streams senders push
that stream at once over TCP loopback (sendfile from the page cache) and a sink in this process reads
every output to its end. The
aggregate throughput is input bytes / wall time from the first byte sent to the last byte received.
The relay is a thread-per-connection copy loop (recv_into one buffer, sendall) in its own Python
process: what a relay costs with no conversion at all. Each program's peak RSS comes from `os.wait4`.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from xenstream.convert.bench import Benchmark, human_size, parse_size, register, verdict
from xenstream.hv.abi import PAGE_SIZE

TARGET_RATIO = 0.7
TARGET_RSS = 128 << 20
READY_SECONDS = 20.0
TRANSFER_SECONDS = 600.0

RELAY = r"""
import socket, sys, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(64)
target = ("127.0.0.1", int(sys.argv[2]))
print("ready", flush=True)

def copy(source):
    with source, socket.create_connection(target) as sink:
        buffer = memoryview(bytearray(1 << 20))
        while got := source.recv_into(buffer):
            sink.sendall(buffer[:got])
        sink.shutdown(socket.SHUT_WR)

while True:
    connection, _ = listener.accept()
    threading.Thread(target=copy, args=(connection,), daemon=True).start()
"""


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="256M", help="size of each v1 stream (default 256M)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent migrations (default 8)")
    parser.add_argument("--format", choices=("libxc", "libxl"), default="libxc", help="output format (default libxc)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers through each program; the best counts (default 3)")
    parser.add_argument("--dir", help="scratch directory (default: a new temporary directory)")


def run(args) -> int:
    scratch = args.dir or tempfile.mkdtemp(prefix="xenstream-bench-serve-")
    os.makedirs(scratch, exist_ok=True)
    try:
        path = os.path.join(scratch, "pv.v1")
        _synthesise(path, parse_size(args.size))
        return _compare(path, max(1, args.streams), args.format, scratch, max(1, args.repeat))
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


def _synthesise(path: str, size: int) -> None:
    from xenstream.legacy.build import BuildOptions, write_stream

    start = time.perf_counter()
    with open(path, "wb") as handle:
        write_stream(handle, BuildOptions(guest="pv", width=64, pages=max(64, size // PAGE_SIZE), vcpus=2, seed=1))
    print(f"synthesised a {human_size(os.path.getsize(path))} v1 PV stream in {time.perf_counter() - start:.1f} s")


def _expected_output_size(path: str, fmt: str) -> int:
    from xenstream.convert.pipeline import convert_fds
    from xenstream.convert.transform import ConvertOptions

    source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return convert_fds(source, target, ConvertOptions(fmt=fmt)).bytes_out
    finally:
        os.close(source)
        os.close(target)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Sink:
    """Reads every connection to its end (one reused buffer per connection), reporting the byte count."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.finished: queue.Queue[int] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection: socket.socket) -> None:
        buffer = memoryview(bytearray(1 << 20))
        total = 0
        with connection:
            while got := connection.recv_into(buffer):
                total += got
        self.finished.put(total)

    def close(self) -> None:
        self._sock.close()


def _send(port: int, path: str, size: int, errors: list) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as source:
            offset = 0
            while offset < size:
                offset += os.sendfile(sock.fileno(), source.fileno(), offset, size - offset)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the far end closes once it has everything
    except OSError as exc:
        errors.append(exc)


def _transfer(port: int, path: str, streams: int, sink: _Sink) -> tuple[float, list[int], list]:
    size = os.path.getsize(path)
    errors: list = []
    senders = [threading.Thread(target=_send, args=(port, path, size, errors), daemon=True) for _ in range(streams)]
    start = time.perf_counter()
    for sender in senders:
        sender.start()
    received = [sink.finished.get(timeout=TRANSFER_SECONDS) for _ in range(streams)]
    seconds = time.perf_counter() - start
    for sender in senders:
        sender.join(10)
    return seconds, received, errors


def _stop(child: subprocess.Popen) -> tuple[int, float]:
    """The child's peak RSS in bytes and its CPU seconds (user + system), then SIGTERM and reap it.

    VmHWM, not wait4's ru_maxrss: the latter also counts the moments between fork and exec, when the
    child is a copy of this (much larger) benchmark process.
    """
    with open(f"/proc/{child.pid}/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    with open(f"/proc/{child.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    child.send_signal(signal.SIGTERM)
    child.wait(60)
    return peak, cpu


def _start_relay(port: int, sink: _Sink) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", RELAY, str(port), str(sink.port)], stdout=subprocess.PIPE)
    if child.stdout.readline().strip() != b"ready":
        raise RuntimeError("the relay did not start")
    return child


def _start_service(port: int, sink: _Sink, fmt: str, scratch: str) -> subprocess.Popen:
    notify_path = os.path.join(scratch, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(READY_SECONDS)
        child = subprocess.Popen(
            [sys.executable, "-m", "xenstream.convert", "-q", "serve", "--listen", f"127.0.0.1:{port}",
             "--to", f"127.0.0.1:{sink.port}", "--format", fmt],
            stdin=subprocess.DEVNULL, env=dict(os.environ, NOTIFY_SOCKET=notify_path))
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
        except TimeoutError:
            child.kill()
            raise RuntimeError("the service did not become ready") from None
        finally:
            os.unlink(notify_path)
    return child


def _summarise(runs: list) -> tuple[float, list[int], list]:
    """Best wall time; the byte counts of every output and the errors of every run."""
    return (min(seconds for seconds, _, _ in runs), [n for _, received, _ in runs for n in received],
            [e for _, _, errors in runs for e in errors])


def _compare(path: str, streams: int, fmt: str, scratch: str, repeat: int) -> int:
    size = os.path.getsize(path)
    expected = _expected_output_size(path, fmt)
    with open(path, "rb") as handle:  # into the page cache
        while handle.read(1 << 24):
            pass
    sink = _Sink()
    relay = service = None
    try:
        relay_port, service_port = _free_port(), _free_port()
        relay = _start_relay(relay_port, sink)
        service = _start_service(service_port, sink, fmt, scratch)
        # Alternate the two, so that whatever else the machine does weighs on both alike.
        relay_runs, service_runs = [], []
        for _ in range(repeat):
            relay_runs.append(_transfer(relay_port, path, streams, sink))
            service_runs.append(_transfer(service_port, path, streams, sink))
        relay_rss, relay_cpu = _stop(relay)
        service_rss, service_cpu = _stop(service)
    finally:
        sink.close()
        for child in (relay, service):
            if child is not None and child.poll() is None:
                child.kill()
    relay_seconds, relay_out, relay_errors = _summarise(relay_runs)
    service_seconds, service_out, service_errors = _summarise(service_runs)

    total = size * streams / 1e6
    correct = relay_out == [size] * (streams * repeat) and service_out == [expected] * (streams * repeat)
    ratio = relay_seconds / service_seconds
    print(f"serve: {streams} concurrent {human_size(size)} v1 PV streams over TCP loopback, output {fmt}, "
          f"best of {repeat}")
    print(f"  trivial relay    {relay_seconds:7.2f} s  {total / relay_seconds:8.1f} MB/s aggregate  "
          f"peak RSS {human_size(relay_rss)}")
    print(f"  xenstream serve  {service_seconds:7.2f} s  {total / service_seconds:8.1f} MB/s aggregate  "
          f"ratio to the relay {ratio:.2f}x (target {TARGET_RATIO}x: {verdict(ratio >= TARGET_RATIO)})")
    print(f"  service CPU      {service_cpu / repeat:.2f} s per run (start-up included; the relay's: {relay_cpu / repeat:.2f} s)")
    print(f"  service peak RSS {human_size(service_rss)} "
          f"(target under {human_size(TARGET_RSS)}: {verdict(service_rss < TARGET_RSS)})")
    if not correct or relay_errors or service_errors:
        print(f"  OUTPUT WRONG: relay {sorted(set(relay_out))} (expected {size} each), service {sorted(set(service_out))} "
              f"(expected {expected} each); errors {relay_errors + service_errors}")
        return 1
    print(f"  every output complete: {human_size(expected)} of v2 per stream")
    return 0


register(Benchmark(name="serve", help="8 concurrent 256 MiB v1 conversions through the service vs a trivial relay",
                   add_arguments=add_arguments, run=run))
