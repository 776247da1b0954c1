"""Does a fine-tuned landmark model still behave like its base model inside the base's window?

A landmark fine-tune should add the blocks beyond the window and change nothing else. Three checks,
each beside the base model (``landmark eval base-check``):

* **Short chat prompts** (:data:`CHAT_PROMPTS`): ordinary questions (facts, arithmetic, word completion)
  in the tokenizer's chat template, answered greedily; an answer is *right* when it matches the
  prompt's expected answer, and *leaks training text* when it holds a fragment of a sentence the
  fine-tuning mixes use (:func:`training_markers`: the passkey instruction and filler, the key
  sentences and questions of the paper's wording and of the training wording families). The landmark
  model reads with top-k retrieval, as users run it; the base with its own attention.
* **Next-token KL to the base on held-out prose**: windows of the validation split (text no
  fine-tune trains on), the base reading each window with its own attention, the landmark model with
  landmarks and retrieval; per regular token, KL(base || landmark) over the base's vocabulary (the
  landmark model's distribution renormalised without its landmark token), and both models' loss.

A model that stays its base has KL near 0, the same loss, as many right chat answers, and no leaks.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

import landmark.hf
from landmark.data.passkey import FILLER, INSTRUCTION
from landmark.data.wordings import PAPER, families
from landmark.eval.common import cache_key_options
from landmark.eval.models import HFUnderTest
from landmark.inference.options import Reading
from landmark.inference.session import landmark_stream

MIN_MARKER_WORDS = 3  # a template fragment shorter than this is too common to call training text
CHAT_NEW_TOKENS = 40  # tokens generated per chat answer


@dataclass(frozen=True)
class ChatPrompt:
    """A short question and a regular expression (case-insensitive) that a right answer contains."""

    question: str
    expected: str


CHAT_PROMPTS = (
    ChatPrompt("What is the capital of France?", r"\bparis\b"),
    ChatPrompt("What is 7 plus 5?", r"\b12\b|\btwelve\b"),
    ChatPrompt("Complete the proverb: The early bird catches the", r"\bworm\b"),
    ChatPrompt("How many days are there in a week?", r"\b7\b|\bseven\b"),
    ChatPrompt("What colour is the sky on a clear day?", r"\bblue\b"),
    ChatPrompt("What is the opposite of hot?", r"\bcold\b"),
    ChatPrompt("Which is the largest planet in our solar system?", r"\bjupiter\b"),
    ChatPrompt("What is 10 times 3?", r"\b30\b|\bthirty\b"),
    ChatPrompt("Which animal is called the king of the jungle?", r"\blions?\b"),
    ChatPrompt("What do bees make?", r"\bhoney\b"),
    ChatPrompt("How many legs does a spider have?", r"\b8\b|\beight\b"),
    ChatPrompt("At what temperature in Celsius does water freeze?", r"(?<![\d.])0(?![.\d])|\bzero\b"),
    ChatPrompt("How do you say 'hello' in Spanish?", r"\bhola\b"),
    ChatPrompt("What is the plural of the word 'mouse'?", r"\bmice\b"),
    ChatPrompt("Who wrote the play Romeo and Juliet?", r"\bshakespeare\b"),
    ChatPrompt("Which gas do plants take in from the air to make food?", r"carbon dioxide|\bco2\b"),
)


def training_markers() -> tuple[str, ...]:
    """Lower-case fragments of every sentence a fine-tuning mix may put in a training window: the
    passkey instruction and filler, and the fixed words of the key sentences, questions and answer
    prefixes of the paper's wording and the training families (split at their placeholders; fragments
    of at least :data:`MIN_MARKER_WORDS` words). Held-out families are not training text."""

    texts = [INSTRUCTION, *re.split(r"(?<=\.)\s+", FILLER)]
    for w in (PAPER, *families("train")):
        texts += [w.key, w.question, w.answer]
    fragments = set()
    for text in texts:
        for piece in re.split(r"\{[^}]*\}", text):
            piece = " ".join(piece.lower().strip(" .,:;!?\"'-").split())
            if len(piece.split()) >= MIN_MARKER_WORDS:
                fragments.add(piece)
    return tuple(sorted(fragments))


def training_text(answer: str, markers: tuple[str, ...] | None = None) -> list[str]:
    """The training-text fragments (:func:`training_markers`) that ``answer`` contains."""
    text = " ".join(answer.lower().split())
    return [m for m in (markers if markers is not None else training_markers()) if m in text]


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    """``question`` as one user turn of the tokenizer's chat template, ready for the assistant's answer
    (plain text when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = question + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def chat_answer(m: HFUnderTest, question: str, reading: Reading, new_tokens: int = CHAT_NEW_TOKENS) -> str:
    """The greedy answer of ``m`` to ``question`` (a landmark model reads with retrieval)."""
    ids = chat_ids(m.tokenizer, question)
    if m.retrieves:
        return m.decode(m.generate([ids], new_tokens, reading)[0]).strip()
    out = m.model.generate(
        torch.tensor([ids], device=m.model.device), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=m.tokenizer.eos_token_id,
    )  # fmt: skip
    return m.decode(out[0, len(ids) :].tolist()).strip()


def chat_check(models: list[HFUnderTest], reading: Reading, progress: bool = True) -> list[dict]:
    """Every model's answer to every :data:`CHAT_PROMPTS` question (judge them with :func:`judge`)."""
    rows = []
    bar = tqdm(total=len(models) * len(CHAT_PROMPTS), desc="chat", unit="prompt", disable=not progress)
    for m in models:
        for p in CHAT_PROMPTS:
            rows.append(
                {"model": m.name, "question": p.question, "answer": chat_answer(m, p.question, reading)}
            )
            bar.update()
    bar.close()
    return rows


def judge(rows: list[dict]) -> list[dict]:
    """Chat rows with ``right`` (the answer matches its prompt's expected answer) and ``leaks`` (the
    training-text fragments it holds): judged when reported, so cached answers meet the current rules."""
    expected = {p.question: p.expected for p in CHAT_PROMPTS}
    markers = training_markers()
    return [
        r | {"right": re.search(expected[r["question"]], r["answer"], re.I) is not None,
             "leaks": training_text(r["answer"], markers)}
        for r in rows
    ]  # fmt: skip


def _landmark_chunks(m: HFUnderTest, window: Tensor, reading: Reading) -> Iterator[tuple[Tensor, Tensor]]:
    """A landmark model reading ``window`` (1, n) regular tokens with landmarks and retrieval:
    ``(regular indices, (c, vocab) logits)`` of each chunk's regular positions."""
    stream, _, _ = landmark_stream(window, None, m.block_size, m.landmark_id)
    regular = stream[0] != m.landmark_id
    index = torch.cumsum(regular.long(), 0) - 1  # (n',) the regular token at each stream position
    cache = landmark.hf.LandmarkRetrievalCache(m.model, reading.retrieval, **reading.cache_kwargs())
    for c0, logits in m._chunks(stream, cache, reading.chunk_len):
        keep = regular[c0 : c0 + logits.shape[1]]
        yield index[c0 : c0 + logits.shape[1]][keep], logits[0][keep.to(logits.device)]


@torch.no_grad()
def window_divergence(lm: HFUnderTest, base: HFUnderTest, window: Tensor, reading: Reading) -> dict:
    """KL(base || lm) summed over the positions of ``window`` (1, n) that have a next token, and both
    models' NLL sums there (nats), with the number of positions."""
    vocab = int(base.model.config.vocab_size)
    base_logp = torch.log_softmax(base.model(input_ids=window.to(base.model.device)).logits[0].float(), -1)
    targets = window[0, 1:]
    n = targets.numel()
    chunks = (
        _landmark_chunks(lm, window, reading)
        if lm.retrieves
        else [(torch.arange(window.shape[1]), lm.model(input_ids=window.to(lm.model.device)).logits[0])]
    )
    kl = nll_lm = 0.0
    for idx, logits in chunks:
        keep = idx < n
        idx, logits = idx[keep], logits[keep.to(logits.device)]
        lm_logp = torch.log_softmax(logits[:, :vocab].float().cpu(), -1)
        b = base_logp[idx]
        kl += float((b.exp() * (b - lm_logp)).sum())
        nll_lm -= float(lm_logp.gather(1, targets[idx, None]).sum())
    nll_base = -float(base_logp[:n].gather(1, targets[:, None]).sum())
    return {"kl": kl, "nll": nll_lm, "nll_base": nll_base, "positions": n}


def prose_check(
    models: list[HFUnderTest], base: HFUnderTest, windows: Tensor, reading: Reading, progress: bool = True
) -> list[dict]:
    """Per model: mean next-token KL(base || model) per token, the model's and the base's mean loss over
    ``windows`` (W, n) of held-out regular tokens."""
    out = []
    bar = tqdm(total=len(models) * len(windows), desc="prose KL", unit="window", disable=not progress)
    for m in models:
        t0, sums = time.perf_counter(), {"kl": 0.0, "nll": 0.0, "nll_base": 0.0, "positions": 0}
        for w in windows:
            for key, value in window_divergence(m, base, w[None], reading).items():
                sums[key] += value
            bar.update()
        count = sums["positions"]
        out.append({
            "model": m.name, "kl_per_token": sums["kl"] / count, "loss": sums["nll"] / count,
            "base_loss": sums["nll_base"] / count, "tokens": count, "windows": len(windows),
            "window_tokens": int(windows.shape[1]), "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
    bar.close()
    return out


def prose_windows(tokens: np.ndarray, count: int, length: int) -> Tensor:
    """``count`` windows of ``length`` consecutive tokens, evenly spaced over ``tokens``: (count, length)."""
    if count < 1 or length < 2:
        raise ValueError(f"need at least 1 window of 2 tokens; got {count} of {length}")
    if len(tokens) < count * length:
        raise ValueError(f"the held-out text has {len(tokens):,} tokens: fewer than {count} x {length}")
    starts = np.linspace(0, len(tokens) - length, count).astype(np.int64)
    return torch.stack([torch.from_numpy(np.asarray(tokens[s : s + length], dtype=np.int64)) for s in starts])


def summary_table(chat: list[dict], prose: list[dict], base_name: str) -> str:
    """Markdown: one row per model (the base first): right chat answers, answers leaking training text,
    KL to the base and loss on held-out prose."""
    names = list(dict.fromkeys(r["model"] for r in chat))
    kl = {r["model"]: r for r in prose}
    lines = [
        "| model | chat answers right | answers with training text | KL to base (nats/token) | prose loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        rows = [r for r in chat if r["model"] == name]
        right, leaks = sum(r["right"] for r in rows), sum(bool(r["leaks"]) for r in rows)
        p = kl.get(name)
        k = "0 (the base)" if name == base_name else (f"{p['kl_per_token']:.4f}" if p else "")
        loss = f"{p['loss']:.4f}" if p else (f"{prose[0]['base_loss']:.4f}" if prose else "")
        lines.append(f"| {name} | {right}/{len(rows)} | {leaks}/{len(rows)} | {k} | {loss} |")
    return "\n".join(lines)


def answers_table(chat: list[dict]) -> str:
    """Markdown: every question with each model's answer (cut to one line), leaks marked."""
    names = list(dict.fromkeys(r["model"] for r in chat))
    by = {(r["model"], r["question"]): r for r in chat}
    lines = ["| question | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for q in dict.fromkeys(r["question"] for r in chat):
        cells = []
        for name in names:
            r = by[(name, q)]
            text = " ".join(r["answer"].split())[:90].replace("|", "\\|")
            mark = ("ok " if r["right"] else "") + ("**training text** " if r["leaks"] else "")
            cells.append(f"{mark}{text}")
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chat_prompts_record() -> list[dict]:
    """The prompts as JSON (for the report)."""
    return [asdict(p) for p in CHAT_PROMPTS]


def run_base_check(
    models: list[HFUnderTest], base: HFUnderTest, windows: Tensor, reading: Reading, cache: Any,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The chat check of the base and every model, and the prose check of every model against the base;
    each model's results are cached (``cache``: a :class:`landmark.eval.common.CellCache`) by its
    weights (with a landmark model's block size and landmark id), the prompts, the held-out tokens and the
    reading, so an interrupted check resumes.

    Returns:
        (chat rows, prose rows), the base's chat rows first.
    """

    prompts = hashlib.sha256(repr([p.question for p in CHAT_PROMPTS]).encode()).hexdigest()[:16]
    tokens = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    chat, prose = [], []
    for m in [base, *models]:
        setting = {
            "weights": m.fingerprint(),
            "kind": m.kind,
            "new_tokens": CHAT_NEW_TOKENS,
            **m.landmark_key(),
        }
        if m.retrieves:
            setting |= {"k": reading.k, "granularity": reading.granularity, "chunk_len": reading.chunk_len,
                        "options": cache_key_options(reading.options, m.kind)}  # fmt: skip
        key = {"eval": "base-check-chat", "prompts": prompts, **setting}
        rows = cache.get(key)
        if rows is None:
            rows = {"rows": chat_check([m], reading, progress)}
            cache.put(key, rows)
        chat += rows["rows"]
        if m is base:
            continue
        key = {"eval": "base-check-prose", "tokens": tokens, "base": base.fingerprint(), **setting}
        row = cache.get(key)
        if row is None:
            row = prose_check([m], base, windows, reading, progress)[0]
            cache.put(key, row)
        prose.append(row | {"model": m.name})
    return judge(chat), [r | {"base": base.name} for r in prose]
