"""Ranking and regression metrics, pure torch on score tensors.

Ranks are 0-based: rank r means r items scored strictly higher than the target (ties count
against the target only for items scored strictly higher, so a constant scorer is not rewarded
beyond chance through tie order).
"""

from __future__ import annotations

import math

import torch

MASKED = float("-inf")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, N), targets (B,) column indices -> 0-based ranks (B,) of the targets.

    Ties with the target are broken half against it (expected rank under random tie order).
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
    higher = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1
    return higher + torch.div(ties, 2, rounding_mode="floor")


def hit_ndcg(ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example HR@k and NDCG@k (one relevant item) from 0-based ranks."""
    hit = (ranks < k).float()
    ndcg = hit / torch.log2(ranks.float() + 2.0)
    return hit, ndcg


class RankingAccumulator:
    """Sums HR@k, NDCG@k and MRR over batches of ranks; `result(prefix)` gives the means."""

    def __init__(self, ks: tuple[int, ...] = (5, 10, 20)):
        self.ks = ks
        self.n = 0
        self.sums: dict[str, float] = {}

    def add(self, ranks: torch.Tensor) -> None:
        self.n += int(ranks.numel())
        for k in self.ks:
            hit, ndcg = hit_ndcg(ranks, k)
            self._add(f"hr@{k}", hit.sum())
            self._add(f"ndcg@{k}", ndcg.sum())
        self._add("mrr", (1.0 / (ranks.float() + 1.0)).sum())

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def result(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": v / max(self.n, 1) for k, v in self.sums.items()}


def pairwise_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """AUC of positive scores (B,) against negatives (B, K), averaged per row (ties = 0.5)."""
    if pos.numel() == 0:
        return float("nan")
    pos = pos.unsqueeze(-1)
    wins = (pos > neg).float() + 0.5 * (pos == neg).float()  # (B, K)
    return float(wins.mean())


def rmse_mae(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    if pred.numel() == 0:
        return float("nan"), float("nan")
    err = pred.double() - truth.double()
    return math.sqrt(float((err**2).mean())), float(err.abs().mean())
