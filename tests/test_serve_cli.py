"""`p5ray serve` and `p5ray recommend` as a user runs them: exit codes, the two address lines,
answers over both protocols, and a clean exit 0 on SIGINT to the process group."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from p5ray import cli
from p5ray.proto import p5ray_pb2 as pb
from p5ray.proto import p5ray_pb2_grpc
from p5ray.server import post
from tests.helpers import make_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_checkpoint_is_exit_2_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err


def test_port_in_use_is_exit_2_one_line(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "c")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(checkpoint), "--http-port", str(port), "--grpc-port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"port {port}" in err and "in use" in err


def test_recommend_without_server_is_exit_2_one_line(capsys):
    assert cli.main(["recommend", "--user", "u1", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no p5ray server" in err


def read_lines(process, want: int, timeout_s: float) -> list[str]:
    """The first `want` stdout lines (a reader thread: a selector misses lines already buffered)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in process.stdout], daemon=True).start()
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline and process.poll() is None:
        try:
            out.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_prints_addresses_answers_and_exits_0_on_sigint(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "c", model_version="cli-model")
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "p5ray.cli", "serve", "--checkpoint", str(checkpoint),
               "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True, env=env)
    try:
        lines = read_lines(process, 2, timeout_s=600)
        assert lines == [f"http: http://127.0.0.1:{http_port}", f"grpc: 127.0.0.1:{grpc_port}"]
        url = f"http://127.0.0.1:{http_port}"

        assert cli.main(["recommend", "--user", "u1", "--k", "3", "--url", url]) == 0
        table = capsys.readouterr().out
        assert "cli-model" in table and len([line for line in table.splitlines() if line.strip()[:1].isdigit()]) == 3
        assert cli.main(["recommend", "--user", "nobody", "--k", "2", "--url", url, "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["cold_start"] is True and len(answer["items"]) == 2

        for route in ("/recall/v1/recall", "/v1/recall"):  # per-task app and the combined app
            assert len(post(f"{url}{route}", {"user_id": "u1", "k": 4})["items"]) == 4

        stub = p5ray_pb2_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        for app in ("p5ray", "recall"):  # the combined app and a per-task app
            reply = stub.Recall(pb.RecallRequest(user_id="u1", k=4), metadata=(("application", app),), timeout=60)
            assert len(reply.items) == 4 and reply.model_version == "cli-model"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        rc = process.wait(timeout=180)
    assert rc == 0
