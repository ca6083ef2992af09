"""The choices a run makes about resources, backend, device, precision and shared storage: pure
functions, tested on CPU (the GPU path's code runs here with its inputs set, not on a GPU)."""

from __future__ import annotations

import pytest
import torch

from p5ray import raycluster
from p5ray.hardware import (
    autocast_dtype,
    bf16_supported,
    check_gpus,
    collective_device,
    pick_device,
    plan_workers,
    torch_backend,
)

# -- worker resources -------------------------------------------------------------------------


def test_a_cluster_with_room_gets_the_configured_request_and_streams_the_data():
    plan = plan_workers(2, 1, False, cluster_cpus=8)
    assert (plan.resources_per_worker, plan.read_first, plan.note) == ({"CPU": 1}, False, "")
    assert plan_workers(2, 1, False, cluster_cpus=3).read_first is False  # exactly one to spare


@pytest.mark.parametrize("cpus", [None, 0])
def test_unknown_size_keeps_the_configured_request(cpus):
    assert plan_workers(4, 2, True, cpus).resources_per_worker == {"CPU": 2, "GPU": 1}


def test_no_cpu_to_spare_reads_the_data_first_and_keeps_whole_cpus():
    """The acceptance cluster: two 1-CPU nodes, two 1-CPU workers -> one worker per node."""
    plan = plan_workers(2, 1, False, cluster_cpus=2)
    assert plan.resources_per_worker == {"CPU": 1} and plan.read_first
    assert "read before training" in plan.note


def test_fewer_cpus_than_workers_ask_for_share_them():
    plan = plan_workers(2, 2, False, cluster_cpus=2)
    assert plan.resources_per_worker == {"CPU": 1} and plan.read_first
    plan = plan_workers(3, 1, True, cluster_cpus=2)
    assert plan.resources_per_worker == {"CPU": 0.66, "GPU": 1}
    assert "0.66" in plan.note
    assert plan_workers(4, 1, False, cluster_cpus=0.01).resources_per_worker == {"CPU": 0.01}


def test_no_workers_is_a_bug():
    with pytest.raises(ValueError):
        plan_workers(0, 1, False, 8)


def test_gpu_count_is_checked_only_for_gpu_runs():
    assert check_gpus(2, False, 0) is None
    assert check_gpus(2, True, None) is None  # unknown: Ray Train waits / reports
    assert check_gpus(2, True, 2) is None
    assert "2 workers need 2 GPUs, the cluster has 1" in check_gpus(2, True, 1)


# -- backend, device, precision ---------------------------------------------------------------


def test_backend_is_nccl_on_gpus_gloo_on_cpus():
    assert torch_backend(True) == "nccl" and torch_backend(False) == "gloo"


def test_device_is_cuda_only_when_asked_for_and_present():
    assert pick_device(False, cuda_available=True) == torch.device("cpu")
    assert pick_device(True, cuda_available=True) == torch.device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device(True, cuda_available=False)


@pytest.mark.parametrize("precision, device, bf16_ok, expected", [
    ("auto", "cuda", True, torch.bfloat16),
    ("auto", "cuda", False, None),  # pre-Ampere GPU: fp32
    ("auto", "cpu", True, None),
    ("bf16", "cpu", False, torch.bfloat16),
    ("bf16", "cuda", True, torch.bfloat16),
    ("fp32", "cuda", True, None),
])
def test_autocast_dtype(precision, device, bf16_ok, expected):
    assert autocast_dtype(precision, device, bf16_ok) is expected


def test_unknown_precision_is_a_bug():
    with pytest.raises(ValueError):
        autocast_dtype("fp8", "cuda")


def test_cpu_collectives_stay_on_cpu():
    assert collective_device("gloo") == torch.device("cpu")
    assert bf16_supported(torch.device("cpu")) is False


