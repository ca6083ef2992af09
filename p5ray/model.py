"""The multi-task recommender network, pure PyTorch.

Notation, used in every shape comment: B batch, T sequence positions (max_len), D model width,
N items including the padding row 0, C candidates per position, E experts.

    P5Rec
      items ──ItemTable──▶ (N, D) item vectors (id embedding + item feature embeddings)
      history (B, T) ──SequenceEncoder (causal transformer, SASRec-style)──▶ h (B, T, D)
      h ──TaskMixture (shared_bottom | mmoe | ple)──▶ one (B, T, D) representation per task
      recall:     r · item vector                  (scores over the whole catalog)
      rank:       MLP([r, e, r*e]) -> logit        (click / purchase probability)
      cross_sell: (e_a + MLP(e_a)) · e_b           (item-to-item, no user state)
      rating:     mean + MLP([r, e, r*e])          (regression)

Inputs are left-padded with 0, so position T-1 holds the most recent item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: str  # "categorical" (one index per row) or "multi" (a padded list of indices)
    cardinality: int  # number of indices including 0 = unknown / padding


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the network: hyper-parameters and data shape."""

    num_items: int  # real items; the tables have num_items + 1 rows (row 0 = padding)
    num_users: int = 0
    dim: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    emb_dropout: float = 0.2
    max_len: int = 50
    mixture: str = "shared_bottom"
    experts: int = 4
    tower_dim: int = 64
    tasks: tuple[str, ...] = ("recall", "rank", "cross_sell", "rating")
    rating_mean: float = 0.0
    item_features: tuple[FeatureSpec, ...] = field(default_factory=tuple)
    user_features: tuple[FeatureSpec, ...] = field(default_factory=tuple)


class Dropout(nn.Module):
    """Inverted dropout via a uniform draw: same maths as nn.Dropout, ~2x faster on CPU."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        return x * (torch.rand_like(x) < keep).to(x.dtype) / keep


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for embeddings and linear layers (larger scales learn far slower here)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


class FeatureEmbedding(nn.Module):
    """Sum of embeddings of one entity's feature columns, looked up by entity index."""

    def __init__(self, specs: tuple[FeatureSpec, ...], num_rows: int, dim: int):
        super().__init__()
        self.names = [s.name for s in specs]
        self.tables = nn.ModuleDict(
            {s.name: nn.Embedding(s.cardinality, dim, padding_idx=0) for s in specs}
        )
        for s in specs:  # the feature values of every entity, filled by set_values()
            shape = (num_rows,) if s.kind == "categorical" else (num_rows, 1)
            self.register_buffer(f"values_{s.name}", torch.zeros(shape, dtype=torch.long))

    def set_values(self, name: str, values: torch.Tensor) -> None:
        setattr(self, f"values_{name}", values.long())

    def forward(self, index: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D)
        out = 0
        for name in self.names:
            values = getattr(self, f"values_{name}")[index]  # (...) or (..., K)
            emb = self.tables[name](values)
            if values.dim() > index.dim():  # multi-valued: mean over the non-padding entries
                count = (values > 0).sum(-1, keepdim=True).clamp(min=1)
                emb = emb.sum(-2) / count
            out = out + emb
        return out


