"""Full-catalog scoring in chunks, shared by validation, evaluate, serving and batch-recommend.

Memory stays bounded by (users in a batch) x (chunk of items) whatever the catalog size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from p5ray.dataset import left_pad
from p5ray.model import P5Rec

NEG = float("-inf")


def seen_mask_rows(seen: Sequence[Sequence[int]], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column-in-chunk) pairs of seen items falling in [start, stop)."""
    rows, cols = [], []
    for b, items in enumerate(seen):
        items = np.asarray(items, dtype=np.int64)
        inside = items[(items >= start) & (items < stop)]
        rows.append(np.full(len(inside), b, dtype=np.int64))
        cols.append(inside - start)
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))


def _chunk_scores(query, table, start, stop, seen):
    scores = query @ table[start:stop].T  # (B, C)
    if start == 0:
        scores[:, 0] = NEG  # padding is never an item
    if seen is not None:
        rows, cols = seen_mask_rows(seen, start, stop)
        scores[rows.to(scores.device), cols.to(scores.device)] = NEG
    return scores


@torch.no_grad()
def ranks_full(
    query: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    seen: Sequence[Sequence[int]] | None = None,
    chunk: int = 65536,
) -> torch.Tensor:
    """0-based rank of each target among all items; `seen` items are masked (-inf).

    query (B, D), table (N, D), targets (B,). Ties count half against the target.
    """
    target_scores = (query * table[targets]).sum(-1, keepdim=True)  # (B, 1)
    if seen is not None:  # a target the user already had is masked too (it cannot be recommended)
        hit = torch.tensor([int(t) in set(np.asarray(s).tolist()) for t, s in zip(targets.tolist(), seen, strict=True)])
        target_scores = target_scores.masked_fill(hit.unsqueeze(1).to(target_scores.device), NEG)
    higher = torch.zeros(len(targets), dtype=torch.long, device=query.device)
    ties = torch.zeros_like(higher)
    rows = torch.arange(len(targets), device=query.device)
    for start in range(0, table.shape[0], chunk):
        stop = min(start + chunk, table.shape[0])
        scores = _chunk_scores(query, table, start, stop, seen)
        # the target's own column is left out: a matmul may round its score differently from
        # target_scores, which would count the target as beating itself (rank off by one)
        inside = (targets >= start) & (targets < stop)
        scores[rows[inside], targets[inside] - start] = NEG
        higher += (scores > target_scores).sum(1)
        ties += (scores == target_scores).sum(1)
    return higher + torch.div(ties, 2, rounding_mode="floor")


@torch.no_grad()
def topk_full(
    query: torch.Tensor,
    table: torch.Tensor,
    k: int,
    seen: Sequence[Sequence[int]] | None = None,
    chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items (B, k) and scores (B, k) over the catalog, seen items excluded, in chunks."""
    best_scores = torch.full((query.shape[0], 0), NEG, device=query.device)
    best_items = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
    for start in range(0, table.shape[0], chunk):
        stop = min(start + chunk, table.shape[0])
        scores = _chunk_scores(query, table, start, stop, seen)
        kk = min(k, stop - start)
        s, i = scores.topk(kk, dim=1)
        merged_scores = torch.cat([best_scores, s], 1)
        merged_items = torch.cat([best_items, i + start], 1)
        top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores = top.values
        best_items = merged_items.gather(1, top.indices)
    return best_items, best_scores


@torch.no_grad()
def user_states(
    model: P5Rec,
    histories: Sequence[Sequence[int]],
    users: Sequence[int] | None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Histories (most recent last) -> {task: (B, D)} states after the last item."""
    items = left_pad(list(histories), model.spec.max_len).to(device)
    user_t = None
    if users is not None and model.user_features is not None:
        user_t = torch.as_tensor(np.asarray(users, dtype=np.int64), device=device)
    return model.encode_last(items, user_t)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
