"""Inference over inputs of any length: chunked processing with block memory and top-k retrieval.

``InferenceSession`` holds, per layer, a ``BlockMemory`` of complete blocks and the incomplete tail
block, for a batch of independent streams. ``feed`` runs new stream positions (landmarks included)
through the model chunk by chunk and returns their logits. The helpers below insert landmarks
automatically:

* ``chunked_logits(model, tokens)``: logits for every token of arbitrarily long inputs (all chunks,
  not only the last), optionally the loss;
* ``generate`` (in ``landmark.inference.generate``): prompt prefill in chunks, then token-by-token
  decoding with retrieval.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from landmark.data.landmarks import insert_landmarks
from landmark.inference.memory import BlockMemory
from landmark.inference.retrieval import (
    DECODE_ROWS,
    RetrievalConfig,
    StepStats,
    decode_step_plan,
    retrieval_attention,
)
from landmark.inference.search import DEFAULT_APPROX_MIN_BLOCKS, LandmarkIndex
from landmark.model import GPT

DEFAULT_CHUNK_LEN = 256  # positions per prefill chunk (the paper uses 250 tokens)


@dataclass
class SessionStats:
    """Totals over a session (for benchmarks and the inference report)."""

    steps: int = 0
    positions: int = 0
    layer: StepStats = field(default_factory=StepStats)


class InferenceSession:
    """A landmark model plus the per-layer memories of a batch of streams.

    Args:
        model: a ``GPT`` with ``attention="landmark"``.
        batch_size: number of independent streams.
        k: blocks retrieved per selection unit (>= 1).
        granularity: ``"token_head"`` (default), ``"token"`` or ``"head"``.
        chunk_len: positions per chunk when feeding long inputs (>= block_size).
        memory_device: where block contents live (default: the model's device), e.g. ``"cpu"``.
        max_blocks: cap on blocks per stream (None: unlimited); ``evict`` chooses FIFO eviction or an
            error when it is reached.
        search: ``"exact"`` (default) scores every landmark in memory; ``"faiss"`` keeps a FAISS
            inner-product index over the landmark keys per layer and scores only its ``candidates``
            (per query row and head; 0: 2 * k + 8) plus the recent blocks exactly (optional extra
            ``faiss``). The index is exact (flat) below ``approx_min_blocks`` blocks per stream and
            HNSW from there on (see ``landmark.inference.search``).
        compile: run the decode steps' retrieval attention through ``torch.compile`` (dynamic shapes;
            the first steps compile, 10-80 s on a CPU). Prefill chunks stay eager. Needs a C++ compiler
            on CPU (inductor). On the project's CPU it measured slower than eager (docs/inference.md).
        decode_kernel: ``"auto"`` (default) runs decode steps through a fused C++ kernel where it
            applies (CPU, float32, token_head, exact search, equal block counts; compiled on first use,
            about a minute, cached), ``"cpp"`` requires it, ``"torch"`` never uses it
            (``landmark.inference.decode_kernel``).
    """

    def __init__(
        self,
        model: GPT,
        batch_size: int = 1,
        *,
        k: int = 4,
        granularity: str = "token_head",
        chunk_len: int = DEFAULT_CHUNK_LEN,
        memory_device: torch.device | str | None = None,
        max_blocks: int | None = None,
        evict: bool = True,
        row_group: int = 64,
        search: str = "exact",
        candidates: int = 0,
        approx_min_blocks: int = DEFAULT_APPROX_MIN_BLOCKS,
        compile: bool = False,
        decode_kernel: str = "auto",
    ):
        cfg = getattr(model, "config", None)
        if getattr(cfg, "attention", None) != "landmark":
            kind = getattr(cfg, "attention", type(model).__name__)
            raise ValueError(
                f"retrieval inference needs a model trained with landmark attention; this one uses {kind!r}"
            )
        if chunk_len < cfg.block_size:
            raise ValueError(
                f"chunk_len ({chunk_len}) must be at least one block (block_size = {cfg.block_size})"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.model, self.config = model, cfg
        self.retrieval = RetrievalConfig(
            k=k,
            granularity=granularity,
            row_group=row_group,
            search=search,
            candidates=candidates,
            compile=compile,
            decode_kernel=decode_kernel,
        )
        self.chunk_len, self.batch_size = chunk_len, batch_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        bs, hkv, d = cfg.block_size, cfg.n_kv_head, cfg.head_dim
        self.memories = [
            BlockMemory(
                batch_size,
                hkv,
                bs,
                d,
                rope_base=cfg.rope_base,
                dtype=self.dtype,
                device=self.device,
                storage_device=memory_device,
                max_blocks=max_blocks,
                evict=evict,
                index=LandmarkIndex(batch_size, hkv, d, approx_min_blocks=approx_min_blocks)
                if search == "faiss"
                else None,
            )
            for _ in range(cfg.n_layer)
        ]
        self.tail_k = [
            torch.zeros(batch_size, hkv, bs, d, dtype=self.dtype, device=self.device)
            for _ in range(cfg.n_layer)
        ]
        self.tail_v = [torch.zeros_like(t) for t in self.tail_k]
        self.tail_len = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.length = torch.zeros(batch_size, dtype=torch.long)  # stream positions so far, per row
        self.stats = SessionStats()

    @torch.no_grad()
    def feed(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Run new stream positions through the model.

        Args:
            ids: (B, C) token ids continuing each stream, landmarks included at stream positions
                ``p % block_size == block_size - 1``; right-padded where lengths differ.
            lengths: (B,) real positions per row (default: all C).

        Returns:
            (B, C, vocab) logits (padding positions are garbage).
        """
        return torch.cat([logits for _, logits in self.iter_feed(ids, lengths)], dim=1)

    @torch.no_grad()
    def iter_feed(self, ids: Tensor, lengths: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        """Like ``feed``, but yields ``(c0, logits)`` chunk by chunk (logits of positions c0..c0+len-1),
        so that long inputs never hold all their logits at once."""
        ids = ids.to(self.device)
        if ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape ({self.batch_size}, length); got {tuple(ids.shape)}")
        lengths = torch.full((self.batch_size,), ids.shape[1]) if lengths is None else lengths.cpu().long()
        self._check_landmarks(ids, lengths)
        for c0 in range(0, ids.shape[1], self.chunk_len):
            c1 = min(ids.shape[1], c0 + self.chunk_len)
            yield c0, self._step(ids[:, c0:c1], (lengths - c0).clamp(0, c1 - c0))

    def _check_landmarks(self, ids: Tensor, lengths: Tensor) -> None:
        bs, lm = self.config.block_size, self.config.landmark_id
        if ids.shape[1] <= DECODE_ROWS:  # a decode step: in Python, cheaper than tensor operations
            for b, (row, n, start) in enumerate(zip(ids.tolist(), lengths.tolist(), self.length.tolist())):
                for t, token in enumerate(row[:n]):
                    if ((start + t) % bs == bs - 1) != (token == lm):
                        self._landmark_error(b, start + t, token)
            return
        pos = self.length[:, None] + torch.arange(ids.shape[1])[None, :]
        real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        should = (pos % bs == bs - 1).to(ids.device)
        is_lm = ids == lm
        bad = real.to(ids.device) & (should != is_lm)
        if bad.any():
            b, t = (int(x) for x in bad.nonzero()[0])
            self._landmark_error(b, int(pos[b, t]), int(ids[b, t]))

    def _landmark_error(self, row: int, position: int, token: int) -> None:
        bs = self.config.block_size
        raise ValueError(
            f"row {row}, stream position {position}: landmarks must sit exactly at positions "
            f"p % {bs} == {bs - 1} (use insert_landmarks); found token {token}"
        )

    def _step(self, ids: Tensor, lengths: Tensor) -> Tensor:
        model, cfg = self.model, self.config
        lengths = lengths.to(self.device)
        h = model.embed(ids)  # (B, C, E)
        plan = same_tail = None
        tails = self.tail_len.tolist()
        if len(set(tails)) == 1 and bool((lengths == ids.shape[1]).all()):
            same_tail = tails[0]
        if ids.shape[1] <= DECODE_ROWS:  # decoding: one plan (kernel or eager) serves every layer
            local_len = self.tail_len + lengths
            plan = decode_step_plan(
                self.memories[0], local_len, self.tail_len, lengths, ids.shape[1], int(local_len.max()),
                self.retrieval, self.dtype, cfg.block_size, cfg.head_dim, cfg.rope_base,
            )  # fmt: skip
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.project(block.norm1(h))  # (B, H, C, D), (B, Hkv, C, D) x2, un-rotated
            local_k, local_v, local_len = self._local(layer, k, v, lengths, same_tail)
            y = retrieval_attention(
                q, local_k, local_v, local_len, self.tail_len, lengths, self.memories[layer], self.retrieval,
                cfg.block_size, cfg.rope_base, cfg.head_dim**-0.5, self.stats.layer, plan,
            )  # fmt: skip
            h = h + attn.merge(y)
            h = h + block.mlp(block.norm2(h))
            self._commit(layer, local_k, local_v, local_len, same_tail)
        self.tail_len = local_len % cfg.block_size
        self.length += lengths.cpu()
        self.stats.steps += 1
        self.stats.positions += int(lengths.sum())
        return model.logits(h)

    def _local(
        self, layer: int, k: Tensor, v: Tensor, lengths: Tensor, same_tail: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Tail block + new positions per row: (B, Hkv, T, D) keys and values, (B,) real lengths.

        ``same_tail``: every row has this tail length and all C new positions real (a shortcut)."""
        bs = self.config.block_size
        local_len = self.tail_len + lengths
        if same_tail is not None:
            local_k = torch.cat((self.tail_k[layer][:, :, :same_tail], k), dim=2)
            local_v = torch.cat((self.tail_v[layer][:, :, :same_tail], v), dim=2)
            return local_k, local_v, local_len
        t = int(local_len.max())
        j = torch.arange(t, device=self.device)[None, :]
        src = torch.where(j < self.tail_len[:, None], j, bs + j - self.tail_len[:, None])
        src = src.clamp(0, bs + k.shape[2] - 1)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        local_k = torch.cat((self.tail_k[layer], k), dim=2).gather(2, src)
        local_v = torch.cat((self.tail_v[layer], v), dim=2).gather(2, src)
        return local_k, local_v, local_len

    def _commit(
        self, layer: int, local_k: Tensor, local_v: Tensor, local_len: Tensor, same_tail: int | None = None
    ) -> None:
        """Move the complete blocks of the local context to memory; keep the rest as the new tail."""
        bs = self.config.block_size
        if same_tail is not None and local_k.shape[2] < bs:  # no block completes: extend the tails
            self.tail_k[layer][:, :, same_tail : local_k.shape[2]] = local_k[:, :, same_tail:]
            self.tail_v[layer][:, :, same_tail : local_k.shape[2]] = local_v[:, :, same_tail:]
            return
        for b, n in enumerate(local_len.tolist()):
            full = n // bs
            if full:
                kb = local_k[b, :, : full * bs].unflatten(1, (full, bs))  # (Hkv, full, bs, D)
                vb = local_v[b, :, : full * bs].unflatten(1, (full, bs))
                self.memories[layer].append(b, kb, vb)
            rest = n - full * bs
            self.tail_k[layer][b, :, :rest] = local_k[b, :, full * bs : n]
            self.tail_v[layer][b, :, :rest] = local_v[b, :, full * bs : n]


@torch.no_grad()
def chunked_logits(
    model: GPT,
    tokens: Tensor,
    lengths: Tensor | None = None,
    *,
    targets: bool = False,
    **session_kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Logits for every token of (arbitrarily long) inputs, processed in chunks with retrieval.

    Args:
        tokens: (B, n) regular tokens (no landmarks; they are inserted here), right-padded.
        lengths: (B,) real tokens per row (default: all n).
        targets: also return the mean next-token loss over real positions (the last token of each row
            has no target).
        **session_kwargs: ``InferenceSession`` options (k, granularity, chunk_len, memory_device, ...).

    Returns:
        logits (B, n, vocab) at the regular tokens (logits[:, t] predicts token t + 1), and the loss or
        None.
    """
    batch, n = tokens.shape
    lengths = torch.full((batch,), n) if lengths is None else lengths.cpu().long()
    bs, lm = model.config.block_size, model.config.landmark_id
    stream = rows_with_landmarks(tokens, lengths, bs, lm)  # (B, n') right-padded
    stream_len = lengths + lengths // (bs - 1)
    session = InferenceSession(model, batch, **session_kwargs)
    logits_stream = session.feed(stream, stream_len)
    regular = torch.arange(stream.shape[1]) % bs != bs - 1
    logits = logits_stream[:, regular][:, :n]
    loss = None
    if targets:
        tgt = tokens[:, 1:].to(logits.device)
        valid = (torch.arange(n - 1)[None, :] < (lengths - 1)[:, None]).to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, reduction="none")
        loss = (ce * valid).sum() / valid.sum().clamp_min(1)
    return logits, loss


def rows_with_landmarks(tokens: Tensor, lengths: Tensor, block_size: int, landmark_id: int) -> Tensor:
    """(B, n) right-padded tokens -> (B, n') streams with landmarks, right-padded, row by row."""
    rows = [
        insert_landmarks(tokens[b, : int(lengths[b])], block_size, landmark_id)
        for b in range(tokens.shape[0])
    ]
    width = max(r.shape[0] for r in rows)
    out = torch.full((tokens.shape[0], width), landmark_id, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


@torch.no_grad()
def chunked_nll(
    model: GPT, tokens: Tensor, lengths: Tensor | None = None, **session_kwargs
) -> tuple[Tensor, Tensor]:
    """Next-token negative log-likelihood of long inputs, processed in chunks with retrieval.

    Memory stays O(chunk x vocab): logits are consumed chunk by chunk. Landmarks are inserted here
    and are not scored; the token before a landmark is scored on the token after it.

    Args:
        tokens: (B, n) regular tokens, right-padded; lengths: (B,) real tokens (default n).

    Returns:
        (nll_sum, count): (B,) float64 sums of -log p(token t+1 | tokens <= t) and (B,) numbers of
        scored tokens (length - 1 per row).
    """
    from landmark.data.landmarks import landmark_targets

    batch, n = tokens.shape
    lengths = torch.full((batch,), n) if lengths is None else lengths.cpu().long()
    bs, lm = model.config.block_size, model.config.landmark_id
    stream = rows_with_landmarks(tokens, lengths, bs, lm)
    stream_len = lengths + lengths // (bs - 1)
    targets = landmark_targets(stream, bs)  # next regular token; -100 at landmarks and the very end
    real = torch.arange(stream.shape[1])[None, :] < stream_len[:, None]
    targets = torch.where(real, targets, torch.full_like(targets, -100))
    # the last regular token of a shorter row would be scored on its padding: never score past the end
    last = torch.arange(stream.shape[1])[None, :] >= (stream_len - 1 - (stream_len % bs == 0).long())[:, None]
    targets = torch.where(last, torch.full_like(targets, -100), targets)
    session = InferenceSession(model, batch, **session_kwargs)
    nll = torch.zeros(batch, dtype=torch.float64)
    for c0, logits in session.iter_feed(stream, stream_len):
        tgt = targets[:, c0 : c0 + logits.shape[1]].to(logits.device)
        ce = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), tgt.clamp_min(0), reduction="none"
        )  # (B, c)
        nll += (ce * (tgt != -100)).sum(1).double().cpu()
    return nll, (lengths - 1).clamp_min(0)
