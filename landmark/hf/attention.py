"""Landmark attention behind transformers' attention interface (``attn_implementation="landmark"``).

transformers 5.x computes q, k and v in its own attention modules (projections, RoPE, the KV cache)
and hands them to a function looked up by name in ``AttentionInterface``. :func:`register` adds two
entries under the name ``"landmark"``:

* ``AttentionInterface["landmark"]`` = :func:`landmark_attention_forward`: calls
  :func:`landmark.landmark_attention` on the un-repeated GQA keys and values.
* ``AttentionMaskInterface["landmark"]`` = :func:`landmark_attention_mask`: landmark attention is causal
  by construction, so no mask tensor is built; the 2-D padding mask is only checked to be right-padded.

The block size is read from ``module.config.landmark_block_size`` at every call, so any module of a
converted model (see :func:`landmark.hf.convert`) carries what the function needs.

With a :class:`landmark.hf.LandmarkRetrievalCache` the call goes to the cache instead (top-k block
retrieval): the cache's ``update`` runs just before the attention function, and announces the exact
key tensor it returned with :func:`route_attention`; the function hands a call with that key tensor, in
that layer, to the cache. Any other cache (or none) keeps the behaviour described below.

Sequence layout the function relies on: key position ``p`` is a landmark iff
``p % block_size == block_size - 1``, counted from the first position of the sequence, and the
queries are the last ``q_len`` of the ``k_len`` keys. A full forward and a decode step with a
``DynamicCache`` (which holds every earlier position) satisfy it; packed sequences, left padding and
caches that hold only a window or a pre-allocated buffer (``StaticCache``, sliding-window caches) do
not, and are refused with an error where they can be recognised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

from landmark.ops.attention import landmark_attention
from landmark.optional import require

ATTN_IMPLEMENTATION = "landmark"  # the name under which the functions are registered
# (layer index, key tensor, handler) announced by a cache's update for the attention call that follows it
_route = threading.local()

AttentionHandler = Callable[..., Tensor]  # (module, query, key, value, scaling, position_ids) -> (B, H, T, D)


def route_attention(layer_idx: int, key: Tensor, handler: AttentionHandler) -> None:
    """Send the next landmark attention call of layer ``layer_idx`` whose key IS ``key`` to ``handler``.

    A cache calls this from ``update``; :func:`landmark_attention_forward` then returns
    ``handler(module, query, key, value, scaling, position_ids)`` (transposed to (B, T, H, D)) instead
    of attending over ``key`` itself. The identity check ties the route to exactly that call. A route
    of the same cache still pending when it announces one for a later layer means the attention
    function was bypassed (a model not using ``attn_implementation="landmark"``): that raises instead
    of silently attending to the new positions only. (A route left over by an interrupted forward is
    simply replaced.)
    """
    pending = getattr(_route, "value", None)
    owner = getattr(handler, "__self__", handler)
    if (
        pending is not None
        and getattr(pending[2], "__self__", pending[2]) is owner
        and layer_idx > pending[0]
    ):
        _route.value = None
        raise RuntimeError(
            f"layer {pending[0]}'s attention did not go through the {ATTN_IMPLEMENTATION!r} attention "
            "function: a LandmarkRetrievalCache needs model.config._attn_implementation == 'landmark' "
            "(load the model with landmark.hf.load_pretrained)"
        )
    _route.value = (layer_idx, key, handler)


def _take_route(module: nn.Module, key: Tensor) -> AttentionHandler | None:
    """The handler announced for this call (and forget it), or None."""
    pending = getattr(_route, "value", None)
    if pending is None or pending[1] is not key or pending[0] != getattr(module, "layer_idx", None):
        return None
    _route.value = None
    return pending[2]


def landmark_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function: landmark attention on one layer's q, k, v.

    Args:
        module: the calling attention module; ``module.config.landmark_block_size`` is the block size.
        query: (batch, heads, q_len, head_dim), RoPE applied.
        key: (batch, kv_heads, k_len, head_dim), RoPE applied, not repeated for GQA; the cache's
            content when decoding (``k_len >= q_len``, the queries being the last ``q_len`` positions).
        value: (batch, kv_heads, k_len, head_dim).
        attention_mask: must be None: the ``"landmark"`` mask function never builds one. A 4-D mask
            passed by the caller cannot be honoured and is refused.
        scaling: the score scale (the model's ``head_dim ** -0.5`` unless configured otherwise).
        dropout: attention dropout; only 0 is supported.
        **kwargs: what the model passes along. ``position_ids`` (batch, q_len), when present, is checked
            (in layer 0) to be ``k_len - q_len ... k_len - 1`` for every row. ``sliding_window`` is
            ignored: landmark attention replaces sliding-window attention.

    Returns:
        ``(out, None)``: out is (batch, q_len, heads, head_dim), the layout transformers expects; no
        attention weights.

    Raises:
        ValueError: a 4-D attention mask, dropout > 0 in training, or position ids that do not start at
            position 0 of the keys (packed sequences, left padding, a windowed or static cache).
    """
    block_size = getattr(module.config, "landmark_block_size", None)
    if block_size is None:
        raise ValueError(
            "attn_implementation='landmark' needs config.landmark_block_size: convert the model with "
            "landmark.hf.convert or load it with landmark.hf.load_pretrained"
        )
    if attention_mask is not None:
        raise ValueError(
            "landmark attention builds its own causal block structure and cannot apply a custom "
            f"{attention_mask.dim()}-D attention mask; pass a 2-D right-padded padding mask or none"
        )
    if dropout and module.training:
        raise ValueError(f"landmark attention does not implement attention dropout; got dropout={dropout}")
    position_ids = kwargs.get("position_ids")
    handler = _take_route(module, key)
    if handler is not None:  # a LandmarkRetrievalCache: top-k retrieval over its block memory
        query, key, value = _common_dtype(query, key, value)
        out = handler(module, query, key, value, scaling, position_ids)  # (B, H, Tq, D)
        return out.transpose(1, 2).contiguous(), None
    if position_ids is not None and getattr(module, "layer_idx", 0) == 0:
        _check_positions(position_ids, query.shape[2], key.shape[2])
    query, key, value = _common_dtype(query, key, value)
    out = landmark_attention(query, key, value, int(block_size), scale=scaling)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def landmark_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> None:
    """The ``AttentionMaskInterface`` function: check the padding mask, build nothing.

    Args:
        attention_mask: (batch, kv_len) bool padding mask or None. Each row must be ones then zeros
            (right padding): padding at the end cannot change the outputs of the tokens before it, since
            landmark attention is causal. The other arguments are those of transformers' mask functions
            and are not used.

    Returns:
        None: the attention function needs no mask tensor.

    Raises:
        ValueError: some row has a padded position before a real one (left padding, or holes; also what
            batched generation of prompts of different lengths produces).
    """
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] > 1:
        mask = attention_mask.bool()
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError(
                "landmark attention needs right-padded batches (each attention_mask row: ones, then zeros); "
                "this mask has padding before real tokens (left padding, or padded prompts of different "
                "lengths being extended by generate). Pad on the right (tokenizer.padding_side = 'right') "
                "and generate one prompt at a time"
            )
    return None


