"""Offline evaluation: protocols, chunked scoring, leakage checks, metrics (pure torch, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p5ray.config import EvalConfig
from p5ray.errors import DataError
from p5ray.evaluate import (
    Split,
    check_leakage,
    evaluate_model,
    ranking_metrics,
    read_split,
    sample_unseen,
)
from p5ray.metrics import RankingAccumulator, hit_ndcg, pairwise_auc, rmse_mae, target_ranks
from p5ray.model import ModelSpec, P5Rec
from p5ray.scoring import ranks_full, topk_full

N_ITEMS = 50


def make_model(tasks=("recall", "rank", "cross_sell", "rating")) -> P5Rec:
    torch.manual_seed(0)
    spec = ModelSpec(num_items=N_ITEMS, num_users=20, dim=16, layers=1, heads=2, max_len=8, tower_dim=8, tasks=tasks, rating_mean=3.0)
    return P5Rec(spec).eval()


def make_split(n_users: int = 20, seed: int = 0, ratings: bool = True) -> Split:
    rng = np.random.default_rng(seed)
    hist = [rng.choice(np.arange(1, N_ITEMS + 1), size=int(rng.integers(1, 12)), replace=False) for _ in range(n_users)]
    targets = np.array([int(rng.integers(1, N_ITEMS + 1)) for _ in range(n_users)])
    return Split(
        users=np.arange(1, n_users + 1),
        histories=hist,
        targets=targets,
        target_ratings=rng.integers(1, 6, n_users).astype(float) if ratings else None,
        all_items=[np.append(h, t) for h, t in zip(hist, targets, strict=True)],
    )


# -- metrics --------------------------------------------------------------------------------


def test_hit_ndcg_and_mrr_by_hand():
    acc = RankingAccumulator((1, 10))
    acc.add(torch.tensor([0, 1, 9, 10]))
    res = acc.result("x")
    assert res["x/hr@1"] == pytest.approx(0.25)
    assert res["x/hr@10"] == pytest.approx(0.75)
    assert res["x/ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 4)
    assert res["x/mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
    hit, ndcg = hit_ndcg(torch.tensor([3]), 3)
    assert float(hit) == 0 and float(ndcg) == 0


def test_ties_count_half_against_the_target():
    scores = torch.zeros(1, 11)  # a constant scorer: the target sits in the middle
    assert int(target_ranks(scores, torch.tensor([4]))) == 5
    assert int(ranks_full(torch.ones(1, 1), torch.zeros(11, 1), torch.tensor([4]))) == 4  # row 0 is padding


def test_auc_and_rmse():
    assert pairwise_auc(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.5], [1.0, 0.0]])) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    rmse, mae = rmse_mae(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0]))
    assert rmse == pytest.approx(np.sqrt(0.5)) and mae == pytest.approx(0.5)


# -- chunked full-catalog scoring -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_scoring_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(0)
    query, table = torch.randn(6, 8, generator=g), torch.randn(N_ITEMS + 1, 8, generator=g)
    targets = torch.randint(1, N_ITEMS + 1, (6,), generator=g)
    seen = [list(range(1, 2 + i * 3)) for i in range(6)]
    for s in (None, seen):
        assert torch.equal(ranks_full(query, table, targets, s, chunk), ranks_full(query, table, targets, s, 10**6))
    items_c, scores_c = topk_full(query, table, 10, seen, chunk)
    items_u, scores_u = topk_full(query, table, 10, seen, 10**6)
    assert torch.equal(items_c, items_u) and torch.allclose(scores_c, scores_u)


def test_full_ranking_by_brute_force():
    g = torch.Generator().manual_seed(1)
    query, table = torch.randn(5, 8, generator=g), torch.randn(N_ITEMS + 1, 8, generator=g)
    targets = torch.randint(1, N_ITEMS + 1, (5,), generator=g)
    seen = [[1, 2, 3], [], [int(targets[2])], [4], [5, 6]]
    scores = query @ table.T
    scores[:, 0] = -np.inf
    for b, s in enumerate(seen):
        scores[b, [i for i in s if i != int(targets[b])]] = -np.inf
    expected = (scores > scores.gather(1, targets.unsqueeze(1))).sum(1)
    got = ranks_full(query, table, targets, seen, chunk=9)
    assert torch.equal(got[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])
    assert int(got[2]) >= N_ITEMS - 2  # a target the user already had is masked too: last place


def test_masking_only_helps_and_unmasked_counts_history():
    model = make_model()
    split = make_split()
    cfg = EvalConfig(chunk_items=13, batch_users=7)
    masked = ranking_metrics(model, split, cfg, masked=True)
    unmasked = ranking_metrics(model, split, cfg, masked=False)
    assert set(masked) >= {"full/ndcg@10", "full/hr@10", "full/mrr"}
    assert set(unmasked) >= {"full_unmasked/ndcg@10", "full_unmasked/hr@10"}
    assert masked["full/mrr"] >= unmasked["full_unmasked/mrr"]


# -- the whole evaluation -------------------------------------------------------------------


def test_evaluate_model_reports_every_protocol():
    model = make_model()
    split = make_split()
    counts = np.arange(N_ITEMS + 1, dtype=float)
    out = evaluate_model(model, split, counts, EvalConfig(chunk_items=16, batch_users=8), rating_range=(1.0, 5.0))
    for key in (
        "full/hr@10", "full/ndcg@10", "full/hr@5", "full/ndcg@20", "full/mrr",
        "full_unmasked/hr@10", "full_unmasked/ndcg@10",
        "sampled/hr@1", "sampled/hr@5", "sampled/hr@10", "sampled/ndcg@10",
        "rank/auc", "cross_sell/auc", "cross_sell/hr@10", "rating/rmse", "rating/mae",
        "full_cold/ndcg@10", "full_warm/ndcg@10",
        "baseline/popularity/full/ndcg@10", "baseline/popularity/full/hr@10",
    ):
        assert key in out, key
        assert np.isfinite(out[key]), key
    assert 0 <= out["sampled/hr@1"] <= out["sampled/hr@10"] <= 1
    assert 0 < out["rating/rmse"] <= 4


def test_an_oracle_model_scores_perfectly():
    """A recall head that puts the target first must give HR@1 = 1 under every protocol."""
    split = make_split(ratings=False)
    model = make_model(("recall",))
    targets = torch.as_tensor(split.targets)
    one_hot = torch.nn.functional.one_hot(torch.arange(N_ITEMS + 1), N_ITEMS + 1).float()

    class Oracle(torch.nn.Module):
        def __call__(self, index):
            return one_hot[index]

        def all(self):
            return one_hot

    model.items = Oracle()
    lookup = dict(zip(split.users.tolist(), targets.tolist(), strict=True))
    model.encode_last = lambda items, users=None: {"recall": one_hot[torch.tensor([lookup[int(u)] for u in users])]}
    model.spec = ModelSpec(num_items=N_ITEMS, tasks=("recall",), dim=N_ITEMS + 1)
    model.user_features = True  # so user_states passes user ids to encode_last
    hist = [h[h != t] for h, t in zip(split.histories, split.targets, strict=True)]
    split = Split(split.users, hist, split.targets, None, split.all_items)
    out = evaluate_model(model, split, np.ones(N_ITEMS + 1), EvalConfig(chunk_items=8, batch_users=6))
    assert out["full/hr@5"] == 1.0 and out["full_unmasked/ndcg@10"] == 1.0 and out["sampled/hr@1"] == 1.0


def test_sampled_negatives_are_unseen_and_reproducible():
    all_items = [np.arange(1, 45), np.array([3, 4])]
    a = sample_unseen(all_items, N_ITEMS, 99, seed=7)
    assert a.shape == (2, 99)
    assert set(a[0].tolist()) <= set(range(45, N_ITEMS + 1))
    assert not set(a[1].tolist()) & {3, 4}
    assert np.array_equal(a, sample_unseen(all_items, N_ITEMS, 99, seed=7))


# -- leakage checks -------------------------------------------------------------------------


def write_data(tmp_path, sequences: dict[int, list[int]], test_history_extra=None):
    """A minimal prepared directory (design.md): train = all but the last two items."""
    users = sorted(sequences)
    seq = [sequences[u] for u in users]
    ints = pa.list_(pa.int32())
    pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32()), "items": pa.array([s[:-2] for s in seq], ints)}), tmp_path / "train.parquet")
    test_hist = [s[:-1] for s in seq]
    if test_history_extra:
        test_hist[0] = test_hist[0] + [test_history_extra]
    pq.write_table(pa.table({
        "user_idx": pa.array(users, pa.int32()), "history": pa.array(test_hist, ints),
        "target": pa.array([s[-1] for s in seq], pa.int32()), "target_rating": pa.array([None] * len(users), pa.float32()),
    }), tmp_path / "test.parquet")
    pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32()), "items": pa.array(seq, ints)}), tmp_path / "sequences.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"users": len(users)}))
    return tmp_path


def shuffled_sequences(n_users=40, seed=0) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {u: rng.choice(np.arange(1, 200), size=6, replace=False).tolist() for u in range(1, n_users + 1)}


def test_leakage_check_passes_on_clean_data(tmp_path):
    data = write_data(tmp_path, shuffled_sequences())
    check_leakage(data, read_split(data, "test"), "test")


def test_leakage_check_fails_when_the_test_item_is_in_training(tmp_path):
    seqs = shuffled_sequences()
    data = write_data(tmp_path, seqs)
    train = pq.read_table(data / "train.parquet").to_pydict()
    train["items"][0] = seqs[1][:-1] + [seqs[1][-1]]  # user 1's whole sequence, test item included
    pq.write_table(pa.table({"user_idx": pa.array(train["user_idx"], pa.int32()), "items": pa.array(train["items"], pa.list_(pa.int32()))}), data / "train.parquet")
    with pytest.raises(DataError, match="leakage"):
        check_leakage(data, read_split(data, "test"), "test")


def test_leakage_check_fails_when_history_differs_from_training(tmp_path):
    data = write_data(tmp_path, shuffled_sequences(), test_history_extra=7)
    with pytest.raises(DataError, match="leakage"):
        check_leakage(data, read_split(data, "test"), "test")


def test_leakage_check_fails_on_first_appearance_numbering(tmp_path):
    """The P5 numbering leak: items numbered in order of first appearance are refused."""
    rng = np.random.default_rng(1)
    seqs, next_id = {}, 1
    for u in range(1, 41):
        seqs[u] = list(range(next_id, next_id + 5)) + [int(rng.integers(1, next_id + 5))]
        next_id += 5
    data = write_data(tmp_path, seqs)
    with pytest.raises(DataError, match="first appearance"):
        check_leakage(data, read_split(data, "test"), "test")
