"""Landmark search with FAISS: an inner-product index over the landmark keys, for very large memories.

The exact path scores every landmark in memory at every step. That is one small matmul per layer up
to hundreds of thousands of blocks; beyond that (or when the landmark keys themselves must live in
CPU RAM), an approximate nearest-neighbour index finds the few best-scoring blocks in sub-linear time.

Why an inner-product index fits. For scoring, the landmarks of all OLD blocks (every block but the
``k_eff`` most recent) sit at one position, slot 0's landmark position ``bs - 1``. RoPE is relative,
``R(p_q) q . R(p_k) k = R(p_q - p_k) q . k``, so an old block's score is the inner product of the query
rotated by ``p_q - (bs - 1)`` with the block's UN-rotated landmark key: one fixed vector per block, which
an index built once can search. The ``k_eff`` most recent blocks sit at slots ``1..k_eff`` and are
scored exactly.

``LandmarkIndex`` keeps one index per (batch row, kv head), updated by ``BlockMemory.append``:

* a block is numbered by its sequence number (blocks appended to the row before it); index entry ``i``
  is sequence number ``first[row] + i``, so evicted blocks and the recent blocks are excluded from a
  search by one id range (``faiss.IDSelectorRange``);
* an index is exact (``IndexFlatIP``) while the row holds fewer than ``approx_min_blocks`` blocks and
  approximate (``IndexHNSWFlat``, inner product) from then on;
* FIFO eviction marks entries stale (they fall out of the id range); once the stale entries outnumber
  the live ones, the row's indexes are rebuilt from the live keys (amortised O(1) per block).

``retrieval._search_select`` then selects as the exact path does, over a candidate set: per batch row,
the union of every query's search hits among the old blocks (``candidates`` per query row and head)
plus the ``k_eff`` recent blocks, all scored exactly. Granularities:

* ``"token_head"``: top-k of the exact scores over the candidates. A block is missed only if the index
  misses it for every query of the step; this is the recall that the tests and docs report.
* ``"token"`` / ``"head"``: these average softmax probabilities over heads / rows. They are computed over
  the candidate set: each unit's softmax is normalised over the candidates instead of all blocks. The
  blocks left out are those that no query ranked among its best ``candidates``, so their share of the
  softmax mass is small; the approximation changes the weighting of the average only through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from landmark.optional import require

DEFAULT_APPROX_MIN_BLOCKS = 32768  # below this many blocks per row an exact flat scan is as fast as HNSW


def _faiss():
    return require("faiss")


@dataclass(frozen=True)
class IndexOptions:
    """How a :class:`LandmarkIndex` indexes its keys.

    Args:
        approx_min_blocks: a row with at least this many live blocks is indexed with HNSW, below with
            an exact flat index.
        hnsw_m: HNSW graph degree (memory per key and recall grow with it).
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (recall and time grow with it).
        min_rebuild: rebuild a row's indexes once it has more than max(live, min_rebuild) evicted
            entries.
    """

    approx_min_blocks: int = DEFAULT_APPROX_MIN_BLOCKS
    hnsw_m: int = 16
    ef_construction: int = 40
    ef_search: int = 64
    min_rebuild: int = 64


class LandmarkIndex:
    """Inner-product indexes over the un-rotated landmark keys of one ``BlockMemory``.

    Args:
        batch, kv_heads, head_dim: the memory's shape.
        options: HNSW and flat index settings (:class:`IndexOptions`).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, options: IndexOptions = IndexOptions()):
        self.faiss = _faiss()
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        o = options
        self.approx_min_blocks, self.hnsw_m = o.approx_min_blocks, o.hnsw_m
        self.ef_construction, self.ef_search, self.min_rebuild = o.ef_construction, o.ef_search, o.min_rebuild
        self.first = [0] * batch  # sequence number of index entry 0, per row
        self.live_from = [0] * batch  # first sequence number still in memory, per row
        self.indexes = [[self._new(0) for _ in range(kv_heads)] for _ in range(batch)]

    def _new(self, n: int):
        if n >= self.approx_min_blocks:
            index = self.faiss.IndexHNSWFlat(self.head_dim, self.hnsw_m, self.faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        return self.faiss.IndexFlatIP(self.head_dim)

    def approximate(self, row: int) -> bool:
        """Whether the row's indexes are HNSW (approximate) rather than flat (exact)."""
        return isinstance(self.indexes[row][0], self.faiss.IndexHNSWFlat)

    def size(self, row: int) -> int:
        """Entries in the row's indexes (live and stale)."""
        return self.indexes[row][0].ntotal

    def add(self, row: int, keys: Tensor) -> None:
        """Append landmark keys (Hkv, m, D) of a row's m newest blocks (their sequence numbers follow)."""
        if not self.approximate(row) and self.size(row) + keys.shape[1] >= self.approx_min_blocks:
            # about to become large: re-create as HNSW with the keys so far (flat storage is readable)
            old = [ix.reconstruct_n(0, ix.ntotal) for ix in self.indexes[row]]
            self.indexes[row] = [self._new(self.approx_min_blocks) for _ in range(self.kv_heads)]
            for h, ix in enumerate(self.indexes[row]):
                ix.add(old[h])
        data = keys.detach().float().cpu().numpy()
        for h, ix in enumerate(self.indexes[row]):
            ix.add(np.ascontiguousarray(data[h]))

    def forget(self, row: int, live_from: int, live_keys: Callable[[], Tensor]) -> None:
        """Blocks with sequence numbers below ``live_from`` were evicted; rebuild once they dominate.

        Args:
            live_keys: returns the (Hkv, n_live, D) landmark keys of the live blocks in order.
        """
        self.live_from[row] = live_from
        stale = live_from - self.first[row]
        live = self.first[row] + self.size(row) - live_from
        if stale > max(live, self.min_rebuild):
            keys = live_keys()
            self.indexes[row] = [self._new(keys.shape[1]) for _ in range(self.kv_heads)]
            self.first[row] = live_from
            self.add(row, keys)

    def search(self, row: int, head: int, queries: np.ndarray, lo: int, hi: int, n: int) -> np.ndarray:
        """Best ``n`` entries by inner product among sequence numbers [lo, hi) of one (row, kv head).

        Args:
            queries: (nq, D) float32.

        Returns:
            (nq, n) sequence numbers, -1 where fewer than n were found.
        """
        faiss = self.faiss
        selector = faiss.IDSelectorRange(lo - self.first[row], hi - self.first[row])
        index = self.indexes[row][head]
        if isinstance(index, faiss.IndexHNSWFlat):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, n))
        else:
            params = faiss.SearchParameters(sel=selector)
        _, ids = index.search(queries, n, params=params)
        return np.where(ids >= 0, ids + self.first[row], -1)


