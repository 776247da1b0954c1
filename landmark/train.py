"""Train a landmark (or full-attention, or Transformer-XL) language model: ``landmark train CONFIG``.

One loop for one process or many (``torchrun``, DistributedDataParallel):

* data: :func:`landmark.data.prepare_data` (cached), then random windows from
  :class:`~landmark.data.WindowSampler`, with landmarks for ``attention = "landmark"`` and without for the
  baselines. Batch ``k`` of process ``r`` depends only on (seed, r, k), so a resumed run draws exactly
  the batches that an uninterrupted one would;
* optimizer: AdamW; matrix weights are decayed, RMSNorm gains are not, and the tied embedding / output
  matrix is decayed unless ``train.decay_embedding = false``; linear warmup then cosine decay to
  ``min_lr``; gradient accumulation and clipping; optional bfloat16 autocast;
* validation: the mean loss over a fixed set of validation windows (the same at every evaluation and
  for every seed), at step 0, every ``eval_every`` steps and at the end;
* output (process 0 only): ``<out_dir>/config.json``, ``metrics.jsonl`` (one JSON object per logged
  step: step, loss, lr, tokens, tokens_per_s, elapsed_s, grad_norm, and val_loss when evaluated),
  checkpoints (:mod:`landmark.checkpoint`), and a tqdm progress bar. Process 0 holds the run folder
  (:class:`RunLock`) for as long as it trains into it, so a second run into the same folder refuses.

``tokens`` counts model input positions (landmarks included; they are 1 in ``block_size`` positions of
a landmark window) summed over all processes.

A run is a sequence of named steps (:func:`_train`): data, resume checks, the resolved config, model
and optimizer, the run folder, the loop (:func:`_loop`, one optimizer step in :func:`_train_step`),
logging (:func:`_log_line`), checkpoints (:func:`_save_checkpoint`) and the summary. Every check that
can fail runs before the first byte is written into the run folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from landmark.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    clean_partial,
    latest_checkpoint,
    model_config_diff,
    open_checkpoint,
    save_checkpoint,
)
from landmark.data import Batch, PreparedData, WindowSampler, bundled_books, prepare_data
from landmark.data.dataset import prepare_error_line
from landmark.data.passkey import BookHaystack, PasskeyMixSampler
from landmark.files import (
    FolderInUseError,
    RunLock,
    first_line,
    os_error_text,
    results_owners,
    write_json_atomic,
    write_text_atomic,
)
from landmark.model import GPT, ModelConfig
from landmark.train_config import (
    ConfigError,
    RunConfig,
    check_training_memory,
    device_kind,
    local_processes,
    validate,
)

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.json"
EVAL_SEED = 1234  # the validation windows: fixed, the same for every run seed
CHECKSUM_ENV = "LANDMARK_WRITE_CHECKSUMS"  # when "1", each process writes param_checksum.rank<r>.txt
STATE_KEYS = ("step", "tokens", "elapsed_s", "loss_acc", "optimizer", "rng_cpu")  # what state.pt must hold

T = TypeVar("T")


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a full disk); the one-line message says what is known
    and what to do. ``landmark train`` prints it as ``error: ...`` with exit status 2."""


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process)."""

    out_dir: Path
    step: int  # optimizer steps done
    tokens: int  # input positions seen, all processes
    loss: float | None  # mean training loss of the last log interval
    val_loss: float | None  # the last validation loss
    tokens_per_s: float  # over the whole run of this invocation (excluding evaluation)


# ------------------------------------------------------------------------------------------ pieces


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over ``warmup`` steps,
    then a cosine from ``lr`` to ``min_lr`` at step ``total``, then ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: GPT, weight_decay: float, decay_embedding: bool = True) -> list[dict[str, Any]]:
    """AdamW groups: decay on 2-D matmul weights (the tied embedding too when ``decay_embedding``),
    none on 1-D parameters (RMSNorm gains)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name == "embed.weight"
        (decay if p.dim() >= 2 and (decay_embedding or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: GPT, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (fused on CUDA)."""
    t = cfg.train
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay, t.decay_embedding),
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        fused=fused or None,
    )


def param_checksum(model: nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order (equal iff the weights are bit-identical)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _setup_distributed(device_type: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    d = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def _device(cfg: RunConfig, d: _Dist) -> torch.device:
    """This process's device (``validate`` has checked that CUDA exists when it is asked for)."""
    if device_kind(cfg.train) == "cuda":
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _agree(d: _Dist, fn: Callable[[], T]) -> T:
    """``fn()`` on this process; under torchrun, when it failed on any process, every process raises,
    so that none is left waiting in a collective for one that stopped (a collective itself)."""
    if not d.on:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # re-raised below, on this process and on all the others
        error = err
    messages: list[str | None] = [None] * d.world
    dist.all_gather_object(messages, None if error is None else first_line(error))
    if error is not None:
        raise error
    failed = next((m for m in messages if m is not None), None)
    if failed is not None:
        raise ConfigError(f"another process stopped the run: {failed}")
    return result


def _prepare(cfg: RunConfig, progress: bool) -> PreparedData:
    dc = cfg.data
    corpus = bundled_books() if dc.corpus == "bundled" else Path(dc.corpus)
    try:
        return prepare_data(
            corpus,
            folder=dc.prepared_dir or None,
            tokenizer=dc.tokenizer,
            vocab_size=dc.vocab_size,
            gpt2_dir=dc.gpt2_dir or None,
            progress=progress,
        )
    except ValueError as err:  # a foreign prepared_dir, a bad corpus, damaged GPT-2 BPE files
        prefixes = {"folder": "data.prepared_dir: ", "corpus": "data.corpus: ", "gpt2_dir": "data.gpt2_dir: "}
        raise ConfigError(prepare_error_line(err, prefixes)) from None


def _sampler(tokens: np.ndarray, mc: ModelConfig, batch_size: int, seed: int, rank: int, what: str):
    try:
        return WindowSampler(
            tokens,
            mc.seq_len,
            batch_size,
            landmark_id=mc.landmark_id,
            block_size=mc.block_size,
            landmarks=mc.attention == "landmark",
            seed=seed,
            rank=rank,
        )
    except ValueError as err:
        raise ConfigError(f"{what} split: {err}") from None


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], device: torch.device, bf16: bool, d: _Dist) -> float:
    """Mean loss of ``model`` (not wrapped in DDP) over ``batches`` (each of the same shape).

    Under DDP, process ``r`` evaluates batches ``r, r + world, ...`` and the sums are all-reduced."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(d.rank, len(batches), d.world):
        b = batches[i].to(device)
        with _autocast(device, bf16):
            total[0] += model(b.input_ids, b.targets).loss.double()
        total[1] += 1
    if d.on:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Lines of metrics.jsonl with step <= ``upto_step`` (a line cut by a crash is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", math.inf) <= upto_step:
                rows.append(row)
    return rows


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


def _latest_text(out_dir: Path) -> str:
    """``"the latest checkpoint, <path>, is intact"`` or ``"no checkpoint was written yet"``."""
    latest = latest_checkpoint(out_dir)
    return f"the latest checkpoint, {latest}, is intact" if latest else "no checkpoint was written yet"


def _write_error(what: str, out_dir: Path, err: OSError) -> TrainingError:
    """The one-line error for a write into the run folder that failed (a full disk, a lost mount)."""
    return TrainingError(
        f"could not write {what} into {out_dir}: {os_error_text(err)}; {_latest_text(out_dir)}: free space "
        "(or fix the folder), then continue with --resume"
    )


# ------------------------------------------------------------------------------- the run's state


@dataclass
class _Data:
    """The prepared data of a run and what the loop draws from it."""

    prepared: PreparedData
    model_config: ModelConfig  # the [model] settings with the tokenizer's vocab_size and landmark_id
    sampler: Any  # WindowSampler, or PasskeyMixSampler around one: .batch(k) -> Batch
    eval_batches: list[Batch]


@dataclass
class _Counters:
    """What a checkpoint saves and a resume restores, besides the weights, optimizer and RNG."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input positions seen, all processes
    elapsed: float = 0.0  # wall time of the run (all invocations), evaluation included
    loss_acc: list = field(default_factory=lambda: [0.0, 0])  # sum and count of losses since the last log


