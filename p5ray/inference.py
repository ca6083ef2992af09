"""One checkpoint -> answers for every task: the core under HTTP, gRPC and batch-recommend.

Each public method validates its input and raises the domain errors of `errors.py`; the
adapters (serve.py for HTTP and gRPC, batch.py for Ray Data) only translate.

History semantics, the same everywhere: a known user's stored history (every interaction in the
checkpoint) followed by the request's `history` (newer events), truncated to the model window for
encoding; every item of both is excluded from recommendations. Unknown ids in a request are
skipped and reported in `ignored`. A user with no usable history gets the cold-start answer
(training popularity), flagged `cold_start`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from p5ray import checkpoint as ckpt
from p5ray.errors import InvalidRequestError, NotFoundError
from p5ray.schemas import MAX_CANDIDATES, MAX_HISTORY, MAX_K
from p5ray.scoring import topk_full, user_states


@dataclass
class Scored:
    items: list[tuple[str, float]]
    cold_start: bool = False
    ignored: list[str] = field(default_factory=list)


@dataclass
class Recommendation:
    items: list[tuple[str, float]]
    cross_sell: list[tuple[str, float]]
    cold_start: bool
    ignored: list[str]
    model_version: str


@dataclass
class UserContext:
    """A request's user resolved against the vocab: what to encode and what to exclude."""

    user: int  # user index, 0 for unknown users
    history: np.ndarray  # item indices, most recent last
    ignored: list[str]

    @property
    def cold(self) -> bool:
        return len(self.history) == 0


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidRequestError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return k


def check_ids(name: str, ids, limit: int, allow_empty: bool = True) -> list[str]:
    if ids is None:
        ids = []
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidRequestError(f"{name} must be a list of string ids")
    if len(ids) > limit:
        raise InvalidRequestError(f"{name} has {len(ids)} items; at most {limit} are accepted")
    if not allow_empty and not ids:
        raise InvalidRequestError(f"{name} must not be empty")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise InvalidRequestError(f"{name} must hold non-empty string ids, got {bad[0]!r}")
    return list(ids)


