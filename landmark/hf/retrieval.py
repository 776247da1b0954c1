"""Long-context inference for converted Hugging Face models: block memory + top-k landmark retrieval.

:class:`LandmarkRetrievalCache` is a transformers ``Cache``: pass it to ``model(...)`` or to
``model.generate(...)`` instead of a ``DynamicCache``. Per layer it keeps what docs/method.md
asks for, through the project's one implementation of each piece (:mod:`landmark.inference`):

* a :class:`~landmark.inference.BlockMemory` of the complete blocks (keys without absolute positions; block
  contents on ``memory_device``, e.g. CPU RAM, the landmark keys next to the queries; optional
  ``max_blocks`` cap with FIFO eviction);
* the incomplete tail block;
* top-k retrieval (:func:`~landmark.inference.retrieval_attention` with
  :func:`~landmark.inference.select_blocks` and the "stingy" position mapping), configured by a
  :class:`~landmark.inference.RetrievalConfig` (k, granularity, search).

How it plugs in. transformers' attention modules apply RoPE, call ``cache.update(k, v, layer_idx)``,
then the attention function registered as ``"landmark"``
(:func:`landmark.hf.attention.landmark_attention_forward`).
``update`` stores nothing yet: it returns the new keys and values unchanged and asks the attention
function (:func:`landmark.hf.attention.route_attention`) to hand exactly this layer call to the cache.
The cache then

1. un-rotates the queries and keys (the inverse rotation at their ``position_ids``, with the model's
   ``rope_theta``; transformers uses the rotate-half layout, the same as :func:`landmark.model.apply_rope`),
   which is exact up to float rounding for the plain RoPE of LLaMA-family models (``rope_type ==
   "default"``; other RoPE variants are refused);
2. processes the new positions in chunks of ``chunk_len`` (a whole prompt given to one forward, as
   ``model.generate`` does, is processed chunk by chunk inside each layer, which computes the same as
   feeding the chunks one forward at a time);
3. calls :func:`~landmark.inference.retrieval_attention` (``rope_base = rope_theta``) over the retrieved
   blocks, the tail and the chunk, and moves the chunk's complete blocks into the memory.

Positions. The model is given the true stream positions, or all zeros (``unrotated_position_ids``,
what :func:`landmark.hf.generate.hf_reader` does: RoPE at position 0 is the identity, so the
rotation by the model and the un-rotation of step 1 are both skipped) (``position_ids`` = ``0, 1, 2, ...``
counted from the start of the stream, landmarks included; ``get_seq_length`` returns the stream length). The
re-placing of retrieved blocks in a short prefix happens inside ``retrieval_attention``, on un-rotated
queries and keys, so positions beyond ``max_position_embeddings`` never reach the model's RoPE
during attention. Every row of a batch must have the same length (no padding).

Landmarks. The caller feeds them at positions ``p % block_size == block_size - 1``, as in training.
:func:`landmark.hf.generate` does it; with ``model.generate``, insert them into the prompt and add
:class:`LandmarkLogitsProcessor`, which makes the landmark the "generated" token at every landmark
position and then continues from the output of the token before it (the landmark's own output is
discarded, as in training, where landmarks are not targets).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import Tensor
from transformers import Cache, LogitsProcessor
from transformers.cache_utils import CacheLayerMixin

from landmark.fingerprint import weights_fingerprint
from landmark.hf.attention import ATTN_IMPLEMENTATION, route_attention
from landmark.hf.convert import landmark_token_id
from landmark.inference.cache import CacheOptions, RetrievalCache, check_landmark_positions
from landmark.inference.retrieval import RetrievalConfig
from landmark.inference.session import retrieval_config
from landmark.inference.weights import weights_of
from landmark.model import apply_rope, rope_angles

_UNROTATED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()  # zero position ids


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The keyword of ``model_class.forward`` that takes a cache (see :func:`forward_cached`)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_cached(
    model: Any, input_ids: Tensor, cache: Cache, *, check_landmarks: bool = True, **kwargs: Any
) -> Any:
    """``model(input_ids, <cache keyword>=cache, use_cache=True, **kwargs)``: one forward that reads and
    extends ``cache``, whatever this transformers version calls the argument (``cache`` from 5.2x on,
    ``past_key_values`` before; an unknown keyword is silently dropped into ``**kwargs`` by the model,
    which would then attend without the cache: the first GPU evaluation, under transformers 5.17,
    failed that way).

    Args:
        model: a causal LM; input_ids: (B, T) on the model's device; cache: a ``Cache`` (a
            :class:`LandmarkRetrievalCache` or a ``DynamicCache``); kwargs: further forward arguments.
        check_landmarks: with a retrieval cache, check that ``input_ids`` hold the landmarks where the
            stream needs them (:meth:`LandmarkRetrievalCache.check_landmarks`; on a GPU it costs one host
            synchronisation per forward); False for ids built by the library (``landmark_stream``,
            ``generate``).

    Returns:
        The model's output (``.logits``: (B, T or logits_to_keep, vocab)).

    Raises:
        ValueError: ``cache`` retrieves and ``input_ids`` lack a landmark where the stream needs one (or
            hold one elsewhere): insert them (``landmark.hf.generate`` does).
        RuntimeError: the forward did not extend ``cache`` (the model does not use it).
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, T) tensor of token ids with T >= 1; got {shape}")
    before = cache.get_seq_length()
    if check_landmarks and isinstance(cache, LandmarkRetrievalCache):
        cache.check_landmarks(input_ids)
    out = model(input_ids=input_ids, use_cache=True, **{_cache_keyword(type(model)): cache}, **kwargs)
    if cache.get_seq_length() != before + input_ids.shape[1]:
        raise RuntimeError(
            f"{type(model).__name__} did not use the cache it was given (its length stayed "
            f"{cache.get_seq_length()}, expected {before + input_ids.shape[1]}): this transformers version "
            "passes caches under another keyword"
        )
    return out


