"""Per-task losses and task weighting: total = sum_i w_i * L_i.

`MultiTaskLoss` is the training wrapper around `P5Rec` (DDP wraps it, so learned task weights are
synchronised like any other parameter). A batch is a dict of tensors:

    inputs (B, T)   left-padded item history        targets (B, T)  next item, 0 = none
    users (B,)      user index                       weights (B,)    per-example weight
    ratings (B, T)  rating of the target, NaN = none seen (B, S)     the user's items, 0-padded
    rank_negatives (B, T, K)  items the user never touched
    negatives (M,)  shared negative pool for sampled losses (drawn from `sampling_probs`)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from p5ray.model import P5Rec

NEG_INF = -1e9  # not -inf: a fully masked row must stay finite


def _weighted_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of loss over positions with weight > 0; 0 (with a graph) when there are none."""
    total = weight.sum()
    return (loss * weight).sum() / total.clamp(min=1e-8)


class MultiTaskLoss(nn.Module):
    def __init__(
        self,
        model: P5Rec,
        alpha: dict[str, float],
        recall_loss: str = "full_softmax",
        weighting: str = "fixed",
        logq_correction: bool = True,
        label_smoothing: float = 0.0,
        sampling_probs: torch.Tensor | None = None,
        contrastive: float = 0.0,
        contrastive_temperature: float = 0.2,
    ):
        super().__init__()
        self.model = model
        self.tasks = tuple(t for t in model.spec.tasks if alpha.get(t, 0.0) > 0)
        self.recall_loss = recall_loss
        self.weighting = weighting
        self.logq_correction = logq_correction
        self.label_smoothing = label_smoothing
        self.contrastive = contrastive
        self.contrastive_temperature = contrastive_temperature
        self.register_buffer("alpha", torch.tensor([alpha[t] for t in self.tasks]))
        # GradNorm multipliers, set by GradNormBalancer; uncertainty log-variances, learned
        self.register_buffer("balance", torch.ones(len(self.tasks)))
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)), requires_grad=weighting == "uncertainty")
        n = model.spec.num_items + 1
        probs = sampling_probs if sampling_probs is not None else torch.ones(n)
        probs = probs.float().clone()
        probs[0] = 0
        self.register_buffer("sampling_probs", probs / probs.sum())

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reps = self.model.encode(batch["inputs"], batch.get("users"))  # {task: (B, T, D)}
        table = self.model.items.all()  # (N, D)
        mask = batch["targets"] > 0  # (B, T): only positions with a next item carry a loss
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
        flat = {
            "targets": batch["targets"][mask],  # (P,)
            "anchors": batch["inputs"][mask],  # (P,) the item before the target
            "ratings": batch["ratings"][mask],  # (P,)
            "rank_negatives": batch["rank_negatives"][mask],  # (P, K)
            "weights": batch["weights"].unsqueeze(1).expand_as(mask)[mask],  # (P,)
            "rows": rows[mask],  # (P,) batch row of each position
        }
        reps = {t: reps[t][mask] for t in self.tasks}  # (P, D) each: the positions with a target
        parts = {}
        for task in self.tasks:
            parts[task] = getattr(self, f"_{task}")(reps[task], table, flat, batch)
        losses = torch.stack([parts[t] for t in self.tasks])
        total = self.combine(losses)
        if self.contrastive > 0 and self.training and "recall" in self.tasks:
            # a second pass draws other dropout masks: the same history seen twice is a positive pair
            twin = self.model.encode(batch["inputs"], batch.get("users"))["recall"][mask]  # (P, D)
            parts["contrastive"] = contrastive_loss(
                reps["recall"], twin, flat["targets"], flat["weights"], self.contrastive_temperature
            )
            total = total + self.contrastive * parts["contrastive"]
        return total, parts

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        weights = self.alpha * self.balance
        if self.weighting == "uncertainty":  # Kendall et al., CVPR 2018
            return (weights * (torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars)).sum()
        return (weights * losses).sum()

    # Each task loss: r (P, D) task representations at the P positions with a target.

    def _recall(self, r, table, flat, batch):
        targets, w = flat["targets"], flat["weights"]
        if self.recall_loss == "full_softmax":
            logits = r @ table.T  # (P, N)
            logits[:, 0] = NEG_INF
            ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
            return _weighted_mean(ce, w)
        if self.recall_loss == "bce":  # SASRec's loss: one unseen negative per position
            pos = (r * table[targets]).sum(-1)  # (P,)
            neg = (r * table[flat["rank_negatives"][:, 0]]).sum(-1)  # (P,)
            return _weighted_mean(F.softplus(-pos) + F.softplus(neg), w)
        seen = _seen_rows(batch.get("seen"), table.shape[0], flat["rows"])
        return self._sampled(r, table, targets, batch["negatives"], seen, w)

    def _sampled(self, r, table, targets, negatives, seen_rows, weights):
        """Sampled softmax over one shared negative pool, with logQ correction (Yi et al. 2019)."""
        pos = (r * table[targets]).sum(-1, keepdim=True)  # (P, 1)
        neg = r @ table[negatives].T  # (P, M)
        # a negative that is the target, or any item the user touched, is not a negative
        hit = negatives.view(1, -1) == targets.unsqueeze(-1)  # (P, M)
        if seen_rows is not None:
            hit = hit | seen_rows[:, negatives]
        if self.logq_correction:
            log_q = torch.log(self.sampling_probs * negatives.numel() + 1e-12)
            pos = pos - log_q[targets].unsqueeze(-1)
            neg = neg - log_q[negatives].view(1, -1)
        logits = torch.cat([pos, neg.masked_fill(hit, NEG_INF)], -1)  # (P, 1 + M)
        return _weighted_mean(-F.log_softmax(logits, -1)[:, 0], weights)

    def _rank(self, r, table, flat, batch):
        items = torch.cat([flat["targets"].unsqueeze(-1), flat["rank_negatives"]], -1)  # (P, 1+K)
        logits = self.model.rank_logits(r, table[items])  # (P, 1+K)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        bce = bce[:, 0] + bce[:, 1:].mean(-1)  # the positive and the negatives weigh the same
        return _weighted_mean(bce, flat["weights"])

    def _cross_sell(self, r, table, flat, batch):
        """Item-to-item: the anchor item's query against the next item, sampled softmax."""
        query = self.model.cross_sell_query(table[flat["anchors"]])  # (P, D)
        weights = flat["weights"] * (flat["anchors"] > 0).float()
        return self._sampled(query, table, flat["targets"], batch["negatives"], None, weights)

    def _rating(self, r, table, flat, batch):
        ratings = flat["ratings"]  # (P,), NaN where unknown
        known = torch.isfinite(ratings).float() * flat["weights"]
        pred = self.model.rating(r, table[flat["targets"]].unsqueeze(-2)).squeeze(-1)  # (P,)
        err = (pred - torch.nan_to_num(ratings)) ** 2
        return _weighted_mean(err, known)


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised InfoNCE between two views of the same P positions, in both directions.

    a, b (P, D): the recall states of two forward passes (different dropout masks). Row i of `a`
    is pulled towards every row of `b` whose position has the same next item (its own twin
    included: DuoRec's unsupervised and supervised positives, Qiu et al., WSDM 2022) and pushed
    from the other positions of the batch. Cosine similarity over `temperature`.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    same = targets.unsqueeze(0) == targets.unsqueeze(1)  # (P, P), diagonal always true
    loss = 0
    for sim in (a @ b.T / temperature, b @ a.T / temperature):  # (P, P)
        positive = torch.logsumexp(sim.masked_fill(~same, NEG_INF), -1)
        loss = loss + (torch.logsumexp(sim, -1) - positive) / 2
    return _weighted_mean(loss, weights)


def _seen_rows(seen: torch.Tensor | None, num_rows: int, rows: torch.Tensor) -> torch.Tensor | None:
    """(P, N) bool: the items each position's user touched (from the 0-padded seen lists)."""
    if seen is None:
        return None
    mask = torch.zeros(seen.shape[0], num_rows, dtype=torch.bool, device=seen.device)
    mask.scatter_(1, seen, True)
    mask[:, 0] = False
    return mask[rows]


class GradNormBalancer:
    """GradNorm-style balancing (Chen et al., ICML 2018), in closed form.

    Every `every` steps, with G_i the gradient norm of L_i at the last shared layer and r_i the
    relative inverse training rate (L_i / L_i(0)) / mean_j(L_j / L_j(0)), move each multiplier
    towards mean(G) * r_i^gamma / G_i, then renormalise the multipliers to sum to the task count.
    """

    def __init__(self, n_tasks: int, gamma: float = 1.5, step: float = 0.1, every: int = 10):
        self.gamma, self.step, self.every = gamma, step, every
        self.initial: torch.Tensor | None = None
        self.n = n_tasks

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def update(self, balance: torch.Tensor, losses: torch.Tensor, grad_norms: torch.Tensor) -> torch.Tensor:
        losses, grad_norms = losses.detach().float(), grad_norms.detach().float()
        if self.initial is None:
            self.initial = losses.clamp(min=1e-8)
        ratio = losses / self.initial
        r = ratio / ratio.mean().clamp(min=1e-8)
        g = grad_norms * balance
        target = g.mean() * r**self.gamma
        factor = (target / g.clamp(min=1e-12)).clamp(0.5, 2.0) ** self.step
        new = balance * factor
        return new * (self.n / new.sum())


def finite_or_zero(loss: torch.Tensor) -> bool:
    """True when a loss is finite; a non-finite step is skipped rather than applied."""
    return bool(math.isfinite(float(loss.detach())))