def search_candidates(
    index: LandmarkIndex, q_old: Tensor, row_valid: Tensor, n_old: Tensor, candidates: int
) -> list[Tensor]:
    """Per batch row, the distinct old blocks that some query of the step ranks among its best.

    Args:
        q_old: (B, Hkv, G, C, D) queries rotated for the old blocks' scoring position.
        row_valid: (B, C) real query rows.
        n_old: (B,) old blocks per row (logical indices 0 .. n_old - 1).

    Returns:
        B tensors of logical block indices (sorted, on q_old's device).
    """
    batch, kv_heads, _, _, dim = q_old.shape
    found = []
    queries = q_old.detach().float().cpu()
    for b in range(batch):
        n = min(candidates, int(n_old[b]))
        if n == 0 or not bool(row_valid[b].any()):
            found.append(torch.zeros(0, dtype=torch.long, device=q_old.device))
            continue
        lo = index.live_from[b]
        hits = []
        for h in range(kv_heads):
            x = queries[b, h][:, row_valid[b].cpu()].reshape(-1, dim).numpy()
            hits.append(index.search(b, h, np.ascontiguousarray(x), lo, lo + int(n_old[b]), n).ravel())
        seq = np.unique(np.concatenate(hits))
        found.append(torch.from_numpy(seq[seq >= 0] - lo).to(q_old.device))
    return found
