"""Long-context generation: chunked prompt prefill, then token-by-token decoding with retrieval.

Landmarks are inserted automatically and never sampled: when a generated token fills the last regular
position of a block, the landmark is fed right after it in the same step. The next token is then
sampled from the output of the token BEFORE the landmark, which is the position the model was trained
to predict from (landmark positions are not targets in training, shared/method.md section 3); the
landmark's own output is discarded, and its key joins the block memory like any other block's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from landmark.inference.session import InferenceSession, rows_with_landmarks
from landmark.model import GPT

TokenCallback = Callable[[int, int], None]  # (batch row, token id)


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """(B, vocab) logits -> (B,) token ids: greedy when temperature == 0, else temperature + nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eot_id: int | None = None,
    seed: int | None = None,
    on_token: TokenCallback | None = None,
    **session_kwargs,
) -> list[list[int]]:
    """Generate continuations of a batch of prompts of any length.

    Args:
        prompts: B token-id lists (regular tokens, no landmarks), of different lengths if you like.
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass (1.0 = off).
        eot_id: stop a row when it generates this token (it is included in the output).
        on_token: called as ``on_token(row, token)`` for every generated token, as soon as it exists
            (for streaming output).
        **session_kwargs: ``InferenceSession`` options (k, granularity, chunk_len, memory_device, ...).

    Returns:
        The generated token ids of each row.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    cfg = model.config
    session = InferenceSession(model, len(prompts), **session_kwargs)
    bs, lm = cfg.block_size, cfg.landmark_id
    if any(lm in p for p in prompts):
        raise ValueError(f"prompts must not contain the landmark token id {lm}: landmarks are inserted here")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    # Prefill: each prompt with its landmarks, right-padded; remember the last regular position's logits.
    tokens = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    stream = rows_with_landmarks(tokens, lengths, bs, lm)
    stream_len = lengths + lengths // (bs - 1)
    logits = session.feed(stream, stream_len)
    last_regular = stream_len - 1 - (stream_len % bs == 0).long()  # a stream ending in a landmark
    pending = logits[torch.arange(len(prompts)), last_regular.to(logits.device)]  # (B, vocab)

    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        pending[:, lm] = float("-inf")  # a landmark is never sampled
        nxt = sample_next(pending, temperature, top_p, generator).cpu()  # (B,)
        pos = session.length.clone()  # stream position each new token takes
        needs_landmark = pos % bs == bs - 2  # the token fills its block's last regular position
        ids = torch.stack((nxt, torch.full_like(nxt, lm)), dim=1)  # (B, 2)
        step_len = torch.where(done, 0, 1 + needs_landmark.long())
        for b in range(len(prompts)):
            if not done[b]:
                out[b].append(int(nxt[b]))
                if on_token is not None:
                    on_token(b, int(nxt[b]))
        done |= (nxt == eot_id) if eot_id is not None else torch.zeros_like(done)
        if bool(done.all()):
            break
        width = (
            2 if bool(needs_landmark[step_len > 0].any()) else 1
        )  # one query row unless a landmark follows
        logits = session.feed(ids[:, :width], step_len)
        pending = logits[:, 0]
    return out
