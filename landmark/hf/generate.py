"""Generation from a converted model with landmarks inserted into the token stream.

Two caches:

* ``retrieval=None``: every earlier position stays in a ``DynamicCache`` and every query attends over
  all of them through the grouped softmax: exact, but each step reads the whole context.
* ``retrieval=RetrievalConfig(k=...)``: a :class:`landmark.hf.LandmarkRetrievalCache`: complete blocks
  go to a block memory, and every query attends to its top-k retrieved blocks plus its local context
  (docs/method.md, "Inference: block memory and top-k retrieval").

The loop, the sampling and the landmark rule are the library's one implementation
(:func:`landmark.inference.generate.generate_with`, shared with the library's ``GPT``); this module only
provides the reader: the prompt goes through the model ``chunk_len`` positions per forward call with
``logits_to_keep=1``, so reading a long prompt holds one chunk's activations and one row of logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from landmark.hf.convert import encode_text, landmark_token_id
from landmark.inference.cache import DEFAULT_CHUNK_LEN, check_state_destination
from landmark.inference.generate import Sampling, TokenCallback, generate_with
from landmark.inference.threads import inference_threads, using_threads
from landmark.optional import require


def _retrieval_module() -> Any:
    """:mod:`landmark.hf.retrieval`, imported on first use: its cache subclasses transformers' Cache."""
    from landmark.hf import retrieval

    return retrieval


def hf_reader(model: Any, cache: Any, chunk_len: int = DEFAULT_CHUNK_LEN, threads: int | None = None):
    """A reader for :func:`generate_with`: feeds (B, C) ids (every row the same length) through
    ``model`` with ``cache``, ``chunk_len`` positions per forward, and returns (B, vocab) logits of
    the last position (with a :class:`landmark.hf.LandmarkRetrievalCache`, position ids of zeros: the
    model's RoPE is skipped, see ``unrotated_position_ids``); with ``threads`` torch threads (None:
    ``LANDMARK_THREADS`` or 1, see :mod:`landmark.inference.threads`)."""
    forward_cached = _retrieval_module().forward_cached
    device = model.get_input_embeddings().weight.device
    threads = inference_threads() if threads is None else threads

    def read(ids: Tensor, lengths: Tensor) -> Tensor:
        if bool((lengths != lengths[0]).any()):
            raise ValueError("Hugging Face models read rows of equal length only (no padding)")
        n = int(lengths[0])
        logits = None
        unrotated = getattr(cache, "unrotated_position_ids", None)  # a LandmarkRetrievalCache
        for c0 in range(0, n, chunk_len):
            chunk = ids[:, c0 : min(n, c0 + chunk_len)].to(device)
            extra = {} if unrotated is None else {"position_ids": unrotated(chunk.shape[1], device)}
            with using_threads(threads):
                logits = forward_cached(model, chunk, cache, logits_to_keep=1, **extra).logits
        return logits[:, -1]

    return read


