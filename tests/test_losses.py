"""Multi-task losses, task weighting, negative sampling and the NaN guards of the epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p5ray import dataset
from p5ray.config import Config, replace
from p5ray.losses import GradNormBalancer, MultiTaskLoss, contrastive_loss
from p5ray.model import ModelSpec, P5Rec
from p5ray.train import EpochData, lr_lambda, run_epoch

N_ITEMS = 40
ALPHA = {"recall": 1.0, "rank": 0.2, "cross_sell": 0.2, "rating": 0.2}


def make_model(tasks=("recall", "rank", "cross_sell", "rating")) -> P5Rec:
    torch.manual_seed(0)
    return P5Rec(ModelSpec(num_items=N_ITEMS, num_users=8, dim=16, layers=1, heads=2, max_len=6, tower_dim=8, tasks=tasks))


def make_batch(seed: int = 0, b: int = 4, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (b, t + 1), generator=g)
    seq[0, :3] = 0  # a short, left-padded row
    inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    targets[inputs == 0] = 0
    return {
        "inputs": inputs,
        "targets": targets,
        "users": torch.arange(1, b + 1),
        "weights": torch.ones(b),
        "ratings": torch.rand(b, t, generator=g) * 4 + 1,
        "rank_negatives": torch.randint(1, N_ITEMS + 1, (b, t, 3), generator=g),
        "seen": seq,
        "negatives": torch.randint(1, N_ITEMS + 1, (16,), generator=g),
    }


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax", "bce"])
def test_recall_losses_are_finite_and_learn(kind):
    """Each recall loss choice trains: a few steps on one batch lower it."""
    model = make_model(("recall",))
    loss_fn = MultiTaskLoss(model, ALPHA, recall_loss=kind)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    batch = make_batch()
    first = None
    for _ in range(30):
        total, parts = loss_fn(batch)
        assert torch.isfinite(total)
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(loss_fn(batch)[0].detach()) < 0.8 * first


def test_full_softmax_matches_cross_entropy_by_hand():
    model = make_model(("recall",)).eval()
    loss_fn = MultiTaskLoss(model, ALPHA, recall_loss="full_softmax")
    batch = make_batch()
    total, _ = loss_fn(batch)
    r = model.encode(batch["inputs"])["recall"]  # (B, T, D)
    mask = batch["targets"] > 0
    logits = r[mask] @ model.items.all().T
    logits[:, 0] = -math.inf
    expected = torch.nn.functional.cross_entropy(logits, batch["targets"][mask])
    assert torch.allclose(total, expected, atol=1e-5)


def test_sampled_softmax_masks_positives_in_the_pool():
    """A pool negative equal to the target or to any item the user touched adds nothing."""
    model = make_model(("recall",)).eval()
    loss_fn = MultiTaskLoss(model, ALPHA, recall_loss="sampled_softmax", logq_correction=False)
    batch = make_batch(b=1)
    target = batch["targets"][0, -1]
    seen_item = batch["seen"][0, 0]
    clean = torch.tensor([n for n in range(1, N_ITEMS + 1) if n not in set(batch["seen"][0].tolist())][:5])
    r = torch.randn(1, 16)
    table = model.items.all()
    targets = target.view(1)
    base = loss_fn._sampled(r, table, targets, clean, None, torch.ones(1))
    seen_rows = torch.zeros(1, N_ITEMS + 1, dtype=torch.bool)
    seen_rows[0, batch["seen"][0]] = True
    polluted = torch.cat([clean, target.view(1), seen_item.view(1)])
    assert torch.allclose(base, loss_fn._sampled(r, table, targets, polluted, seen_rows, torch.ones(1)), atol=1e-6)
    # without the user's seen items the pollution would count
    assert not torch.allclose(base, loss_fn._sampled(r, table, targets, polluted, None, torch.ones(1)), atol=1e-6)


def test_logq_correction_changes_the_loss_for_a_skewed_pool():
    model = make_model(("recall",))
    probs = torch.arange(N_ITEMS + 1, dtype=torch.float)
    batch = make_batch()
    with_q = MultiTaskLoss(model, ALPHA, recall_loss="sampled_softmax", sampling_probs=probs)(batch)[0]
    without = MultiTaskLoss(model, ALPHA, recall_loss="sampled_softmax", sampling_probs=probs, logq_correction=False)(batch)[0]
    assert not torch.allclose(with_q, without)


def test_all_tasks_present_and_weighted_sum():
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA)
    total, parts = loss_fn(make_batch())
    assert set(parts) == set(ALPHA)
    expected = sum(ALPHA[t] * parts[t] for t in parts)
    assert torch.allclose(total, expected, atol=1e-5)


def test_zero_alpha_drops_a_task():
    model = make_model()
    loss_fn = MultiTaskLoss(model, {**ALPHA, "rank": 0.0})
    assert "rank" not in loss_fn(make_batch())[1]


def test_per_example_weights():
    """Weight 0 removes an example; doubling every weight leaves the weighted mean unchanged."""
    model = make_model().eval()
    loss_fn = MultiTaskLoss(model, ALPHA)
    batch = make_batch()
    base = loss_fn(batch)[1]
    doubled = loss_fn({**batch, "weights": batch["weights"] * 2})[1]
    for t in base:
        assert torch.allclose(base[t], doubled[t], atol=1e-5)
    w = batch["weights"].clone()
    w[1] = 0
    dropped = loss_fn({**batch, "weights": w})[1]
    other = {k: (v if k != "weights" else w) for k, v in batch.items()}
    other["inputs"] = batch["inputs"].clone()
    other["inputs"][1] = torch.randint(1, N_ITEMS + 1, other["inputs"][1].shape)  # row 1 changes
    assert torch.allclose(dropped["recall"], loss_fn(other)[1]["recall"], atol=1e-5)
    assert not torch.allclose(dropped["recall"], base["recall"], atol=1e-5)


def test_uncertainty_weighting_learns_log_variances():
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA, weighting="uncertainty")
    assert loss_fn.log_vars.requires_grad
    total, parts = loss_fn(make_batch())
    total.backward()
    assert loss_fn.log_vars.grad is not None and loss_fn.log_vars.grad.abs().sum() > 0
    fixed = MultiTaskLoss(model, ALPHA, weighting="fixed")
    assert not fixed.log_vars.requires_grad
    # with log_vars = 0 uncertainty weighting equals the fixed sum
    assert torch.allclose(total, fixed.combine(torch.stack([parts[t] for t in fixed.tasks])), atol=1e-5)


def test_gradnorm_moves_weight_towards_the_task_with_small_gradients():
    balancer = GradNormBalancer(2, gamma=0.0, step=1.0)
    balance = torch.ones(2)
    losses = torch.tensor([1.0, 1.0])
    for _ in range(5):
        balance = balancer.update(balance, losses, torch.tensor([10.0, 1.0]))
    assert balance[1] > balance[0]
    assert torch.isclose(balance.sum(), torch.tensor(2.0))
    # a task whose loss falls slower gets more weight (gamma > 0)
    balancer = GradNormBalancer(2, gamma=1.5, step=1.0)
    balancer.update(torch.ones(2), torch.tensor([1.0, 1.0]), torch.ones(2))
    slow = balancer.update(torch.ones(2), torch.tensor([0.9, 0.3]), torch.ones(2))
    assert slow[0] > slow[1]


def _contrastive_by_hand(a, b, targets, weights, tau):
    a = [[v / math.sqrt(sum(v * v for v in x)) for v in x] for x in a.tolist()]
    b = [[v / math.sqrt(sum(v * v for v in x)) for v in x] for x in b.tolist()]
    t, w = targets.tolist(), weights.tolist()
    total = 0.0
    for u, v in ((a, b), (b, a)):
        for i in range(len(u)):
            sims = [sum(p * q for p, q in zip(u[i], v[j])) / tau for j in range(len(v))]
            pos = sum(math.exp(s) for j, s in enumerate(sims) if t[j] == t[i])
            total += w[i] * -math.log(pos / sum(math.exp(s) for s in sims)) / 2
    return total / sum(w)


def test_contrastive_loss_matches_supervised_infonce_by_hand():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    targets = torch.tensor([5, 7, 5, 9, 7, 2])  # positions 0/2 and 1/4 share their next item
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 0.0, 1.0])
    got = float(contrastive_loss(a, b, targets, weights, 0.3))
    assert got == pytest.approx(_contrastive_by_hand(a, b, targets, weights, 0.3), rel=1e-5)
    # twins that agree with each other and differ from the rest give a lower loss
    assert float(contrastive_loss(a, a, torch.arange(6), weights, 0.3)) < float(contrastive_loss(a, b, torch.arange(6), weights, 0.3))


def test_contrastive_term_in_training_only_and_added_with_its_weight():
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA, contrastive=0.5).train()
    total, parts = loss_fn(make_batch())
    assert float(parts["contrastive"].detach()) > 0
    expected = sum(ALPHA[t] * parts[t] for t in ALPHA) + 0.5 * parts["contrastive"]
    assert torch.allclose(total, expected, atol=1e-5)
    total.backward()
    assert model.encoder.blocks[0].qkv.weight.grad is not None
    loss_fn.eval()
    assert "contrastive" not in loss_fn(make_batch())[1]
    assert "contrastive" not in MultiTaskLoss(make_model(), ALPHA).train()(make_batch())[1]


@pytest.mark.parametrize("contrastive", [0.0, 0.5])
def test_no_valid_position_gives_zero_loss_with_a_graph(contrastive):
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA, contrastive=contrastive)
    batch = make_batch()
    batch["targets"] = torch.zeros_like(batch["targets"])
    total, parts = loss_fn(batch)
    assert float(total.detach()) == 0.0 and total.requires_grad
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in loss_fn.parameters())


def test_bf16_autocast_loss_on_cpu_is_finite():
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss_fn(make_batch())
    total.backward()
    assert torch.isfinite(total) and all(p.grad is None or torch.isfinite(p.grad).all() for p in loss_fn.parameters())


# -- negative sampler ---------------------------------------------------------------------


def test_negative_sampler_never_returns_positives():
    sampler = dataset.NegativeSampler(20, np.random.default_rng(0))
    positives = set(range(1, 19))  # only items 19 and 20 are left
    out = sampler.sample(positives, (50, 7))
    assert out.shape == (50, 7)
    assert set(out.ravel().tolist()) <= {19, 20}


def test_collate_rank_negatives_avoid_the_users_items():
    sampler = dataset.NegativeSampler(12, np.random.default_rng(1))
    rows = {
        "user_idx": np.array([1, 2]),
        "items": dataset._object_array([np.array([1, 2, 3, 4, 5, 6, 7, 8, 9]), np.array([10, 11])]),
        "ratings": dataset._object_array([np.full(9, np.nan, np.float32), np.full(2, np.nan, np.float32)]),
        "weight": np.ones(2, np.float32),
    }
    user_items = {1: set(range(1, 11)), 2: {10, 11, 12}}
    batch = dataset.collate(rows, 8, sampler, 5, user_items)
    neg = batch["rank_negatives"]
    valid = batch["targets"] > 0
    assert set(neg[0][valid[0]].ravel().tolist()) <= {11, 12}
    assert not set(neg[1][valid[1]].ravel().tolist()) & {10, 11, 12}
    assert batch["inputs"].shape == (2, 8) and int(valid[1].sum()) == 1


def test_bucketed_order_is_a_permutation_of_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 50, size=1000)
    order = dataset.bucketed_order(lengths, 32, rng, pool=8)
    assert sorted(order.tolist()) == list(range(1000))
    spread = [np.ptp(lengths[order[i:i + 32]]) for i in range(0, 992, 32)]
    assert np.mean(spread) < 0.5 * np.ptp(lengths)


# -- the epoch: schedule and NaN guards ------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
    values = [lr_lambda(s, 10, 100, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def epoch_data(n_users: int = 16) -> EpochData:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(3, 9))) for _ in range(n_users)]
    rows = {
        "user_idx": np.arange(1, n_users + 1),
        "items": dataset._object_array(seqs),
        "ratings": dataset._object_array([np.full(len(s), 3.0, np.float32) for s in seqs]),
        "weight": np.ones(n_users, np.float32),
    }
    user_items = {i + 1: set(s.tolist()) for i, s in enumerate(seqs)}
    probs = torch.ones(N_ITEMS + 1)
    probs[0] = 0
    return EpochData(rows, user_items, dataset.NegativeSampler(N_ITEMS, np.random.default_rng(0)), probs / probs.sum())


def tiny_cfg(**train) -> Config:
    cfg = Config()
    return replace(cfg, train={"batch_size": 4, **train}, model={"max_len": 6}, loss={"num_negatives": 8, "rank_negatives": 2})


def run(loss_fn, cfg, data, steps=3, seed=0):
    opt = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return run_epoch(loss_fn, opt, sched, data, cfg, steps, np.random.default_rng(seed), torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_non_finite_loss_never_poisons_the_weights():
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA)
    data = epoch_data()
    data.rows["weight"][:] = np.inf  # every step overflows to a non-finite loss
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = run(loss_fn, tiny_cfg(), data)
    assert stats["skipped_steps"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    data.rows["weight"][:] = 1.0
    stats = run(loss_fn, tiny_cfg(), data)
    assert stats["skipped_steps"] == 0 and math.isfinite(stats["loss/total"])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_run_epoch_is_reproducible_from_the_seed():
    def once():
        torch.manual_seed(3)
        model = make_model()
        data = epoch_data()
        return run(MultiTaskLoss(model, ALPHA), tiny_cfg(), data, seed=5)["loss/total"], model
    (a, ma), (b, mb) = once(), once()
    assert a == b
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_gradnorm_in_the_epoch_updates_the_balance():
    model = make_model()
    loss_fn = MultiTaskLoss(model, ALPHA, weighting="gradnorm")
    opt = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    balancer = GradNormBalancer(len(loss_fn.tasks), every=1)
    run_epoch(loss_fn, opt, sched, epoch_data(), tiny_cfg(), 4, np.random.default_rng(0), torch.device("cpu"), balancer)
    assert not torch.allclose(loss_fn.balance, torch.ones_like(loss_fn.balance))
    assert torch.isclose(loss_fn.balance.sum(), torch.tensor(float(len(loss_fn.tasks))))


def test_cpu_bf16_epoch_runs():
    model = make_model()
    stats = run(MultiTaskLoss(model, ALPHA), tiny_cfg(precision="bf16"), epoch_data())
    assert math.isfinite(stats["loss/total"]) and stats["skipped_steps"] == 0



def test_early_stopping_keeps_the_best_and_stops_after_patience():
    from p5ray.train import early_stopping

    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0}
    scores = [0.01, 0.03, 0.02, 0.03, float("nan"), 0.029]
    stops = [early_stopping(state, s, e + 1, patience=3) for e, s in enumerate(scores)]
    assert stops == [False, False, False, False, True, True]
    assert state["best"] == 0.03 and state["best_epoch"] == 2
    never = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0}
    assert not any(early_stopping(never, 0.0, e, patience=0) for e in range(1, 20))
