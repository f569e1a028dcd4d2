"""`xenstream upgrade`: v1/v2 detection, atomic verified replacement, backups, jobs, summaries, and
interruption (SIGINT, SIGTERM, kill -9) at random moments never leaving a partial file under a final name
nor touching an original."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.convert.v2state import convert_bytes
from xenstream.convert.cli import main as xenstream_main
from xenstream.convert.upgrade import stream_version
from xenstream.legacy.build import BuildOptions, build_stream
from xenstream.v2.verify import verify_path


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, bytes]:
    pv = build_stream(BuildOptions(guest="pv", pages=40, holes=1, vcpus=2))
    xl = build_stream(BuildOptions(guest="pv", pages=40, holes=1, wrapper="xl"))
    hvm = build_stream(BuildOptions(guest="hvm", pages=12, holes=1))
    tmem = build_stream(BuildOptions(guest="pv", pages=40, holes=1, tmem=True, live_iterations=1))
    v2, _ = convert_bytes(pv, tmp_path_factory.mktemp("v2"))
    return {"pv.sav": pv, "xl.sav": xl, "hvm.sav": hvm, "tmem.sav": tmem, "new.sav": v2}


def _put(directory, streams, names):
    paths = []
    for name in names:
        path = directory / name
        path.write_bytes(streams[name])
        paths.append(str(path))
    return paths


def _upgrade(capsys, *args) -> tuple[int, str]:
    code = xenstream_main(["upgrade", *args])
    return code, capsys.readouterr().out


def test_stream_version_detection(streams):
    assert stream_version(streams["new.sav"][:48]) == 2
    assert stream_version(streams["pv.sav"][:48]) == 1
    assert stream_version(streams["xl.sav"][:48]) == 1
    assert stream_version(convert_bytes_xl(streams)[:48]) == 2


def convert_bytes_xl(streams) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return convert_bytes(streams["xl.sav"], Path(tmp), fmt="libxl")[0]


def test_output_dir_json_summary(tmp_path, streams, capsys):
    out = tmp_path / "out"
    out.mkdir()
    paths = _put(tmp_path, streams, ["pv.sav", "xl.sav", "hvm.sav", "tmem.sav", "new.sav"])
    code, text = _upgrade(capsys, *paths, "-o", str(out), "--json")
    assert code == 1  # tmem.sav failed
    summary = json.loads(text)
    status = {os.path.basename(f["file"]): f["status"] for f in summary["files"]}
    assert status == {"pv.sav": "converted", "xl.sav": "converted", "hvm.sav": "converted",
                      "tmem.sav": "failed", "new.sav": "already-v2"}
    assert summary["converted"] == 3 and summary["failed"] == 1 and summary["already_v2"] == 1
    assert "TMEM" in next(f["error"] for f in summary["files"] if f["status"] == "failed")
    assert sorted(os.listdir(out)) == ["hvm.sav", "pv.sav", "xl.sav"]  # nothing else, no .part left
    for name in ("hvm.sav", "pv.sav", "xl.sav"):
        assert verify_path(out / name).ok
        assert stream_version((out / name).read_bytes()[:48]) == 2
    for path in paths:  # originals untouched
        assert open(path, "rb").read() == streams[os.path.basename(path)]


def test_in_place_keeps_backup(tmp_path, streams, capsys):
    (path,) = _put(tmp_path, streams, ["pv.sav"])
    code, text = _upgrade(capsys, path, "--in-place")
    assert code == 0 and "original kept as" in text
    assert open(path + ".v1", "rb").read() == streams["pv.sav"]
    assert verify_path(path).ok
    # A second run finds v2 and leaves it alone.
    before = open(path, "rb").read()
    code, text = _upgrade(capsys, path, "--in-place")
    assert code == 0 and "already v2" in text and open(path, "rb").read() == before


def test_in_place_without_backup(tmp_path, streams, capsys):
    (path,) = _put(tmp_path, streams, ["hvm.sav"])
    code, _ = _upgrade(capsys, path, "--in-place", "--no-backup")
    assert code == 0
    assert not os.path.exists(path + ".v1")
    assert sorted(os.listdir(tmp_path)) == ["hvm.sav"]
    assert verify_path(path).ok


def test_failed_in_place_leaves_original(tmp_path, streams, capsys):
    (path,) = _put(tmp_path, streams, ["tmem.sav"])
    code, text = _upgrade(capsys, path, "--in-place")
    assert code == 1 and "FAILED" in text
    assert open(path, "rb").read() == streams["tmem.sav"]
    assert sorted(os.listdir(tmp_path)) == ["tmem.sav"]


def test_jobs(tmp_path, streams, capsys):
    names = []
    for i in range(6):
        name = f"g{i}.sav"
        (tmp_path / name).write_bytes(streams["pv.sav" if i % 2 else "hvm.sav"])
        names.append(str(tmp_path / name))
    out = tmp_path / "out"
    out.mkdir()
    code, text = _upgrade(capsys, *names, "-o", str(out), "--jobs", "3")
    assert code == 0 and "6 converted" in text
    assert all(verify_path(out / f"g{i}.sav").ok for i in range(6))


def test_existing_target_not_overwritten(tmp_path, streams, capsys):
    (path,) = _put(tmp_path, streams, ["pv.sav"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "pv.sav").write_bytes(b"keep me")
    code, _ = _upgrade(capsys, path, "-o", str(out))
    assert code == 1 and (out / "pv.sav").read_bytes() == b"keep me"


# ---- interruption ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_stream() -> bytes:
    return build_stream(BuildOptions(guest="pv", pages=6000, holes=2, vcpus=2))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("in_place", [False, True], ids=["output-dir", "in-place"])
def test_interrupted_upgrade_is_safe(tmp_path, big_stream, how, in_place):
    rng = random.Random(f"{how}{in_place}")
    original = _digest(big_stream)
    for attempt in range(2):
        work = tmp_path / f"run{attempt}"
        work.mkdir()
        out = work / "out"
        out.mkdir()
        paths = []
        for i in range(4):
            path = work / f"dom{i}.sav"
            path.write_bytes(big_stream)
            paths.append(path)
        where = ["--in-place"] if in_place else ["-o", str(out)]
        proc = subprocess.Popen([sys.executable, "-m", "xenstream.convert", "upgrade", *map(str, paths), *where],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.25, 0.9))
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=60)
        for path in paths:
            target = path if in_place else out / path.name
            if in_place:
                data = path.read_bytes()
                if _digest(data) != original:  # replaced: must be complete, and the original kept
                    assert verify_path(path).ok
                    assert _digest((work / (path.name + ".v1")).read_bytes()) == original
            else:
                assert _digest(path.read_bytes()) == original
                if target.exists():
                    assert verify_path(target).ok
        leftovers = [n for n in os.listdir(out if not in_place else work) if n.endswith(".part")]
        if how != "SIGKILL":
            assert leftovers == []
        shutil.rmtree(work)


def test_progress_bar_on_a_terminal_only(tmp_path, big_stream):
    import pty

    (tmp_path / "a.sav").write_bytes(big_stream)
    out = tmp_path / "out"
    out.mkdir()
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xenstream.convert", "upgrade", str(tmp_path / "a.sav"),
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=60) == 0
    os.close(controller)
    assert b"total (1/1 files)" in shown and b"ETA" in shown and b"/s" in shown
    assert "1 converted" in stdout and "ETA" not in stdout
    # Not a terminal: no progress at all on stderr.
    (tmp_path / "quiet").mkdir()
    quiet = subprocess.run([sys.executable, "-m", "xenstream.convert", "upgrade", str(tmp_path / "a.sav"), "-o",
                            str(tmp_path / "quiet")], capture_output=True)
    assert quiet.returncode == 0 and quiet.stderr == b""


def test_two_files_with_one_output_name(tmp_path, streams, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "dom.sav").write_bytes(streams["pv.sav"])
    out = tmp_path / "out"
    out.mkdir()
    code, text = _upgrade(capsys, str(tmp_path / "a" / "dom.sav"), str(tmp_path / "b" / "dom.sav"), "-o", str(out),
                          "--jobs", "2")
    assert code == 1 and "same output name" in text and "1 converted" in text
    assert verify_path(out / "dom.sav").ok
