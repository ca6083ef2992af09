"""Offline evaluation: every metric key of SPEC.md this data supports, as one flat dict.

Protocols (leave-one-out: the last item is the test target, the second-to-last the valid one):
  full/*           rank the target among all items, the user's earlier items masked
                   (the S3-Rec / ICLRec protocol)
  full_unmasked/*  the same without masking (the setting of P5's and TIGER's numbers)
  sampled/*        the target among 1 + 99 items the user never touched (P5's direct protocol)
  rank/auc, cross_sell/auc    positive against the same sampled negatives
  cross_sell/hr@10            the next item among all items given the previous item
  rating/rmse, rating/mae     where the data has ratings
  baseline/popularity/full/*  training-split popularity under the `full` protocol
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p5ray import checkpoint as ckpt
from p5ray import dataset
from p5ray.config import EvalConfig
from p5ray.errors import DataError, UserError
from p5ray.metrics import RankingAccumulator, pairwise_auc, rmse_mae
from p5ray.model import P5Rec
from p5ray.scoring import batches, ranks_full, user_states

log = logging.getLogger(__name__)

PROTOCOL = (
    "leave-one-out by time (last item = test, second-to-last = valid); "
    "full: all items ranked, the user's earlier items masked; full_unmasked: no masking; "
    "sampled: target + {neg} items the user never touched, uniform, seed {seed}"
)


@dataclass
class Split:
    users: np.ndarray  # (U,) user indices
    histories: list  # U arrays, most recent last
    targets: np.ndarray  # (U,)
    target_ratings: np.ndarray | None  # (U,) or None
    all_items: list  # U arrays: every item the user ever touched (for sampled negatives)


def read_split(data_dir: str | Path, name: str) -> Split:
    table = dataset.read_table(data_dir, f"{name}.parquet")
    seqs = dataset.read_table(data_dir, "sequences.parquet")
    full = dict(zip(seqs.column("user_idx").to_pylist(), seqs.column("items").to_pylist(), strict=True))
    users = table.column("user_idx").to_numpy().astype(np.int64)
    ratings = table.column("target_rating") if "target_rating" in table.column_names else None
    target_ratings = None
    if ratings is not None and ratings.null_count < len(ratings):
        target_ratings = ratings.to_numpy(zero_copy_only=False).astype(np.float64)
    return Split(
        users=users,
        histories=[np.asarray(h, dtype=np.int64) for h in table.column("history").to_pylist()],
        targets=table.column("target").to_numpy().astype(np.int64),
        target_ratings=target_ratings,
        all_items=[np.asarray(full.get(int(u), []), dtype=np.int64) for u in users],
    )


def sample_unseen(all_items: list, num_items: int, n: int, seed: int) -> np.ndarray:
    """(U, n) uniform items each user never touched, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    out = rng.integers(1, num_items + 1, size=(len(all_items), n))
    for u, items in enumerate(all_items):
        seen = set(np.asarray(items).tolist())
        if len(seen) >= num_items:
            continue
        row = out[u]
        bad = np.fromiter((x in seen for x in row), bool, count=n)
        while bad.any():
            row[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))
            bad = np.fromiter((x in seen for x in row), bool, count=n)
    return out


@torch.no_grad()
def ranking_metrics(model: P5Rec, split: Split, cfg: EvalConfig, masked: bool = True, device="cpu") -> dict:
    """Full-ranking metrics of the recall head; used for validation during training too."""
    model.eval()
    table = model.items.all()
    acc = RankingAccumulator(cfg.ks)
    for sl in batches(len(split.users), cfg.batch_users):
        hist = split.histories[sl]
        r = user_states(model, hist, split.users[sl], device)["recall"]
        targets = torch.as_tensor(split.targets[sl], device=device)
        acc.add(ranks_full(r, table, targets, hist if masked else None, cfg.chunk_items))
    return acc.result("full" if masked else "full_unmasked")


