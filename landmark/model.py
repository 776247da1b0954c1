"""A GPT-style decoder whose attention is landmark attention, with two baselines from the same code.

``attention`` selects how a layer attends (everything else is shared):

* ``"landmark"``: the grouped softmax of ``landmark_attention`` over windows that carry a landmark
  token at the end of every block (docs/method.md, "Training: the grouped softmax");
* ``"full"``: ordinary causal attention (no landmarks), the baseline trained at the same length;
* ``"xl"``: Transformer-XL-style segment recurrence: the window is cut into segments of ``xl_segment``
  positions and each segment attends to itself (causally) plus a cache of the previous segment's keys
  and values, with no gradient through the cache.

Architecture: token embedding (tied with the output layer), ``n_layer`` pre-norm blocks
(RMSNorm -> attention -> residual, RMSNorm -> GELU MLP -> residual), final RMSNorm; no biases; rotary
position embeddings computed in float32; grouped-query attention when ``n_kv_head < n_head``.
Keys are produced before RoPE by ``Attention.project`` so that inference can store them without
absolute positions and re-position retrieved blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from landmark.config import DEFAULT_BLOCK_SIZE, IMPLEMENTATIONS
from landmark.ops import landmark_attention

ATTENTION_KINDS = ("landmark", "full", "xl")


class Cache(Protocol):
    """What a layer hands its new positions to at inference (``landmark.inference.RetrievalCache``,
    ``landmark.inference.FullCache``): un-rotated q (B, H, T, D), k, v (B, Hkv, T, D), real positions
    per row (B,) -> attention outputs (B, H, T, D)."""

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None
    ) -> Tensor: ...


IGNORE_INDEX = -100  # targets with this value are not scored (landmark positions)


MODEL_SIZES = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio", "seq_len")  # each >= 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_finite_real(x: Any) -> bool:
    """A finite real number (a range check alone lets inf and NaN through)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def first_failure(checks: list[tuple[bool, str, Any]]) -> str | None:
    """``"<name> must be <expected>; got <value>"`` for the first failed ``(ok, "<name> must be ...",
    value)`` check (``"... and finite"`` when the value is infinite or NaN), or None."""
    for ok, expected, value in checks:
        if not ok:
            finite = "" if not isinstance(value, float) or math.isfinite(value) else " and finite"
            return f"{expected}{finite}; got {value!r}"
    return None


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # tokenizer vocabulary, end-of-text and landmark tokens included
    n_layer: int = 6  # number of transformer blocks
    n_head: int = 8  # query heads per layer
    n_kv_head: int = 8  # key/value heads; fewer than n_head = grouped-query attention
    n_embd: int = 256  # model width; head_dim = n_embd // n_head
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    seq_len: int = 512  # training window in positions, landmarks included
    attention: str = "landmark"  # "landmark" | "full" | "xl"
    block_size: int = DEFAULT_BLOCK_SIZE  # landmark: positions per block, landmark included (63 + 1)
    landmark_id: int = -1  # landmark: token id of the landmark (set from the tokenizer)
    xl_segment: int = 256  # xl: segment length; each segment also sees the previous segment's cache
    rope_base: float = 10000.0  # rotary embedding base
    dropout: float = 0.0  # dropout on attention output and MLP output (0 = off)
    attn_impl: str = "auto"  # landmark_attention implementation: auto | blockwise | triton | reference

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def value_checks(self) -> list[tuple[bool, str, Any]]:
        """(ok, "<field> must be <expected>", value) for every field with a range: sizes >= 1, a finite
        positive RoPE base, dropout in [0, 1), a known attention implementation."""
        checks = [(_is_int(getattr(self, k)) and getattr(self, k) >= 1, f"{k} must be an integer >= 1",
                   getattr(self, k)) for k in MODEL_SIZES]  # fmt: skip
        real = is_finite_real
        checks += [
            (real(self.rope_base) and self.rope_base > 0, "rope_base must be > 0", self.rope_base),
            (real(self.dropout) and 0 <= self.dropout < 1, "dropout must be in [0, 1)", self.dropout),
            (self.attn_impl in IMPLEMENTATIONS, f"attn_impl must be one of {', '.join(IMPLEMENTATIONS)}",
             self.attn_impl),
        ]  # fmt: skip
        return checks

    def validate(self) -> None:
        """Raise ValueError with a one-line explanation for an inconsistent configuration."""
        failure = first_failure(self.value_checks())
        if failure:
            raise ValueError(failure)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {self.attention!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = n_embd / n_head must be even for rotary embeddings; got {self.head_dim}"
            )
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.attention == "landmark":
            if self.block_size < 2:
                raise ValueError(f"block_size must be >= 2 (tokens + 1 landmark); got {self.block_size}")
            if self.seq_len % self.block_size:
                raise ValueError(
                    f"block_size ({self.block_size}) must divide seq_len ({self.seq_len}) so that "
                    "training windows are whole blocks"
                )
            if not 0 <= self.landmark_id < self.vocab_size:
                raise ValueError(
                    f"landmark_id must be a token id in [0, vocab_size={self.vocab_size}); "
                    f"got {self.landmark_id}"
                )
        if self.attention == "xl" and (self.xl_segment < 1 or self.seq_len % self.xl_segment):
            raise ValueError(f"xl_segment ({self.xl_segment}) must divide seq_len ({self.seq_len})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles, float32: (..., T, head_dim // 2) for integer positions (..., T)."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by the angles; computed in float32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)  # (B, H, T, D/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention of one of the three kinds."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values BEFORE rotary embedding: (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(batch, length, 2, self.n_kv_head, self.head_dim).unbind(dim=2)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def merge(self, y: Tensor) -> Tensor:
        """(B, H, T, D) attention output -> (B, T, n_embd) after the output projection."""
        batch, _, length, _ = y.shape
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(batch, length, -1)))

    def forward(self, x: Tensor, cache: Cache | None = None, lengths: Tensor | None = None) -> Tensor:
        """x: (B, T, n_embd) -> (B, T, n_embd).

        Without a cache, x is a training window starting at position 0. With one, x holds the next
        positions of each stream (``lengths`` (B,) real ones, right padding) and the cache attends:
        ``cache.attend(layer, q, k, v, lengths)`` with un-rotated q, k, v (a
        ``landmark.inference.RetrievalCache`` for landmark models, a ``FullCache`` for the baseline).
        """
        cfg = self.cfg
        q, k, v = self.project(x)
        if cache is not None:
            return self.merge(cache.attend(self.layer_idx, q, k, v, lengths))
        if cfg.attention == "xl":
            return self.merge(self._xl(q, k, v))
        cos, sin = rope_angles(torch.arange(x.shape[1], device=x.device), self.head_dim, cfg.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.attention == "landmark":
            y = landmark_attention(q, k, v, cfg.block_size, impl=cfg.attn_impl)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
            )
        return self.merge(y)

    def _xl(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Segment recurrence over the window: (B, H, T, D) inputs (pre-RoPE) -> (B, H, T, D)."""
        seg = self.cfg.xl_segment
        outs = []
        cache_k = cache_v = None
        for start in range(0, q.shape[2], seg):
            qs, ks, vs = (
                q[:, :, start : start + seg],
                k[:, :, start : start + seg],
                v[:, :, start : start + seg],
            )
            outs.append(xl_segment_attention(qs, ks, vs, cache_k, cache_v, self.cfg.rope_base))
            cache_k, cache_v = ks.detach(), vs.detach()  # no gradient through the cache
        return torch.cat(outs, dim=2)


def xl_segment_attention(
    q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor | None, cache_v: Tensor | None, rope_base: float
) -> Tensor:
    """One Transformer-XL segment: queries (B, H, S, D) over [cache (B, Hkv, C, D); segment], causal.

    All inputs are un-rotated; positions are local (cache at 0..C-1, segment at C..C+S-1), which is
    exact for rotary embeddings because they only see relative positions.
    """
    if cache_k is not None:
        k, v = torch.cat((cache_k, k), dim=2), torch.cat((cache_v, v), dim=2)
    seg, keys = q.shape[2], k.shape[2]
    cos, sin = rope_angles(torch.arange(keys, device=q.device), q.shape[-1], rope_base)
    q, k = apply_rope(q, cos[keys - seg :], sin[keys - seg :]), apply_rope(k, cos, sin)
    allowed = (
        torch.arange(keys, device=q.device)[None, :]
        <= torch.arange(keys - seg, keys, device=q.device)[:, None]
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = nn.RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: Cache | None = None, lengths: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, lengths)
        return x + self.mlp(self.norm2(x))


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, vocab_size)
    loss: Tensor | None = None  # mean cross-entropy over scored positions (targets != IGNORE_INDEX)


class GPT(nn.Module):
    """Decoder-only language model; ``config.attention`` picks landmark, full or xl attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("out_proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, h: Tensor) -> Tensor:
        """Final norm and the tied output layer: (B, T, n_embd) -> (B, T, vocab_size)."""
        return F.linear(self.norm(h), self.embed.weight)

    def hidden_states(
        self, input_ids: Tensor, cache: Cache | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """(B, T) token ids -> (B, T, n_embd) outputs of the last block (before the final norm).

        ``cache``, ``lengths``: the ids continue the streams held by the cache (see ``forward``).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length); got {tuple(input_ids.shape)}")
        if cache is not None and self.config.attention == "xl":
            raise ValueError("xl models read long inputs segment by segment (landmark.eval); no cache")
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, cache, lengths)
        return h

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        cache: Cache | None = None,
        lengths: Tensor | None = None,
        logits_at: Tensor | None = None,
    ) -> ModelOutput:
        """Logits (and the loss) of a training window, or of the next positions of cached streams.

        Args:
            input_ids: (B, T) int64; without a cache T <= seq_len and the window starts at position 0
                (landmarks already inserted for "landmark").
            targets: (B, T); entries equal to IGNORE_INDEX (landmark positions) are not scored.
            cache: continue the streams it holds: a ``landmark.inference.RetrievalCache`` (landmark
                models: top-k block retrieval) or a ``landmark.inference.FullCache`` (full attention
                over every earlier position); the new positions join it.
            lengths: (B,) real positions per row of ``input_ids`` (right padding), with a cache.
            logits_at: (B,) one position per row: return only its logits, (B, 1, vocab) (reading a
                long prompt needs the last position's only; the others cost a vocab-size projection).
        """
        h = self.hidden_states(input_ids, cache, lengths)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at.to(h.device)][:, None]
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return ModelOutput(logits=logits, loss=loss)
