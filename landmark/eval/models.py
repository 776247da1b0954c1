"""The models under evaluation: one interface, one adapter per model family.

The evaluations (``landmark.eval.passkey``, ``landmark.eval.perplexity``) ask a :class:`ModelUnderTest`
four things, whatever the model is:

* ``generate(prompts, max_new_tokens, reading)``: greedy continuations read with top-k retrieval
  (landmark models);
* ``tail_logits(ids, count)``: the logits of the last ``count`` positions of one pass over ``ids`` with
  the model's own attention (teacher-forced scoring of the other models);
* ``window_nll(windows, reading)``: next-token NLL sums of windows read from a fresh state;
* ``encoder`` / ``decode``: the tokenizer, for the prompts and the answers.

Two families:

* :class:`GPTUnderTest`: the library's own ``GPT`` (kinds ``landmark``, ``full``, ``xl``; a run or
  checkpoint folder);
* :class:`HFUnderTest`: a Hugging Face causal LM folder, given on the command line as ``hf:PATH``:
  a landmark-converted model (kind ``hf-landmark``: read with a ``LandmarkRetrievalCache``) or any other
  (kind ``hf``: its own attention, beyond its training window as it is), run with the library's
  inference threads (:mod:`landmark.inference.threads`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import landmark.hf
from landmark.checkpoint import CheckpointError, load_model
from landmark.fingerprint import model_fingerprint
from landmark.hf.checks import check_model_folder, for_option, load_causal_lm, loading, read_config
from landmark.hf.delta import load_pretrained
from landmark.hf.generate import generate as hf_generate
from landmark.hf.passkey import HFTokenEncoder
from landmark.inference import chunked_nll, generate
from landmark.inference.options import Reading
from landmark.inference.session import landmark_stream, sum_nll
from landmark.inference.threads import using_threads
from landmark.inference.weights import compact_weights
from landmark.model import ATTENTION_KINDS
from landmark.optional import require

HF_PREFIX = "hf:"  # --model NAME=hf:PATH: a Hugging Face model folder
LM_EVAL_MODEL = "landmark"  # lm_eval --model landmark (registered by landmark.eval.harness)
# its --model_args: the retrieval cache's options, and the others (landmark.eval.harness.LandmarkLM)
SESSION_OPTIONS = ("search", "kernel", "memory_device", "max_blocks")
MODEL_ARGS = ("pretrained", "base", "tokenizer", "k", "granularity", "chunk_len", "device", "max_length",
              "max_gen_toks", "add_bos_token", "batch_size", "max_batch_size")  # fmt: skip
RETRIEVAL_KINDS = ("landmark", "hf-landmark")  # read with top-k retrieval (--k, --granularity, ...)
KINDS = (*ATTENTION_KINDS, "hf-landmark", "hf")


class ModelUnderTest:
    """A loaded model with the name it is reported under (see the module for the interface)."""

    family = ""
    trials_per_call: int | None = None  # passkey prompts per generate call (None: a cell's trials at once)

    def __init__(self, name: str, path: str, model: Any, tokenizer: Any) -> None:
        self.name, self.path, self.model, self.tokenizer = name, path, model, tokenizer
        self._fingerprint: str | None = None

    @property
    def kind(self) -> str:
        raise NotImplementedError

    @property
    def retrieves(self) -> bool:
        """Whether the model reads with top-k retrieval (and so takes ``--k``, ``--granularity``, ...)."""
        return self.kind in RETRIEVAL_KINDS

    @property
    def block_size(self) -> int:
        """Positions per landmark block (landmark included); 1 for a model without landmarks."""
        raise NotImplementedError

    @property
    def encoder(self) -> Any:
        """An object with ``encode(text) -> list[int]`` (no special tokens) for the passkey prompts."""
        return self.tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def landmark_id(self) -> int | None:
        """The landmark token's id; None for a model without landmarks."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """The weights' and the configuration's fingerprint (cache keys), computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def landmark_key(self) -> dict[str, Any]:
        """What a result cell's cache key adds for a landmark model: its block size and landmark token id,
        which the weights' fingerprint does not cover (a delta's delta.json sets them); {} for the other
        models (their keys unchanged)."""
        if not self.retrieves:
            return {}
        return {"landmark": {"block_size": self.block_size, "token_id": self.landmark_id}}

    def generate(self, prompts: list[list[int]], max_new_tokens: int, reading: Reading) -> list[list[int]]:
        """B prompts (regular tokens) -> B greedy continuations of ``max_new_tokens`` read with retrieval."""
        raise NotImplementedError

    def tail_logits(self, ids: list[int], count: int) -> Tensor:
        """(count, vocab) logits of the last ``count`` positions of ``ids``, the model's own attention."""
        raise NotImplementedError

    def window_nll(self, windows: Tensor, reading: Reading) -> tuple[Tensor, Tensor]:
        """(W, L) windows of regular tokens -> ((W,) float64 NLL sums over tokens 1..L-1, (W,) counts),
        each window read from a fresh state."""
        raise NotImplementedError


