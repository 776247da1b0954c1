"""Landmark fine-tuning of a Hugging Face causal LM with the transformers Trainer.

One function, :func:`finetune`, behind ``landmark hf finetune``. It works the same in one process and
under ``torchrun`` (the Trainer picks DDP, or FSDP with ``fsdp=True``; gloo on CPU, NCCL on CUDA):

1. load the model (a landmark model via :func:`landmark.hf.load_pretrained`, else any supported causal
   LM, converted with :func:`landmark.hf.convert`);
2. tokenize the corpus once (cached, :func:`landmark.hf.data.tokenize_corpus`) and cut it into windows
   of ``max_length`` positions, landmarks included (:class:`landmark.hf.LandmarkCollator`);
3. optionally wrap the model with LoRA (peft): adapters on the attention projections, plus the
   ``<landmark>`` embedding row as trainable tokens (the row is new, so it must learn);
4. train with the Trainer (AdamW, cosine schedule with warm-up; the loss is the landmark loss through
   ``shift_labels``), optionally evaluate on validation windows before and after;
5. checkpoint every ``save_steps`` optimizer steps into the staging folder (the last checkpoint kept),
   so that an interrupted run continues with ``resume=True`` (``--resume``) from its last checkpoint,
   with the same settings (checked against the run's ``finetune-run.json``), optimizer, schedule and
   data order; one process at a time (the staging folder is locked);
6. save with ``save_pretrained`` (LoRA merged into the weights; the adapter is also kept in
   ``<out>/lora-adapter``), so that :func:`landmark.hf.load_pretrained` restores the model. Everything
   is written into a staging folder beside ``out`` and renamed into place at the end: an existing
   ``out`` is refused unless ``overwrite`` and is replaced only by a complete new folder.

Every setting is checked (:meth:`FinetuneConfig.check`) before anything is loaded or written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from landmark.config import DEFAULT_BLOCK_SIZE, FINETUNE_SUMMARY_FILE, LORA_ADAPTER_FOLDER, MAX_GRAD_ACCUM
from landmark.data import CorpusError, read_corpus
from landmark.data.passkey import BookHaystack, PasskeyMix
from landmark.data.wordings import TRAINING_WORDINGS
from landmark.files import RunLock, check_not_input, write_json_atomic
from landmark.hf.checks import (
    Rule,
    check_model_folder,
    check_options,
    check_out_folder,
    check_within_positions,
    for_option,
    int_range,
    load_causal_lm,
    loading,
    option_name,
    publish,
    read_config,
    real_range,
    staging_folder,
)
from landmark.hf.collator import LandmarkCollator, regular_tokens_per_window
from landmark.hf.convert import convert, unsupported_config
from landmark.hf.data import TokenWindows, tokenize_corpus
from landmark.hf.delta import load_pretrained, read_meta, set_lora, start_from_delta
from landmark.hf.distill import DistillCollator, check_teacher_folder, distilling_trainer_class, load_teacher
from landmark.hf.passkey import PasskeyMixWindows, check_passkey_windows
from landmark.optional import require
from landmark.resources import BFLOAT16, check_fits, processes_sharing_memory

# LoRA target sets (--lora-targets): the attention projections, where landmarks act, or every linear layer
LORA_TARGET_SETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
RUN_FILE = "finetune-run.json"  # in the staging folder: the settings an interrupted run resumes with
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # a Trainer checkpoint folder: checkpoint-<step>
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint folder
# a checkpoint's weights: the LoRA adapter, a whole model (one file, sharded), FSDP's own files
CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                      "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                      "pytorch_model_fsdp*")  # fmt: skip
# settings a resumed run may change: how long this call runs, what is printed, and the steps it ends at
# (no fewer than it has done: --steps <steps done> finishes a run stopped by --max-minutes where it is)
RESUMABLE_CHANGES = ("resume", "max_minutes", "logging_steps", "overwrite", "steps")
# settings that act only beside another one: setting -> (the one it needs, what that one must be); given
# without it they would be ignored, so they are refused (FinetuneConfig.check_dependent)
DEPENDENT_SETTINGS = {
    "lora_dropout": ("lora_r", "--lora-r > 0 (LoRA; --lora-r 0 is a full fine-tune)"),
    "lora_targets": ("lora_r", "--lora-r > 0 (LoRA; --lora-r 0 is a full fine-tune)"),
    "lora_alpha": ("lora_r", "--lora-r > 0 (LoRA; --lora-r 0 is a full fine-tune)"),
    "passkey_near_gap": ("passkey_near", "--passkey-near > 0 (the near keys it spaces)"),
    "distill_weight": ("distill", "--distill BASE (the KL term it weighs)"),
}
MIN_WINDOW_BLOCKS = 2  # --max-length: at least this many blocks, so that tokens reach a block by its landmark


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune` (the ``landmark hf finetune`` options)."""

    model: str  # folder of a causal LM (a landmark model, or a supported model to convert)
    out: str  # where the fine-tuned model and tokenizer are saved (save_pretrained)
    corpus: str | None = None  # corpus folder (see landmark.data.read_corpus); None = the bundled books
    block_size: int | None = None  # positions per block, landmark included; None = the model's, else 64
    max_length: int = 512  # positions per training window, landmarks included (the paper: 512)
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # windows per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-5  # peak learning rate (full fine-tuning; LoRA usually wants ~1e-4..2e-4)
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0 at `steps`
    weight_decay: float = 0.0
    lora_r: int = 0  # LoRA rank; 0 = full fine-tuning
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "attention"  # a key of LORA_TARGET_SETS
    fsdp: bool = False  # shard with FSDP (under torchrun) instead of DDP
    bf16: bool = False  # bfloat16 mixed precision
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_windows: int = 0  # validation windows evaluated before and after training (0: none)
    max_windows: int | None = None  # use at most this many training windows (None: the whole split)
    # the passkey mix (landmark.data.passkey.PasskeyMix, the same options as landmark train's data.passkey_*)
    passkey_fraction: float = 0.0  # share of training windows replaced by in-window passkey samples
    passkey_books: float = 0.0  # share of those whose filler is prose of the training split
    passkey_multikey: float = 0.0  # share of those with several named keys, one asked
    passkey_near: float = 0.0  # share of key/question pairs whose question follows the key within
    # passkey_near_gap filler tokens (the key in the local context, not held one block back)
    passkey_near_gap: int | None = None  # the most filler tokens between a near key and its question;
    # None: anywhere before the question (data.passkey_near_gap's default is 0: right before it)
    passkey_pairs: int = 1  # key/question pairs per passkey sample (> 1: repeated filler, one key each)
    passkey_chat: float = 0.0  # share of those in the tokenizer's chat template (answer = the reply)
    passkey_wordings: str = "paper"  # "paper": the paper's sentences; "train": the training wording families
    max_minutes: float | None = None  # stop training after this much wall time (None: run all `steps`)
    seed: int = 0
    overwrite: bool = False  # replace an existing, non-empty `out` (else refused)
    save_steps: int = 50  # checkpoint (for resume) every this many optimizer steps
    resume: bool = False  # continue the interrupted run staged for `out` from its last checkpoint
    init_delta: str | None = None  # start LoRA and the landmark row from this delta (over `model`);
    # with lora_r 0, start a full fine-tune from the delta's merged model
    distill: str | None = None  # the base model folder to distil toward (landmark.hf.distill); None: off
    distill_weight: float = 1.0  # weight of KL(base || model) per token beside the cross-entropy

    def passkey_mix(self) -> PasskeyMix:
        """The passkey options of the run (the shares of ``--passkey-*``)."""
        return PasskeyMix.of(self)

    def _check_wordings(self) -> None:
        """``--passkey-wordings``: a training set (never the held-out families), with passkey samples."""

        if self.passkey_wordings not in TRAINING_WORDINGS:
            raise ValueError(
                f"--passkey-wordings must be one of {', '.join(TRAINING_WORDINGS)} (the held-out families "
                f"are never trained on); got {self.passkey_wordings!r}"
            )
        if self.passkey_wordings != "paper" and not self.passkey_fraction:
            raise ValueError(
                f"--passkey-wordings {self.passkey_wordings} words the passkey samples and needs "
                "--passkey-fraction > 0"
            )

    def check(self) -> None:
        """Refuse bad settings before any work: ranges (nan and inf included), the model folder and its
        limits, the corpus, the output folder, FSDP on CPU.

        Raises:
            ValueError: one line naming the option (as on the command line, ``--steps``).
        """
        check_options(asdict(self), FINETUNE_RULES)
        self.check_dependent()
        if self.fsdp and not torch.cuda.is_available():
            raise ValueError(
                "--fsdp needs CUDA devices: accelerate enables FSDP only for GPU-class devices and would "
                "silently fall back to DDP on CPU processes (torch's own FSDP2 does run on CPU with gloo; "
                "see docs/huggingface.md); use DDP (the default under torchrun) on CPU"
            )
        if self.lora_r and self.fsdp:
            raise ValueError("LoRA with FSDP is not supported by `landmark hf finetune` (untested); use DDP")
        shares = (
            ("--passkey-books", self.passkey_books),
            ("--passkey-multikey", self.passkey_multikey),
            ("--passkey-near", self.passkey_near),
            ("--passkey-chat", self.passkey_chat),
        )
        self._check_wordings()
        extra = next(((o, v) for o, v in shares if v), None)
        if extra and not self.passkey_fraction:
            raise ValueError(
                f"{extra[0]} is a share of the passkey samples and needs --passkey-fraction > 0; got "
                f"{extra[0]} {extra[1]} with --passkey-fraction 0"
            )
        try:  # the ranges are checked above: what is left is how the options combine
            self.passkey_mix()
        except ValueError as err:
            raise ValueError(
                f"--passkey-pairs, --passkey-books, --passkey-multikey, --passkey-chat: {err}"
            ) from None
        if self.lora_targets not in LORA_TARGET_SETS:
            raise ValueError(
                f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}; got {self.lora_targets!r}"
            )
        config = read_config(check_model_folder(self.model, "--model"))
        problem = unsupported_config(config)
        if problem is not None:
            raise ValueError(f"--model {self.model}: {problem}")
        delta_block = self._check_init_delta(config) if self.init_delta is not None else None
        check_within_positions(config, {"block_size": self.block_size, "max_length": self.max_length})
        self._check_window(config, delta_block)
        self._check_memory(config)
        if self.distill is not None:
            check_teacher_folder(self.distill)
        self._check_corpus()
        reads = [(self.model, "--model"), (self.distill, "--distill"), (self.init_delta, "--init-delta")]
        check_not_input(self.out, [*reads, (self.corpus, "--corpus")])  # (the more telling refusal first)
        check_out_folder(self.out, self.overwrite, "--out")
        self._check_resume()

    def check_dependent(self, given: Iterable[str] | None = None) -> None:
        """Refuse a setting of DEPENDENT_SETTINGS without the setting it needs (it would be ignored).

        Args:
            given: the settings set explicitly (the command line's options, its defaults included); None:
                those away from their defaults.

        Raises:
            ValueError: ``--lora-dropout 0.1 needs --lora-r > 0 (...); got it with --lora-r 0``.
        """
        defaults = {f.name: f.default for f in fields(self)}
        if given is None:
            given = [name for name in DEPENDENT_SETTINGS if getattr(self, name) != defaults[name]]
        for name in given:
            needed, wording = DEPENDENT_SETTINGS[name]
            value = getattr(self, needed)
            if not value:
                option, other = option_name(name), option_name(needed)
                has = f"without {other}" if value is None else f"with {other} {value}"
                raise ValueError(
                    f"{option} {getattr(self, name)} needs {wording}; got it {has} (it would be ignored)"
                )

    def _check_window(self, config: dict[str, Any], delta_block: int | None) -> None:
        """``max_length`` holds MIN_WINDOW_BLOCKS blocks of the run's block size (``block_size``, else the
        ``--init-delta``'s, else the landmark model's, else the default): a shorter window holds at most
        one landmark, and few or no tokens learn to reach a block through it."""
        block, source = self._run_block_size(config, delta_block)
        least = MIN_WINDOW_BLOCKS * block
        if self.max_length < least:
            raise ValueError(
                f"--max-length {self.max_length} must be at least {MIN_WINDOW_BLOCKS} blocks ({least} "
                f"positions, {source} {block}): a shorter window holds at most one landmark, so few or no "
                "tokens learn to reach an earlier block through it"
            )

    def _run_block_size(self, config: dict[str, Any], delta_block: int | None) -> tuple[int, str]:
        """(the block size the run trains with, where it comes from), read before the model is loaded."""
        model_block = config.get("landmark_block_size")
        if self.block_size is not None:
            return self.block_size, "--block-size"
        if delta_block is not None:
            return delta_block, "the --init-delta's block size"
        if isinstance(model_block, int) and not isinstance(model_block, bool):
            return model_block, "the model's block size"
        return DEFAULT_BLOCK_SIZE, "the default block size"

    def _check_memory(self, config: dict[str, Any]) -> None:
        """Refuse a run that certainly cannot fit in its device's memory (a lower bound: the weights in
        bfloat16, and per window position the input of every layer and the logits, both in bfloat16;
        the backward pass keeps them even with gradient checkpointing), naming ``--batch-size`` or
        ``--max-length``, whichever is larger than its default by more."""
        try:
            hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
            vocab, inner = int(config["vocab_size"]), int(config.get("intermediate_size") or 0)
        except (KeyError, TypeError, ValueError):
            return  # not a LLaMA-family config.json: loading it reports that
        weights = BFLOAT16 * (vocab * hidden + layers * 3 * hidden * inner)
        per_position = BFLOAT16 * (layers * hidden + vocab)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        processes = processes_sharing_memory(device)
        need = processes * (weights + self.batch_size * self.max_length * per_position)
        defaults = {f.name: f.default for f in fields(self)}
        grown = {o: getattr(self, o) / defaults[o] for o in ("batch_size", "max_length")}
        option = max(grown, key=grown.get)
        setting = f"--{option.replace('_', '-')} {getattr(self, option)}"
        what = (
            f"fine-tuning {self.batch_size} windows x {self.max_length} positions through {layers} layers "
            f"of width {hidden} and {vocab} logits{f', x {processes} processes' if processes > 1 else ''}"
        )
        check_fits(need, setting, what, device)

    def _check_resume(self) -> None:
        """With ``resume``: the staging folder holds a checkpoint of a run with the same settings (those
        in RESUMABLE_CHANGES aside). Without: it holds no checkpoint (an interrupted run is never
        silently thrown away)."""
        staging = staging_folder(self.out)
        if staging.is_dir() and _main_process():  # another live fine-tune into it: said before loading
            probe = RunLock(staging, option="--out")
            probe.acquire()
            probe.release()
        checkpoint = last_checkpoint(staging)
        if not self.resume:
            if checkpoint is not None:
                raise ValueError(
                    f"--out: an interrupted fine-tune left {checkpoint.name} in {staging}: add --resume to "
                    "continue it, or delete that folder to start again"
                )
            return
        run_file = staging / RUN_FILE
        if checkpoint is None or not run_file.is_file():
            partial = incomplete_checkpoints(staging)
            left = (
                f": it left only incomplete checkpoints ({', '.join(c.name for c, _ in partial)}); run "
                "without --resume to start again"
                if partial
                else ""
            )
            raise ValueError(
                f"--resume: no interrupted fine-tune to continue for --out {self.out} ({staging}){left}"
            )
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"--resume: cannot read {run_file}: {err}") from None
        mine = asdict(self)
        defaults = {f.name: f.default for f in fields(self)}  # for settings newer than the run's file
        saved = {name: saved.get(name, defaults[name]) for name in mine}
        changed = [name for name in mine if name not in RESUMABLE_CHANGES and saved[name] != mine[name]]
        if changed:
            name = changed[0]
            option = option_name(name)
            may = ", ".join(option_name(c) for c in RESUMABLE_CHANGES if c not in ("resume", "overwrite"))
            shown = lambda v: "its default (not given)" if v is None else repr(v)  # noqa: E731
            raise ValueError(
                f"--resume: the interrupted run used {option} {shown(saved.get(name))}; this call "
                f"gives {shown(mine[name])} (resume with the run's settings; only {may} may change)"
            )
        done = steps_done(checkpoint)
        if self.steps < done:
            raise ValueError(
                f"--steps {self.steps}: the interrupted run has done {done} steps ({checkpoint.name}); "
                f"give --steps {done} to finish it there, or more to go on"
            )

    def _check_init_delta(self, config: dict[str, Any]) -> int:
        """``init_delta`` is a delta folder whose LoRA (rank, alpha, targets) and block size are this
        run's, over an unconverted ``model`` (its weights fingerprint is checked once loaded). With
        ``lora_r`` 0 (full fine-tuning of the delta's merged model) only the block size must match.
        Returns the delta's block size."""

        try:
            meta = read_meta(Path(self.init_delta))
        except ValueError as err:
            raise ValueError(f"--init-delta: {err}") from None
        if config.get("landmark_token_id") is not None:
            raise ValueError(
                f"--init-delta starts from the delta's base model: --model {self.model} is already a "
                "landmark model (give the unconverted base)"
            )
        if self.lora_r:
            self._check_same_lora(meta["lora"])
        block = int(meta["landmark"]["block_size"])
        if self.block_size is not None and self.block_size != block:
            raise ValueError(
                f"--block-size must be the delta's {block} with --init-delta; got {self.block_size}"
            )
        return block

    def _check_same_lora(self, lora: dict[str, Any]) -> None:
        """This run's LoRA (rank, alpha, targets) is ``lora``, the ``--init-delta``'s (``delta.json``)."""
        mine = {
            "r": self.lora_r,
            "alpha": self.lora_alpha,
            "targets": sorted(LORA_TARGET_SETS[self.lora_targets]),
        }
        theirs = {
            "r": lora.get("r"),
            "alpha": lora.get("alpha"),
            "targets": sorted(lora.get("targets") or []),
        }
        for key, option in (("r", "--lora-r"), ("alpha", "--lora-alpha"), ("targets", "--lora-targets")):
            if mine[key] != theirs[key]:
                raise ValueError(
                    f"{option} must match --init-delta {self.init_delta} (LoRA r={theirs['r']}, "
                    f"alpha={theirs['alpha']}, targets {', '.join(theirs['targets'])}); got {mine[key]}"
                )

    def _check_corpus(self) -> None:
        """The corpus folder can be read and has the splits the settings use (the bundled books, the
        default, have them: not extracted here)."""

        if self.corpus is None:
            return
        try:
            corpus = read_corpus(self.corpus)
        except CorpusError as err:
            raise ValueError(f"--corpus: {err}") from None
        needed = ["train"] + (["validation"] if self.eval_windows else [])
        missing = [split for split in needed if split not in corpus.splits]
        if missing:
            raise ValueError(
                f"--corpus {corpus.root} has no {' or '.join(missing)} split (it has {sorted(corpus.splits)})"
            )


