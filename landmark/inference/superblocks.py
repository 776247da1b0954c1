"""Sublinear landmark selection: super-blocks whose summaries bound every member's score.

The exact selection scores every landmark key in memory for every query: at a million tokens that is
about 16,000 landmark keys per query, layer and KV head, and the scan dominates reading. Grouping the
blocks into super-blocks of ``group`` consecutive blocks, each with the per-channel minimum ``lo`` and
maximum ``hi`` of its members' landmark keys (as Quest bounds its pages), gives for every query ``q`` an
upper bound of every member's score::

    q . key  <=  sum_c max(q_c lo_c, q_c hi_c)  =  q . (lo + hi) / 2  +  |q| . (hi - lo) / 2

(two matrix products over the super-blocks). :func:`bounded_top_k` visits the super-blocks best bound
first, scores their members exactly, and stops as soon as no unvisited bound can reach the k-th best
exact score: the selection is the full scan's (:func:`landmark.inference.retrieval.top_k_blocks` of
the scores of ``landmark_scores``, ties to the more recent block), at the cost of the bounds plus the
visited members. The bounds are widened by a rounding slack, so that a member whose score rounds up
to the k-th best is never skipped; a member outside the visited super-blocks then scores strictly less
than the k-th best, so it can neither enter the top k nor tie with it.

Scores follow the library's definition (float64 sums rounded to the query dtype; see
``retrieval._landmark_scores``). The eager path (``landmark.inference.retrieval``) is the reference;
this module is checked against it in tests/test_superblocks.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_GROUP = 4  # blocks per super-block at least; by default about sqrt(N), which balances the bounds
# cost (N / group) against the members of the super-blocks visited (a few times group)
SLACK = 2.0**-20  # relative widening of a bound: float32 rounding of a score is below 2**-24 of it


@dataclass(frozen=True)
class SuperBlocks:
    """Summaries of ``n`` landmark keys in super-blocks of ``group``: per-channel midpoints and
    half-widths, (..., S, D) float64 each, ``S = ceil(n / group)``."""

    mid: Tensor
    half: Tensor
    group: int
    n: int

    @property
    def count(self) -> int:
        """Super-blocks S."""
        return self.mid.shape[-2]


def default_group(n: int) -> int:
    """Blocks per super-block for ``n`` landmark keys: about sqrt(n), at least ``MIN_GROUP``."""
    return max(MIN_GROUP, math.isqrt(n))


def summarize(keys: Tensor, group: int | None = None) -> SuperBlocks:
    """The super-blocks of landmark keys (..., N, D), ``group`` consecutive keys each (the last one
    may hold fewer; None: :func:`default_group`)."""
    n, d = keys.shape[-2], keys.shape[-1]
    group = default_group(n) if group is None else group
    if group < 1:
        raise ValueError(f"group must be >= 1; got {group}")
    count = math.ceil(n / group)
    pad = count * group - n
    if pad:  # repeat the last key: the last super-block's minimum and maximum do not change
        keys = torch.cat([keys, keys[..., -1:, :].expand(*keys.shape[:-2], pad, d)], dim=-2)
    grouped = keys.double().reshape(*keys.shape[:-2], count, group, d)
    lo, hi = grouped.amin(dim=-2), grouped.amax(dim=-2)
    return SuperBlocks((lo + hi) / 2, (hi - lo) / 2, group, n)


def upper_bounds(q: Tensor, blocks: SuperBlocks) -> Tensor:
    """(..., R, S) float64 bounds of the scores of queries (..., R, D) against every member of each
    super-block, widened by the rounding slack."""
    qd = q.double()
    exact = qd @ blocks.mid.transpose(-1, -2) + qd.abs() @ blocks.half.transpose(-1, -2)
    scale = qd.abs() @ (blocks.mid.abs() + blocks.half).transpose(-1, -2)  # >= |every term's sum|
    return exact + SLACK * scale + torch.finfo(q.dtype).tiny


def landmark_scores(q: Tensor, keys: Tensor) -> Tensor:
    """Scores of queries (..., R, D) against keys (..., M, D), the library's definition: float64 sums
    rounded to the query dtype; (..., R, M)."""
    return (q.double() @ keys.double().transpose(-1, -2)).to(q.dtype)


def bounded_top_k(
    q: Tensor, keys: Tensor, k: int, blocks: SuperBlocks | None = None
) -> tuple[Tensor, Tensor]:
    """The top ``k`` landmark keys of every query, by visiting super-blocks best bound first.

    Args:
        q: (..., R, D) queries, rotated to the keys' frame.
        keys: (..., N, D) landmark keys, N >= 1.
        k: keys selected per query (at most N are).
        blocks: :func:`summarize` of ``keys`` (made here when None; a caller scoring several steps
            against the same keys makes it once).

    Returns:
        ``(index, visited)``: (..., R, min(k, N)) int64 key indices in ascending order, the full scan's
        selection (ties to the higher index); (..., R) int64 keys scored exactly per query.
    """
    index, scores = bounded_candidates(q, keys, k, blocks)
    return top_k_candidates(index, scores, min(k, keys.shape[-2])), (index >= 0).sum(-1)


def bounded_candidates(
    q: Tensor, keys: Tensor, k: int, blocks: SuperBlocks | None = None
) -> tuple[Tensor, Tensor]:
    """The keys :func:`bounded_top_k` scores exactly, a superset of every query's top ``k``: (..., R, M)
    key indices (-1: padding) and their scores (-inf there). Arguments as ``bounded_top_k``."""
    n = keys.shape[-2]
    if blocks is None:
        blocks = summarize(keys)
    if blocks.n != n:
        raise ValueError(f"blocks summarize {blocks.n} keys; keys has {n}")
    k = min(k, n)
    bounds = upper_bounds(q, blocks)
    order = bounds.argsort(dim=-1, descending=True)
    sorted_bounds = bounds.gather(-1, order)
    visit = min(blocks.count, math.ceil(k / blocks.group) + 1)
    while True:
        index, scores = _members(q, keys, order[..., :visit], blocks.group)
        kth = scores.topk(k, dim=-1).values[..., -1].double()
        if visit == blocks.count:
            break
        if bool((sorted_bounds[..., visit] < kth).all()):
            break  # no unvisited super-block can reach the k-th best of any query
        visit = min(blocks.count, 2 * visit)
    return index, scores


def _members(q: Tensor, keys: Tensor, chosen: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """(index, scores) of every member of the chosen super-blocks (..., R, V): (..., R, V * group)
    key indices (-1 past the last key) and their exact scores (-inf there)."""
    n = keys.shape[-2]
    index = (chosen[..., None] * group + torch.arange(group, device=q.device)).flatten(-2)
    valid = index < n
    index = torch.where(valid, index, -1)
    flat = index.clamp(min=0)
    lead = keys.shape[:-2]
    picked = keys[..., None, :, :].expand(*lead, q.shape[-2], n, keys.shape[-1])
    members = picked.gather(-2, flat[..., None].expand(*flat.shape, keys.shape[-1]))
    scores = (members.double() @ q.double()[..., None]).squeeze(-1).to(q.dtype)
    return index, scores.masked_fill(~valid, float("-inf"))


def top_k_candidates(index: Tensor, scores: Tensor, k: int) -> Tensor:
    """The k best of candidates (..., R, M) given by key index and score, ties to the higher index (the
    full scan's rule); (..., R, k) key indices in ascending order."""
    by_index = index.argsort(dim=-1, descending=True, stable=True)
    scores, index = scores.gather(-1, by_index), index.gather(-1, by_index)
    by_score = scores.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return index.gather(-1, by_score).sort(dim=-1).values
