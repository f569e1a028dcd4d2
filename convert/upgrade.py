"""Upgrading archived save images from v1 to v2, safely.

For each file: tell v1 from v2 by its first bytes (a v2 file is left alone and reported as such),
convert into a temporary file in the target directory with the output verified in the same pass,
fsync it, then rename it into place and fsync the directory. The final name only ever holds a complete,
verified file; the original is only read (``--in-place`` keeps it as ``FILE.v1`` through a hard link
made before the rename, unless ``no_backup``). An interruption at any moment leaves at most a
``.NAME.*.part`` file behind, never a partial file under the final name.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import attrs

from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import ConvertOptions
from xenstream.legacy import constants as lc
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.v2.errors import StreamError as V2StreamError

BACKUP_SUFFIX = ".v1"
PART_SUFFIX = ".part"
_HEAD = lc.XL_FIXED_SIZE


@attrs.frozen
class UpgradeSettings:
    output_dir: str | None = None
    in_place: bool = False
    backup: bool = True
    options: ConvertOptions = ConvertOptions(fmt="auto")
    parser_options: dict = attrs.Factory(dict)


@attrs.define
class FileResult:
    path: str
    status: str = "pending"  # converted, already-v2, failed, interrupted
    output: str | None = None
    backup: str | None = None
    size: int = 0
    bytes_done: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    checkpoints: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.path, "status": self.status, "output": self.output, "backup": self.backup,
                "bytes_in": self.size, "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3),
                "checkpoints": self.checkpoints, "error": self.error}


def stream_version(head: bytes) -> int:
    """2 for a v2 stream (bare libxc, libxl, or an xl save file with STREAMV2), else 1."""
    if head.startswith(lc.V2_LIBXC_MARKER[:8]) or head.startswith(lc.V2_LIBXL_MAGIC):
        return 2
    if head.startswith(lc.XL_MAGIC) and len(head) >= 40:
        mandatory = int.from_bytes(head[36:40], "little")
        if mandatory & lc.XL_FLAG_STREAMV2:
            return 2
    return 1


def target_path(path: str, settings: UpgradeSettings) -> str:
    if settings.in_place:
        return path
    return os.path.join(settings.output_dir, os.path.basename(path))


class Cancelled(Exception):
    """The upgrade was interrupted (SIGINT / SIGTERM); the file being converted is left as it was."""


def upgrade_file(result: FileResult, settings: UpgradeSettings, cancel: threading.Event | None = None) -> FileResult:
    """Upgrade one file, filling in `result` (its bytes_done moves while it runs)."""
    started = time.monotonic()
    path = result.path
    try:
        fd_in = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return _failed(result, f"{exc.strerror}", started)
    part = None
    try:
        result.size = os.fstat(fd_in).st_size
        if stream_version(os.pread(fd_in, _HEAD, 0)) == 2:
            result.status = "already-v2"
            result.bytes_done = result.size
            return result
        target = target_path(path, settings)
        if not settings.in_place and os.path.lexists(target):
            return _failed(result, f"{target} exists", started)
        directory = os.path.dirname(os.path.abspath(target))
        fd_out, part = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=PART_SUFFIX, dir=directory)
        try:
            outcome = convert_fds(fd_in, fd_out, settings.options, verify=True, spool_dir=directory,
                                  progress=lambda n: _progress(result, n, cancel), **settings.parser_options)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
        os.chmod(part, os.stat(path).st_mode & 0o7777)
        if settings.in_place and settings.backup:
            result.backup = _keep_backup(path)
        if settings.in_place:
            os.replace(part, target)
        else:
            os.link(part, target)  # never over a file that appeared meanwhile: FileExistsError instead
            os.unlink(part)
        part = None
        _fsync_directory(directory)
        result.status = "converted"
        result.output = target
        result.bytes_out = outcome.bytes_out
        result.bytes_done = result.size
        result.checkpoints = outcome.summary.checkpoints
    except Cancelled:
        result.status = "interrupted"
        return result
    except (LegacyStreamError, V2StreamError) as exc:
        return _failed(result, str(exc), started)
    except OSError as exc:
        return _failed(result, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), started)
    finally:
        os.close(fd_in)
        if part is not None:
            _remove_quietly(part)
    result.seconds = time.monotonic() - started
    return result


def _progress(result: FileResult, done: int, cancel: threading.Event | None) -> None:
    result.bytes_done = done
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def _keep_backup(path: str) -> str:
    """Hard-link the original as FILE.v1 (an earlier interrupted run may have made the same link)."""
    backup = path + BACKUP_SUFFIX
    try:
        os.link(path, backup)
    except FileExistsError:
        if not os.path.samefile(path, backup):
            raise OSError(f"backup {backup} exists and is another file") from None
    return backup


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _failed(result: FileResult, message: str, started: float) -> FileResult:
    result.status = "failed"
    result.error = message
    result.seconds = time.monotonic() - started
    return result


def upgrade_files(paths: list[str], settings: UpgradeSettings, jobs: int = 1,
                  on_start: Callable[[list[FileResult]], None] | None = None) -> list[FileResult]:
    """Upgrade every file, `jobs` at a time; results in the order of `paths`.

    KeyboardInterrupt (SIGINT, or SIGTERM mapped onto it by the caller) stops every conversion in
    flight at its next page batch, removes their temporary files and is raised again."""
    results = [FileResult(path=p) for p in paths]
    claimed: dict[str, str] = {}
    for result in results:
        try:
            result.size = os.stat(result.path).st_size
        except OSError:
            pass
        target = os.path.abspath(target_path(result.path, settings))
        if target in claimed:
            _failed(result, f"{claimed[target]} has the same output name", time.monotonic())
        claimed.setdefault(target, result.path)
    if on_start is not None:
        on_start(results)
    cancel = threading.Event()
    todo = [r for r in results if r.status == "pending"]
    if jobs <= 1:
        for result in todo:
            upgrade_file(result, settings)
        return results
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(upgrade_file, r, settings, cancel) for r in todo]
    try:
        for future in futures:
            future.result()
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


class ProgressBar:
    """Per-file and overall progress on a terminal: bytes, rate and ETA, redrawn a few times a second."""

    def __init__(self, stream, interval: float = 0.2):
        self._stream = stream
        self._interval = interval
        self._results: list[FileResult] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._lines = 0

    def start(self, results: list[FileResult]) -> None:
        self._results = results
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._draw()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw()

    def _draw(self) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        active = [r for r in self._results if r.status == "pending" and r.bytes_done]
        lines = [_progress_line(r.path, r.bytes_done, r.size, elapsed) for r in active]
        total = sum(r.size for r in self._results)
        done = sum(r.bytes_done if r.status == "pending" else r.size for r in self._results)
        finished = sum(r.status != "pending" for r in self._results)
        lines.append(_progress_line(f"total ({finished}/{len(self._results)} files)", done, total, elapsed))
        out = "".join("\x1b[1A\x1b[2K" for _ in range(self._lines)) + "\r\x1b[2K"
        out += "\n".join(lines) + "\n"
        self._lines = len(lines)
        self._stream.write(out)
        self._stream.flush()


def _progress_line(name: str, done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed
    fraction = done / total if total else 1.0
    width = 24
    filled = int(fraction * width)
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_text = "--:--" if eta == float("inf") else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% {_size(done)}/{_size(total)} "
            f"{_size(rate)}/s ETA {eta_text}  {name}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