@dataclass
class _Throughput:
    """Training tokens and seconds (evaluation excluded): of this invocation and of the log interval."""

    run_tokens: int = 0
    run_time: float = 0.0
    interval_tokens: int = 0
    interval_time: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.run_tokens, self.run_time = self.run_tokens + tokens, self.run_time + seconds
        self.interval_tokens, self.interval_time = self.interval_tokens + tokens, self.interval_time + seconds

    def rate(self) -> float:
        return self.run_tokens / max(self.run_time, 1e-9)

    def interval_rate(self) -> float:
        return self.interval_tokens / max(self.interval_time, 1e-9)

    def new_interval(self) -> None:
        self.interval_tokens, self.interval_time = 0, 0.0


@dataclass
class _Run:
    """One invocation of a run: what the setup steps build and the loop works with."""

    cfg: RunConfig
    d: _Dist
    device: torch.device
    data: _Data
    out_dir: Path
    resolved: dict[str, Any]  # config.json
    raw_model: GPT
    optimizer: torch.optim.AdamW
    counters: _Counters
    checkpoint: Checkpoint | None  # the one resumed from
    model: nn.Module | None = None  # raw_model, in DistributedDataParallel under torchrun
    metrics: IO[bytes] | None = None  # metrics.jsonl on process 0, unbuffered (a line whole or cut back)

    @property
    def show(self) -> bool:
        return self.d.main and self.cfg.train.progress

    @property
    def step_tokens(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.data.model_config.seq_len * self.d.world


# ------------------------------------------------------------------------------------------- steps


def train(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """Train as configured; under ``torchrun`` every process calls this.

    Args:
        cfg: the run configuration (:func:`landmark.train_config.load_config`).
        resume: continue from the latest checkpoint in ``cfg.train.out_dir`` (start afresh when there
            is none). Without it, an ``out_dir`` that already holds checkpoints is an error.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError, CheckpointError, landmark.data.CorpusError: one-line messages; nothing in the
            run folder is written before these checks pass (another run holding the folder included).
        TrainingError: a non-finite loss, or a write into the run folder failed (a full disk).
    """
    validate(cfg)  # the checks of load_config, also for a RunConfig built in Python
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, resume: bool) -> TrainResult:
    """The steps of a run, in order; under torchrun each setup step ends with every process agreeing
    that it succeeded (:func:`_agree`)."""
    d = _setup_distributed(device_kind(cfg.train))
    device = _device(cfg, d)
    lock = RunLock(Path(cfg.train.out_dir))
    run = None
    try:
        if not d.on and lock.folder.is_dir():  # another run holding the folder is said first (torchrun:
            _hold(lock)  # process 0 takes the hold in _setup, the others agreeing then)
        _agree(d, lambda: _check_resume_data(cfg, resume))  # before the data folder is touched
        # Process 0 prepares the data (trains the tokenizer, tokenises) while the others wait.
        prepared = _agree(
            d, lambda: _prepare(cfg, progress=d.main and cfg.train.progress) if d.main else None
        )
        run = _agree(d, lambda: _setup(cfg, d, device, resume, prepared, lock))
        _agree(d, lambda: _open_run_folder(run, lock) if d.main else None)
        run.model = _wrap_ddp(run.raw_model, device, d)
        _print_header(run)
        last_loss, val_loss, speed = _loop(run)
        _summary(run, last_loss, val_loss, speed)
        return TrainResult(
            run.out_dir, run.counters.step, run.counters.tokens, last_loss, val_loss, speed.rate()
        )
    finally:
        if run is not None and run.metrics is not None:
            with contextlib.suppress(OSError):  # unbuffered: nothing is left to flush
                run.metrics.close()
        lock.release()


def _setup(
    cfg: RunConfig, d: _Dist, device: torch.device, resume: bool, prepared: PreparedData | None, lock: RunLock
) -> _Run:
    """Everything before the first write into the run folder: the data, the hold on an existing folder,
    the resume checks, the resolved config, and the model and optimizer (restored when resuming)."""
    data = _setup_data(cfg, d, prepared if prepared is not None else _prepare(cfg, progress=False))
    out_dir = Path(cfg.train.out_dir)
    if d.main and out_dir.is_dir():
        _hold(lock)  # before its checkpoints are read: a run still writing them makes us refuse
    checkpoint = _resume_checks(out_dir, resume, data)
    if resume and checkpoint is None and d.main:  # (documented: a restart script may always pass --resume)
        print(f"note: --resume: {out_dir} holds no checkpoint yet: a new run starts", file=sys.stderr)
    if checkpoint is not None and cfg.train.max_steps < checkpoint.step:
        raise ConfigError(
            f"train.max_steps ({cfg.train.max_steps}) is below the step of the checkpoint to resume "
            f"({checkpoint.step} in {checkpoint.path}): nothing would be trained; raise train.max_steps"
        )
    resolved = _resolved_config(cfg, data, d)
    raw_model, optimizer, counters = _build_model(cfg, data.model_config, device, checkpoint)
    return _Run(cfg, d, device, data, out_dir, resolved, raw_model, optimizer, counters, checkpoint)


def _setup_data(cfg: RunConfig, d: _Dist, prepared: PreparedData) -> _Data:
    """The model config for the tokenizer, the training sampler of this process (with synthetic passkey
    and repeat windows when configured) and the fixed validation batches."""
    t, tok = cfg.train, prepared.tokenizer
    mc = cfg.model_config(tok.vocab_size, tok.landmark_id)
    check_training_memory(cfg, mc.vocab_size, processes=local_processes(t))  # the tokenizer's true size
    sampler = _sampler(prepared.splits["train"].tokens, mc, t.batch_size, t.seed, d.rank, "train")
    if cfg.data.passkey_fraction > 0 or cfg.data.repeat_fraction > 0:  # synthetic retrieval samples
        sampler = _mix_sampler(cfg, sampler, tok, d.rank)
    val_tokens = prepared.splits["validation"].tokens
    eval_sampler = _sampler(val_tokens, mc, t.eval_batch_size or t.batch_size, EVAL_SEED, 0, "validation")
    return _Data(prepared, mc, sampler, [eval_sampler.batch(i) for i in range(t.eval_batches)])


def _mix_sampler(cfg: RunConfig, base: WindowSampler, tok: Any, rank: int) -> PasskeyMixSampler:
    """The training sampler with passkey samples (``data.passkey_*``) and repeat windows mixed in."""
    dc = cfg.data
    try:  # a CorpusError (the corpus has no train split) is a ValueError too
        corpus = bundled_books() if dc.corpus == "bundled" else Path(dc.corpus)
        haystack = BookHaystack(corpus, split="train") if dc.passkey_fraction and dc.passkey_books else None
        return PasskeyMixSampler(
            base, tok, dc.passkey_mix(), seed=cfg.train.seed, rank=rank, repeat_fraction=dc.repeat_fraction,
            haystack=haystack,
        )  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"data.passkey_*, data.repeat_fraction: {err}") from None