# The numeric settings' ranges (None values, for optional settings, are not checked).
FINETUNE_RULES: dict[str, Rule] = {
    "block_size": int_range(2),
    "max_length": int_range(2),
    "steps": int_range(1),
    "batch_size": int_range(1),
    "grad_accum": int_range(1, MAX_GRAD_ACCUM),  # float32 gradient sums: landmark.config
    "lr": real_range(0, open_low=True),
    "warmup_steps": int_range(0),
    "weight_decay": real_range(0),
    "lora_r": int_range(0),
    "lora_alpha": int_range(1),
    "lora_dropout": real_range(0, 1, open_high=True),
    "logging_steps": int_range(1),
    "save_steps": int_range(1),
    "eval_windows": int_range(0),
    "max_windows": int_range(1),
    "passkey_fraction": real_range(0, 1),
    "passkey_books": real_range(0, 1),
    "passkey_multikey": real_range(0, 1),
    "passkey_near": real_range(0, 1),
    "passkey_near_gap": int_range(0),
    "passkey_pairs": int_range(1),
    "passkey_chat": real_range(0, 1),
    "max_minutes": real_range(0, open_low=True),
    "distill_weight": real_range(0, open_low=True),
    "seed": int_range(0, 2**32 - 1),  # numpy's seed range (the Trainer seeds numpy)
}


