import numpy as np
import torch

from p5ray.scoring import ranks_full, topk_full


def _setup(seed=0, b=6, n=50, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)


def test_chunked_ranks_equal_unchunked_and_brute_force():
    q, table = _setup()
    targets = torch.tensor([1, 5, 7, 9, 20, 49])
    seen = [[2, 3], [], [7], [10, 11, 12], [1], [48]]
    whole = ranks_full(q, table, targets, seen, chunk=1000)
    for chunk in (1, 7, 16):
        assert torch.equal(ranks_full(q, table, targets, seen, chunk=chunk), whole)
    scores = q @ table.T
    scores[:, 0] = -np.inf
    for b, items in enumerate(seen):
        scores[b, items] = -np.inf
    for b, t in enumerate(targets.tolist()):
        if t in seen[b]:
            assert whole[b] > 10  # a target the user already had can never be recommended
        else:
            assert whole[b] == int((scores[b] > scores[b, t]).sum())


def test_topk_chunked_matches_full_sort_and_masks():
    q, table = _setup(1)
    seen = [[int(i) for i in torch.randperm(49)[:10] + 1] for _ in range(len(q))]
    items, scores = topk_full(q, table, 5, seen, chunk=9)
    full = q @ table.T
    full[:, 0] = -np.inf
    for b, s in enumerate(seen):
        full[b, s] = -np.inf
    ref = full.topk(5, dim=1)
    assert torch.equal(items, ref.indices)
    assert torch.allclose(scores, ref.values)
    for b, s in enumerate(seen):
        assert not set(items[b].tolist()) & set(s) and 0 not in items[b].tolist()