def rope_theta(config: Any) -> float:
    """The base of a config's plain RoPE; ValueError for any other RoPE variant (scaled, partial, ...).

    Retrieval re-positions blocks by rotating un-rotated keys again: only the plain rotation
    ``angle = position * theta ** (-2i / head_dim)`` over the whole head can be undone and redone.
    """
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", scaling.get("rope_type", scaling.get("type"))))
    if rope_type not in (None, "default"):
        raise ValueError(
            f"retrieval needs plain RoPE (rope_type 'default'); this model uses rope_type {rope_type!r}, "
            "whose positions cannot be re-mapped by rotating keys again. Use a model without RoPE scaling"
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"retrieval needs RoPE over the whole head; partial_rotary_factor is {partial}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the config holds no rope_theta: retrieval needs a RoPE model")
    return float(theta)


def unrotate(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Undo the rotary embedding of ``x`` (B, heads, T, D) applied at ``positions`` (B or 1, T).

    The inverse rotation (angle ``-position * inv_freq``) in the rotate-half layout of transformers'
    ``apply_rotary_pos_emb`` and :func:`landmark.model.apply_rope`; computed in float32, returned in
    ``x.dtype``.
    """
    cos, sin = rope_angles(positions, x.shape[-1], base)  # (B, T, D/2)
    return apply_rope(x, cos[:, None], -sin[:, None])


class _RetrievalLayer(CacheLayerMixin):
    """transformers' view of one layer: its state lives in the shared ``RetrievalCache``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, stream: RetrievalCache, layer_idx: int) -> None:
        super().__init__()
        self.stream, self.layer_idx = stream, layer_idx

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Return the new keys and values unchanged; the attention call stores them (see the module)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        length = self.stream.seq_length(self.layer_idx).tolist()  # host integers: no device read
        return length[0] if length else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False

    def offload(self) -> None:  # block contents already live on ``memory_device``
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LandmarkRetrievalCache cannot be cropped (its memory is append-only)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("LandmarkRetrievalCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            raise NotImplementedError("LandmarkRetrievalCache cannot expand a filled cache")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("LandmarkRetrievalCache cannot select batch rows")


class LandmarkRetrievalCache(Cache):
    """A transformers ``Cache`` that answers every query with top-k block retrieval through the landmarks.

    A thin adapter: the stream state (block memories, tails, lengths) and the attention are the
    library's one implementation, :class:`landmark.inference.RetrievalCache`, which the library's own
    ``GPT`` uses too; this class un-rotates what transformers' attention modules computed and hands it
    over.

    Args:
        model: a converted model (:func:`landmark.hf.convert` / :func:`landmark.hf.load_pretrained`),
            or its config.
        retrieval: k, granularity, search, kernel (default ``RetrievalConfig()``: k = 4, per token and
            head); or its fields as keywords (``k=4``).
        **options: the cache's options (:class:`landmark.inference.CacheOptions`) by name:
            ``chunk_len`` (positions of a long input processed at once, the paper: 250 tokens; at least
            one block), ``memory_device`` (where block contents live, default the model's device, e.g.
            ``"cpu"``), ``max_blocks`` (a cap on the blocks kept per stream and layer, None: unlimited)
            and ``evict`` (FIFO eviction of the oldest block at the cap, or an error:
            :class:`landmark.inference.MemoryFullError`); and the retrieval fields when ``retrieval``
            is not given.

    Attributes:
        stream: the :class:`landmark.inference.RetrievalCache` holding the state.
        stats: :class:`landmark.inference.retrieval.StepStats`, what the attention read (summed over
            layers and steps): landmarks scored, blocks fetched, local positions.

    Raises:
        ValueError: the model is not a landmark model or does not use the ``"landmark"`` attention;
            its RoPE is not plain (see :func:`rope_theta`); ``chunk_len`` shorter than a block; a bad
            retrieval setting (k < 1, unknown granularity, ...).
    """

    def __init__(
        self,
        model: Any,
        retrieval: RetrievalConfig | None = None,
        **options: Any,
    ) -> None:
        config = getattr(model, "config", model)
        block_size = getattr(config, "landmark_block_size", None)
        if block_size is None:
            raise ValueError(
                "LandmarkRetrievalCache needs a landmark model: convert it with landmark.hf.convert"
            )
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"LandmarkRetrievalCache works through the {ATTN_IMPLEMENTATION!r} attention; this model "
                f"uses {getattr(config, '_attn_implementation', None)!r} (load it with "
                "landmark.hf.load_pretrained)"
            )
        self.rope_base = rope_theta(config)
        self.block_size = int(block_size)
        self.landmark_id = int(config.landmark_token_id)
        cache_options, retrieval_fields = CacheOptions.pick(options)
        self.retrieval = retrieval_config(retrieval, **retrieval_fields)
        self.stream = RetrievalCache(
            config.num_hidden_layers, block_size=self.block_size, rope_base=self.rope_base,
            retrieval=self.retrieval, options=cache_options,
        )  # fmt: skip
        super().__init__(layers=[_RetrievalLayer(self.stream, i) for i in range(config.num_hidden_layers)])
        self._checked: tuple[Tensor, bool] | None = None  # the last position ids read, and whether zeros

    @property
    def stats(self):
        return self.stream.stats

    def check_landmarks(self, input_ids: Tensor) -> None:
        """The landmark token sits exactly at the stream positions ``p % block_size == block_size - 1`` of
        ``input_ids`` (B, T), which continue this cache: a ValueError naming the row and position else
        (without landmarks retrieval reads blocks with no address and answers silently wrong)."""
        batch, t = input_ids.shape
        start = torch.full((batch,), self.get_seq_length())
        check_landmark_positions(input_ids.cpu(), torch.full((batch,), t), start, self.block_size,
                                 self.landmark_id)  # fmt: skip

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Called by the attention module after RoPE: route this layer's attention call to :meth:`attend`.

        Args:
            key_states, value_states: (B, Hkv, T, D) the new positions (keys rotated).

        Returns:
            The same tensors: the landmark attention function recognises them and calls :meth:`attend`.
        """
        self.layers[layer_idx].update(key_states, value_states)
        route_attention(layer_idx, key_states, self.attend)
        return key_states, value_states

    def attend(
        self,
        module: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        scaling: float | None,
        position_ids: Tensor | None,
    ) -> Tensor:
        """Retrieval attention of one layer for the new positions, and their insertion into the memory.

        Args:
            module: the attention module (``module.layer_idx``).
            query: (B, H, T, D) rotated at ``position_ids``; key, value: (B, Hkv, T, D), keys rotated.
            scaling: the score scale (default ``D ** -0.5``).
            position_ids: (B or 1, T) must be the stream positions ``length .. length + T - 1``.

        Returns:
            (B, H, T, D) attention outputs.
        """
        layer_idx = int(module.layer_idx)
        t = query.shape[2]
        length = self.layers[layer_idx].get_seq_length()
        if position_ids is not None and position_ids.shape[-1] == t and self._unrotated(position_ids):
            # unrotated_position_ids: RoPE at position 0 is the identity, q and k arrive un-rotated
            return self.stream.attend(layer_idx, query, key, value, None, scaling)
        positions = torch.arange(length, length + t, device=query.device)[None]  # (1, T)
        if position_ids is not None and (
            position_ids.shape[-1] != t or not bool((position_ids == positions).all())
        ):
            starts = position_ids.reshape(-1, position_ids.shape[-1])[:, 0].tolist()[:8]
            raise ValueError(
                f"LandmarkRetrievalCache needs the stream positions {length}..{length + t - 1} "
                f"(every row the same, no padding), or all zeros (unrotated_position_ids); got "
                f"position_ids starting at {starts}"
            )
        q = unrotate(query, positions, self.rope_base)  # (B, H, T, D)
        k = unrotate(key, positions, self.rope_base)  # (B, Hkv, T, D)
        return self.stream.attend(layer_idx, q, k, value, None, scaling)

    @staticmethod
    def unrotated_position_ids(t: int, device: torch.device | str | None = None) -> Tensor:
        """(1, t) zeros: position ids to give the model with this cache so that its RoPE is the identity.

        The cache re-positions queries and keys itself and needs them un-rotated; with the true stream
        positions it un-rotates what the model rotated (:func:`unrotate`), with zeros both rotations are
        skipped (rotation at position 0 is the identity) and the outputs are the same up to float
        rounding. :func:`landmark.hf.generate.hf_reader` passes them.
        """
        zeros = torch.zeros(1, t, dtype=torch.long, device=device)
        _UNROTATED[id(zeros)] = zeros  # known to be zeros: no layer needs to read them back to check
        return zeros

    def _unrotated(self, position_ids: Tensor) -> bool:
        """Whether ``position_ids`` are all zeros: known without reading them for those made by
        ``unrotated_position_ids``; other tensors are read once (every layer of a step gets the same)."""
        if _UNROTATED.get(id(position_ids)) is position_ids:
            return True
        if self._checked is None or self._checked[0] is not position_ids:
            self._checked = (position_ids, not bool(position_ids.any()))
        return self._checked[1]

    def save_state(self, path: Any, model: Any, *, overwrite: bool = False) -> None:
        """Save what the cache has read (block memories, tails, positions) to ``path`` (safetensors,
        atomic), tied to ``model``'s weights: see :meth:`landmark.inference.RetrievalCache.save` (an
        existing file other than a saved state is refused unless ``overwrite``)."""

        self.stream.save(path, weights_fingerprint(model), overwrite=overwrite, weights=weights_of(model))

    def load_state(self, path: Any, model: Any) -> None:
        """Continue from a state saved by :meth:`save_state` for the same weights (this cache must be new)."""

        device = model.get_input_embeddings().weight.device
        self.stream.load(path, weights_fingerprint(model), device, weights=weights_of(model))

    def reset(self) -> None:
        """Forget every stream (the cache can then serve a new batch)."""
        super().reset()
        self.stream.reset()


class LandmarkLogitsProcessor(LogitsProcessor):
    """Landmarks in ``model.generate``: forced at landmark positions, never sampled elsewhere.

    When the next stream position is a landmark position (``p % block_size == block_size - 1``,
    ``p = input_ids.shape[1]``; the prompt must hold its landmarks, see
    :func:`landmark.data.insert_landmarks`), every row's scores become "the landmark, surely", and the
    current scores (the prediction of the token that follows the landmark) are kept. At the next step,
    whose scores come from the landmark's own output, the kept scores are returned instead: the token
    after a landmark is predicted by the token before it, as in training. Everywhere else the landmark
    id is masked out.

    One processor serves one ``generate`` call (it holds the kept scores); rows must have equal lengths.
    Generated sequences include the landmarks (``decode(..., skip_special_tokens=True)`` drops them) and
    ``max_new_tokens`` counts them.
    """

    def __init__(self, block_size: int, landmark_id: int) -> None:
        self.block_size, self.landmark_id = int(block_size), int(landmark_id)
        self._kept: Tensor | None = None

    @classmethod
    def for_model(cls, model: Any) -> LandmarkLogitsProcessor:
        """The processor for a converted model (its block size and landmark id)."""

        return cls(int(model.config.landmark_block_size), landmark_token_id(model))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        bs, lm = self.block_size, self.landmark_id
        position = input_ids.shape[1]  # stream position of the token chosen now
        if self._kept is not None and position % bs == 0 and bool((input_ids[:, -1] == lm).all()):
            scores, self._kept = self._kept, None  # the landmark was fed: continue from the token before it
        scores = scores.clone()
        scores[:, lm] = float("-inf")
        if position % bs == bs - 1:
            self._kept = scores
            forced = torch.full_like(scores, float("-inf"))
            forced[:, lm] = 0.0
            return forced
        return scores
