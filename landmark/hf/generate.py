"""Generation from a converted model with landmarks inserted into the token stream.

Two caches:

* ``retrieval=None``: every earlier position stays in a ``DynamicCache`` and every query attends over
  all of them through the grouped softmax: exact, but each step reads the whole context.
* ``retrieval=RetrievalConfig(k=...)``: a :class:`landmark.hf.LandmarkRetrievalCache`: the prompt is
  processed in chunks, complete blocks go to a block memory, and every query attends to its top-k
  retrieved blocks plus its local context (shared/method.md s.4).

Landmarks are fed, never sampled: when the next position is a landmark position, the landmark is fed
together with the next regular token. The next token is always predicted from a regular token's
output, as in training, where the token before a landmark predicts the token after it and the
landmark's own output is not scored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from landmark.data.landmarks import insert_landmarks
from landmark.hf.convert import landmark_token_id


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
    *,
    retrieval: Any = None,
    **cache_kwargs: Any,
) -> tuple[str, Tensor]:
    """Continue ``prompt`` by ``max_new_tokens`` regular tokens (batch size 1).

    Args:
        model: a converted model (:func:`landmark.hf.convert` or :func:`landmark.hf.load_pretrained`).
        tokenizer: its tokenizer.
        prompt: text (tokenized with the tokenizer's special tokens, e.g. BOS) or (n,) raw token ids.
        max_new_tokens: regular tokens to generate; stops early at the tokenizer's eos token.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        seed: seeds the sampling generator.
        retrieval: None for exact attention over the whole context (``DynamicCache``), or a
            :class:`landmark.inference.RetrievalConfig` for top-k block retrieval through a
            :class:`landmark.hf.LandmarkRetrievalCache`.
        **cache_kwargs: with ``retrieval``, options of :class:`landmark.hf.LandmarkRetrievalCache`
            (``chunk_len``, ``memory_device``, ``max_blocks``, ``evict``).

    Returns:
        ``(text, ids)``: the decoded new tokens, and (num_new,) int64 ids of the new regular tokens.
    """
    from transformers import DynamicCache

    block_size = int(model.config.landmark_block_size)
    landmark_id = landmark_token_id(model)
    device = model.get_input_embeddings().weight.device
    if isinstance(prompt, str):
        raw = torch.tensor(tokenizer(prompt).input_ids, dtype=torch.long)
    else:
        raw = torch.as_tensor(prompt, dtype=torch.long).flatten()
    if raw.numel() == 0:
        raise ValueError("the prompt is empty")
    if retrieval is None and cache_kwargs:
        raise ValueError(f"{sorted(cache_kwargs)} are options of the retrieval cache: pass retrieval=...")
    ids = insert_landmarks(raw, block_size, landmark_id)
    if ids[-1] == landmark_id:  # a complete last block: its landmark goes in with the next token
        ids = ids[:-1]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = tokenizer.eos_token_id
    if retrieval is None:
        cache = DynamicCache(config=model.config)
    else:
        from landmark.hf.retrieval import LandmarkRetrievalCache

        cache = LandmarkRetrievalCache(model, retrieval, **cache_kwargs)
    step_input = ids.to(device)[None]  # (1, n)
    position = 0  # positions already in the cache
    new: list[int] = []
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()  # (vocab,)
        position += step_input.shape[1]
        logits[landmark_id] = float("-inf")  # never sample a landmark
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        new.append(token)
        if eos is not None and token == eos:
            break
        feed = [landmark_id, token] if position % block_size == block_size - 1 else [token]
        step_input = torch.tensor([feed], dtype=torch.long, device=device)
    out_ids = torch.tensor(new, dtype=torch.long)
    return tokenizer.decode(out_ids.tolist(), skip_special_tokens=True), out_ids