def register() -> None:
    """Register :func:`landmark_attention_forward` and :func:`landmark_attention_mask` as ``"landmark"``.

    Idempotent; needed once per process before a model uses ``attn_implementation="landmark"``
    (:func:`landmark.hf.convert` and :func:`landmark.hf.load_pretrained` call it).
    """
    transformers = require("transformers")
    masking_utils = require("transformers.masking_utils")

    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, landmark_attention_forward)
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, landmark_attention_mask)


def _check_positions(position_ids: Tensor, q_len: int, k_len: int) -> None:
    """Raise unless every row of ``position_ids`` (batch, q_len) is ``k_len - q_len ... k_len - 1``."""
    if torch.compiler.is_compiling():
        return
    expected = torch.arange(k_len - q_len, k_len, device=position_ids.device)
    if position_ids.shape[-1] != q_len or not bool((position_ids == expected).all()):
        if q_len > 1 and not bool(position_ids.any()):  # the reader's zeros, its cache lost on the way
            raise ValueError(
                "position ids of zeros (LandmarkRetrievalCache.unrotated_position_ids) need the retrieval "
                "cache, which did not reach this attention call: pass it with landmark.hf.forward_cached("
                "model, ids, cache) (the forward of transformers before 5.2x names it past_key_values)"
            )
        first = position_ids.reshape(-1, position_ids.shape[-1])[:, :1].flatten().tolist()
        raise ValueError(
            f"landmark attention needs queries at positions {k_len - q_len}..{k_len - 1} (the last {q_len} "
            f"of {k_len} keys, counted from the start of the sequence); got position_ids starting at "
            f"{first[:8]}. Packed sequences, left padding and static or sliding-window caches are not "
            "supported: use right padding and a DynamicCache"
        )


def _common_dtype(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in one dtype: autocast's when it is on (RoPE may have promoted q and k), else q's."""
    if query.dtype == key.dtype == value.dtype:
        return query, key, value
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)
