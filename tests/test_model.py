"""The network (pure torch): shapes, causality, padding, mixtures, heads, NaN safety, bf16."""

from __future__ import annotations

import pytest
import torch

from p5ray.model import FeatureSpec, ModelSpec, P5Rec, count_parameters

N_ITEMS = 30


def make(**kw) -> P5Rec:
    torch.manual_seed(0)
    spec = ModelSpec(num_items=N_ITEMS, num_users=5, dim=16, layers=2, heads=2, max_len=8, tower_dim=8, **kw)
    return P5Rec(spec).eval()


def test_encode_shapes_and_serving_form():
    model = make()
    items = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])  # (B=2, T=5), left-padded
    reps = model.encode(items)
    assert set(reps) == {"recall", "rank", "cross_sell", "rating"}
    assert all(r.shape == (2, 5, 16) for r in reps.values())
    scores = model(items)
    assert scores.shape == (2, N_ITEMS + 1)
    table = model.items.all()
    assert table.shape == (N_ITEMS + 1, 16)
    assert torch.allclose(scores, model.encode_last(items)["recall"] @ table.T, atol=1e-6)
    assert torch.equal(table[0], torch.zeros(16))  # padding row


def test_encoder_is_causal():
    """The state at position t must not depend on items after t."""
    model = make()
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[1, 2, 3, 9, 9, 9]])
    ra, rb = model.encode(a)["recall"], model.encode(b)["recall"]
    assert torch.allclose(ra[:, :3], rb[:, :3], atol=1e-6)
    assert not torch.allclose(ra[:, 3:], rb[:, 3:], atol=1e-4)


def test_left_padding_does_not_change_the_last_state():
    """A history padded to max_len and the same history trimmed to its length agree."""
    model = make()
    short = torch.tensor([[4, 7, 9]])
    padded = torch.tensor([[0, 0, 0, 0, 0, 4, 7, 9]])
    assert torch.allclose(model.encode_last(short)["recall"], model.encode_last(padded)["recall"], atol=1e-5)


def test_fully_padded_row_is_finite():
    model = make()
    out = model.encode(torch.zeros(2, 4, dtype=torch.long))
    assert all(torch.isfinite(r).all() for r in out.values())


@pytest.mark.parametrize("mixture", ["shared_bottom", "mmoe", "ple"])
def test_mixtures_give_per_task_representations(mixture):
    model = make(mixture=mixture, experts=3)
    reps = model.encode(torch.tensor([[1, 2, 3]]))
    assert all(r.shape == (1, 3, 16) for r in reps.values())
    if mixture != "shared_bottom":  # gated experts: tasks see different mixtures
        assert not torch.allclose(reps["recall"], reps["rank"])
    assert count_parameters(model) > count_parameters(make()) or mixture == "shared_bottom"


def test_unknown_mixture_is_rejected():
    with pytest.raises(ValueError, match="unknown mixture"):
        make(mixture="moe")


def test_heads_shapes():
    model = make(rating_mean=3.5)
    r = model.encode_last(torch.tensor([[1, 2], [3, 4]]))  # (B=2, D)
    cand = model.items.all()[torch.tensor([[1, 2, 3], [4, 5, 6]])]  # (2, 3, D)
    assert model.recall_scores(r["recall"], cand).shape == (2, 3)
    assert model.rank_logits(r["rank"], cand).shape == (2, 3)
    assert model.rating(r["rating"], cand).shape == (2, 3)
    assert model.cross_sell_query(cand[:, 0]).shape == (2, 16)
    # an untrained rating head sits near the training mean
    assert abs(float(model.rating(r["rating"], cand).detach().mean()) - 3.5) < 0.5


def test_only_trained_tasks_have_heads():
    model = make(tasks=("recall", "cross_sell"))
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert "cross_sell_tower" in names and "rank_tower" not in names and "rating_tower" not in names


def test_item_and_user_features_change_vectors():
    spec = ModelSpec(
        num_items=4, num_users=2, dim=8, layers=1, heads=1, max_len=4,
        item_features=(FeatureSpec("genre", "multi", 3),), user_features=(FeatureSpec("age", "categorical", 3),),
    )
    torch.manual_seed(0)
    model = P5Rec(spec).eval()
    model.items.features.set_values("genre", torch.tensor([[0, 0], [1, 0], [1, 2], [2, 0], [0, 0]]))
    model.user_features.set_values("age", torch.tensor([0, 1, 2]))
    table = model.items.all()
    assert torch.equal(table[0], torch.zeros(8))
    assert not torch.allclose(table[1] - model.items.embedding.weight[1], table[3] - model.items.embedding.weight[3])
    a = model.encode_last(torch.tensor([[1, 2]]), torch.tensor([1]))["recall"]
    b = model.encode_last(torch.tensor([[1, 2]]), torch.tensor([2]))["recall"]
    assert not torch.allclose(a, b)


def test_dropout_only_in_training():
    model = make(dropout=0.5, emb_dropout=0.5)
    items = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(items), model(items))  # eval: deterministic
    model.train()
    assert not torch.equal(model(items), model(items))


def test_bf16_autocast_on_cpu_is_finite():
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(torch.tensor([[1, 2, 3], [0, 0, 4]]))
    assert torch.isfinite(scores.float()).all()
