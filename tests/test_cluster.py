"""`p5ray submit` against a real 2-node Ray cluster on loopback, token auth on.

One cluster for the module, shaped like the acceptance check (two nodes of 1 CPU each): train with
2 workers on different nodes, checkpoint on shared storage, evaluate it, and the refusals (a
storage path one node cannot see, a wrong or missing token). Torn down even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_cluster import LoopbackCluster, can_hide_directory, make_prepared

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "p5ray" / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def cluster():
    hidden = Path("/tmp") / f"p5c-hidden-{os.getpid()}"
    hidden.mkdir(exist_ok=True)
    c = LoopbackCluster(node_cpus=(1, 1), hidden=hidden if can_hide_directory() else None)
    try:
        yield c.start()
    finally:
        left = c.stop()
        shutil.rmtree(hidden, ignore_errors=True)
        assert not left, f"cluster processes left running: {left}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(make_prepared(tmp_path_factory.mktemp("cluster") / "prepared"))


def submit(cluster: LoopbackCluster, *args: str, token: str | None = "cluster", home: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if token:
        env["RAY_AUTH_TOKEN"] = cluster.token if token == "cluster" else token
    if home:
        env["HOME"] = home
    cmd = [sys.executable, "-m", "p5ray.cli", "submit", "--address", cluster.url, *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1100)


def job_id(stderr: str) -> str:
    return re.search(r"job (p5ray-[\w-]+): submitted", stderr).group(1)


@pytest.fixture(scope="module")
def trained(cluster, data, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    done = submit(cluster, "--", "train", "--data", data, "--config", TINY, "--num-workers", "2",
                  "--storage", str(shared), "--name", "cluster")
    assert done.returncode == 0, done.stderr[-3000:]
    return done, shared


def test_train_job_runs_two_workers_on_two_nodes_and_checkpoints_to_shared_storage(cluster, trained):
    done, shared = trained
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("checkpoint: "), done.stdout  # stdout is the verb's own stdout
    checkpoint = Path(lines[-1].split(": ", 1)[1])
    assert checkpoint.is_relative_to(shared) and (checkpoint / "model.pt").is_file()
    assert all(not line.startswith("[stdout]") for line in lines)
    job = job_id(done.stderr)
    assert f"job {job}: SUCCEEDED" in done.stderr
    nodes = cluster.train_worker_nodes(job)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes


def test_evaluate_job_reads_the_checkpoint_and_prints_only_metrics(cluster, trained, data):
    checkpoint = trained[0].stdout.strip().splitlines()[-1].split(": ", 1)[1]
    done = submit(cluster, "--", "evaluate", "--checkpoint", checkpoint, "--data", data)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert 0.0 <= metrics["full/ndcg@10"] <= 1.0


def test_status_and_logs_of_a_finished_job(cluster, trained):
    job = job_id(trained[0].stderr)
    status = submit(cluster, "--status", job)
    assert (status.returncode, status.stdout.strip()) == (0, "SUCCEEDED")
    logs = submit(cluster, "--logs", job)
    assert logs.returncode == 0
    assert logs.stdout.strip().splitlines()[-1] == trained[0].stdout.strip().splitlines()[-1]


def test_no_wait_then_stop(cluster, data, tmp_path):
    started = submit(cluster, "--no-wait", "--", "train", "--data", data, "--config", TINY,
                     "--set", "train.epochs=1000", "--storage", str(tmp_path), "--name", "long")
    assert started.returncode == 0, started.stderr[-2000:]
    stopped = submit(cluster, "--stop", job_id(started.stderr))
    assert (stopped.returncode, stopped.stdout.strip()) == (0, "STOPPED")


def test_storage_one_node_cannot_see_is_refused(cluster, data):
    if cluster.hidden is None:
        pytest.skip("no private mount namespace here (unshare): refusal tested in test_hardware")
    storage = cluster.hidden / "runs"
    done = submit(cluster, "--", "train", "--data", data, "--config", TINY, "--storage", str(storage))
    assert done.returncode == 1, done.stderr[-2000:]  # the job ran and failed: exit 1 (SPEC)
    assert f"--storage {storage} is not visible from 1 of 2 nodes" in done.stderr
    assert "checkpoint:" not in done.stdout


def test_wrong_token_is_one_line_exit_2(cluster):
    done = submit(cluster, "--status", "whatever", token="0" * 64)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "rejected the auth token" in done.stderr


def test_missing_token_is_one_line_exit_2(cluster, tmp_path):
    done = submit(cluster, "--", "evaluate", "--checkpoint", "/no/ckpt", "--data", "/no/data",
                  token=None, home=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "requires an auth token" in done.stderr