class GPTUnderTest(ModelUnderTest):
    """The library's ``GPT`` (a training run or checkpoint folder)."""

    family = "gpt"

    @property
    def kind(self) -> str:
        return self.model.config.attention

    @property
    def block_size(self) -> int:
        return self.model.config.block_size if self.kind == "landmark" else 1

    @property
    def landmark_id(self) -> int | None:
        return int(self.model.config.landmark_id) if self.kind == "landmark" else None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, reading: Reading) -> list[list[int]]:
        return generate(self.model, prompts, max_new_tokens=max_new_tokens, retrieval=reading.retrieval,
                        **reading.cache_kwargs())  # fmt: skip

    @torch.no_grad()
    def tail_logits(self, ids: list[int], count: int) -> Tensor:
        h = self.model.hidden_states(torch.tensor([ids]))[0, -count:]  # (count, n_embd)
        return self.model.logits(h[None])[0]

    @torch.no_grad()
    def window_nll(self, windows: Tensor, reading: Reading) -> tuple[Tensor, Tensor]:

        if self.kind == "landmark":
            return chunked_nll(self.model, windows, retrieval=reading.retrieval, **reading.cache_kwargs())
        counts = torch.full((windows.shape[0],), windows.shape[1] - 1)
        return self._plain_nll(windows), counts

    def _plain_nll(self, windows: Tensor, slice_len: int = 1024) -> Tensor:
        """(W, L) windows -> (W,) NLL sums of a full or xl model: one pass, logits in slices."""
        h = self.model.hidden_states(windows)
        total = torch.zeros(windows.shape[0], dtype=torch.float64)
        for s in range(0, windows.shape[1] - 1, slice_len):
            e = min(windows.shape[1] - 1, s + slice_len)
            targets = windows[:, s + 1 : e + 1]
            total += _nll_sums(self.model.logits(h[:, s:e]), targets)
        return total


class HFUnderTest(ModelUnderTest):
    """A Hugging Face causal LM: landmark-converted (``hf-landmark``) or not (``hf``)."""

    family = "hf"
    trials_per_call = 1  # a long prompt's block memory is large (SmolLM2's: about 1.5 GB at 32k)

    @property
    def landmark_id(self) -> int | None:
        value = getattr(self.model.config, "landmark_token_id", None)
        return None if value is None else int(value)

    @property
    def kind(self) -> str:
        return "hf" if self.landmark_id is None else "hf-landmark"

    @property
    def block_size(self) -> int:
        return int(self.model.config.landmark_block_size) if self.landmark_id is not None else 1

    @property
    def encoder(self) -> Any:

        return HFTokenEncoder(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, reading: Reading) -> list[list[int]]:
        """One prompt after the other, each through :func:`landmark.hf.generate` (stops at eos)."""

        outs = []
        for prompt in prompts:
            _, new = hf_generate(
                self.model, self.tokenizer, torch.tensor(prompt), max_new_tokens, reading=reading
            )
            outs.append(new.tolist())
        return outs

    @torch.no_grad()
    def tail_logits(self, ids: list[int], count: int) -> Tensor:
        """(count, vocab) logits of the last ``count`` positions of one forward over ``ids`` (what greedy
        decoding after the context would predict there, up to float rounding): one pass lets the model's
        attention run over the whole sequence at once (SmolLM2 at 32k tokens: 448 s of one thread for one
        forward, against a 900 s trial when the context was read in 256-position chunks into a
        ``DynamicCache``)."""

        with using_threads():
            out = self.model(input_ids=torch.tensor([ids], device=self._device), logits_to_keep=count)
        return out.logits[0]

    @torch.no_grad()
    def window_nll(self, windows: Tensor, reading: Reading) -> tuple[Tensor, Tensor]:
        """Every window read ``chunk_len`` positions per forward (all positions' logits of a chunk): the
        landmark model with landmarks inserted, through a ``LandmarkRetrievalCache`` (landmark positions
        not scored, as for the library's ``GPT``); the other model through its own ``DynamicCache``."""
        transformers = require("transformers")

        counts = torch.full((windows.shape[0],), windows.shape[1] - 1)
        if self.landmark_id is None:
            targets = torch.cat([windows[:, 1:], torch.full_like(windows[:, :1], -100)], dim=1)
            cache = transformers.DynamicCache(config=self.model.config)
            return sum_nll(self._chunks(windows, cache, reading.chunk_len), targets), counts
        stream, _, targets = landmark_stream(windows, None, self.block_size, self.landmark_id)
        cache = landmark.hf.LandmarkRetrievalCache(self.model, reading.retrieval, **reading.cache_kwargs())
        return sum_nll(self._chunks(stream, cache, reading.chunk_len), targets), counts

    def _chunks(self, ids: Tensor, cache: Any, chunk_len: int) -> Iterator[tuple[int, Tensor]]:
        """(B, n) ids -> ``(c0, (B, c, vocab) logits)`` of every chunk of ``chunk_len`` positions."""
        for c0 in range(0, ids.shape[1], chunk_len):
            chunk = ids[:, c0 : c0 + chunk_len].to(self._device)
            with using_threads():
                logits = landmark.hf.forward_cached(self.model, chunk, cache, check_landmarks=False).logits
            yield c0, logits