@torch.no_grad()
def evaluate_model(model: P5Rec, split: Split, item_counts: np.ndarray, cfg: EvalConfig, rating_range=None) -> dict:
    model.eval()
    n_items = model.spec.num_items
    table = model.items.all()  # (N, D)
    negatives = torch.as_tensor(sample_unseen(split.all_items, n_items, cfg.sampled_negatives, cfg.seed))
    full, unmasked, sampled = RankingAccumulator(cfg.ks), RankingAccumulator(cfg.ks), RankingAccumulator((1, 5, 10))
    cold, warm = RankingAccumulator((10,)), RankingAccumulator((10,))
    cross_full = RankingAccumulator((10,))
    rank_pos, rank_neg, cs_pos, cs_neg, rating_pred = [], [], [], [], []
    for sl in batches(len(split.users), cfg.batch_users):
        hist = split.histories[sl]
        states = user_states(model, hist, split.users[sl])
        targets = torch.as_tensor(split.targets[sl])
        r = states["recall"]
        ranks = ranks_full(r, table, targets, hist, cfg.chunk_items)
        full.add(ranks)
        lengths = np.array([len(h) for h in hist])
        cold_rows = torch.as_tensor(lengths <= 5)
        cold.add(ranks[cold_rows])
        warm.add(ranks[~cold_rows])
        unmasked.add(ranks_full(r, table, targets, None, cfg.chunk_items))
        cand = torch.cat([targets.unsqueeze(1), negatives[sl]], 1)  # (B, 1 + K)
        s = model.recall_scores(r, table[cand])  # (B, 1 + K)
        sampled.add(_rank_in_row(s))
        if "rank" in model.spec.tasks:
            logits = model.rank_logits(states["rank"], table[cand])
            rank_pos.append(logits[:, 0])
            rank_neg.append(logits[:, 1:])
        if "cross_sell" in model.spec.tasks:  # a model trained without it has no cross-sell head
            anchors = torch.as_tensor([int(h[-1]) if len(h) else 0 for h in hist])
            query = model.cross_sell_query(table[anchors])  # (B, D)
            cs = model.recall_scores(query, table[cand])
            cs_pos.append(cs[:, 0])
            cs_neg.append(cs[:, 1:])
            cross_full.add(ranks_full(query, table, targets, None, cfg.chunk_items))
        if split.target_ratings is not None and "rating" in model.spec.tasks:
            rating_pred.append(model.rating(states["rating"], table[targets].unsqueeze(1)).squeeze(1))
    out = {**full.result("full"), **unmasked.result("full_unmasked")}
    keep = ("sampled/hr@1", "sampled/hr@5", "sampled/hr@10", "sampled/ndcg@5", "sampled/ndcg@10")
    out.update({k: v for k, v in sampled.result("sampled").items() if k in keep})
    if rank_pos:
        out["rank/auc"] = pairwise_auc(torch.cat(rank_pos), torch.cat(rank_neg))
    if cs_pos:
        out["cross_sell/auc"] = pairwise_auc(torch.cat(cs_pos), torch.cat(cs_neg))
        out["cross_sell/hr@10"] = cross_full.result("x")["x/hr@10"]
    if rating_pred:
        pred = torch.cat(rating_pred)
        if rating_range is not None:
            pred = pred.clamp(*rating_range)
        out["rating/rmse"], out["rating/mae"] = rmse_mae(pred, torch.as_tensor(split.target_ratings))
    if cold.n and warm.n:
        out["full_cold/ndcg@10"] = cold.result("c")["c/ndcg@10"]
        out["full_warm/ndcg@10"] = warm.result("w")["w/ndcg@10"]
        out["n_users_cold"] = cold.n
    out.update(popularity_metrics(split, item_counts, cfg))
    return out


