"""A landmark model for lm-evaluation-harness: ``--model landmark`` (``pip install -e ".[lmeval]"``).

:class:`LandmarkLM` reads a Hugging Face model folder the way :mod:`landmark.eval.models` does
(:func:`landmark.eval.models.load_hf`): a landmark delta or converted model reads long contexts through a
:class:`landmark.hf.LandmarkRetrievalCache` (top-k retrieval, ``k`` / ``granularity`` / ``chunk_len``), any
other folder with its own attention (a ``DynamicCache``), so one adapter runs a landmark model and its
base on the same requests.

* ``generate_until``: the library's generation loop (:func:`landmark.inference.generate.generate_with`
  over :func:`landmark.hf.generate.hf_reader`): greedy unless the task asks for sampling, stops at the
  tokenizer's eos token, at any ``until`` string (checked as every token arrives) or after
  ``max_gen_toks``; the landmark token is never generated.
* ``loglikelihood``: the continuation's log-probability from one causal pass over context +
  continuation (landmarks inserted and not scored, as ``HFUnderTest.window_nll`` scores), and whether
  greedy decoding would produce it.
* ``loglikelihood_rolling``: the same over lm_eval's rolling windows of ``max_length`` tokens (a landmark
  model's default ``max_length`` holds any document in one window).

lm_eval 0.4.13 finds models only in its own registry (``lm_eval.api.registry.model_registry``, filled from
``lm_eval/models/__init__.py``; no entry points): importing this module registers ``landmark`` there
(``@register_model``). The command-line entry :func:`main` (``landmark eval lm-eval ...`` or
``python -m landmark.eval.harness ...``) imports it and then runs lm_eval's own command line with the
same arguments.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor
from tqdm import tqdm

from landmark.eval.models import LM_EVAL_MODEL, MODEL_ARGS, SESSION_OPTIONS, HFUnderTest, load_hf
from landmark.eval.ruler_data import use_prepared_ruler
from landmark.hf.convert import encode_text
from landmark.hf.generate import hf_reader
from landmark.hf.retrieval import LandmarkRetrievalCache, forward_cached
from landmark.inference.cache import DEFAULT_CHUNK_LEN
from landmark.inference.generate import Hooks, Landmarks, Sampling, generate_with
from landmark.inference.options import Reading, check_device, resolve_device
from landmark.inference.session import landmark_stream
from landmark.inference.threads import using_threads
from landmark.optional import require

MODEL_NAME = LM_EVAL_MODEL  # lm_eval --model landmark
LANDMARK_MAX_LENGTH = 1 << 24  # a landmark model's default max_length: any document in one window
DEFAULT_MAX_GEN_TOKS = 256  # as lm_eval's HFLM


@dataclass(frozen=True)
class ModelArgs:
    """``--model_args`` of the ``landmark`` model beside ``pretrained`` (see :class:`LandmarkLM`)."""

    k: int = 4
    granularity: str = Reading.granularity
    chunk_len: int = DEFAULT_CHUNK_LEN
    device: str | None = None
    max_length: int | None = None
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    add_bos_token: bool = False
    base: str | None = None
    tokenizer: str | None = None
    batch_size: int | str | None = 1
    max_batch_size: int | None = None

    @classmethod
    def split(cls, given: dict[str, Any]) -> tuple[ModelArgs, dict[str, Any]]:
        """(these arguments, the retrieval cache's options) of ``--model_args``; unknown names refused."""
        unknown = sorted(set(given) - set(MODEL_ARGS) - set(SESSION_OPTIONS))
        if unknown:
            raise ValueError(
                f"--model_args: unknown arguments {unknown} for --model {MODEL_NAME}; known: "
                f"{', '.join(MODEL_ARGS + SESSION_OPTIONS)}"
            )
        options = {n: int(v) if n == "max_blocks" else v for n, v in given.items()
                   if n in SESSION_OPTIONS and v is not None}  # fmt: skip
        return cls(**{n: v for n, v in given.items() if n not in SESSION_OPTIONS}), options


log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from the token callback when the text so far holds a stop string."""


@register_model(MODEL_NAME)
class LandmarkLM(TemplateLM):
    """lm_eval's view of a Hugging Face model folder, read by this library (see the module).

    Args (``--model_args key=value,...``):
        pretrained: a landmark delta folder, a landmark-converted model folder, or a plain Hugging Face
            causal LM folder (read with its own attention).
        base: the base model folder of a delta (default: the one the delta names).
        tokenizer: a tokenizer folder for the tasks that build their prompts with one (RULER's
            generators read ``tokenizer``, else ``pretrained``, which a delta folder cannot serve); the
            model always reads with its own tokenizer.
        k, granularity, chunk_len: the retrieval setting (``RetrievalConfig``; chunk_len: positions per
            forward). search, kernel, memory_device, max_blocks: the retrieval cache's options.
        device: cpu, cuda or cuda:N (default cuda when available; an unavailable cuda falls back to cpu,
            as lm_eval's default ``cuda:0`` would otherwise fail on a CPU machine).
        max_length: tokens of context + generation (longer prompts are cut from the left); default: the
            model's window for a plain model, unlimited for a landmark model.
        max_gen_toks: default tokens to generate when a task does not say.
        add_bos_token: prepend the tokenizer's BOS (as HFLM's option; default False).
        batch_size, max_batch_size: accepted for lm_eval's command line; requests are read one at a time
            (a long prompt's block memory is large, and rows of different lengths are not padded).
    """

    def __init__(self, pretrained: str, **model_args: Any) -> None:
        super().__init__()
        args, options = ModelArgs.split(model_args)
        self._device = torch.device(_device(args.device))
        self.under_test: HFUnderTest = load_hf(MODEL_NAME, str(pretrained), str(self._device), base=args.base)
        self.tokenizer = self.under_test.tokenizer
        self.reading = Reading(
            k=int(args.k), granularity=str(args.granularity), chunk_len=int(args.chunk_len), **options
        )
        if self.retrieves:
            _ = self.reading.retrieval  # a bad k or granularity fails here, before any request
        max_length = args.max_length
        self._max_length = int(max_length) if max_length is not None else self._default_max_length()
        self.max_gen_toks = int(args.max_gen_toks)
        self.add_bos_token = bool(args.add_bos_token)
        self.batch_size = args.batch_size

    # --- what lm_eval asks of a model ------------------------------------------------------------------

    @property
    def retrieves(self) -> bool:
        """Whether the model reads with top-k retrieval (a landmark model)."""
        return self.under_test.landmark_id is not None

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after: BOS if the tokenizer has one, else eos (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The tokenizer's chat template over ``chat_history`` (as HFLM; a template refusing the system
        role is retried without it)."""

        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )  # fmt: skip

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template failed; retrying without the system role")
            return render([m for m in chat_history if m["role"] != "system"])

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **_
    ) -> list[int]:
        """Token ids of ``string`` (special-token strings such as a chat template's are special tokens,
        except ``<landmark>``, which stays plain text: landmarks are inserted by the library only)."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = list(self.tokenizer.encode(string, add_special_tokens=add))
        if self.retrieves and self.under_test.landmark_id in ids:
            ids = encode_text(self.tokenizer, string, add_special_tokens=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """``((context, continuation), context_ids, continuation_ids)`` -> (log-probability, greedy)."""
        out = []
        for _, context, continuation in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            ids = (list(context) + list(continuation))[-(self.max_length + 1) :]
            out.append(self.score(ids, len(ids) - len(continuation)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-probability over lm_eval's disjoint rolling windows of ``max_length``."""
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = get_rolling_token_windows(token_list=self.tok_encode(string),
                                                prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)  # fmt: skip
            total = 0.0
            for context, continuation in map(make_disjoint_window, windows):
                total += self.score(list(context) + list(continuation), len(context))[0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each ``(context, gen_kwargs)`` -> the generated text, cut before the first ``until`` string."""
        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], desc="generate_until", disable=disable_tqdm
        ):
            text = self.generate(context, gen_kwargs)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    # --- the library's reading -------------------------------------------------------------------------

    def generate(self, context: str, gen_kwargs: dict) -> str:
        """One ``generate_until`` request: the context (cut from the left to ``max_length -
        max_gen_toks``) read through the model's cache, then tokens until eos, an ``until`` string or
        ``max_gen_toks``."""

        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(
            kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False)
        )
        max_gen = int(kwargs.pop("max_gen_toks"))
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks {max_gen} must be less than max_length {self.max_length}")
        ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
        sampling = Sampling(float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
                            float(kwargs.get("top_p") or 1.0), kwargs.get("seed"))  # fmt: skip
        new = self.generate_ids(ids, max_gen, until, sampling)
        return postprocess_generated_text(self.tok_decode(new), until, None)

    def generate_ids(self, ids: list[int], max_new: int, until: list[str], sampling: Any = None) -> list[int]:
        """(n,) prompt ids -> the generated ids: greedy (or ``sampling``), stopped after eos, after the
        token that completes an ``until`` string, or after ``max_new`` tokens."""

        m, tokens = self.under_test, []
        stops = [s for s in until if s]

        def on_token(_row: int, token: int) -> None:
            tokens.append(token)
            if stops and any(s in self.tok_decode(tokens, False) for s in stops):
                raise _Stop

        with contextlib.suppress(_Stop):
            generate_with(
                hf_reader(m.model, self._new_cache(), self.reading.chunk_len),
                [ids],
                max_new,
                landmarks=Landmarks(m.block_size, m.landmark_id),
                sampling=sampling or Sampling(),
                hooks=Hooks((self.eot_token_id,), on_token),
            )
        return tokens

    @torch.no_grad()
    def score(self, ids: list[int], start: int) -> tuple[float, bool]:
        """(log-probability of ``ids[start:]`` after ``ids[:start]``, whether greedy decoding gives it).

        One causal pass over ``ids`` (landmarks inserted for a landmark model); the log-probabilities
        are over the whole vocabulary (as ``HFUnderTest.window_nll`` scores), the greedy check leaves
        the landmark token out (it is never generated)."""
        if not 1 <= start < len(ids):
            raise ValueError(f"score: need 1 <= start < len(ids); got start {start}, {len(ids)} ids")
        stream, where = self._stream(ids)
        logits = self._logits_at(stream, where[start - 1 : len(ids) - 1])  # (n_cont, vocab)
        target = torch.tensor(ids[start:])
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).sum()
        if self.retrieves:
            logits[:, self.under_test.landmark_id] = float("-inf")
        return float(logp), bool((logits.argmax(-1) == target).all())

    def _stream(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        """(n,) regular ids -> ((1, n') the stream the model reads, (n,) the stream position of every
        regular token)."""
        tokens = torch.tensor([ids])
        positions = torch.arange(len(ids))
        m = self.under_test
        if not self.retrieves:
            return tokens, positions

        stream, _, _ = landmark_stream(tokens, None, m.block_size, m.landmark_id)
        return stream, positions + positions // (m.block_size - 1)

    def _logits_at(self, stream: Tensor, wanted: Tensor) -> Tensor:
        """(1, n') stream, (w,) increasing stream positions -> (w, vocab) logits there: the stream read
        ``chunk_len`` positions per forward through a fresh cache (as ``HFUnderTest.window_nll`` reads), only
        the needed rows computed."""

        model, cache, rows = self.under_test.model, self._new_cache(), []
        for c0 in range(0, stream.shape[1], self.reading.chunk_len):
            chunk = stream[:, c0 : c0 + self.reading.chunk_len].to(self._device)
            here = wanted[(wanted >= c0) & (wanted < c0 + chunk.shape[1])] - c0
            keep = chunk.shape[1] - int(here.min()) if here.numel() else 1
            with using_threads():
                logits = forward_cached(
                    model, chunk, cache, check_landmarks=False, logits_to_keep=keep
                ).logits[0]
            if here.numel():
                rows.append(logits[here - (chunk.shape[1] - keep)].cpu())
        return torch.cat(rows)

    def _new_cache(self) -> Any:
        """A fresh cache: a ``LandmarkRetrievalCache`` for a landmark model, else a ``DynamicCache``."""
        model = self.under_test.model
        if not self.retrieves:
            transformers = require("transformers")

            return transformers.DynamicCache(config=model.config)

        return LandmarkRetrievalCache(model, self.reading.retrieval, **self.reading.cache_kwargs())

    def _default_max_length(self) -> int:
        if self.retrieves:
            return LANDMARK_MAX_LENGTH
        config = self.under_test.model.config
        return int(getattr(config, "max_position_embeddings", None) or 2048)


def _device(value: str | None) -> str:
    """The device to read with: ``value``, or cuda when available; a cuda name on a machine without
    CUDA (lm_eval's command line defaults to ``cuda:0``) falls back to cpu with a warning."""

    if value and str(value).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s: no CUDA device here, reading on the cpu", value)
        return "cpu"
    check_device(value, "--model_args device")
    return resolve_device(value)


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line with ``--model landmark`` registered (and, when ``landmark eval
    prepare-ruler`` has run, RULER's offline inputs in its environment)."""

    use_prepared_ruler()
    lm_eval_main = require("lm_eval.__main__")

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    lm_eval_main.cli_evaluate()
    return 0


__all__ = ["LANDMARK_MAX_LENGTH", "MODEL_NAME", "LandmarkLM", "main"]

if __name__ == "__main__":
    sys.exit(main())