def test_autocast_choice_trains_on_cpu_in_bf16():
    """What run_epoch does with autocast_dtype: a bf16 forward on CPU gives a finite fp32 grad."""
    layer = torch.nn.Linear(4, 2)
    dtype = autocast_dtype("bf16", "cpu")
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = layer(torch.randn(3, 4))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


# -- serving on a GPU ------------------------------------------------------------------------


def test_serve_on_gpu_puts_one_gpu_under_each_set_of_task_replicas():
    from p5ray import server
    from p5ray.serve import AppArgs
    from p5ray.tasks import TASKS

    apps = {a["name"]: a["args"] for a in server.serve_config("c", use_gpu=True)["applications"]}
    assert apps["p5ray"]["replica_gpus"] * len(TASKS) == pytest.approx(1.0)
    assert all("replica_gpus" not in args for name, args in apps.items() if name != "p5ray")  # shared replicas
    assert "replica_gpus" not in server.serve_config("c")["applications"][0]["args"]
    assert AppArgs.model_validate(apps["p5ray"]).replica_gpus == pytest.approx(0.25)
    with pytest.raises(ValueError):
        AppArgs.model_validate({"checkpoint": "c", "replica_gpus": -1})


def test_serve_gpu_shortage_is_one_actionable_line():
    from p5ray import server
    from p5ray.errors import UserError

    server.check_gpus(2, 2)
    with pytest.raises(UserError) as info:
        server.check_gpus(2, 1)
    assert "has 1 GPU(s), the task replicas need 2" in str(info.value)
    assert "drop --use-gpu" in info.value.one_line() and "\n" not in info.value.one_line()


def test_a_replica_without_a_gpu_holds_the_model_on_cpu():
    from p5ray.serve import replica_device

    assert replica_device() == "cpu"  # outside a GPU actor: ray.get_gpu_ids() is empty


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_serve_use_gpu_without_gpus_is_exit_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    from p5ray import cli
    from tests.helpers import make_checkpoint

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    checkpoint = make_checkpoint(tmp_path / "c")
    assert cli.main(["serve", "--checkpoint", str(checkpoint), "--use-gpu", "--http-port", "18931", "--grpc-port", "18932"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "this machine has 0 GPU(s)" in err


# -- shared storage ---------------------------------------------------------------------------


@pytest.mark.parametrize("storage, nodes, needed", [
    ("/shared/runs", 2, True),
    ("/shared/runs", 1, False),
    ("s3://bucket/runs", 4, False),
    ("gs://bucket/runs", 4, False),
])
def test_only_local_paths_on_multi_node_clusters_are_checked(storage, nodes, needed):
    assert raycluster.needs_storage_check(storage, nodes) is needed


def test_refusal_names_the_nodes_that_cannot_see_the_path():
    assert raycluster.storage_refusal("/s", [], 3) is None
    blind = [{"id": "abcdef0123456789", "address": "10.0.0.7"}]
    message = raycluster.storage_refusal("/s", blind, 3)
    assert message.startswith("--storage /s is not visible from 1 of 3 nodes: 10.0.0.7 (node abcdef01)")
    assert "\n" not in message


def test_marker_is_read_when_present_and_missed_when_not(tmp_path):
    marker = tmp_path / "m"
    marker.write_text("token")
    assert raycluster.read_marker(str(marker)) == "token"
    assert raycluster.read_marker(str(tmp_path / "absent"), patience_s=0.2) is None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_use_gpu_trains_with_nccl_and_bf16_on_a_gpu_box(tmp_path):
    """On a CUDA machine: `p5ray train --use-gpu` end to end (one worker per GPU, NCCL, bf16)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers_cluster import make_prepared

    root = Path(__file__).resolve().parent.parent
    data = make_prepared(tmp_path / "data")
    workers = str(min(2, torch.cuda.device_count()))
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "p5ray.cli", "train", "--data", str(data), "--config",
         str(root / "p5ray/configs/tiny.yaml"), "--use-gpu", "--num-workers", workers,
         "--storage", str(tmp_path / "runs"), "--name", "gpu"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("checkpoint: ")