def _rank_in_row(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 within each row, ties half against it."""
    higher = (scores[:, 1:] > scores[:, :1]).sum(1)
    ties = (scores[:, 1:] == scores[:, :1]).sum(1)
    return higher + torch.div(ties, 2, rounding_mode="floor")


def popularity_metrics(split: Split, item_counts: np.ndarray, cfg: EvalConfig) -> dict:
    """Training-split popularity ranking under the full (masked) protocol."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    # break popularity ties by item index so the baseline is a deterministic ranked list
    scores = counts + torch.arange(len(counts), 0, -1, dtype=torch.float64) / (len(counts) * 2.0)
    acc = RankingAccumulator((10,))
    for sl in batches(len(split.users), cfg.batch_users):
        q = torch.ones(sl.stop - sl.start, 1, dtype=torch.float64)
        table = scores.unsqueeze(1)  # (N, 1): score = count
        acc.add(ranks_full(q, table, torch.as_tensor(split.targets[sl]), split.histories[sl], cfg.chunk_items))
    res = acc.result("baseline/popularity/full")
    return {k: v for k, v in res.items() if k.endswith(("ndcg@10", "hr@10"))}


def check_leakage(data_dir: str | Path, split: Split, split_name: str) -> None:
    """Fail if the evaluation target can leak into training, or ids follow sequence order."""
    train = dataset.read_table(data_dir, "train.parquet")
    train_items = dict(zip(train.column("user_idx").to_pylist(), train.column("items").to_pylist(), strict=True))
    extra = 1 if split_name == "test" else 0
    for u, hist in zip(split.users.tolist(), split.histories, strict=True):
        prefix = train_items.get(u)
        if prefix is None or len(hist) != len(prefix) + extra or list(hist[: len(prefix)]) != list(prefix):
            raise DataError(
                str(data_dir), f"leakage check failed: user {u}'s {split_name} history is not the training prefix"
                + (" plus the valid item" if extra else ""),
                hint="re-run `p5ray prepare`",
            )
    first_seen: dict[int, int] = {}
    for hist in split.all_items:
        for i in hist.tolist():
            first_seen.setdefault(i, len(first_seen))
    if len(first_seen) > 50:
        idx = np.fromiter(first_seen.keys(), float)
        order = np.fromiter(first_seen.values(), float)
        rho = np.corrcoef(np.argsort(np.argsort(idx)), np.argsort(np.argsort(order)))[0, 1]
        if abs(rho) > 0.5:
            raise DataError(
                str(data_dir),
                f"leakage check failed: item indices follow first appearance (Spearman {rho:.2f})",
                hint="item indices must be assigned independently of sequence order; re-run `p5ray prepare`",
            )


def run(checkpoint_dir: str, data_dir: str, split_name: str = "test", output: str | None = None) -> dict:
    loaded = ckpt.load(checkpoint_dir)
    manifest = dataset.read_manifest(data_dir)
    items = dataset.read_table(data_dir, "items.parquet")
    users = dataset.read_table(data_dir, "users.parquet")
    ckpt.check_fits_data(loaded, items, users, data_dir)
    if split_name not in ("test", "valid"):
        raise UserError(f"--split {split_name}: expected test or valid")
    split = read_split(data_dir, split_name)
    check_leakage(data_dir, split, split_name)
    counts = np.zeros(loaded.model.spec.num_items + 1, dtype=np.float64)
    counts[items.column("item_idx").to_numpy()] = items.column("train_count").to_numpy()
    rating_range = None
    if manifest.get("has_ratings"):
        rating_range = (float(manifest.get("rating_min", 1.0)), float(manifest.get("rating_max", 5.0)))
    cfg = loaded.config.eval
    torch.set_num_threads(max(1, torch.get_num_threads()))
    metrics = evaluate_model(loaded.model, split, counts, cfg, rating_range)
    metrics["protocol"] = PROTOCOL.format(neg=cfg.sampled_negatives, seed=cfg.seed)
    metrics["n_users"] = len(split.users)
    metrics["split"] = split_name
    metrics["model_version"] = loaded.meta.get("model_version")
    metrics = dict(sorted(metrics.items()))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
