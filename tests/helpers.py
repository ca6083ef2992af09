"""Test helpers: paths, running the CLI, and small synthetic checkpoints (a real model and the
real checkpoint format, built in a second without prepared data or training)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from p5ray import checkpoint as ckpt
from p5ray.config import Config, replace
from p5ray.train import build_model, build_spec

TINY_MODEL = {"dim": 16, "layers": 1, "heads": 1, "max_len": 8, "tower_dim": 16, "use_features": False}


def item_id(i: int) -> str:
    return f"i{i}"


def user_id(u: int) -> str:
    return f"u{u}"


def make_checkpoint(
    path: str | Path,
    num_items: int = 60,
    num_users: int = 20,
    has_ratings: bool = True,
    seed: int = 0,
    model_version: str | None = None,
    history_len: int = 5,
    mixture: str = "shared_bottom",
) -> Path:
    """A checkpoint with items i1..iN (popularity decreasing with the index) and users u1..uU,
    each with `history_len` random items (user u1 gets items i1..i{history_len})."""
    rng = np.random.default_rng(seed)
    cfg = replace(Config(), model={**TINY_MODEL, "mixture": mixture})
    manifest = {"items": num_items, "users": num_users, "has_ratings": has_ratings}
    spec = build_spec(cfg, manifest, rating_mean=3.5 if has_ratings else 0.0)
    item_idx = np.arange(1, num_items + 1, dtype=np.int32)
    items = pa.table({
        "item_idx": pa.array(item_idx, pa.int32()),
        "item_id": [item_id(i) for i in item_idx],
        "train_count": pa.array(num_items + 1 - item_idx, pa.int64()),
    })
    histories = [list(range(1, history_len + 1))] + [
        rng.choice(item_idx, size=history_len, replace=False).tolist() for _ in range(num_users - 1)
    ]
    users = pa.table({
        "user_idx": pa.array(np.arange(1, num_users + 1), pa.int32()),
        "user_id": [user_id(u) for u in range(1, num_users + 1)],
        "history": pa.array(histories, pa.list_(pa.int32())),
    })
    torch.manual_seed(seed)
    model = build_model(spec, items, users)
    meta = {
        "epoch": 1,
        "metrics": {},
        "tasks": list(spec.tasks),
        "has_ratings": has_ratings,
        "rating_min": 1.0 if has_ratings else None,
        "rating_max": 5.0 if has_ratings else None,
    }
    if model_version:
        meta["model_version"] = model_version
    return ckpt.save(path, model, cfg, items, users, meta)


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TINY = ROOT / "p5ray" / "configs" / "tiny.yaml"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`p5ray ARGS` in a subprocess (its own Ray), capturing stdout and stderr."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "p5ray.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT,
    )


def last_line(text: str, prefix: str) -> str | None:
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return lines[-1][len(prefix):].strip() if lines else None


def start_local_ray(num_cpus: int = 8, attempts: int = 3) -> None:
    """A fresh local Ray for this process (never someone else's cluster), retried: on a busy
    machine the raylet can miss Ray's fixed 30 s start-up window."""
    import ray

    from p5ray.raycluster import apply_serve_env

    apply_serve_env()  # Serve in tests runs as `p5ray serve` runs it
    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
