"""Has a checkpoint learned the passkey task in distribution? A teacher-forced probe on training samples.

For ``--samples`` passkey samples exactly like the training recipe's (``PasskeyPrompts.training_sample``:
the key in an earlier block than the question, landmarks inserted as in training), one forward pass
gives the loss per token at the three places a key appears: its first mention (unpredictable: the
floor is ln 10 per digit), its second mention inside the key sentence ("... Remember it. 48213 is the
pass key.", a copy a few tokens back) and the answer after the question (a copy from an earlier
block, through a landmark). A model that has learned the task has a near-zero answer loss. A fourth
number, "answer, key adjacent", asks the question right after the key sentence (the key then mostly
in the question's own block, reached without a landmark): low there but high for the far answer
means the copy is learned but not the retrieval through landmarks. Finally, "by distance" gives the
answer loss against the number of filler tokens between the key sentence and the question (``--gaps``):
a model that finds the key by its content has a flat curve; one that learned "copy from so many tokens
back" has a dip at the distance it was trained on. "repeat" does the same for plain text: a 32-token span
of a bundled book copied again ``gap`` tokens after its end (the loss on the copy's tokens after its
first), the skill ``data.repeat_fraction`` trains. Cheap (seconds on a CPU), so run it before spending
an hour on long-context evaluations.

Usage:
    python benchmarks/passkey_probe.py runs/passkey-landmark [--samples 16] [--length 449] [--gaps 0 8 64]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from landmark.checkpoint import load_model
from landmark.data.landmarks import landmark_example
from landmark.data.passkey import KEY_RANGE, PasskeyPrompts, first_integer


def _key_spans(tokens: list[int], key_ids: list[int]) -> list[int]:
    """Start indices of every occurrence of ``key_ids`` in ``tokens``."""
    n = len(key_ids)
    return [i for i in range(len(tokens) - n + 1) if tokens[i : i + n] == key_ids]


@torch.no_grad()
def probe(path: str, samples: int, length: int, seed: int, gaps: list[int]) -> dict:
    model, tokenizer, _ = load_model(path)
    cfg = model.config
    prompts = PasskeyPrompts(tokenizer)
    landmarks = cfg.attention == "landmark"
    min_gap = cfg.block_size - 1 if landmarks else 1
    rng = np.random.default_rng(seed)
    names = ("first mention", "second mention", "answer", "answer, key adjacent")
    losses: dict[str, list[float]] = {name: [] for name in names}
    exact = 0
    for i in range(2 * samples):
        adjacent = i >= samples  # the second half: the question right after the key sentence
        raw = prompts.training_window(rng, length, min_gap, pairs=1, near=1.0 if adjacent else 0.0)
        key = first_integer(tokenizer.decode(raw).rsplit("The pass key is", 1)[1])
        digits = tokenizer.encode(f" {key}")  # the key's tokens, as in all three places
        starts = _key_spans(raw, digits)
        if len(starts) != 3:  # first, second mention, answer: tokenisation differs (rare): skip
            continue
        if adjacent:
            starts, keep = starts[2:], names[3:]
        else:
            keep = names[:3]
        raw_t = torch.tensor(raw, dtype=torch.long)
        if landmarks:
            inp, tgt = landmark_example(raw_t, cfg.block_size, cfg.landmark_id, -100)
            regular = (tgt != -100).nonzero().flatten()  # stream positions predicting raw[1:], in order
        else:
            inp, tgt = raw_t[:-1], raw_t[1:]
            regular = torch.arange(len(tgt))
        logits = model(inp[None]).logits[0]
        ce = torch.nn.functional.cross_entropy(logits, tgt.clamp_min(0), reduction="none")
        pred = logits.argmax(-1)
        for name, start in zip(keep, starts):
            at = regular[start - 1 : start - 1 + len(digits)]  # positions predicting the key's tokens
            losses[name].append(float(ce[at].mean()))
            if name == "answer":
                exact += bool((pred[at] == tgt[at]).all())
    n = len(losses["answer"])
    by_gap = {gap: _answer_loss_at_gap(model, prompts, rng, length, gap, samples) for gap in gaps}
    text = _book_tokens(tokenizer, samples * length)
    repeat = {gap: _repeat_loss_at_gap(model, text, rng, length, gap, samples) for gap in gaps}
    return {
        "checkpoint": path,
        "samples": n,
        "length": length,
        "loss_per_key_token": {name: float(np.mean(v)) for name, v in losses.items()},
        "answer_exact": exact,
        "answer_loss_by_gap": by_gap,
        "repeat_loss_by_gap": repeat,
    }


REPEAT = 32  # tokens of the repeated span in the "repeat" lines


def _book_tokens(tokenizer, n: int) -> list[int]:
    """About ``n`` tokens from the start of a bundled book (Moby-Dick)."""
    from landmark.data.books import bundled_books

    book = next(bundled_books().rglob("moby_dick.txt"))
    text = book.read_text(encoding="utf-8", errors="replace")[: 8 * n]
    return tokenizer.encode(text)[:n]


def _forward_loss(model: torch.nn.Module, raw: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-raw-token losses (len(raw) - 1,) of predicting raw[1:], landmarks inserted as in training."""
    cfg = model.config
    raw_t = torch.tensor(raw, dtype=torch.long)
    if cfg.attention == "landmark":
        inp, tgt = landmark_example(raw_t, cfg.block_size, cfg.landmark_id, -100)
        regular = (tgt != -100).nonzero().flatten()
    else:
        inp, tgt = raw_t[:-1], raw_t[1:]
        regular = torch.arange(len(tgt))
    ce = torch.nn.functional.cross_entropy(model(inp[None]).logits[0], tgt.clamp_min(0), reduction="none")
    return ce[regular], regular


