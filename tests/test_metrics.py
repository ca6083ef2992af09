import math

import torch

from p5ray.metrics import RankingAccumulator, hit_ndcg, pairwise_auc, rmse_mae, target_ranks


def test_ranks_and_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    assert target_ranks(scores, torch.tensor([2, 0])).tolist() == [1, 0]
    # a target tied with 3 others sits in the middle of the tie on average
    tied = torch.zeros(1, 4)
    assert target_ranks(tied, torch.tensor([0])).tolist() == [1]


def test_hit_ndcg_values():
    hit, ndcg = hit_ndcg(torch.tensor([0, 1, 9, 10]), 10)
    assert hit.tolist() == [1, 1, 1, 0]
    assert math.isclose(ndcg[0].item(), 1.0)
    assert math.isclose(ndcg[1].item(), 1 / math.log2(3), rel_tol=1e-6)
    assert ndcg[3].item() == 0


def test_accumulator_means_over_batches():
    acc = RankingAccumulator((1, 10))
    acc.add(torch.tensor([0, 20]))
    acc.add(torch.tensor([5]))
    out = acc.result("full")
    assert math.isclose(out["full/hr@1"], 1 / 3)
    assert math.isclose(out["full/hr@10"], 2 / 3)
    assert math.isclose(out["full/mrr"], (1 + 1 / 21 + 1 / 6) / 3, rel_tol=1e-6)


def test_auc_and_regression():
    assert pairwise_auc(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.5], [1.0, 2.0]])) == 0.5
    assert pairwise_auc(torch.tensor([1.0]), torch.tensor([[1.0]])) == 0.5
    rmse, mae = rmse_mae(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0]))
    assert math.isclose(rmse, math.sqrt(0.5)) and math.isclose(mae, 0.5)
