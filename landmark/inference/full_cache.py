"""A full key/value cache: the baseline that landmark retrieval is measured against.

``FullCache`` keeps every earlier position of every layer, ROTATED, in preallocated tensors
``(B, Hkv, max_len, D)``, and answers ``attend`` with ordinary causal attention over all of them, so
its cost grows with the context: a generated token reads all cached keys and values of every layer.
Pass it to ``GPT.forward(ids, cache=...)`` of a model with ``attention="full"`` (with any other kind
the weights load but the attention is not the one they were trained with). All rows of the batch share
one length (no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from landmark.model import apply_rope, rope_angles


class FullCache:
    """Rotated K/V of every layer for ``max_len`` positions.

    Args:
        n_layers: attention layers of the model.
        shape: (batch_size, kv_heads, max_len, head_dim) of each layer's keys and values; ``max_len``
            is the capacity in positions (prompt + generated tokens).
        rope_base: the model's RoPE base.
        dtype, device: of the model.
    """

    def __init__(
        self,
        n_layers: int,
        shape: tuple[int, int, int, int],
        *,
        rope_base: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        batch_size, _, max_len, _ = shape
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"need max_len >= 1 and batch_size >= 1; got {max_len}, {batch_size}")
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = [0] * n_layers  # positions held per layer (the same after every step)
        self.max_len, self.rope_base = max_len, rope_base

    @classmethod
    def for_model(cls, model, batch_size: int = 1, *, max_len: int) -> FullCache:
        """A cache with the geometry, dtype and device of a ``GPT``."""
        cfg, param = model.config, next(model.parameters())
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        return cls(cfg.n_layer, shape, rope_base=cfg.rope_base, dtype=param.dtype, device=param.device)

    @property
    def length(self) -> int:
        """Positions held (by the last layer)."""
        return self.lengths[-1]

    def nbytes(self) -> int:
        """Bytes of the K/V caches (all layers, full capacity)."""
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lengths: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """Causal attention of T new positions over every cached one: un-rotated q (B, H, T, D), k, v
        (B, Hkv, T, D) -> (B, H, T, D); they join the cache."""
        if lengths is not None and bool((lengths != q.shape[2]).any()):
            raise ValueError("FullCache rows must all have the same length (no padding)")
        t, start = q.shape[2], self.lengths[layer]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} needed")
        cos, sin = rope_angles(torch.arange(start, end, device=q.device), q.shape[-1], self.rope_base)
        self.keys[layer][:, :, start:end] = apply_rope(k, cos, sin)
        self.values[layer][:, :, start:end] = v
        mask = None
        if t > 1:  # new rows see the whole cache and, causally, each other
            mask = (
                torch.arange(end, device=q.device)[None, :]
                <= torch.arange(start, end, device=q.device)[:, None]
            )
        self.lengths[layer] = end
        return F.scaled_dot_product_attention(
            apply_rope(q, cos, sin), self.keys[layer][:, :, :end], self.values[layer][:, :, :end],
            attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
        )  # fmt: skip

    def fill_random(self, length: int, generator: torch.Generator | None = None) -> None:
        """Pretend ``length`` positions were prefilled: random keys/values (benchmarks of decode cost,
        which does not depend on the values)."""
        if length > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; got {length}")
        for k, v in zip(self.keys, self.values):
            k[:, :, :length].normal_(generator=generator)
            v[:, :, :length].normal_(generator=generator)
        self.lengths = [length] * len(self.keys)
