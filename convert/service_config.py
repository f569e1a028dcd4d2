"""Configuration of `xenstream serve`: listeners with their destinations, limits, timeouts, allowlist.

Two sources, one result: a small TOML file (stdlib `tomllib`) and command-line options, the latter
winning for the service-wide values and adding listeners of their own. Everything is validated here,
once, so the running service never meets a half-valid setting. Addresses bind to 127.0.0.1 unless a
host is written out.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any

import attrs

DEFAULT_HOST = "127.0.0.1"
FORMATS = ("libxc", "libxl")
WIDTHS = {"detect": None, "32": 32, "64": 64}
GUESTS = {"detect": None, "pv": "pv", "hvm": "hvm"}
REMUS = ("checkpoints", "refuse")  # what becomes of a v1 Remus stream (see service_stream)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


# ------------------------------------------------------------------------------------------- addresses


@attrs.frozen
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@attrs.frozen
class DirectoryTarget:
    """One file per stream in `path`, written to a temporary name and renamed when complete."""

    path: str

    def __str__(self) -> str:
        return f"dir:{self.path}"


@attrs.frozen
class RestoreTarget:
    """Restore every stream into a new PV domain of a simulated Xen host (one host per listener)."""

    def __str__(self) -> str:
        return "restore:sim"


def parse_socket_address(text: str, what: str) -> TcpAddress | UnixAddress:
    """`unix:/path`, `/path`, `host:port`, `[v6]:port`, `:port` or `port` (host defaults to 127.0.0.1)."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ConfigError(f"{what}: empty Unix socket path")
        return UnixAddress(path)
    if text.startswith("/"):
        return UnixAddress(text)
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0 or text[closing + 1 : closing + 2] != ":":
            raise ConfigError(f"{what}: expected [address]:port, got {text!r}")
        host, port_text = text[1:closing], text[closing + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
        host = host or DEFAULT_HOST
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: bad port in {text!r}")
    return TcpAddress(host, int(port_text))


def parse_destination(text: str) -> TcpAddress | UnixAddress | DirectoryTarget | RestoreTarget:
    """A listener's destination: a socket address, `dir:/path`, or `restore:sim`."""
    text = text.strip()
    if text.startswith("dir:"):
        path = text[len("dir:"):]
        if not os.path.isabs(path):
            raise ConfigError(f"destination: directory must be an absolute path, got {path!r}")
        return DirectoryTarget(path)
    if text == "restore:sim":
        return RestoreTarget()
    address = parse_socket_address(text, "destination")
    if isinstance(address, TcpAddress) and address.port == 0:
        raise ConfigError("destination: port 0 is not an address one can connect to")
    return address


# ------------------------------------------------------------------------------------------- settings


@attrs.frozen
class ListenerConfig:
    """One listening socket, its destination, and how v1 streams arriving there are converted."""

    name: str
    listen: TcpAddress | UnixAddress
    destination: TcpAddress | UnixAddress | DirectoryTarget | RestoreTarget
    format: str = "libxc"  # output layer of converted v1 streams: "libxc" or "libxl"
    width: int | None = None  # v1 toolstack width in bits, None = detect
    guest: str | None = None  # v1 guest type, None = detect
    remus: str = "checkpoints"  # v1 Remus streams: "checkpoints" (a v2 checkpointed stream) or "refuse"
    socket_mode: int = 0o660  # permissions of a Unix listening socket


@attrs.frozen
class Timeouts:
    """Seconds. `min_rate`/`rate_window`: while the service waits on a source, the source must deliver
    at least `min_rate` bytes per second averaged over `rate_window` seconds of waiting (slow-loris guard);
    time the service spends blocked on its destination does not count against the source."""

    header: float = 10.0  # accept -> enough bytes to tell v1 from v2
    idle: float = 60.0  # one read from the source or one write to the destination
    connect: float = 10.0  # connecting to the destination
    min_rate: float = 1024.0
    rate_window: float = 30.0
    shutdown_grace: float = 30.0  # SIGTERM: how long streams in flight may take to finish


@attrs.frozen
class ServiceConfig:
    listeners: tuple[ListenerConfig, ...]
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # empty: any TCP peer
    max_connections: int = 32
    buffer_size: int = 1 << 20  # bytes read from a source at once (the per-connection buffer)
    max_buffered: int = 16 << 20  # input a stream may hold unforwarded (one record's worth); larger is refused
    restore_frames: int = 1 << 18  # size of each restore:sim host, in 4 KiB frames
    metrics: TcpAddress | None = None
    timeouts: Timeouts = Timeouts()

    def peer_allowed(self, host: str) -> bool:
        if not self.allow:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)


# ------------------------------------------------------------------------------------------- parsing

_SERVICE_KEYS = {"max_connections", "buffer_size", "max_buffered", "restore_frames", "allow", "metrics"}
_TIMEOUT_KEYS = set(attrs.fields_dict(Timeouts))
_LISTENER_KEYS = {"name", "listen", "destination", "format", "width", "guest", "remus", "socket_mode"}
MIN_BUFFER, MAX_BUFFER = 1 << 12, 1 << 26
MAX_BUFFERED = 1 << 28  # above the v2 record limit: a record that large is refused by the reader anyway
MAX_CONNECTIONS = 4096


def _reject_unknown(table: dict, known: set, where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")


def _typed(value: Any, kinds: tuple[type, ...], where: str):
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    return value


def parse_allow(entries) -> tuple:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"allow: {exc}") from None
    return tuple(networks)


