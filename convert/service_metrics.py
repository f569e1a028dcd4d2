"""Counters of `xenstream serve` and their Prometheus text exposition, served over HTTP.

One lock guards every update: updates are a handful of integer additions per read/write, far below
the cost of the I/O they count, and a single lock keeps a scrape consistent across families.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)

# name -> (type, help); label sets are created on first use.
FAMILIES = {
    "xenstream_connections_active": ("gauge", "Migration streams being handled now."),
    "xenstream_connections_total": ("counter", "Migration streams accepted (allowlist and limit passed)."),
    "xenstream_connections_failed_total": ("counter", "Migration streams that did not complete, by reason."),
    "xenstream_connections_rejected_total": ("counter", "Connections refused at accept, by reason."),
    "xenstream_bytes_in_total": ("counter", "Bytes read from sources."),
    "xenstream_bytes_out_total": ("counter", "Bytes written to destinations."),
    "xenstream_pages_total": ("counter", "Guest pages carried by finished and failed streams."),
    "xenstream_streams_total": ("counter", "Streams by detected variant and result."),
    "xenstream_conversion_seconds": ("histogram", "Wall time from accept to the end of a stream."),
}


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    escaped = (f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for key, value in pairs)
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    """Exact integers (byte counters outgrow %g's six digits); floats in full precision."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {name: {} for name in FAMILIES}
        self._histograms: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            family = self._values[name]
            family[key] = family.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0)

    def observe_duration(self, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            cells = self._histograms.setdefault(key, [0] * (len(DURATION_BUCKETS) + 2))
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    cells[i] += 1
            cells[-2] += seconds
            cells[-1] += 1

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in FAMILIES.items():
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    lines.extend(self._render_histogram(name))
                    continue
                family = self._values[name]
                if not family and kind == "gauge":
                    lines.append(f"{name} 0")
                for key, amount in sorted(family.items()):
                    lines.append(f"{name}{_labels(key)} {_number(amount)}")
        return "\n".join(lines) + "\n"

    def _render_histogram(self, name: str) -> list[str]:
        lines = []
        for key, cells in sorted(self._histograms.items()):
            for bound, count in zip(DURATION_BUCKETS, cells):
                lines.append(f"{name}_bucket{_labels(key + (('le', f'{bound:g}'),))} {count}")
            lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {cells[-1]}")
            lines.append(f"{name}_sum{_labels(key)} {_number(cells[-2])}")
            lines.append(f"{name}_count{_labels(key)} {cells[-1]}")
        return lines


class MetricsServer:
    """GET /metrics (Prometheus text) and GET /healthz on a TCP address, in a background thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, healthy) -> None:
        handler = _handler_class(metrics, healthy)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(metrics: Metrics, healthy):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a scraper that stalls does not keep a thread forever

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            routes = {
                "/metrics": lambda: (200, CONTENT_TYPE, metrics.render()),
                "/healthz": lambda: (200, "text/plain", "ok\n") if healthy() else (503, "text/plain", "stopping\n"),
            }
            route = routes.get(self.path.split("?", 1)[0])
            status, content_type, text = route() if route else (404, "text/plain", "not found\n")
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # scrapes are not worth a log line each
            pass

    return Handler
