"""Decoding with a full key/value cache: the baseline that landmark retrieval is measured against.

``FullCacheDecoder`` runs a ``GPT`` (any attention kind is accepted for the weights, but the step is
ordinary causal attention, so it reproduces ``GPT.forward`` only for ``attention="full"``) over a
preallocated per-layer cache of ROTATED keys and values, ``(B, Hkv, max_len, D)``. Every step attends
to every cached position, so its cost grows with the context: a generated token reads all cached keys
and values of every layer. All rows of the batch share one length (no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from landmark.model import GPT, apply_rope, rope_angles


class FullCacheDecoder:
    """A GPT plus preallocated rotated K/V caches for ``max_len`` positions.

    Args:
        model: a ``GPT`` (``attention="full"`` for results equal to ``GPT.forward``).
        batch_size: rows decoded together (all of the same length).
        max_len: cache capacity in positions (prompt + generated tokens).
    """

    def __init__(self, model: GPT, batch_size: int = 1, *, max_len: int):
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"need max_len >= 1 and batch_size >= 1; got {max_len}, {batch_size}")
        self.model, self.config = model, model.config
        param = next(model.parameters())
        cfg = self.config
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.device = param.device

    def nbytes(self) -> int:
        """Bytes of the K/V caches (all layers, full capacity)."""
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    @torch.no_grad()
    def feed(self, ids: Tensor) -> Tensor:
        """Append positions to every row and return their logits.

        Args:
            ids: (B, T) token ids continuing each row (T = 1 when decoding, a whole prompt to prefill).

        Returns:
            (B, T, vocab) logits.
        """
        batch, t = ids.shape
        if batch != self.batch_size:
            raise ValueError(f"ids must have {self.batch_size} rows; got {batch}")
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} needed")
        cfg, model = self.config, self.model
        cos, sin = rope_angles(torch.arange(start, end, device=self.device), cfg.head_dim, cfg.rope_base)
        mask = None
        if t > 1:  # new rows see the whole cache and, causally, each other
            mask = (
                torch.arange(end, device=self.device)[None, :]
                <= torch.arange(start, end, device=self.device)[:, None]
            )
        h = model.embed(ids.to(self.device))  # (B, T, E)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.project(block.norm1(h))  # (B, H, T, D), (B, Hkv, T, D) x2
            self.keys[layer][:, :, start:end] = apply_rope(k, cos, sin)
            self.values[layer][:, :, start:end] = v
            y = F.scaled_dot_product_attention(
                apply_rope(q, cos, sin),
                self.keys[layer][:, :, :end],
                self.values[layer][:, :, :end],
                attn_mask=mask,
                enable_gqa=cfg.n_kv_head != cfg.n_head,
            )  # (B, H, T, D)
            h = h + attn.merge(y)
            h = h + block.mlp(block.norm2(h))
        self.length = end
        return model.logits(h)

    def fill_random(self, length: int, generator: torch.Generator | None = None) -> None:
        """Pretend ``length`` positions were prefilled: random keys/values (benchmarks of decode cost,
        which does not depend on the values)."""
        if length > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; got {length}")
        for k, v in zip(self.keys, self.values):
            k[:, :, :length].normal_(generator=generator)
            v[:, :, :length].normal_(generator=generator)
        self.length = length
