"""What a training run asks Ray for, and which backend, device and precision it runs with.

Pure functions of the config and of the cluster's size, so every choice is tested on a CPU box:

    plan_workers      resources per Ray Train worker on a cluster of a given size
    torch_backend     process-group backend: NCCL on GPUs, gloo on CPUs
    pick_device       cuda or cpu
    autocast_dtype    bf16 autocast on GPUs that support it (train.precision=auto), else fp32
    collective_device where tensors for a collective must live for that backend

No Ray imports here: scripts/gpu_check.py uses this module on a bare GPU box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerPlan:
    resources_per_worker: dict  # e.g. {"CPU": 1} or {"CPU": 1, "GPU": 1}
    read_first: bool = False  # read the data before training instead of streaming it alongside
    note: str = ""  # why the plan differs from the config (logged), "" if it does not


def plan_workers(num_workers: int, cpus_per_worker: float, use_gpu: bool, cluster_cpus: float | None) -> WorkerPlan:
    """Resources for `num_workers` training workers on a cluster with `cluster_cpus` CPUs.

    `cluster_cpus` is what the cluster has or can grow to (an autoscaler's maximum); None (or 0,
    a head without CPUs whose workers are yet to come) keeps the configured request.

    Ray Data streams the training data to the workers while they train, and needs a whole free
    CPU for that (its file-listing task asks for 1 CPU; its resource coordinator hands out whole
    CPUs). On a cluster without one to spare, workers holding every CPU would starve the stream
    and training would hang; there the data (small, on a cluster that size) is read before the
    workers start (`read_first`), and the workers may then have every CPU. On a cluster with
    fewer CPUs than the workers ask for, each worker gets an equal fractional share: logical CPUs
    are the scheduler's bookkeeping, torch threads are set per worker from the config.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    gpu = {"GPU": 1} if use_gpu else {}  # one worker per GPU
    wanted = num_workers * cpus_per_worker
    if not cluster_cpus or cluster_cpus >= wanted + 1:
        return WorkerPlan({"CPU": cpus_per_worker, **gpu})
    note = (
        f"the cluster has {cluster_cpus:g} CPUs, not {num_workers} workers x {cpus_per_worker:g} CPU "
        "+ 1 to stream the data: the data is read before training"
    )
    if cluster_cpus >= wanted:
        return WorkerPlan({"CPU": cpus_per_worker, **gpu}, True, note)
    share = _round_down(cluster_cpus / num_workers)
    return WorkerPlan({"CPU": share, **gpu}, True, f"{note}, and each worker reserves {share:g} CPU")


def check_gpus(num_workers: int, use_gpu: bool, cluster_gpus: float | None) -> str | None:
    """A message when --use-gpu asks for more GPUs than the cluster has or can get, else None."""
    if not use_gpu or cluster_gpus is None or cluster_gpus >= num_workers:
        return None
    return (
        f"--use-gpu runs one worker per GPU: {num_workers} workers need {num_workers} GPUs, "
        f"the cluster has {cluster_gpus:g}"
    )


def _round_down(cpus: float) -> float:
    """To a multiple of 1/100 CPU (Ray's resource granularity is 1/10000), at least 0.01."""
    return max(0.01, math.floor(cpus * 100) / 100)


def torch_backend(use_gpu: bool) -> str:
    """torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if use_gpu else "gloo"


def pick_device(use_gpu: bool, cuda_available: bool | None = None) -> torch.device:
    """cuda when asked for and present; asking for a GPU without one is an error, not a fallback."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if use_gpu and not available:
        raise RuntimeError("a GPU was requested but CUDA is not available on this machine")
    return torch.device("cuda" if use_gpu else "cpu")


def autocast_dtype(precision: str, device_type: str, bf16_supported: bool = True) -> torch.dtype | None:
    """The autocast dtype for train.precision on this device, or None for plain fp32.

    auto: bf16 on a GPU that supports it (Ampere and newer), fp32 otherwise (CPU autocast is slower
    than fp32 for these small matmuls). bf16: always, CPU included. fp32: never.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" and bf16_supported else None
    raise ValueError(f"unknown precision {precision!r}")


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def collective_device(backend: str) -> torch.device:
    """Where a tensor must live for an all_reduce: NCCL only reduces CUDA tensors."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
