"""The serving core (p5ray/inference.py) without Ray: one synthetic checkpoint, every task."""

import numpy as np
import pytest
import torch

from p5ray.errors import InvalidRequestError, NotFoundError
from p5ray.inference import Recommender
from p5ray.scoring import user_states
from tests.helpers import item_id, make_checkpoint


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return Recommender(str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", model_version="v1")))


@pytest.fixture(scope="module")
def core_without_ratings(tmp_path_factory):
    return Recommender(str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", has_ratings=False)))


def ids(scored):
    return [i for i, _ in scored.items]


def test_recall_top_k_sorted_and_excludes_seen(core):
    out = core.recall("u1", ["i10"], 7)
    assert len(out.items) == 7 and not out.cold_start and out.ignored == []
    scores = [s for _, s in out.items]
    assert scores == sorted(scores, reverse=True)
    seen = {item_id(i) for i in range(1, 6)} | {"i10"}  # u1's stored history + the request's
    assert not seen & set(ids(out))


def test_recall_matches_brute_force(core):
    history = np.concatenate([core.histories[core.user_index["u2"]], [core.item_index["i3"]]])
    r = user_states(core.model, [history[-core.max_len:]], [core.user_index["u2"]])["recall"]
    scores = (r @ core.table.T)[0]
    scores[0] = -torch.inf
    scores[torch.as_tensor(history)] = -torch.inf
    want = [core.item_ids[i] for i in scores.topk(5).indices.tolist()]
    assert ids(core.recall("u2", ["i3"], 5)) == want


def test_unknown_user_without_history_is_cold_start_by_popularity(core):
    out = core.recall("nobody", None, 4)
    assert out.cold_start and ids(out) == ["i1", "i2", "i3", "i4"]
    assert core.recommend("nobody", k=3).cold_start


def test_unknown_items_are_ignored_and_listed(core):
    out = core.recall(None, ["i2", "zzz", "i4", "yyy"], 5)
    assert out.ignored == ["zzz", "yyy"] and not out.cold_start
    assert {"i2", "i4"}.isdisjoint(ids(out))
    only_unknown = core.recall(None, ["zzz"], 3)
    assert only_unknown.cold_start and only_unknown.ignored == ["zzz"]


def test_history_longer_than_window_is_truncated_for_encoding(core):
    long = [item_id(i) for i in range(20, 60)]  # 40 items, window 8
    full = core.recall(None, long, 5)
    recent = core.recall(None, long[-core.max_len:], 20)
    # same state (only the most recent window is encoded); every history item still excluded
    assert set(long).isdisjoint(ids(full))
    assert ids(full) == [i for i in ids(recent) if i not in long][:5]


@pytest.mark.parametrize("k", [0, -1, 1001, 10**6, True, 2.5])
def test_bad_k_is_invalid(core, k):
    with pytest.raises(InvalidRequestError):
        core.recall("u1", None, k)


def test_history_over_limit_is_invalid(core):
    with pytest.raises(InvalidRequestError, match="at most"):
        core.recall("u1", ["i1"] * 10_001, 5)


def test_rank_sorts_candidates_and_lists_unknown(core):
    out = core.rank("u3", None, ["i7", "nope", "i8", "i9"])
    assert sorted(ids(out)) == ["i7", "i8", "i9"] and out.ignored == ["nope"]
    probs = [s for _, s in out.items]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    with pytest.raises(InvalidRequestError, match="empty"):
        core.rank("u3", None, [])


def test_cross_sell_excludes_anchors_and_needs_a_known_item(core):
    out = core.cross_sell(["i5", "unknown"], 6)
    assert len(out.items) == 6 and "i5" not in ids(out) and out.ignored == ["unknown"]
    with pytest.raises(InvalidRequestError, match="none of the item_ids"):
        core.cross_sell(["unknown"], 3)


def test_rating_in_range_and_404_without_ratings(core, core_without_ratings):
    assert 1.0 <= core.rating("u1", "i9") <= 5.0
    with pytest.raises(InvalidRequestError):
        core.rating("u1", "no-such-item")
    with pytest.raises(NotFoundError):
        core_without_ratings.rating("u1", "i9")


def test_recommend_is_recall_then_rank_then_cross_sell(core):
    rec = core.recommend("u4", ["i30", "bad"], k=5)
    recalled = core.recall("u4", ["i30", "bad"], 100)
    ranked = core.rank("u4", ["i30", "bad"], ids(recalled))
    assert [i for i, _ in rec.items] == ids(ranked)[:5]
    assert rec.cross_sell == core.cross_sell_after("u4", ["i30", "bad"], [i for i, _ in rec.items], 5).items
    assert not {i for i, _ in rec.cross_sell} & {i for i, _ in rec.items}
    assert rec.ignored == ["bad"] and rec.model_version == "v1" and not rec.cold_start


def composed(core, user, history, k):
    """/v1/recommend as the "composed" serving pipeline runs it: three separate core calls."""
    recalled = core.recall(user, history, max(k, 100))
    items = recalled.items if recalled.cold_start else core.rank(user, history, ids(recalled)).items
    items = items[:k]
    return items, core.cross_sell_after(user, history, [i for i, _ in items], k).items, recalled.cold_start, recalled.ignored


@pytest.fixture(scope="module")
def core_mmoe(tmp_path_factory):
    """Per-task encoder states that differ (shared_bottom gives every task the same tensor; a
    fresh MMoE's gates are near uniform, so they are randomised here)."""
    core = Recommender(str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", model_version="v1", mixture="mmoe")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in core.model.mixture.parameters():
            p.normal_(0, 1, generator=generator)
    return core


@pytest.mark.parametrize("name", ["core", "core_mmoe"])
def test_recommend_many_is_the_composed_pipeline_in_one_pass(name, request):
    core = request.getfixturevalue(name)
    requests = [("u1", None, 5), ("nobody", None, 3), (None, ["i7", "x"], 4), ("u2", ["i40"], 12), ("u3", None, 1)]
    answers = core.recommend_many(requests)
    assert len(answers) == len(requests)
    for answer, request in zip(answers, requests, strict=True):
        items, cross, cold, ignored = composed(core, *request)
        assert [i for i, _ in answer.items] == [i for i, _ in items]
        assert [s for _, s in answer.items] == pytest.approx([s for _, s in items], rel=1e-5)
        assert [i for i, _ in answer.cross_sell] == [i for i, _ in cross]
        assert [s for _, s in answer.cross_sell] == pytest.approx([s for _, s in cross], rel=1e-5)
        assert (answer.cold_start, answer.ignored, answer.model_version) == (cold, ignored, "v1")
    assert answers[1].cold_start and answers[2].ignored == ["x"] and len(answers[3].items) == 12


def test_recommend_many_refuses_a_bad_request(core):
    with pytest.raises(InvalidRequestError, match="k must be"):
        core.recommend_many([("u1", None, 5), ("u2", None, 0)])


def test_recall_many_equals_one_by_one(core):
    requests = [("u1", None, 3), ("nobody", None, 2), (None, ["i7", "x"], 4)]
    for many, one in zip(core.recall_many(requests), [core.recall(*r) for r in requests], strict=True):
        assert ids(many) == ids(one) and (many.cold_start, many.ignored) == (one.cold_start, one.ignored)
        assert [s for _, s in many.items] == pytest.approx([s for _, s in one.items], rel=1e-5)