def prompt_ids(model: Any, tokenizer: Any, prompt: str | Tensor, continuation: bool = False) -> list[int]:
    """The raw token ids of ``prompt``, checked: the HF twin of the native path's prompt handling.

    Text is tokenized with the tokenizer's special tokens (BOS; none for a ``continuation`` of a saved
    state), special-token strings inside it kept as plain text (:func:`landmark.hf.convert.encode_text`):
    a ``<landmark>`` typed by a user is never a landmark. Token ids must be a flat sequence of integers
    within the model's vocabulary, without the landmark id (landmarks are inserted here).

    Raises:
        ValueError: an empty prompt; ids that are not integers, out of range, or hold the landmark id.
    """
    landmark_id = landmark_token_id(model)
    if isinstance(prompt, str):
        raw = encode_text(tokenizer, prompt, add_special_tokens=not continuation)
    else:
        ids = torch.as_tensor(prompt)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"prompt: token ids must be integers; got dtype {ids.dtype}")
        raw = ids.flatten().tolist()
        vocab = int(model.get_input_embeddings().weight.shape[0])
        bad = [t for t in raw if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids must be in [0, {vocab}); got {bad[0]}")
        if landmark_id in raw:
            raise ValueError(
                f"prompt: token ids must not contain the landmark token id {landmark_id} (at index "
                f"{raw.index(landmark_id)}): pass raw tokens, landmarks are inserted by generate"
            )
    if not raw:
        raise ValueError("prompt: the prompt is empty")
    return raw


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
    *,
    top_p: float = 1.0,
    retrieval: Any = None,
    on_token: TokenCallback | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    load_state: Any = None,
    save_state: Any = None,
    overwrite_state: bool = False,
    **cache_kwargs: Any,
) -> tuple[str, Tensor]:
    """Continue ``prompt`` by ``max_new_tokens`` regular tokens (batch size 1).

    Args:
        model: a converted model (:func:`landmark.hf.convert` or :func:`landmark.hf.load_pretrained`).
        tokenizer: its tokenizer.
        prompt: text (tokenized with the tokenizer's special tokens, e.g. BOS; special-token strings in it
            are plain text) or (n,) raw token ids (never the landmark id), see :func:`prompt_ids`.
        max_new_tokens: regular tokens to generate (>= 1); stops early at the tokenizer's eos token.
        temperature: 0 for greedy decoding, else sampling at this temperature; ``top_p``: nucleus mass.
        seed: seeds the sampling generator.
        retrieval: None for exact attention over the whole context (``DynamicCache``), or a
            :class:`landmark.inference.RetrievalConfig` for top-k block retrieval through a
            :class:`landmark.hf.LandmarkRetrievalCache`.
        on_token: called as ``on_token(0, token)`` for every generated token (streaming).
        chunk_len: prompt positions per forward call (and the retrieval cache's chunk).
        load_state: with ``retrieval``, a state saved earlier (a long document read once): the prompt
            continues it (a question about the document).
        save_state: with ``retrieval``, save the state here once the prompt is read (before any
            generated token), for later ``load_state`` calls. Checked before any work: an existing
            file other than a saved state, or the ``load_state`` file, is refused (ValueError).
        overwrite_state: replace an existing ``save_state`` file that is not a saved state.
        **cache_kwargs: with ``retrieval``, options of :class:`landmark.hf.LandmarkRetrievalCache`
            (``memory_device``, ``max_blocks``, ``evict``).

    Returns:
        ``(text, ids)``: the decoded new tokens, and (num_new,) int64 ids of the new regular tokens.
    """
    transformers = require("transformers")

    sampling = Sampling(temperature, top_p, seed)
    raw = prompt_ids(model, tokenizer, prompt, continuation=load_state is not None)
    if retrieval is None and (cache_kwargs or load_state is not None or save_state is not None):
        options = sorted(cache_kwargs) + [
            n for n, v in (("load_state", load_state), ("save_state", save_state)) if v
        ]
        raise ValueError(f"{options} are options of the retrieval cache: pass retrieval=...")
    if save_state is not None:
        check_state_destination(save_state, overwrite_state, [(load_state, "the load_state file")])
    if retrieval is None:
        cache = transformers.DynamicCache(config=model.config)
    else:
        cache = _retrieval_module().LandmarkRetrievalCache(
            model, retrieval, chunk_len=chunk_len, **cache_kwargs
        )
        if load_state is not None:
            cache.load_state(load_state, model)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    start = [cache.get_seq_length()] if load_state is not None else None
    new = generate_with(
        hf_reader(model, cache, chunk_len), [raw], max_new_tokens,
        block_size=int(model.config.landmark_block_size), landmark_id=landmark_token_id(model),
        sampling=sampling, stop_ids=() if eos is None else (eos,), on_token=on_token, start=start,
        after_prompt=None if save_state is None else functools.partial(
            cache.save_state, save_state, model, overwrite=overwrite_state),
    )[0]  # fmt: skip
    out_ids = torch.tensor(new, dtype=torch.long)
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return text, out_ids