def load_for_finetune(path: str | Path, block_size: int | None = None) -> tuple[Any, Any]:
    """A landmark model and tokenizer from ``path``: loaded as is if it is one, else converted.

    Args:
        path: a local model folder.
        block_size: None keeps a landmark model's block size (or uses 64 to convert); an explicit value
            converts with it (re-setting it on a landmark model).
    """
    transformers = require("transformers")

    path = check_model_folder(path)
    with loading(path):
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "landmark_token_id", None) is not None:
        model, tokenizer = load_pretrained(path)
        if block_size is not None and block_size != model.config.landmark_block_size:
            model, tokenizer = convert(model, tokenizer, block_size)
        return model, tokenizer
    with loading(path):
        model = load_causal_lm(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return convert(model, tokenizer, block_size if block_size is not None else DEFAULT_BLOCK_SIZE)


@dataclass
class _Run:
    """What the steps of one fine-tune share: its settings, where it writes, and the window geometry."""

    cfg: FinetuneConfig
    out: Path  # the final folder, replaced only once the run is complete
    staging: Path  # where the run writes until then (checkpoints for --resume included)
    args: Any  # transformers.TrainingArguments
    block_size: int  # positions per block, landmark included
    raw_tokens: int  # corpus tokens per window (+1: the next-token target of the last one)
    lock: RunLock | None = None  # held by process 0 while it writes into `staging`

    @property
    def main(self) -> bool:
        """Process 0 (of one, or of a torchrun job): the one that prints and writes."""
        return self.args.process_index == 0

    @property
    def step_tokens(self) -> int:
        """Regular tokens per optimizer step, over every process (windows being full)."""
        cfg = self.cfg
        return cfg.batch_size * cfg.grad_accum * self.args.world_size * (self.raw_tokens - 1)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` with landmarks on ``cfg.corpus`` and save it to ``cfg.out``.

    The steps, in order: check the settings; load the model (converted to landmarks, or from a delta);
    set up the run (training arguments, the staging folder held for this process); build the windows
    (corpus text, passkey samples); add LoRA; train (resuming from the last checkpoint with
    ``--resume``); save and publish the folder, or, stopped by ``--max-minutes``, keep it resumable.

    Returns:
        A summary (also written to ``<out>/landmark-finetune.json``): the settings, the train loss,
        eval losses before/after when ``eval_windows > 0``, time, parameter counts.
    """
    cfg.check()
    _check_passkey_windows_early(cfg)
    lock, made = _hold_staging(cfg)
    try:
        model, tokenizer, delta_lora = _load_model(cfg)
        run = _start_run(cfg, model, tokenizer, lock)
        train_set, eval_set, corpus_tokens = _windows(run, tokenizer)
    except BaseException:  # refused or stopped before training: nothing of this run is left behind
        _let_go(cfg, lock, made)
        raise
    model = _trainable(model, cfg, delta_lora)
    _announce(run, model, len(train_set), corpus_tokens)
    timer = _step_timer()
    callbacks = [timer, *([_time_limit(cfg.max_minutes)] if cfg.max_minutes else [])]
    trainer = _trainer(
        run, model, tokenizer, train_dataset=train_set, eval_dataset=eval_set, callbacks=callbacks
    )
    if cfg.fsdp and trainer.accelerator.distributed_type.value != "FSDP":
        raise RuntimeError(
            f"FSDP was requested but accelerate set up {trainer.accelerator.distributed_type.value}"
        )
    summary = _train(run, trainer, timer, evaluate=eval_set is not None)
    summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    if trainer.state.global_step < cfg.steps:  # stopped by --max-minutes: keep the run resumable
        return _stop_early(run, trainer, summary)
    _publish(run, trainer, tokenizer, summary)
    return summary


def _load_model(cfg: FinetuneConfig) -> tuple[Any, Any, Any]:
    """(model, tokenizer, the LoRA factors of ``--init-delta`` or None): the model to fine-tune."""
    try:
        if cfg.init_delta is not None:
            return start_from_delta(cfg.model, cfg.init_delta, merge=not cfg.lora_r)
        model, tokenizer = load_for_finetune(cfg.model, cfg.block_size)
        return model, tokenizer, None
    except ValueError as err:  # a damaged folder, an unsupported model: name the option
        raise for_option(err, "--model") from None


def _main_process() -> bool:
    """Process 0 of a torchrun job (``RANK``), or a process on its own: the one that holds the folder
    (the others would find it held by process 0)."""
    return os.environ.get("RANK", "0") == "0"


def _hold_staging(cfg: FinetuneConfig) -> tuple[RunLock | None, bool]:
    """Process 0 makes (if missing) and holds the staging folder before the model is loaded, so that a
    second fine-tune into the same ``--out`` is refused at once: (the hold, whether the folder was made
    here); (None, False) in the other processes of a torchrun job."""
    if not _main_process():
        return None, False
    staging = staging_folder(Path(cfg.out))
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.mkdir()
        made = True
    except FileExistsError:
        made = False
    lock = RunLock(staging, option="--out")
    try:
        lock.acquire()
    except BaseException:
        if made:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return lock, made


def _let_go(cfg: FinetuneConfig, lock: RunLock | None, made: bool) -> None:
    """After a refusal or a stop before training (process 0): remove the staging folder when it holds
    nothing to resume (a new run: only its settings), and let it go."""
    if lock is None:
        return
    if made or not cfg.resume:
        shutil.rmtree(lock.folder, ignore_errors=True)
    lock.release()


def _check_passkey_windows_early(cfg: FinetuneConfig) -> None:
    """Passkey samples fit the windows, checked with the tokenizer alone before the model is loaded
    (with ``--init-delta`` the delta's block size is known once it is read: checked then)."""
    if not cfg.passkey_fraction or cfg.init_delta is not None:
        return
    transformers = require("transformers")
    try:
        config = json.loads((Path(cfg.model) / "config.json").read_text(encoding="utf-8"))
        with loading(Path(cfg.model)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError):
        return  # an unreadable model folder: loading it says so
    block, _ = cfg._run_block_size(config if isinstance(config, dict) else {}, None)
    raw_tokens = regular_tokens_per_window(cfg.max_length, block) + 1
    check_passkey_windows(tokenizer, raw_tokens, block, cfg.passkey_mix())


def _start_run(cfg: FinetuneConfig, model: Any, tokenizer: Any, lock: RunLock | None) -> _Run:
    """The run's training arguments and window geometry; process 0 (holding the staging folder:
    ``lock``) clears what a killed run left unless ``--resume`` and records the settings a resume
    continues with."""
    block_size = int(model.config.landmark_block_size)
    raw_tokens = regular_tokens_per_window(cfg.max_length, block_size) + 1
    if cfg.passkey_fraction:
        check_passkey_windows(tokenizer, raw_tokens, block_size, cfg.passkey_mix())
    out = Path(cfg.out)
    staging = staging_folder(out)
    run = _Run(cfg, out, staging, _training_arguments(cfg, model, staging), block_size, raw_tokens)
    if run.main:
        run.lock = lock  # held before the model was loaded
        if not cfg.resume:
            for leftover in staging.iterdir():  # what a killed run left (no checkpoint: checked)
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            write_json_atomic(staging / RUN_FILE, asdict(cfg))
        else:
            _drop_incomplete_checkpoints(staging)
    return run


def _drop_incomplete_checkpoints(staging: Path) -> None:
    """Remove the checkpoints a run killed while saving left half-written (said on stderr, one line
    each): the resume starts from the last complete one, and the Trainer's rotation (it keeps the newest)
    must never keep a half-written one in its place."""
    resumed = last_checkpoint(staging)
    for checkpoint, problem in incomplete_checkpoints(staging):
        print(
            f"note: skipping {checkpoint.name} in {staging}: incomplete ({problem}; the run was stopped "
            f"while saving it); resuming from {resumed.name if resumed else 'the start'}",
            file=sys.stderr,
            flush=True,
        )
        shutil.rmtree(checkpoint, ignore_errors=True)


def _training_arguments(cfg: FinetuneConfig, model: Any, staging: Path) -> Any:
    """``transformers.TrainingArguments`` of the run: AdamW (beta2 0.95), cosine schedule with warmup,
    a checkpoint every ``save_steps`` (the last one kept, for ``--resume``), CPU/DDP/FSDP as set."""
    transformers = require("transformers")
    use_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    return transformers.TrainingArguments(
        output_dir=str(staging),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta2=0.95,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,  # the last checkpoint: what --resume needs
        report_to="none",
        remove_unused_columns=False,  # the collator needs the raw "input_ids" windows
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and distributed else None,
        fsdp=cfg.fsdp,
        fsdp_config=_fsdp_config(model) if cfg.fsdp else None,
        bf16=cfg.bf16,
        **_checkpointing_args(transformers.TrainingArguments, cfg.gradient_checkpointing),
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
    )


def _windows(run: _Run, tokenizer: Any) -> tuple[Any, Any, int]:
    """(training windows, evaluation windows or None, training tokens of the corpus): the corpus
    tokenized (process 0 first, the others read its cache), cut into windows, with passkey samples
    mixed in as ``--passkey-*`` set."""
    cfg, raw_tokens = run.cfg, run.raw_tokens
    with run.args.main_process_first(desc="tokenize the corpus"):
        train_tokens = tokenize_corpus(tokenizer, cfg.corpus, "train", progress=run.main)
        eval_tokens = (
            tokenize_corpus(tokenizer, cfg.corpus, "validation", progress=run.main)
            if cfg.eval_windows
            else None
        )
    try:
        train_set = TokenWindows(train_tokens, raw_tokens, limit=cfg.max_windows)
    except ValueError as err:  # name what the user can change
        corpus = cfg.corpus or "the bundled books"
        raise ValueError(f"--corpus {corpus}: its train split: {err}: give more text, or a shorter "
                         "--max-length") from None  # fmt: skip
    if cfg.passkey_fraction:
        haystack = BookHaystack(cfg.corpus, split="train") if cfg.passkey_books else None
        train_set = PasskeyMixWindows(
            train_set,
            tokenizer,
            raw_tokens,
            run.block_size,
            cfg.passkey_mix(),
            seed=cfg.seed,
            haystack=haystack,
        )
    try:
        eval_set = (
            TokenWindows(eval_tokens, raw_tokens, limit=cfg.eval_windows) if eval_tokens is not None else None
        )
    except ValueError as err:
        raise ValueError(f"--corpus {cfg.corpus or 'the bundled books'}: its validation split: {err}: give "
                         "more text, a shorter --max-length, or --eval-windows 0") from None  # fmt: skip
    return train_set, eval_set, len(train_tokens)


def _trainable(model: Any, cfg: FinetuneConfig, delta_lora: Any) -> Any:
    """The model with LoRA adapters (``--lora-r``), set to ``--init-delta``'s factors when given."""
    if cfg.lora_r:
        model = _with_lora(model, cfg)
    if delta_lora is not None:
        set_lora(model, delta_lora)
    return model


def _announce(run: _Run, model: Any, windows: int, corpus_tokens: int) -> None:
    """Process 0 prints what is fine-tuned, on what, how."""
    if not run.main:
        return
    cfg, args = run.cfg, run.args
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"landmark fine-tuning: {type(model).__name__} from {cfg.model}, block_size {run.block_size} "
        f"(landmark id {model.config.landmark_token_id}), windows of {cfg.max_length} positions "
        f"({run.raw_tokens - 1} tokens + landmarks), {windows} training windows of "
        f"{corpus_tokens:,} tokens; {args.world_size} process(es), "
        f"{'FSDP' if cfg.fsdp else 'DDP' if args.world_size > 1 else 'single'}, "
        f"{'LoRA r=' + str(cfg.lora_r) if cfg.lora_r else 'full fine-tuning'}: "
        f"{trainable:,} of {total:,} parameters trainable",
        flush=True,
    )


def _train(run: _Run, trainer: Any, timer: Any, evaluate: bool) -> dict[str, Any]:
    """Train (from the last checkpoint with ``--resume``), with the evaluation loss before and after;
    returns the summary: settings, losses, steps, tokens and throughput."""
    cfg, args = run.cfg, run.args
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "block_size": run.block_size,
        "world_size": args.world_size,
    }
    if evaluate:
        summary["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    checkpoint = last_checkpoint(run.staging) if cfg.resume else None
    if run.main and checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    finished = checkpoint is not None and steps_done(checkpoint) >= cfg.steps  # --steps <done>
    if finished:
        train_loss = _finish_at(trainer, checkpoint)
    else:
        resume = str(checkpoint) if checkpoint is not None else None
        train_loss = trainer.train(resume_from_checkpoint=resume).training_loss
    summary["train_seconds"] = round(time.perf_counter() - start, 1)
    # (None: no loss was logged, or it is not a number; strict JSON has no NaN)
    summary["train_loss"] = train_loss if train_loss is not None and math.isfinite(train_loss) else None
    summary["steps_done"] = trainer.state.global_step
    summary["tokens_seen"] = trainer.state.global_step * run.step_tokens
    # no throughput for a run finished at its checkpoint: this call trained nothing
    summary["tokens_per_s"] = (
        None if finished else summary["tokens_seen"] / max(summary["train_seconds"], 1e-9)
    )
    summary["steady_tokens_per_s"] = timer.steady_rate(
        run.step_tokens
    )  # the first step (compilation) excluded
    summary["distributed_type"] = str(trainer.accelerator.distributed_type.value)
    summary["sharded_parameters"] = any(
        type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters()
    )
    if evaluate:
        summary["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    return summary


def steps_done(checkpoint: Path) -> int:
    """The optimizer steps a Trainer checkpoint folder (``checkpoint-<step>``) holds."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


def _finish_at(trainer: Any, checkpoint: Path) -> float | None:
    """A run resumed with ``--steps`` equal to the steps it has done: its checkpoint's weights, no further
    step. Returns the mean of the training losses the run logged (the Trainer's own mean is lost), None
    where it logged none."""
    trainer._load_from_checkpoint(str(checkpoint))
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    trainer.state.global_step = int(state["global_step"])
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    return sum(losses) / len(losses) if losses else None


def _stop_early(run: _Run, trainer: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Stopped by ``--max-minutes``: save a checkpoint at this step so that ``--resume`` continues here,
    write what was trained so far (for scripts that read it, e.g. gpu_check), release the folder."""
    cfg = run.cfg
    if cfg.max_minutes and trainer.state.global_step % cfg.save_steps:
        trainer._save_checkpoint(trainer.model, trial=None)
    summary["stopped_early"] = True
    if run.main:
        print(
            f"stopped after {trainer.state.global_step} of {cfg.steps} steps (--max-minutes); "
            f"continue with the same command and --resume (checkpoint in {run.staging})",
            flush=True,
        )
        if run.lock is not None:
            run.lock.release()
        write_json_atomic(run.staging / FINETUNE_SUMMARY_FILE, summary)  # replaced when the run ends
    return summary


def _publish(run: _Run, trainer: Any, tokenizer: Any, summary: dict[str, Any]) -> None:
    """Save the model (or its LoRA adapter) with the summary, drop the resume state, and only then
    replace ``out`` (``--overwrite``) with the complete folder."""
    _save(trainer, tokenizer, run.staging, lora=bool(run.cfg.lora_r))
    if run.main:
        for old in run.staging.glob("checkpoint-*"):  # resume state (optimizer...): not part of the model
            shutil.rmtree(old, ignore_errors=True)
        (run.staging / RUN_FILE).unlink(missing_ok=True)
        write_json_atomic(run.staging / FINETUNE_SUMMARY_FILE, summary)
        if run.lock is not None:
            run.lock.release()
        publish(run.out)
    trainer.accelerator.wait_for_everyone()
    if run.main:
        line = f"saved to {run.out} (load with landmark.hf.load_pretrained); "
        loss = summary["train_loss"]
        line += "train loss not logged" if loss is None else f"train loss {loss:.4f}"
        if summary["tokens_per_s"] is not None:
            line += f", {summary['tokens_per_s']:,.0f} tokens/s"
        if "eval_loss_after" in summary:
            before, after = summary["eval_loss_before"], summary["eval_loss_after"]
            line += f"; eval loss {before:.4f} -> {after:.4f}"
            line += f" (perplexity {math.exp(before):.2f} -> {math.exp(after):.2f})"
        print(line, flush=True)


def _trainer(run: _Run, model: Any, tokenizer: Any, **kw: Any) -> Any:
    """The Trainer of a run: plain, or distilling toward ``cfg.distill`` (:mod:`landmark.hf.distill`)."""
    transformers = require("transformers")
    cfg, args, block_size, raw_tokens = run.cfg, run.args, run.block_size, run.raw_tokens

    if cfg.distill is None:
        collator = LandmarkCollator(tokenizer, block_size, cfg.max_length)
        return transformers.Trainer(model=model, args=args, data_collator=collator, **kw)

    dtype = torch.bfloat16 if cfg.bf16 else None
    teacher = load_teacher(cfg.distill, tokenizer, raw_tokens - 1, dtype=dtype)
    collator = DistillCollator(tokenizer, block_size, cfg.max_length)
    return distilling_trainer_class()(
        model=model, args=args, data_collator=collator, teacher=teacher, distill_weight=cfg.distill_weight,
        **kw,
    )  # fmt: skip


def last_checkpoint(staging: Path) -> Path | None:
    """The complete Trainer checkpoint (:func:`checkpoint_problem`) with the most steps in ``staging``
    (``checkpoint-<step>``), or None (also for a folder that does not exist). Read from the folders alone,
    without importing transformers (seconds): ``--resume`` with nothing to resume is refused at once."""
    complete = [c for c in _checkpoints(staging) if checkpoint_problem(c) is None]
    return complete[-1] if complete else None


def incomplete_checkpoints(staging: Path) -> list[tuple[Path, str]]:
    """``(folder, what it lacks)`` of every checkpoint in ``staging`` that is not complete (a run stopped
    while the Trainer was writing it), by step."""
    found = [(c, checkpoint_problem(c)) for c in _checkpoints(staging)]
    return [(c, problem) for c, problem in found if problem is not None]


def _checkpoints(staging: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``staging``, by step."""
    staging = Path(staging)
    if not staging.is_dir():
        return []
    found = [p for p in staging.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=steps_done)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What a Trainer checkpoint folder lacks to be resumed from: a readable ``trainer_state.json`` (written
    after the weights, optimizer and schedule), a weights file, whole ``.pt``/``.pth`` and ``.safetensors``
    files (from their directory and header: a truncated optimizer state failed the resume with "Invalid
    argument"); None when it is complete."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {TRAINER_STATE}"
    if not any(any(checkpoint.glob(name)) for name in CHECKPOINT_WEIGHTS):
        return f"no weights ({', '.join(CHECKPOINT_WEIGHTS[:3])}, ...)"
    for file in sorted(checkpoint.rglob("*.pt")) + sorted(checkpoint.rglob("*.pth")):  # optimizer, schedule
        if not zipfile.is_zipfile(file):  # (torch.save writes a zip archive; a cut one has no directory)
            return f"a damaged {file.relative_to(checkpoint)} (cut short?)"
    for file in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):  # (checks that the file holds every tensor its header lists)
                pass
        except (OSError, SafetensorError):
            return f"a damaged {file.relative_to(checkpoint)} (cut short?)"
    return None


def _step_timer() -> Any:
    """A Trainer callback recording when each optimizer step ends; ``steady_rate(tokens_per_step)`` is the
    throughput from the end of the first step to the end of the last (None with fewer than 2 steps)."""
    transformers = require("transformers")

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            return control

        def steady_rate(self, tokens_per_step: int) -> float | None:
            if len(self.ends) < 2:
                return None
            return (len(self.ends) - 1) * tokens_per_step / max(self.ends[-1] - self.ends[0], 1e-9)

    return StepTimer()


def _time_limit(minutes: float) -> Any:
    """A Trainer callback that stops training once ``minutes`` of wall time have passed since it began."""
    transformers = require("transformers")

    class TimeLimit(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > 60 * minutes:
                control.should_training_stop = True
            return control

    return TimeLimit()


def _checkpointing_args(arguments_class: type, enabled: bool) -> dict[str, Any]:
    """Activation checkpointing settings under the name this transformers version uses."""
    if not enabled:
        return {}
    name = "activation" if "activation_checkpointing" in arguments_class.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": True, f"{name}_checkpointing_kwargs": {"use_reentrant": False}}


def _fsdp_config(model: Any) -> dict[str, Any]:
    """FSDP2, each decoder layer one unit, a full (single-file) state dict when saving."""
    layer = type(model.model.layers[0]).__name__
    return {"version": 2, "transformer_layer_cls_to_wrap": [layer], "state_dict_type": "FULL_STATE_DICT"}


def _with_lora(model: Any, cfg: FinetuneConfig) -> Any:
    peft = require("peft")

    lora = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(LORA_TARGET_SETS[cfg.lora_targets]),
        trainable_token_indices={"embed_tokens": [int(model.config.landmark_token_id)]},
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def _save(trainer: Any, tokenizer: Any, out: Path, lora: bool) -> None:
    """save_pretrained the model (LoRA merged) and the tokenizer into ``out``, from the main process."""
    if not lora:
        trainer.save_model(str(out))  # gathers FSDP shards; writes on the main process only
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(out)
        return
    if trainer.is_world_process_zero():
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        peft_model.save_pretrained(out / LORA_ADAPTER_FOLDER)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
