"""Security basics that are cheap to check: loopback by default, no unpickling of checkpoint
contents, the auth token never printed. (Request size and history caps: test_serve.py's 413 and
100,000-item history cases; the HTTP port refused off loopback: test_faults_serve.py.)"""

import json
import secrets
import socket

import pytest
import torch

from p5ray import checkpoint as ckpt
from p5ray import cli, server
from p5ray.errors import CheckpointError
from tests.helpers import make_checkpoint
from tests.helpers_faults import main_in_process


def test_servers_bind_loopback_unless_told_otherwise():
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "c"])
    assert args.host == "127.0.0.1"
    assert server.serve_config("c")["http_options"]["host"] == "127.0.0.1"
    assert server.serve_config("c", host="0.0.0.0")["http_options"]["host"] == "0.0.0.0"


class _Payload:
    """Unpickling this creates `marker`: proof that code in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.pt", "train_state.pt"])
def test_pickled_code_in_a_resume_checkpoint_never_runs(tmp_path, name):
    path = make_checkpoint(tmp_path / "ckpt")
    torch.save({"epoch": 1}, path / "train_state.pt")
    marker = tmp_path / "payload-ran"
    torch.save({"x": _Payload(marker)}, path / name)
    meta = json.loads((path / "meta.json").read_text())
    for file in ("model.pt", "train_state.pt"):  # checksums that match: only weights_only stands guard
        meta["sha256"][file] = ckpt._sha256(path / file)
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be resumed from"):
        ckpt.load_for_resume(path)
    assert not marker.exists()


def test_the_auth_token_never_reaches_the_output(monkeypatch, capsys):
    token = f"p5ray-test-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("P5RAY_VERBOSE", "0")  # --verbose sets it for the process; undone after the test
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main_in_process(["submit", "--verbose", "--address", f"http://127.0.0.1:{port}", "--",
                     "evaluate", "--checkpoint", "/no/ckpt", "--data", "/no/data"])
    captured = capsys.readouterr()
    assert code == 2
    assert "no Ray cluster answers" in captured.err  # it got as far as using the token
    assert token not in captured.out and token not in captured.err
