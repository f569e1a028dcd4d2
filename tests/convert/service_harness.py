"""Test harness for `xenstream serve`: the service as a subprocess, destinations and sources on loopback.

Everything here is bounded in time: every wait has a deadline and fails the test when it passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

START_SECONDS = 15.0


def connect(address: str, timeout: float = 5.0) -> socket.socket:
    """A client socket to `host:port`, `[v6]:port` or `unix:/path`."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address[len("unix:"):])
        return sock
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def send_stream(address: str, data: bytes, *, timeout: float = 20.0) -> bytes:
    """Send a whole stream, half-close, and wait for the service to close its side; returns what the
    service sent back (nothing, in normal operation)."""
    with connect(address, timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the service hung up first (reset, broken pipe, not connected)
            return b""
        return _read_to_end(sock)


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def closed_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SinkServer:
    """A destination: accepts connections and records everything each one sends, until EOF.

    With `stall=True` it accepts and never reads (a receive buffer kept small), as a hung receiver;
    with `rate` it reads at most that many bytes per second, as a slow one.
    """

    def __init__(self, *, unix_path: str | None = None, stall: bool = False, rate: float | None = None):
        if unix_path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(unix_path)
            self.address = f"unix:{unix_path}"
        else:
            self._sock = socket.socket()
            self._sock.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._sock.listen(64)
        self._stall = stall
        self._rate = rate  # bytes per second this receiver reads at most (a slow destination)
        self.streams: queue.Queue[bytes] = queue.Queue()
        self._held: list[socket.socket] = []
        self._closing = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._stall:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                self._held.append(conn)
                continue
            threading.Thread(target=self._collect, args=(conn,), daemon=True).start()

    def _collect(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        started = time.monotonic()
        with conn:
            data = bytearray()
            try:
                while chunk := conn.recv(1 << 16 if self._rate else 1 << 20):
                    data += chunk
                    if self._rate:
                        time.sleep(max(0.0, started + len(data) / self._rate - time.monotonic()))
            except OSError:
                pass
        self.streams.put(bytes(data))

    def next_stream(self, timeout: float = 20.0) -> bytes:
        return self.streams.get(timeout=timeout)

    def close(self) -> None:
        self._closing = True
        self._sock.close()
        for conn in self._held:
            conn.close()


class ServiceProcess:
    """`xenstream serve --config FILE` in a subprocess, JSON logs in a file, ready via sd_notify."""

    def __init__(self, workdir: str, config_text: str, *extra_args: str):
        self.workdir = workdir
        self.config_path = os.path.join(workdir, "serve.toml")
        with open(self.config_path, "w") as handle:
            handle.write(config_text)
        self.log_path = os.path.join(workdir, "serve.log")
        self.extra_args = extra_args
        self.addresses: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        notify_path = os.path.join(self.workdir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.2)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xenstream.convert", "--log-format", "json", "serve", "--config",
             self.config_path, *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log_file, env=env)
        deadline = time.monotonic() + START_SECONDS
        with notify:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log_text()}")
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in message.split("\n"):
                    break
            else:
                self.kill()
                raise AssertionError(f"service not ready after {START_SECONDS}s:\n{self.log_text()}")
        for entry in self.logs():
            if entry.get("event") == "listening":
                self.addresses[entry["listener"]] = entry["address"]
            elif entry.get("event") == "metrics endpoint":
                self.addresses["metrics"] = entry["address"]
        return self

    def log_text(self) -> str:
        with open(self.log_path, "rb") as handle:
            return handle.read().decode(errors="replace")

    def logs(self) -> list[dict]:
        entries = []
        for line in self.log_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"event": "unparsed", "text": line})
        return entries

    def wait_log(self, predicate, timeout: float = 20.0) -> dict:
        """The first log entry satisfying `predicate`, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.logs():
                if predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching log entry within {timeout}s:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def last_conn(self) -> int:
        """The number of the connection accepted last (0 before any)."""
        return max((e["conn"] for e in self.logs() if e.get("event") == "accepted"), default=0)

    def stream_result(self, conn: int, timeout: float = 20.0) -> dict:
        return self.wait_log(lambda e: e.get("conn") == conn and e.get("event") in ("stream done", "stream failed"),
                             timeout)

    def results(self) -> list[dict]:
        return [e for e in self.logs() if e.get("event") in ("stream done", "stream failed")]

    def http_get(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET on the metrics endpoint."""
        with connect(self.addresses["metrics"]) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            reply = _read_to_end(sock)
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body.decode()

    def metrics(self) -> str:
        status, body = self.http_get("/metrics")
        assert status == 200
        return body

    def stop(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def peak_rss(self) -> int:
        """The service's peak resident set so far, in bytes (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    sample = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.contextmanager
def running_service(workdir: str, config_text: str, sinks):
    """The service started on `config_text`; afterwards it must stop cleanly on SIGTERM, and the
    destination servers `sinks` are closed."""
    service = ServiceProcess(workdir, config_text).start()
    try:
        yield service
        assert service.stop() == 0
    finally:
        service.kill()
        for sink in sinks:
            sink.close()