def _nll_sums(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T, vocab) logits, (B, T) targets -> (B,) float64 NLL sums."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return ce.sum(1).double().cpu()


def parse_model_arg(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the folder) -> (name, path); PATH may be ``hf:FOLDER``."""
    if "=" in text:
        name, path = text.split("=", 1)
    else:
        path = text
        name = Path(text.removeprefix(HF_PREFIX).rstrip("/")).name
    if not name or not path or path == HF_PREFIX:
        raise ValueError(f"--model must be NAME=PATH, NAME=hf:FOLDER or PATH; got {text!r}")
    return name, path


def load_models(specs: list[str], device: str = "cpu", weights: str = "model") -> list[ModelUnderTest]:
    """Load every ``NAME=PATH`` (a run or checkpoint folder) or ``NAME=hf:FOLDER`` (a Hugging Face model
    folder), its linear layers' weights as ``weights`` says (``compact_weights``); a one-line ValueError
    naming ``--model`` for no model, a name given twice, a missing or damaged folder or an unknown model
    kind."""
    if not specs:
        raise ValueError("give at least one --model NAME=PATH (a training run folder or checkpoint)")
    named = [parse_model_arg(spec) for spec in specs]
    names = [name for name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--model names {twice} more than once: give every checkpoint its own NAME=PATH")
    out = []
    for name, path in named:
        if path.startswith(HF_PREFIX):
            out.append(load_hf(name, path.removeprefix(HF_PREFIX), device, weights=weights))
        else:
            out.append(load_gpt(name, path, device, weights=weights))
    return out


def load_gpt(name: str, path: str, device: str = "cpu", weights: str = "model") -> GPTUnderTest:
    """The library's checkpoint at ``path`` (a run or checkpoint folder), its linear layers' weights as
    ``weights`` says."""

    try:
        model, tokenizer, _ = load_model(path, device=device)
    except CheckpointError as err:
        raise ValueError(f"--model {name}: {err}") from None
    if model.config.attention not in ATTENTION_KINDS:
        raise ValueError(
            f"--model {name}: unknown model kind {model.config.attention!r}; known: {ATTENTION_KINDS}"
        )
    return GPTUnderTest(name, path, compact_weights(model.eval(), weights), tokenizer)


def load_hf(
    name: str, path: str, device: str = "cpu", base: str | None = None, weights: str = "model"
) -> HFUnderTest:
    """The Hugging Face model folder at ``path``: a landmark-converted model (its config has
    ``landmark_token_id``; or a folder without config.json, such as a delta folder) through
    ``landmark.hf.load_pretrained``, any other with its own attention; ``base``: a delta folder's base
    (default: the one the delta names); ``weights``: the linear layers' weights (``compact_weights``).
    Errors name ``--model NAME``."""
    option = f"--model {name}"
    folder = Path(path)
    try:
        plain = False
        if (folder / "config.json").is_file():
            check_model_folder(folder)  # valid config.json, weights, tokenizer
            plain = read_config(folder).get("landmark_token_id") is None
        with _quiet_loading():
            if plain:
                transformers = require("transformers")

                with loading(folder):
                    model = load_causal_lm(folder)
                    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:  # landmark-converted, or not a model folder at all: load_pretrained says which
                model, tokenizer = load_pretrained(folder, base=base)
    except ValueError as err:
        raise for_option(err, option) from None
    return HFUnderTest(name, str(folder), compact_weights(model.to(device).eval(), weights), tokenizer)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' per-tensor loading bar (a mistake found later stays one line on stderr)."""
    hf_logging = require("transformers.utils.logging")

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
