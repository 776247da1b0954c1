"""Sublinear landmark selection (landmark/inference/superblocks.py) against the full scan: the same
top-k (ties to the more recent block included) for every query, while scoring fewer keys."""

from __future__ import annotations

import pytest
import torch

from landmark.inference.retrieval import top_k_blocks
from landmark.inference.superblocks import bounded_top_k, landmark_scores, summarize, upper_bounds


def full_scan(q, keys, k):
    return top_k_blocks(landmark_scores(q, keys), min(k, keys.shape[-2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("n", "group", "k"), [(1, 4, 3), (7, 4, 2), (100, 8, 4), (257, 16, 5), (64, 64, 64)])
def test_the_full_scans_selection(dtype, n, group, k):
    g = torch.Generator().manual_seed(n * 31 + group)
    keys = torch.randn(3, n, 12, generator=g).to(dtype)
    q = torch.randn(3, 9, 12, generator=g).to(dtype)
    index, visited = bounded_top_k(q, keys, k, summarize(keys, group))
    assert torch.equal(index, full_scan(q, keys, k))
    assert visited.shape == (3, 9) and bool((visited <= n).all()) and bool((visited >= min(k, n)).all())


def test_ties_go_to_the_more_recent_block_as_in_the_full_scan():
    """Equal keys (the first layer's landmarks are all alike) score alike: the later blocks win, also
    across super-blocks, and a repeated key beside distinct ones."""
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 12).expand(50, 12).clone()
    q = torch.randn(4, 12, generator=g)
    for group in (1, 3, 8, 64):
        index, _ = bounded_top_k(q, same, 5, summarize(same, group))
        assert torch.equal(index, full_scan(q, same, 5))
        assert index.tolist() == [[45, 46, 47, 48, 49]] * 4
    mixed = torch.randn(40, 12, generator=g)
    mixed[[3, 17, 29, 38]] = mixed[10].clone()  # five copies of one key, spread over the super-blocks
    q = torch.cat([mixed[10:11] * 3, torch.randn(5, 12, generator=g)])
    for k in (1, 2, 5, 7):
        index, _ = bounded_top_k(q, mixed, k, summarize(mixed, 4))
        assert torch.equal(index, full_scan(q, mixed, k))


def test_bounds_hold_for_every_member():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 90, 16, generator=g) * torch.logspace(-3, 3, 16)  # channels of every scale
    q = torch.randn(2, 7, 16, generator=g)
    blocks = summarize(keys, 8)
    bounds = upper_bounds(q, blocks)  # (2, 7, 12)
    scores = landmark_scores(q, keys).double()  # (2, 7, 90)
    padded = torch.nn.functional.pad(scores, (0, 96 - 90), value=float("-inf"))
    best = padded.reshape(2, 7, 12, 8).amax(-1)
    assert bool((best <= bounds).all())


def test_clustered_keys_are_selected_by_visiting_few_super_blocks():
    """Keys in runs of similar direction (as blocks of one passage are): each query scores a small share
    of the keys, and still gets the full scan's answer."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(64, 32, generator=g) * 4
    keys = centres.repeat_interleave(32, 0) + torch.randn(2048, 32, generator=g) * 0.3  # 2,048 keys
    q = centres[torch.randint(0, 64, (16,), generator=g)] + torch.randn(16, 32, generator=g) * 0.3
    index, visited = bounded_top_k(q, keys, 4, summarize(keys, 32))
    assert torch.equal(index, full_scan(q, keys, 4))
    assert float(visited.double().mean()) <= 2048 / 8  # at most an eighth of the full scan


def test_summaries_must_match_the_keys():
    keys = torch.randn(10, 4)
    with pytest.raises(ValueError, match="summarize 9 keys"):
        bounded_top_k(torch.randn(2, 4), keys, 2, summarize(keys[:9], 4))
    with pytest.raises(ValueError, match="group must be >= 1"):
        summarize(keys, 0)
