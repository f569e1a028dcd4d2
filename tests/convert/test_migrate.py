"""`xenstream migrate` / `xenstream receive`: two simulated hosts over loopback TCP, the guest arriving
intact (v2 live, v1 live through `xenstream serve`, checkpointed with failover)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.convert.service_harness import ServiceProcess

DEADLINE = 60.0


class Receiver:
    """`xenstream receive --listen 127.0.0.1:0` as a subprocess; `address` once it listens."""

    def __init__(self, tmp_path, *extra: str) -> None:
        self.report_path = str(tmp_path / "received.json")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xenstream.convert", "-q", "receive", "--listen", "127.0.0.1:0", "--digest",
             "--host-mem", "256M", "--report", self.report_path, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        assert line.startswith("listening on "), line
        self.address = line.split()[-1]

    def report(self) -> dict:
        try:
            _, err = self.proc.communicate(timeout=DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert self.proc.returncode == 0, err
        with open(self.report_path) as handle:
            return json.load(handle)


def migrate(tmp_path, to: str, *args: str) -> dict:
    path = str(tmp_path / "sent.json")
    done = subprocess.run([sys.executable, "-m", "xenstream.convert", "-q", "migrate", "--to", to, "--digest",
                           "--report", path, *args], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert "migrated" in done.stderr
    with open(path) as handle:
        return json.load(handle)


@pytest.mark.parametrize("policy", ["xen", "adaptive"])
def test_v2_live_migration_arrives_intact(tmp_path, policy):
    receiver = Receiver(tmp_path)
    sent = migrate(tmp_path, receiver.address, "--guest", "pv64:mem=16M,vcpus=2,seed=51",
                   "--workload", "hotset:pages=256,rate=15000,cold=300", "--policy", policy)
    received = receiver.report()
    assert received["digest"] == sent["digests"][-1]
    assert (received["checkpoints"], received["failover"], received["ended"]) == (0, False, "END")
    assert received["bytes"] == sent["bytes"]
    assert sent["policy"] == policy and sent["format"] == "v2"
    rounds = sent["rounds"]
    assert sent["live_rounds"] == sum(r["live"] for r in rounds) >= 2
    assert sent["final_pages"] == rounds[sent["live_rounds"]]["sent"]
    assert sent["total_pages"] == sum(r["sent"] for r in rounds)
    assert all({"dirty", "sent", "bytes", "seconds"} <= r.keys() for r in rounds)


def test_legacy_sender_through_serve_arrives_intact(tmp_path):
    receiver = Receiver(tmp_path)
    workdir = tmp_path / "serve"
    workdir.mkdir()
    service = ServiceProcess(str(workdir), f'[[listener]]\nname = "v1"\nlisten = "127.0.0.1:0"\n'
                                           f'destination = "{receiver.address}"\nformat = "libxl"\n').start()
    try:
        sent = migrate(tmp_path, service.addresses["v1"], "--legacy", "--guest", "pv64:mem=16M,vcpus=2,seed=52",
                       "--workload", "uniform:rate=20000")
        received = receiver.report()
        assert service.stream_result(1)["result"] == "ok"
    finally:
        service.stop()
        service.kill()
    assert sent["format"] == "v1" and sent["live_rounds"] >= 2
    assert received["digest"] == sent["digests"][-1]


def test_checkpointed_migration_fails_over_to_the_last_checkpoint(tmp_path):
    receiver = Receiver(tmp_path)
    sent = migrate(tmp_path, receiver.address, "--guest", "pv64:mem=8M,vcpus=2,seed=53",
                   "--workload", "uniform:rate=20000", "--checkpoint-interval", "20", "--checkpoints", "3")
    received = receiver.report()
    assert sent["checkpoints"] == 3 and len(sent["digests"]) == 3
    assert len(set(sent["digests"])) == 3  # the guest kept running between checkpoints
    assert (received["checkpoints"], received["failover"]) == (3, True)
    assert received["digest"] == sent["digests"][-1]


def test_receiver_refuses_a_broken_first_checkpoint(tmp_path):
    receiver = Receiver(tmp_path)
    host, port = receiver.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x00" * 7)
    receiver.proc.wait(DEADLINE)
    assert receiver.proc.returncode == 1
    assert "before the first complete checkpoint" in receiver.proc.stderr.read()


@pytest.mark.parametrize(("args", "message"), [
    (["--legacy", "--checkpoint-interval", "10"], "--legacy"),
    (["--legacy", "--policy", "adaptive"], "--legacy"),
    (["--workload", "bogus"], "unknown workload"),
    (["--workload", "uniform:speed=1"], "no parameter"),
])
def test_migrate_option_errors_before_connecting(args, message):
    done = subprocess.run([sys.executable, "-m", "xenstream.convert", "migrate", "--guest", "pv64:mem=4M",
                           "--to", "127.0.0.1:9", *args], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