class ItemTable(nn.Module):
    """Item vectors: id embedding plus item feature embeddings. Row 0 is padding (zero)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        n = spec.num_items + 1
        self.embedding = nn.Embedding(n, spec.dim, padding_idx=0)
        self.features = (
            FeatureEmbedding(spec.item_features, n, spec.dim) if spec.item_features else None
        )

    def forward(self, index: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D)
        out = self.embedding(index)
        if self.features is not None:
            out = out + self.features(index) * (index > 0).unsqueeze(-1)
        return out

    def all(self) -> torch.Tensor:  # (N, D)
        index = torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)
        return self(index)


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block with a causal, padding-aware mask."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=-1)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D/H)
        y = y.transpose(1, 2).reshape(B, T, D)
        x = x + self.dropout(self.proj(y))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """SASRec-style causal transformer over the most recent max_len items."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.position = nn.Embedding(spec.max_len, spec.dim)
        self.emb_dropout = Dropout(spec.emb_dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(spec.dim, spec.heads, spec.dropout) for _ in range(spec.layers)
        )
        self.norm = nn.LayerNorm(spec.dim)

    def forward(self, item_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        B, T, D = item_vectors.shape  # items: (B, T), 0 = padding, T <= max_len
        valid = items > 0  # (B, T)
        # positions count from the left edge of the max_len window, so a batch trimmed to its
        # longest history (T < max_len) gets the same positions as when padded to max_len
        pos = torch.arange(self.position.num_embeddings - T, self.position.num_embeddings, device=items.device)
        x = item_vectors + self.position(pos)  # (B, T, D)
        x = self.emb_dropout(x) * valid.unsqueeze(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()  # (T, T)
        # a query sees earlier valid keys and always itself, so no row is fully masked (no NaN)
        mask = causal & (valid.unsqueeze(1) | torch.eye(T, dtype=torch.bool, device=items.device))
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask) * valid.unsqueeze(-1)
        return self.norm(x)  # (B, T, D)


class Expert(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class TaskMixture(nn.Module):
    """Per-task representations from the shared one: shared_bottom, MMoE or PLE.

    shared_bottom: every task reads h. MMoE (Ma et al., KDD 2018): E shared experts and a softmax
    gate per task. PLE (Tang et al., RecSys 2020, one extraction layer): E shared experts plus one
    expert per task, each task's gate mixing the shared experts and its own.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.kind = spec.mixture
        self.tasks = spec.tasks
        if self.kind == "shared_bottom":
            return
        if self.kind not in ("mmoe", "ple"):
            raise ValueError(f"unknown mixture {self.kind!r}")
        self.shared = nn.ModuleList(Expert(spec.dim, spec.dropout) for _ in range(spec.experts))
        own = 1 if self.kind == "ple" else 0
        self.own = nn.ModuleDict(
            {t: nn.ModuleList(Expert(spec.dim, spec.dropout) for _ in range(own)) for t in self.tasks}
        )
        self.gates = nn.ModuleDict({t: nn.Linear(spec.dim, spec.experts + own) for t in self.tasks})

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "shared_bottom":
            return {t: h for t in self.tasks}
        shared = [e(h) for e in self.shared]  # E x (..., D)
        out = {}
        for t in self.tasks:
            experts = torch.stack(shared + [e(h) for e in self.own[t]], dim=-2)  # (..., E', D)
            gate = self.gates[t](h).softmax(-1).unsqueeze(-1)  # (..., E', 1)
            out[t] = (gate * experts).sum(-2)  # (..., D)
        return out


def _pair_mlp(dim: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(3 * dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, 1)
    )


class P5Rec(nn.Module):
    """Shared sequence encoder with recall, rank, cross-sell and rating heads."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.items = ItemTable(spec)
        self.encoder = SequenceEncoder(spec)
        self.user_features = (
            FeatureEmbedding(spec.user_features, spec.num_users + 1, spec.dim)
            if spec.user_features
            else None
        )
        self.mixture = TaskMixture(spec)
        # heads exist only for the tasks being trained (DDP requires every parameter to get a grad)
        if "rank" in spec.tasks:
            self.rank_tower = _pair_mlp(spec.dim, spec.tower_dim, spec.dropout)
        if "cross_sell" in spec.tasks:
            self.cross_sell_tower = Expert(spec.dim, spec.dropout)
        if "rating" in spec.tasks:
            self.rating_tower = _pair_mlp(spec.dim, spec.tower_dim, spec.dropout)
        self.apply(init_weights)

    # -- shared representation ------------------------------------------------------------
    def encode(self, items: torch.Tensor, users: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """items (B, T) left-padded -> {task: (B, T, D)} per-position task representations."""
        h = self.encoder(self.items(items), items)  # (B, T, D)
        if self.user_features is not None and users is not None:
            h = h + self.user_features(users).unsqueeze(1)  # (B, 1, D) broadcast over T
        return self.mixture(h)

    def encode_last(self, items: torch.Tensor, users: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The state after the most recent item: {task: (B, D)}."""
        return {t: r[:, -1] for t, r in self.encode(items, users).items()}

    # -- heads ----------------------------------------------------------------------------
    def recall_scores(self, r: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """(..., D) x (C, D) -> (..., C), or (..., D) x (..., C, D) -> (..., C)."""
        if item_vectors.dim() == 2:
            return r @ item_vectors.T
        return (item_vectors @ r.unsqueeze(-1)).squeeze(-1)

    def rank_logits(self, r: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """r (..., D), item_vectors (..., C, D) -> logits (..., C)."""
        r = r.unsqueeze(-2).expand_as(item_vectors)
        return self.rank_tower(torch.cat([r, item_vectors, r * item_vectors], -1)).squeeze(-1)

    def cross_sell_query(self, anchor_vectors: torch.Tensor) -> torch.Tensor:
        """(..., D) item vectors of the anchor items -> (..., D) queries against item vectors."""
        return self.cross_sell_tower(anchor_vectors)

    def rating(self, r: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """r (..., D), item_vectors (..., C, D) -> predicted ratings (..., C)."""
        r = r.unsqueeze(-2).expand_as(item_vectors)
        out = self.rating_tower(torch.cat([r, item_vectors, r * item_vectors], -1)).squeeze(-1)
        return out + self.spec.rating_mean

    def forward(self, items: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """Serving form of recall: the scores of every item after the history, (B, N)."""
        r = self.encode_last(items, users)["recall"]
        return self.recall_scores(r, self.items.all())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
