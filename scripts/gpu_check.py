"""GPU check for a bare CUDA box: needs only PyTorch and p5ray's pure-torch model code (no Ray).

    python scripts/gpu_check.py            # from the project root; about a minute on a modern GPU

Measures, on synthetic data of the Amazon Beauty shape (12,101 items, dim 64, max_len 50,
batch 256, the default 2-layer encoder with recall, rank and cross-sell heads):
  - one training step (forward, backward, AdamW) in fp32 and in bf16 autocast, with the full
    softmax over the catalog and with sampled softmax (1,024 shared negatives) as recall loss:
    samples/s and peak GPU memory;
  - full-catalog top-10 scoring (one matmul + topk, as serving's recall) for 12,101 and 1,000,000
    synthetic item vectors, 1 user and 256 users per call: median latency.
Prints one table. Without CUDA it says so and exits 0. `--cpu-smoke` runs every measurement at
toy sizes on CPU (a test uses it so the script cannot rot on machines without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # p5ray from this checkout

from p5ray.hardware import autocast_dtype  # noqa: E402  (pure torch, like the two below)
from p5ray.losses import MultiTaskLoss  # noqa: E402
from p5ray.model import ModelSpec, P5Rec  # noqa: E402

BEAUTY = {"items": 12_101, "users": 22_363, "dim": 64, "max_len": 50, "batch": 256}
SMOKE = {"items": 500, "users": 100, "dim": 16, "max_len": 8, "batch": 16}
TASKS = ("recall", "rank", "cross_sell")  # Beauty has no ratings
RANK_NEGATIVES, SHARED_NEGATIVES, TOP_K = 4, 1024, 10


@dataclass
class Row:
    what: str
    precision: str
    throughput: str  # e.g. "12,345 samples/s"
    latency_ms: float
    peak_mib: float


def synthetic_batch(shape: dict, device: torch.device, seen_width: int = 20) -> dict:
    """A batch of full-length windows (the longest Beauty batches; most are shorter)."""
    B, T, N = shape["batch"], shape["max_len"], shape["items"]
    items = torch.randint(1, N + 1, (B, T + 1), device=device)
    return {
        "inputs": items[:, :-1],  # (B, T)
        "targets": items[:, 1:],  # (B, T)
        "ratings": torch.full((B, T), float("nan"), device=device),
        "users": torch.randint(1, shape["users"] + 1, (B,), device=device),
        "weights": torch.ones(B, device=device),
        "rank_negatives": torch.randint(1, N + 1, (B, T, RANK_NEGATIVES), device=device),
        "seen": torch.randint(1, N + 1, (B, seen_width), device=device),
        "negatives": torch.randint(1, N + 1, (min(SHARED_NEGATIVES, N),), device=device),
    }


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn, each synchronised (the GPU's time, not the launch's)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def train_step_row(shape: dict, recall_loss: str, precision: str, device: torch.device, steps: int, warmup: int) -> Row:
    spec = ModelSpec(num_items=shape["items"], num_users=shape["users"], dim=shape["dim"], max_len=shape["max_len"], tasks=TASKS)
    loss_fn = MultiTaskLoss(P5Rec(spec), alpha={t: 1.0 for t in TASKS}, recall_loss=recall_loss).to(device)
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-3)
    batch = synthetic_batch(shape, device)
    amp = autocast_dtype(precision, device.type)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            total, _ = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    reset_peak(device)
    seconds = statistics.median(timed(step, device, warmup=warmup, repeats=steps))
    name = "full softmax" if recall_loss == "full_softmax" else f"sampled softmax ({min(SHARED_NEGATIVES, shape['items'])} neg)"
    return Row(f"train step, {name}", precision, f"{shape['batch'] / seconds:,.0f} samples/s", seconds * 1e3, peak_mib(device))


@torch.no_grad()
def scoring_row(num_items: int, users: int, dim: int, precision: str, device: torch.device, repeats: int, warmup: int) -> Row:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    table = torch.randn(num_items + 1, dim, device=device, dtype=dtype)  # (N, D) item vectors
    query = torch.randn(users, dim, device=device, dtype=dtype)  # (U, D) user states

    def score():
        scores = query @ table.T  # (U, N)
        scores[:, 0] = float("-inf")  # padding row
        return scores.topk(TOP_K, dim=-1)

    reset_peak(device)
    seconds = statistics.median(timed(score, device, warmup=warmup, repeats=repeats))
    what = f"top-{TOP_K} scoring, {num_items:,} items, {users} user{'s' if users > 1 else ''}"
    return Row(what, precision, f"{users / seconds:,.0f} users/s", seconds * 1e3, peak_mib(device))


def run(device: torch.device, smoke: bool) -> list[Row]:
    shape = SMOKE if smoke else BEAUTY
    steps, repeats, warmup = (1, 2, 1) if smoke else (20, 50, 3)
    catalogs = (shape["items"], 5_000) if smoke else (BEAUTY["items"], 1_000_000)
    rows = []
    for recall_loss in ("full_softmax", "sampled_softmax"):
        for precision in ("fp32", "bf16"):
            rows.append(train_step_row(shape, recall_loss, precision, device, steps, warmup))
    for num_items in catalogs:
        for users in (1, shape["batch"]):
            for precision in ("fp32", "bf16"):
                rows.append(scoring_row(num_items, users, shape["dim"], precision, device, repeats, warmup))
    return rows


def table(rows: list[Row]) -> str:
    header = ("benchmark", "precision", "throughput", "median ms", "peak GPU MiB")
    cells = [header] + [
        (r.what, r.precision, r.throughput, f"{r.latency_ms:.2f}", "-" if r.peak_mib != r.peak_mib else f"{r.peak_mib:,.0f}")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths, strict=True))) for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (tests the script)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): nothing measured")
        return 0
    else:
        device = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in this table
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"p5ray GPU check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}")
    else:
        print(f"p5ray GPU check, CPU smoke run (toy sizes): torch {torch.__version__}")
    print(table(run(device, args.cpu_smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
