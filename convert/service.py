"""`xenstream serve`: accept migration streams on TCP and Unix sockets, convert or check them as they
flow, forward them to each listener's destination.

Concurrency model: one thread per migration stream, blocking sockets, a single accept loop.
The work of a stream is moving bytes (recv, send, splice: system calls that release the GIL) with a
little parsing per record between them; page payloads are spliced source -> pipe -> destination and
never enter Python. So threads overlap well, and blocking I/O gives backpressure without any
machinery: a stream whose destination is slow stops reading its source. Threads are bounded by
`max_connections`; each stream owns one fixed read buffer, so memory is bounded too.

Lifecycle: `bind()` opens the listeners (and the metrics endpoint), `serve()` accepts until
`request_stop()` (signal-safe, used for SIGTERM), then closes the listeners, lets the streams in flight
finish for `shutdown_grace` seconds (a second request cuts that short), aborts the rest cleanly
(destination closed without END, temporary files removed) and returns.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import struct
import threading
import time

import structlog

from xenstream.convert.service_config import DirectoryTarget, RestoreTarget, ServiceConfig, TcpAddress, UnixAddress
from xenstream.convert.service_connection import Connection
from xenstream.convert.service_metrics import Metrics, MetricsServer
from xenstream.convert.service_restore import SimulatedHost
from xenstream.convert.service_stream import CONVERSIONS

ABORT_JOIN_SECONDS = 5.0
HURRY_POLL_SECONDS = 0.25  # how soon a second SIGTERM during the grace period takes effect
BACKLOG = 128

log = structlog.get_logger("xenstream.serve")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        try:
            notify.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))


def _bind_tcp(address: TcpAddress) -> socket.socket:
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a previous run is removed; a live one (or any other file) is an error."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise OSError(errno.EADDRINUSE, f"{path}: another process is listening there")


def _bind_unix(address: UnixAddress, mode: int) -> socket.socket:
    _remove_stale_unix_socket(address.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address.path)
    os.chmod(address.path, mode)
    return sock


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Service:
    def __init__(self, config: ServiceConfig, conversions=CONVERSIONS):
        self.config = config
        self.metrics = Metrics()
        self._conversions = conversions
        self._listeners: list[tuple[socket.socket, object]] = []
        self._unix_paths: list[str] = []
        self._metrics_server: MetricsServer | None = None
        self._connections: dict[int, tuple[Connection, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._next_ident = 1
        self._stopping = False
        self._hurry = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.addresses: dict[str, str] = {}  # listener name -> bound address ("metrics" too)
        self._restore_hosts = {listener.name: SimulatedHost(config.restore_frames)
                               for listener in config.listeners if isinstance(listener.destination, RestoreTarget)}

    # ---- lifecycle ---------------------------------------------------------------------------------

    def bind(self) -> None:
        for listener in self.config.listeners:
            target = listener.destination
            if isinstance(target, DirectoryTarget) and not (os.path.isdir(target.path) and
                                                           os.access(target.path, os.W_OK | os.X_OK)):
                raise OSError(errno.ENOENT, f"listener {listener.name}: {target.path} is not a writable directory")
        try:
            for listener in self.config.listeners:
                if isinstance(listener.listen, UnixAddress):
                    sock = _bind_unix(listener.listen, listener.socket_mode)
                    self._unix_paths.append(listener.listen.path)
                else:
                    sock = _bind_tcp(listener.listen)
                sock.listen(BACKLOG)
                sock.setblocking(False)
                self._listeners.append((sock, listener))
                self.addresses[listener.name] = _describe(sock)
                log.info("listening", listener=listener.name, address=self.addresses[listener.name],
                         destination=str(listener.destination), format=listener.format)
            if self.config.metrics is not None:
                server = MetricsServer(self.metrics, self.config.metrics.host, self.config.metrics.port,
                                       healthy=lambda: not self._stopping)
                self._metrics_server = server
                host, port = server.address
                self.addresses["metrics"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                server.start()
                log.info("metrics endpoint", address=self.addresses["metrics"])
        except BaseException:
            self._close_listeners()
            raise

    def request_stop(self) -> None:
        """Begin a graceful shutdown; asked again during it, cut the grace period short.
        Safe to call from a signal handler."""
        if self._stopping:
            self._hurry = True
        self._stopping = True
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass

    def serve(self) -> None:
        sd_notify("READY=1\nSTATUS=accepting migration streams")
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_read, selectors.EVENT_READ, None)
            for sock, listener in self._listeners:
                selector.register(sock, selectors.EVENT_READ, (sock, listener))
            while not self._stopping:
                for key, _ in selector.select():
                    if key.data is not None and not self._stopping:
                        self._accept(*key.data)
        self._shutdown()

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        self._close_listeners()
        grace = self.config.timeouts.shutdown_grace
        with self._lock:
            in_flight = len(self._connections)
        log.info("stopping", streams_in_flight=in_flight, grace_seconds=grace)
        if not self._wait_idle(time.monotonic() + grace):
            with self._lock:
                late = [connection for connection, _ in self._connections.values()]
            log.warning("grace period over, aborting streams", streams=len(late))
            for connection in late:
                connection.abort()
            self._wait_idle(time.monotonic() + ABORT_JOIN_SECONDS, hurry_ends_it=False)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        os.close(self._wake_read)
        os.close(self._wake_write)
        log.info("stopped")

    def _wait_idle(self, deadline: float, hurry_ends_it: bool = True) -> bool:
        """Wait for every stream to end, until `deadline` (or a second stop request, when it counts)."""
        with self._changed:
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (hurry_ends_it and self._hurry):
                    return False
                self._changed.wait(min(remaining, HURRY_POLL_SECONDS))
        return True

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unix_paths.clear()

    # ---- accepting ---------------------------------------------------------------------------------

    def _accept(self, listening: socket.socket, listener) -> None:
        try:
            sock, address = listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE and friends: keep serving the streams we have
            log.error("accept failed", listener=listener.name, error=exc.strerror or str(exc))
            time.sleep(0.05)
            return
        peer = _unix_peer_text(sock) if sock.family == socket.AF_UNIX else _peer_text(address)
        reason = self._refusal(sock, address)
        if reason is not None:
            self.metrics.add("xenstream_connections_rejected_total", listener=listener.name, reason=reason)
            log.warning("connection refused", listener=listener.name, peer=peer, reason=reason)
            sock.close()
            return
        with self._lock:
            ident = self._next_ident
            self._next_ident += 1
            connection = Connection(ident=ident, listener=listener, sock=sock, peer=peer, config=self.config,
                                    metrics=self.metrics, conversions=self._conversions,
                                    restore_host=self._restore_hosts.get(listener.name))
            thread = threading.Thread(target=self._run, args=(connection,), name=f"stream-{ident}", daemon=True)
            self._connections[ident] = (connection, thread)
        self.metrics.add("xenstream_connections_total", listener=listener.name)
        self.metrics.add("xenstream_connections_active", 1)
        log.info("accepted", conn=ident, listener=listener.name, peer=peer)
        thread.start()

    def _refusal(self, sock: socket.socket, address) -> str | None:
        if sock.family != socket.AF_UNIX and not self.config.peer_allowed(address[0]):
            return "allowlist"
        with self._lock:
            if len(self._connections) >= self.config.max_connections:
                return "limit"
        return None

    def _run(self, connection: Connection) -> None:
        try:
            connection.run()
        finally:
            self.metrics.add("xenstream_connections_active", -1)
            with self._changed:
                del self._connections[connection.ident]
                self._changed.notify_all()


_PEER_CREDENTIALS = struct.Struct("3i")


def _unix_peer_text(sock: socket.socket) -> str:
    """Who is at the other end of a Unix socket, as the kernel vouches for it."""
    pid, uid, gid = _PEER_CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
    return f"unix:pid={pid},uid={uid},gid={gid}"


def _peer_text(address) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
