"""`xenstream bench`: the registry, the child measurement, and a tiny run of the verify benchmark (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xenstream.convert import bench


@pytest.mark.parametrize("text,expected", [("1G", 1 << 30), ("4GiB", 4 << 30), ("512M", 512 << 20), ("4096", 4096),
                                           ("64k", 64 << 10)])
def test_parse_size(text, expected):
    assert bench.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError):
        bench.parse_size("lots")


def test_verify_benchmark_is_discovered():
    assert "verify" in bench.discover()


def test_register_twice_is_refused():
    benchmark = bench.discover()["verify"]
    with pytest.raises(ValueError):
        bench.register(benchmark)


def test_measure_reports_the_childs_own_peak_rss():
    ballast = bytearray(200 << 20)  # a big parent must not inflate a small child's figure
    ballast[::4096] = b"\1" * len(ballast[::4096])
    small = bench.measure(["true"], capture=False)
    big = bench.measure([sys.executable, "-c", "b = bytearray(96 << 20); b[::4096] = b'x' * len(b[::4096]); print('hi')"])
    assert small.returncode == 0 and small.max_rss_bytes < 64 << 20
    assert big.stdout == b"hi\n" and big.max_rss_bytes > 96 << 20
    assert bench.measure(["false"], capture=False).returncode == 1
    del ballast


def test_bench_verify_small_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "xenstream.convert", "bench", "verify", "--sizes", "8M",
                           "--repeat", "1", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("verify 8.0 MiB PV stream from the page cache: valid") for line in lines)
    assert any("ratio to cat" in line and "verifying" in line for line in lines)
    assert any("verifier peak RSS" in line for line in lines)
    assert list(tmp_path.iterdir()) == []  # the stream is removed unless --keep


def test_bench_verify_skips_when_the_disk_is_too_small(tmp_path, monkeypatch, capsys):
    from xenstream.convert import bench, bench_verify

    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: type("U", (), {"free": 1 << 20})())
    assert bench_verify._bench_size(str(tmp_path), 4 << 30, 1, False) == 0
    assert "skipped" in capsys.readouterr().out