def listener_from_settings(settings: dict, index: int) -> ListenerConfig:
    where = f"listener {settings.get('name', index)}"
    _reject_unknown(settings, _LISTENER_KEYS, where)
    for required in ("listen", "destination"):
        if required not in settings:
            raise ConfigError(f"{where}: '{required}' is required")
    fmt = str(settings.get("format", "libxc"))
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format must be libxc or libxl, got {fmt!r}")
    width = str(settings.get("width", "detect"))
    if width not in WIDTHS:
        raise ConfigError(f"{where}: width must be 32, 64 or detect, got {width!r}")
    guest = str(settings.get("guest", "detect"))
    if guest not in GUESTS:
        raise ConfigError(f"{where}: guest must be pv, hvm or detect, got {guest!r}")
    remus = settings.get("remus", "checkpoints")
    if remus not in REMUS:
        raise ConfigError(f"{where}: remus must be checkpoints or refuse, got {remus!r}")
    mode = settings.get("socket_mode", 0o660)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ConfigError(f"{where}: socket_mode must be octal, got {mode!r}") from None
    _typed(mode, (int,), f"{where}: socket_mode")
    return ListenerConfig(
        name=str(settings.get("name", f"listener{index}")),
        listen=parse_socket_address(str(_typed(settings["listen"], (str, int), f"{where}: listen")), f"{where}: listen"),
        destination=parse_destination(_typed(settings["destination"], (str,), f"{where}: destination")),
        format=fmt,
        width=WIDTHS[width],
        guest=GUESTS[guest],
        remus=remus,
        socket_mode=mode & 0o777,
    )


def config_from_settings(settings: dict) -> ServiceConfig:
    """Build and validate a config from a TOML-shaped dict: [service], [timeouts], [[listener]]."""
    _reject_unknown(settings, {"service", "timeouts", "listener"}, "config")
    service = settings.get("service", {})
    _reject_unknown(service, _SERVICE_KEYS, "[service]")
    timeouts = settings.get("timeouts", {})
    _reject_unknown(timeouts, _TIMEOUT_KEYS, "[timeouts]")
    for key, value in timeouts.items():
        if _typed(value, (int, float), f"timeouts.{key}") <= 0:
            raise ConfigError(f"timeouts.{key} must be positive, got {value!r}")

    listeners = tuple(listener_from_settings(entry, i) for i, entry in enumerate(settings.get("listener", [])))
    if not listeners:
        raise ConfigError("no listener configured (use [[listener]] or --listen/--to)")
    names = [entry.name for entry in listeners]
    if len(set(names)) != len(names):
        raise ConfigError("listener names must be unique")

    max_connections = _typed(service.get("max_connections", 32), (int,), "max_connections")
    if not 1 <= max_connections <= MAX_CONNECTIONS:
        raise ConfigError(f"max_connections must be 1 ... {MAX_CONNECTIONS}")
    buffer_size = _typed(service.get("buffer_size", 1 << 20), (int,), "buffer_size")
    if not MIN_BUFFER <= buffer_size <= MAX_BUFFER:
        raise ConfigError(f"buffer_size must be {MIN_BUFFER} ... {MAX_BUFFER}")
    max_buffered = _typed(service.get("max_buffered", 16 << 20), (int,), "max_buffered")
    if not MIN_BUFFER <= max_buffered <= MAX_BUFFERED:
        raise ConfigError(f"max_buffered must be {MIN_BUFFER} ... {MAX_BUFFERED}")
    restore_frames = _typed(service.get("restore_frames", 1 << 18), (int,), "restore_frames")
    if not 1 << 10 <= restore_frames <= 1 << 26:
        raise ConfigError("restore_frames must be 1024 ... 67108864 (4 MiB ... 256 GiB)")
    metrics = None
    if service.get("metrics"):
        metrics = parse_socket_address(str(service["metrics"]), "metrics")
        if not isinstance(metrics, TcpAddress):
            raise ConfigError("metrics: a TCP host:port is required")
    return ServiceConfig(
        listeners=listeners,
        allow=parse_allow(_typed(service.get("allow", []), (list,), "allow")),
        max_connections=max_connections,
        buffer_size=buffer_size,
        max_buffered=max_buffered,
        restore_frames=restore_frames,
        metrics=metrics,
        timeouts=Timeouts(**{key: float(value) for key, value in timeouts.items()}),
    )


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def merge_command_line(settings: dict, args) -> dict:
    """Overlay command-line options (argparse namespace of `xenstream serve`) onto TOML settings."""
    merged = {
        "service": dict(settings.get("service", {})),
        "timeouts": dict(settings.get("timeouts", {})),
        "listener": list(settings.get("listener", [])),
    }
    service, timeouts = merged["service"], merged["timeouts"]
    for key in ("max_connections", "buffer_size", "max_buffered", "restore_frames", "metrics"):
        if getattr(args, key, None) is not None:
            service[key] = getattr(args, key)
    if getattr(args, "allow", None):
        service["allow"] = list(args.allow)
    for key in _TIMEOUT_KEYS:
        value = getattr(args, f"timeout_{key}", None)
        if value is not None:
            timeouts[key] = value
    listens, targets = list(getattr(args, "listen", None) or []), list(getattr(args, "to", None) or [])
    if len(listens) != len(targets):
        raise ConfigError("give one --to DESTINATION for every --listen ADDRESS")
    for i, (listen, target) in enumerate(zip(listens, targets)):
        entry = {"name": f"cli{i}", "listen": listen, "destination": target}
        for key in ("format", "width", "guest", "remus"):
            if getattr(args, key, None) is not None:
                entry[key] = getattr(args, key)
        merged["listener"].append(entry)
    return merged