RESUME_DATA_KEYS = ("tokenizer", "corpus")  # data settings a resumed run keeps (vocab_size: a BPE's)


def _check_resume_data(cfg: RunConfig, resume: bool) -> None:
    """Resuming with other data settings (tokenizer, corpus, BPE vocabulary) is refused before any data
    is prepared: preparing first would rewrite a shared ``data.prepared_dir`` for a run that then stops;
    so is an out_dir this run may not write into (:func:`_check_out_dir`)."""
    latest = _check_out_dir(Path(cfg.train.out_dir), resume)
    saved = open_checkpoint(latest).config.get("data") if latest is not None else None
    if not isinstance(saved, dict):  # nothing to resume, or a damaged config (refused by _resume_checks)
        return
    keys = [*RESUME_DATA_KEYS, *(("vocab_size",) if cfg.data.tokenizer == "bpe" else ())]
    for key in keys:
        if key in saved and saved[key] != getattr(cfg.data, key):
            raise ConfigError(
                f"cannot resume {latest}: it was trained with data.{key} = {saved[key]!r}, not "
                f"{getattr(cfg.data, key)!r}: use the run's [data] settings"
            )


def _foreign_run_files(out_dir: Path) -> list[str]:
    """config.json and metrics.jsonl in ``out_dir`` that a run of this library did not write (a run's
    config.json holds its model, data and train settings; metrics.jsonl comes after it)."""
    try:
        config = json.loads((out_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        ours = isinstance(config, dict) and {"model", "data", "train"} <= config.keys()
    except (OSError, ValueError):  # missing, unreadable or not JSON
        ours = False
    return [] if ours else [name for name in (RUN_CONFIG_FILE, METRICS_FILE) if (out_dir / name).exists()]


def _resume_checks(out_dir: Path, resume: bool, data: _Data) -> Checkpoint | None:
    """The checkpoint to resume from (None: start afresh). Refuses to overwrite a run without
    ``resume``, and to resume a checkpoint of another model or tokenizer."""
    latest = _check_out_dir(out_dir, resume)
    if latest is None:
        return None
    checkpoint = open_checkpoint(latest)
    try:
        saved = checkpoint.model_config
    except Exception as err:  # a hand-edited config.json: KeyError, TypeError, ZeroDivisionError, ...
        raise CheckpointError(
            f"{checkpoint.path / RUN_CONFIG_FILE}: invalid model settings ({first_line(err)})"
        ) from None
    diff = model_config_diff(saved, data.model_config)
    if diff:
        raise CheckpointError(
            f"cannot resume {checkpoint.path}: it holds a different model ({'; '.join(diff)}); "
            "use the run's [model] settings or another train.out_dir"
        )
    saved_data = checkpoint.config.get("data")
    saved_tok = saved_data.get("tokenizer_fingerprint") if isinstance(saved_data, dict) else None
    tok = data.prepared.tokenizer
    if saved_tok != tok.fingerprint:
        raise CheckpointError(
            f"cannot resume {checkpoint.path}: it was trained with another tokenizer "
            f"({saved_tok} != {tok.fingerprint}): use the run's [data] settings"
        )
    return checkpoint


def _check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """``train.out_dir`` may receive this run: not a checkpoint's or a model's folder, no run files
    another program wrote, no checkpoints unless ``resume``. The latest checkpoint (None: none)."""
    held = [name for name in ("model.safetensors", "delta.safetensors") if (out_dir / name).exists()]
    if held:  # the run's config.json and metrics.jsonl would land beside another model's weights
        raise ConfigError(
            f"train.out_dir {out_dir} holds a model ({held[0]}): it is a checkpoint or model folder, not a "
            "run folder; choose another train.out_dir"
        )
    results = sorted(results_owners(out_dir))
    if results:  # a run's files would land among an evaluation's (which then refuses the folder)
        raise ConfigError(
            f"train.out_dir {out_dir} holds results of an evaluation or a quickstart "
            f"({', '.join(results[:3])}{', ...' if len(results) > 3 else ''}): choose another train.out_dir"
        )
    foreign = _foreign_run_files(out_dir)
    if foreign:
        raise ConfigError(
            f"train.out_dir {out_dir} holds {' and '.join(foreign)} that no run of this library wrote: "
            "choose another train.out_dir (a run writes these two files)"
        )
    latest = latest_checkpoint(out_dir)
    if latest is not None and not resume:
        raise ConfigError(
            f"{out_dir} already holds checkpoints ({latest.name}): pass --resume to continue that run, "
            "or choose another train.out_dir"
        )
    return latest


def _resolved_config(cfg: RunConfig, data: _Data, d: _Dist) -> dict[str, Any]:
    """config.json: the settings as used, with what the data added (tokenizer, ids, token counts)."""
    mc, tok, folder = data.model_config, data.prepared.tokenizer, data.prepared.folder
    return {
        "model": mc.to_dict(),
        "data": {
            **asdict(cfg.data),
            "prepared_dir": str(folder),
            "tokenizer_path": str(folder / "tokenizer.json"),
            "tokenizer_vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint,
            "eot_id": tok.eot_id,
            "landmark_id": tok.landmark_id,
            "block_size": mc.block_size,
            "landmarks": mc.attention == "landmark",
            "train_tokens": len(data.prepared.splits["train"].tokens),
            "validation_tokens": len(data.prepared.splits["validation"].tokens),
        },
        "train": asdict(cfg.train),
        "world_size": d.world,
    }


def _build_model(
    cfg: RunConfig, mc: ModelConfig, device: torch.device, checkpoint: Checkpoint | None
) -> tuple[GPT, torch.optim.AdamW, _Counters]:
    """The seeded model and its optimizer; restored from ``checkpoint`` when resuming."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, cfg)
    counters = _Counters()
    if checkpoint is not None:
        counters = _restore(checkpoint, model, optimizer, device)
    return model, optimizer, counters


def _restore(
    checkpoint: Checkpoint, model: GPT, optimizer: torch.optim.AdamW, device: torch.device
) -> _Counters:
    """Load the weights, optimizer state, counters and RNG state of ``checkpoint``; a damaged or
    incomplete file is a one-line CheckpointError."""
    where = checkpoint.path
    try:
        checkpoint.load_weights(model)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors and torch raise several kinds
        raise CheckpointError(
            f"{where / WEIGHTS_FILE} cannot be loaded into the model ({first_line(err)}): the file is "
            "damaged or belongs to another model"
        ) from None
    try:
        state = checkpoint.load_state(map_location=device)
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{where / STATE_FILE} lacks {', '.join(missing)}: the file is damaged")
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        return _Counters(
            int(state["step"]), int(state["tokens"]), float(state["elapsed_s"]), list(state["loss_acc"])
        )
    except CheckpointError:
        raise
    except Exception as err:  # torch.load and load_state_dict raise several kinds
        path = where / STATE_FILE
        if path.is_file() and not zipfile.is_zipfile(path):  # (a torch.save zip cut short has no directory)
            raise CheckpointError(f"{path} is cut short or damaged (not a whole torch archive)") from None
        reason = first_line(err)
        raise CheckpointError(f"{path} cannot be loaded ({reason}): the file is damaged or missing") from None


def _hold(lock: RunLock) -> None:
    """Take the run folder's lock; a folder another run holds is a ConfigError (one line, exit 2)."""
    try:
        lock.acquire()
    except FolderInUseError as err:
        raise ConfigError(str(err)) from None


def _open_run_folder(run: _Run, lock: RunLock) -> None:
    """Process 0: hold the folder (creating it), remove left-over temporary checkpoints, write
    config.json and metrics.jsonl without the lines logged after the checkpoint resumed from."""
    out_dir, metrics_path = run.out_dir, run.out_dir / METRICS_FILE
    try:
        for path in (out_dir / RUN_CONFIG_FILE, metrics_path):  # before either is written
            if path.exists() and not path.is_file():
                raise IsADirectoryError(errno.EISDIR, f"{path.name} is not a file", str(path))
        if not lock.held:
            out_dir.mkdir(parents=True, exist_ok=True)
            _hold(lock)
            if latest_checkpoint(out_dir) != (run.checkpoint.path if run.checkpoint else None):
                raise ConfigError(f"{out_dir} received checkpoints from another run while this one started")
        clean_partial(out_dir)
        _write_json(out_dir / RUN_CONFIG_FILE, run.resolved)
        kept = _read_metrics(metrics_path, run.counters.step) if run.checkpoint is not None else []
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        run.metrics = open(metrics_path, "ab", buffering=0)  # noqa: SIM115 - closed by _train
    except OSError as err:
        raise _write_error("the run folder, config.json and metrics.jsonl", out_dir, err) from None


def _wrap_ddp(model: GPT, device: torch.device, d: _Dist) -> nn.Module:
    """The model in DistributedDataParallel under torchrun, else as it is."""
    if not d.on:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _print_header(run: _Run) -> None:
    """Process 0: the model, the data and the run in three lines."""
    if not run.d.main:
        return
    mc, data = run.data.model_config, run.data.prepared
    kind = f"{mc.attention}" + (f", block {mc.block_size}" if mc.attention == "landmark" else "")
    kind += f", segment {mc.xl_segment}" if mc.attention == "xl" else ""
    resuming = f", resuming at step {run.counters.step} from {run.checkpoint.path}" if run.checkpoint else ""
    print(
        f"model: {run.raw_model.num_parameters() / 1e6:.2f}M parameters, {mc.n_layer} layers, width "
        f"{mc.n_embd}, {mc.n_head} heads, {kind}, seq_len {mc.seq_len}, vocab {mc.vocab_size}\n"
        f"data: {len(data.splits['train'].tokens):,} train / {len(data.splits['validation'].tokens):,} "
        f"validation tokens in {data.folder}\n"
        f"run: {run.out_dir} on {run.device} x {run.d.world} process(es), {run.step_tokens:,} tokens per step"
        + resuming,
        flush=True,
    )


# -------------------------------------------------------------------------------------------- loop


def _loop(run: _Run) -> tuple[float | None, float | None, _Throughput]:
    """Optimizer steps until ``train.max_steps`` (or ``train.max_minutes``), logging, evaluating and
    checkpointing on the way. Returns the last logged training loss, the last validation loss and the
    throughput of this invocation."""
    t, c = run.cfg.train, run.counters
    total_steps = t.schedule_steps or t.max_steps
    bar = tqdm(total=t.max_steps, initial=c.step, disable=not run.show, unit="step", dynamic_ncols=True)
    val_loss = _first_evaluation(run, bar, total_steps) if c.step == 0 and t.eval_every else None
    clock = time.perf_counter() - c.elapsed  # elapsed_s = wall time of the run, evaluation included
    speed, last_loss = _Throughput(), None
    run.model.train()
    while c.step < t.max_steps:
        step_start = time.perf_counter()
        lr = lr_at(c.step, t.lr, t.min_lr, t.warmup_steps, total_steps)
        loss, grad_norm = _train_step(run, lr)
        c.step += 1
        c.tokens += run.step_tokens
        c.loss_acc[0] += loss
        c.loss_acc[1] += 1
        speed.add(run.step_tokens, time.perf_counter() - step_start)
        c.elapsed = time.perf_counter() - clock
        if run.show:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed.rate():,.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
        out_of_time = _out_of_time(run)
        last = c.step >= t.max_steps or out_of_time
        evaluate_now = t.eval_every > 0 and (c.step % t.eval_every == 0 or last)
        if c.step % t.log_every == 0 or evaluate_now or last:
            row = _log_line(run, lr, grad_norm, speed, evaluate_now, bar)
            last_loss, val_loss = row["loss"], row.get("val_loss", val_loss)
        if (t.ckpt_every and c.step % t.ckpt_every == 0) or last:
            c.elapsed = time.perf_counter() - clock
            _agree(run.d, lambda: _save_checkpoint(run))
        if out_of_time:
            if run.show:
                bar.write(f"stopping at step {c.step}: train.max_minutes = {t.max_minutes} reached")
            break
    bar.close()
    return last_loss, val_loss, speed


def _first_evaluation(run: _Run, bar: tqdm, total_steps: int) -> float:
    """The validation loss of the initial weights, logged as step 0."""
    t = run.cfg.train
    val_loss = evaluate(run.raw_model, run.data.eval_batches, run.device, t.bf16, run.d)
    lr0 = lr_at(0, t.lr, t.min_lr, t.warmup_steps, total_steps)
    _write_metrics(run, {"step": 0, "lr": lr0, "tokens": 0, "elapsed_s": 0.0, "val_loss": val_loss})
    if run.show:
        bar.write(f"step 0: val_loss {val_loss:.4f}")
    return val_loss


def _train_step(run: _Run, lr: float) -> tuple[float, float | None]:
    """One optimizer step at learning rate ``lr``: ``grad_accum`` micro-batches (gradients synchronised
    once, on the last), the loss checked, clipping, AdamW. Returns the mean loss over all processes and
    the gradient norm before clipping (None without clipping)."""
    t, d, device, c = run.cfg.train, run.d, run.device, run.counters
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for micro in range(t.grad_accum):
        batch = run.data.sampler.batch(c.step * t.grad_accum + micro).to(device, non_blocking=True)
        sync = not d.on or micro == t.grad_accum - 1
        with contextlib.nullcontext() if sync else run.model.no_sync(), _autocast(device, t.bf16):
            loss = run.model(batch.input_ids, batch.targets).loss / t.grad_accum
        loss.backward()
        step_loss += loss.detach().double()
    if d.on:
        dist.all_reduce(step_loss)
        step_loss /= d.world
    loss_value = step_loss.item()
    if not math.isfinite(loss_value):
        raise TrainingError(_nonfinite_loss_message(run, loss_value, lr))
    grad_norm = None
    if t.grad_clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(run.raw_model.parameters(), t.grad_clip).item()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def _nonfinite_loss_message(run: _Run, loss: float, lr: float) -> str:
    """What is known when the loss is not finite: the step, the lr, whether the weights the loss came
    from were finite (and their largest magnitude), and the settings that can cause it."""
    t = run.cfg.train
    params = dict(run.raw_model.named_parameters())
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        weights = f"{len(bad)} weight tensor(s) were already not finite (e.g. {bad[0]})"
    else:
        largest = max(p.detach().abs().max().item() for p in params.values())
        weights = f"the weights were finite (largest magnitude {largest:.3g}), so the forward pass overflowed"
    causes = ["a learning rate too high for this model (train.lr, train.warmup_steps)"]
    if t.bf16:
        causes.append("bfloat16 overflow (train.bf16)")
    if t.grad_clip == 0:
        causes.append("no gradient clipping (train.grad_clip = 0)")
    return (
        f"the training loss is {loss} at step {run.counters.step + 1} (lr {lr:.3g}); {weights}; possible "
        f"causes: {', '.join(causes)}; {_latest_text(run.out_dir)}: change the setting and continue "
        "with --resume"
    )


def _out_of_time(run: _Run) -> bool:
    """Whether ``train.max_minutes`` has passed; under torchrun process 0's clock decides for all."""
    t, d = run.cfg.train, run.d
    out_of_time = t.max_minutes > 0 and run.counters.elapsed >= 60 * t.max_minutes
    if d.on and t.max_minutes > 0:
        flag = torch.tensor([float(out_of_time)], device=run.device)
        dist.broadcast(flag, 0)
        out_of_time = bool(flag.item())
    return out_of_time


def _log_line(
    run: _Run, lr: float, grad_norm: float | None, speed: _Throughput, evaluate_now: bool, bar: tqdm
) -> dict[str, Any]:
    """Write this step's metrics.jsonl line (mean loss since the last line; val_loss when
    ``evaluate_now``) and start a new log interval. Returns the line."""
    t, c = run.cfg.train, run.counters
    row = {
        "step": c.step,
        "loss": c.loss_acc[0] / c.loss_acc[1],
        "lr": lr,
        "tokens": c.tokens,
        "tokens_per_s": speed.interval_rate(),
        "elapsed_s": round(c.elapsed, 3),
    }
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    c.loss_acc = [0.0, 0]
    speed.new_interval()
    if evaluate_now:
        row["val_loss"] = evaluate(run.raw_model, run.data.eval_batches, run.device, t.bf16, run.d)
        if run.show:
            bar.write(f"step {c.step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}")
    _write_metrics(run, row)
    return row


def _write_metrics(run: _Run, row: dict[str, Any]) -> None:
    """Append one line to metrics.jsonl (process 0); a failed write is a one-line TrainingError on
    every process."""

    def append() -> None:
        if run.metrics is None:
            return
        f, data = run.metrics, memoryview((json.dumps(row) + "\n").encode("utf-8"))
        start = None
        try:
            start = f.seek(0, os.SEEK_END)
            while data:
                data = data[f.write(data) :]
        except OSError as err:
            if start is not None:  # cut back the part of the line that was written
                with contextlib.suppress(OSError):
                    f.truncate(start)
            raise _write_error(f"metrics.jsonl (step {row['step']})", run.out_dir, err) from None

    _agree(run.d, append)


def _save_checkpoint(run: _Run) -> None:
    """Process 0: write the checkpoint of the current step (atomically: a failed write leaves the earlier
    checkpoints as they were, and is a one-line TrainingError)."""
    if not run.d.main:
        return
    c, t = run.counters, run.cfg.train
    state = {
        "step": c.step,
        "tokens": c.tokens,
        "elapsed_s": c.elapsed,
        "loss_acc": c.loss_acc,
        "optimizer": run.optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    tok = run.data.prepared.tokenizer
    try:
        save_checkpoint(run.out_dir, c.step, run.raw_model, run.resolved, tok, state, keep=t.keep_checkpoints)
    except OSError as err:
        raise _write_error(f"the checkpoint of step {c.step}", run.out_dir, err) from None


def _summary(run: _Run, last_loss: float | None, val_loss: float | None, speed: _Throughput) -> None:
    """The optional parameter checksums (CHECKSUM_ENV) and, on process 0, the closing line."""
    c, d = run.counters, run.d
    if os.environ.get(CHECKSUM_ENV) == "1":
        (run.out_dir / f"param_checksum.rank{d.rank}.txt").write_text(param_checksum(run.raw_model) + "\n")
    if d.main:
        loss_text = "n/a" if last_loss is None else f"{last_loss:.4f}"
        val_text = "n/a" if val_loss is None else f"{val_loss:.4f}"
        print(
            f"done: step {c.step}, {c.tokens:,} tokens, loss {loss_text}, val_loss {val_text}, "
            f"{speed.rate():,.0f} tokens/s; latest checkpoint {latest_checkpoint(run.out_dir)}",
            flush=True,
        )
    if d.on:
        dist.barrier()


def shutdown_distributed() -> None:
    """Destroy the process group if :func:`train` created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