class Recommender:
    def __init__(self, checkpoint_dir: str, device: str = "cpu", chunk_items: int = 65536):
        loaded = ckpt.load(checkpoint_dir, device=device)
        self.path = str(loaded.path)
        self.device = torch.device(device)
        self.model = loaded.model
        self.model_version = str(loaded.meta.get("model_version"))
        self.tasks = tuple(self.model.spec.tasks)
        self.chunk_items = chunk_items
        self.max_len = self.model.spec.max_len
        item_idx = loaded.items.column("item_idx").to_numpy()
        n = self.model.spec.num_items + 1
        self.item_ids = np.empty(n, dtype=object)
        self.item_ids[item_idx] = loaded.items.column("item_id").to_pylist()
        self.item_index = {s: int(i) for i, s in zip(item_idx, loaded.items.column("item_id").to_pylist(), strict=True)}
        self.user_index = {
            s: int(i) for i, s in zip(loaded.users.column("user_idx").to_pylist(), loaded.users.column("user_id").to_pylist(), strict=True)
        }
        histories = loaded.users.column("history").to_pylist()
        self.histories = {int(u): np.asarray(h or [], dtype=np.int64) for u, h in zip(loaded.users.column("user_idx").to_pylist(), histories, strict=True)}
        counts = np.zeros(n, dtype=np.float64)
        counts[item_idx] = loaded.items.column("train_count").to_numpy()
        self.popularity = counts
        self.popular_order = np.argsort(-counts[1:], kind="stable") + 1  # item indices, most popular first
        lo, hi = loaded.meta.get("rating_min"), loaded.meta.get("rating_max")
        self.rating_range = (float(lo if lo is not None else -np.inf), float(hi if hi is not None else np.inf))
        with torch.no_grad():
            self.table = self.model.items.all()  # (N, D), computed once

    # -- resolving ids ----------------------------------------------------------------------
    def resolve(self, user_id: str | None, history: Sequence[str] | None) -> UserContext:
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidRequestError(f"user_id must be a string, got {user_id!r}")
        history = check_ids("history", history, MAX_HISTORY)
        user = self.user_index.get(user_id, 0) if user_id else 0
        known, ignored = self._lookup(history)
        stored = self.histories.get(user, np.zeros(0, dtype=np.int64))
        return UserContext(user, np.concatenate([stored, np.asarray(known, dtype=np.int64)]), ignored)

    def _lookup(self, ids: Sequence[str]) -> tuple[list[int], list[str]]:
        known, ignored = [], []
        for i in ids:
            idx = self.item_index.get(i)
            if idx is None:
                ignored.append(i)
            else:
                known.append(idx)
        return known, ignored

    def _states(self, contexts: Sequence[UserContext]) -> dict[str, torch.Tensor]:
        users = [c.user for c in contexts]
        return user_states(self.model, [c.history[-self.max_len:] for c in contexts], users, self.device)

    def _named(self, items: np.ndarray, scores: np.ndarray) -> list[tuple[str, float]]:
        return [(self.item_ids[i], float(s)) for i, s in zip(items.tolist(), scores.tolist(), strict=True)]

    def _popular(self, k: int, exclude: np.ndarray) -> list[tuple[str, float]]:
        items, scores = self._popular_idx(k, exclude)
        return self._named(items, scores)

    def _popular_idx(self, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular items not in `exclude`: (item indices, training share)."""
        excluded = set(exclude.tolist())
        total = max(self.popularity.sum(), 1.0)
        out = []
        for i in self.popular_order:
            if i not in excluded:
                out.append(int(i))
                if len(out) == k:
                    break
        items = np.asarray(out, dtype=np.int64)
        return items, self.popularity[items] / total

    # -- tasks ------------------------------------------------------------------------------
    @torch.no_grad()
    def recall_many(self, requests: Sequence[tuple[str | None, Sequence[str] | None, int]]) -> list[Scored]:
        """Top-k over the whole catalog for several (user_id, history, k) at once."""
        contexts = [self.resolve(u, h) for u, h, _ in requests]
        ks = [check_k(k) for _, _, k in requests]
        out: list[Scored | None] = [None] * len(requests)
        warm = [i for i, c in enumerate(contexts) if not c.cold]
        for i, c in enumerate(contexts):
            if c.cold:
                out[i] = Scored(self._popular(ks[i], c.history), True, c.ignored)
        if warm:
            r = self._states([contexts[i] for i in warm])["recall"]
            items, scores = topk_full(r, self.table, max(ks[i] for i in warm), [contexts[i].history for i in warm], self.chunk_items)
            for row, i in enumerate(warm):
                k = ks[i]
                valid = torch.isfinite(scores[row, :k])
                out[i] = Scored(self._named(items[row, :k][valid].cpu().numpy(), scores[row, :k][valid].cpu().numpy()), False, contexts[i].ignored)
        return out  # type: ignore[return-value]

    def recall(self, user_id: str | None = None, history: Sequence[str] | None = None, k: int = 10) -> Scored:
        return self.recall_many([(user_id, history, k)])[0]

    @torch.no_grad()
    def rank(self, user_id: str | None, history: Sequence[str] | None, candidates: Sequence[str]) -> Scored:
        """Click/purchase probability of each candidate for this user, highest first."""
        self._require("rank")
        candidates = check_ids("candidates", candidates, MAX_CANDIDATES, allow_empty=False)
        ctx = self.resolve(user_id, history)
        known, ignored = self._lookup(candidates)
        ignored = ctx.ignored + ignored
        if not known:
            return Scored([], ctx.cold, ignored)
        idx = torch.as_tensor(known, device=self.device)
        r = self._states([ctx])["rank"]  # (1, D)
        probs = torch.sigmoid(self.model.rank_logits(r, self.table[idx].unsqueeze(0)))[0]  # (C,)
        order = torch.argsort(probs, descending=True, stable=True)
        return Scored(self._named(idx[order].cpu().numpy(), probs[order].cpu().numpy()), ctx.cold, ignored)

    @torch.no_grad()
    def cross_sell(self, item_ids: Sequence[str], k: int = 10, exclude: np.ndarray | None = None) -> Scored:
        """Items to sell with the given items: the mean of their cross-sell queries, top-k."""
        self._require("cross_sell")
        k = check_k(k)
        item_ids = check_ids("item_ids", item_ids, MAX_HISTORY, allow_empty=False)
        known, ignored = self._lookup(item_ids)
        if not known:
            raise InvalidRequestError(f"none of the item_ids is known to this model: {item_ids[:5]}")
        idx = torch.as_tensor(known, device=self.device)
        query = self.model.cross_sell_query(self.table[idx]).mean(0, keepdim=True)  # (1, D)
        seen = np.asarray(known, dtype=np.int64) if exclude is None else np.concatenate([exclude, known])
        items, scores = topk_full(query, self.table, k, [seen], self.chunk_items)
        valid = torch.isfinite(scores[0])
        return Scored(self._named(items[0][valid].cpu().numpy(), scores[0][valid].cpu().numpy()), False, ignored)

    @torch.no_grad()
    def rating(self, user_id: str | None, item_id: str, history: Sequence[str] | None = None) -> float:
        self._require("rating")
        if not isinstance(item_id, str) or not item_id:
            raise InvalidRequestError("item_id must be a non-empty string")
        idx = self.item_index.get(item_id)
        if idx is None:
            raise InvalidRequestError(f"unknown item_id {item_id!r}")
        ctx = self.resolve(user_id, history)
        r = self._states([ctx])["rating"]
        value = self.model.rating(r, self.table[torch.as_tensor([[idx]], device=self.device)])[0, 0]
        lo, hi = self.rating_range
        return float(value.clamp(lo, hi))

    def _require(self, task: str) -> None:
        if task not in self.tasks:
            raise NotFoundError(f"this model was not trained for the {task} task")

    # -- the combined path ------------------------------------------------------------------
    def cross_sell_after(self, user_id: str | None, history: Sequence[str] | None, items: Sequence[str], k: int = 10, anchors: int = 3) -> Scored:
        """Cross-sell for a recommendation: anchored on its first `anchors` items, excluding the
        user's history and every recommended item (so the two lists never overlap)."""
        ctx = self.resolve(user_id, history)
        known, _ = self._lookup(list(items))
        exclude = np.concatenate([ctx.history, np.asarray(known, dtype=np.int64)])
        return self.cross_sell(list(items[:anchors]), k, exclude)

    def recommend(self, user_id: str | None, history: Sequence[str] | None = None, k: int = 10, candidates: int = 100) -> Recommendation:
        """recall (top max(k, candidates)) -> rank -> top k, plus cross-sell for the top items."""
        return self.recommend_many([(user_id, history, k)], candidates)[0]

    @torch.no_grad()
    def recommend_many(self, requests: Sequence[tuple[str | None, Sequence[str] | None, int]], candidates: int = 100,
                       anchors: int = 3) -> list[Recommendation]:
        """`recommend` for several (user_id, history, k) at once, in one pass of the shared encoder.

        The same answers as calling recall, rank and cross_sell_after one after the other (the
        serving app's "composed" pipeline does exactly that over DeploymentHandles), but the
        users are encoded once, together: the recall and rank heads read the same encoder state,
        and the catalog scans of recall and cross-sell run batched. Raises on the first invalid
        request (callers that must answer the others retry one by one).
        """
        ks = [check_k(k) for _, _, k in requests]
        contexts = [self.resolve(u, h) for u, h, _ in requests]
        top: list[tuple[np.ndarray, np.ndarray]] = [None] * len(requests)  # type: ignore[list-item]
        warm = [i for i, c in enumerate(contexts) if not c.cold]
        for i, c in enumerate(contexts):
            if c.cold:
                top[i] = self._popular_idx(ks[i], c.history)
        if warm:
            states = self._states([contexts[i] for i in warm])  # every task head, one encoder pass
            wanted = [max(ks[i], candidates) for i in warm]
            items, scores = topk_full(states["recall"], self.table, max(wanted), [contexts[i].history for i in warm], self.chunk_items)
            for row, i in enumerate(warm):
                valid = torch.isfinite(scores[row, : wanted[row]])
                cand, score = items[row, : wanted[row]][valid], scores[row, : wanted[row]][valid]
                if "rank" in self.tasks and len(cand):
                    probs = torch.sigmoid(self.model.rank_logits(states["rank"][row : row + 1], self.table[cand].unsqueeze(0)))[0]
                    order = torch.argsort(probs, descending=True, stable=True)
                    cand, score = cand[order], probs[order]
                top[i] = (cand[: ks[i]].cpu().numpy(), score[: ks[i]].cpu().numpy())
        cross = [np.zeros(0, dtype=np.int64)] * len(requests), [np.zeros(0)] * len(requests)
        sell = [i for i in range(len(requests)) if len(top[i][0])] if "cross_sell" in self.tasks else []
        if sell:
            queries = torch.cat([self.model.cross_sell_query(self.table[torch.as_tensor(top[i][0][:anchors], device=self.device)]).mean(0, keepdim=True)
                                 for i in sell])
            # never the user's history, nor an item already recommended (anchors included)
            excluded = [np.concatenate([contexts[i].history, top[i][0]]) for i in sell]
            items, scores = topk_full(queries, self.table, max(ks[i] for i in sell), excluded, self.chunk_items)
            for row, i in enumerate(sell):
                valid = torch.isfinite(scores[row, : ks[i]])
                cross[0][i], cross[1][i] = items[row, : ks[i]][valid].cpu().numpy(), scores[row, : ks[i]][valid].cpu().numpy()
        return [Recommendation(self._named(*top[i]), self._named(cross[0][i], cross[1][i]), contexts[i].cold,
                               contexts[i].ignored, self.model_version) for i in range(len(requests))]
