"""An untrained checkpoint that fits a prepared data directory: its real vocab, features and
histories, random weights. Batch and serving cost depend on shapes, not on weight values."""

from __future__ import annotations

from pathlib import Path

import torch

from p5ray import checkpoint as ckpt
from p5ray import dataset
from p5ray.config import Config, replace
from p5ray.train import build_model, build_spec, checkpoint_users, training_rating_mean


def checkpoint_for_data(data_dir: str | Path, path: str | Path, model: dict | None = None, seed: int = 0) -> Path:
    """`model` overrides the default model config (dim 64, 2 layers, window 50)."""
    cfg = replace(Config(), model=model) if model else Config()
    manifest = dataset.read_manifest(data_dir)
    items = dataset.read_table(data_dir, "items.parquet")
    users = dataset.read_table(data_dir, "users.parquet")
    spec = build_spec(cfg, manifest, training_rating_mean(dataset.read_table(data_dir, "train.parquet")))
    torch.manual_seed(seed)
    net = build_model(spec, items, users)
    meta = {"epoch": 0, "metrics": {}, "tasks": list(spec.tasks), "has_ratings": bool(manifest.get("has_ratings")),
            "rating_min": manifest.get("rating_min"), "rating_max": manifest.get("rating_max"),
            "model_version": f"untrained-{manifest['items']}"}
    return ckpt.save(path, net, cfg, items, checkpoint_users(str(data_dir), users), meta)