def _repeat_loss_at_gap(
    model: torch.nn.Module, text: list[int], rng: np.random.Generator, length: int, gap: int, samples: int
) -> float:
    """Mean loss on the tokens 2..REPEAT of a span copied ``gap`` tokens after its end (the copy ends the
    window, as a passkey answer does), over ``samples`` windows of book text."""
    out = []
    for i in range(samples):
        window = list(text[i * length : (i + 1) * length])
        b = length - REPEAT  # the copy ends the window
        a = b - gap - REPEAT
        if a < 0:
            raise ValueError(f"--gaps: a {REPEAT}-token span {gap} tokens back does not fit {length} tokens")
        window[b:] = window[a : a + REPEAT]
        ce, _ = _forward_loss(model, window)
        out.append(float(ce[b : b + REPEAT - 1].mean()))  # ce[t] predicts window[t + 1]
    return float(np.mean(out))


def _answer_loss_at_gap(
    model: torch.nn.Module,
    prompts: PasskeyPrompts,
    rng: np.random.Generator,
    length: int,
    gap: int,
    samples: int,
) -> float:
    """Mean answer loss per key token over ``samples`` prompts of ``length`` tokens whose question follows
    the key sentence after exactly ``gap`` filler tokens (the key sentence's place in its block varies
    with the key's length only; the question and answer end the window, as in training)."""
    tok = prompts.tokenizer
    unit = len(prompts.filler)
    out = []
    for _ in range(samples):
        key = int(rng.integers(*KEY_RANGE))
        sentence, answer = prompts.key_sentence(key), prompts.answer(key)
        before = length - len(prompts.instruction) - len(sentence) - gap - len(prompts.question) - len(answer)
        if before < 0:
            raise ValueError(f"--gaps: {gap} filler tokens do not fit a {length}-token sample")
        filler = prompts.filler * (max(before, gap) // unit + 1)
        raw = prompts.instruction + filler[:before] + sentence + filler[:gap] + prompts.question + answer
        n_key = len(tok.encode(f" {key}"))
        ce, _ = _forward_loss(model, raw)
        at = slice(len(raw) - len(answer) - 1, len(raw) - len(answer) - 1 + n_key)  # predicting the key
        out.append(float(ce[at].mean()))
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder or checkpoint folder")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--length", type=int, default=449, help="raw tokens per sample (<= seq_len - landmarks)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument(
        "--gaps", type=int, nargs="*", default=[0, 4, 16, 48, 96, 192, 320],
        help="filler tokens between key sentence and question for the 'by distance' lines (none: skip)",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = probe(args.checkpoint, args.samples, args.length, args.seed, args.gaps)
    for name, v in r["loss_per_key_token"].items():
        print(f"{name:>20}: {v:.2f} nats per key token")
    print(f"answers exactly right (teacher-forced argmax): {r['answer_exact']}/{r['samples']}")
    for gap, v in r["answer_loss_by_gap"].items():
        print(f"{'answer, ' + str(gap) + ' filler tokens':>28}: {v:.2f} nats per key token")
    for gap, v in r["repeat_loss_by_gap"].items():
        print(f"{'repeat, ' + str(gap) + ' tokens back':>28}: {v:.2f} nats per copied token")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
