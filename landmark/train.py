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
  checkpoints (:mod:`landmark.checkpoint`), and a tqdm progress bar.

``tokens`` counts model input positions (landmarks included; they are 1 in ``block_size`` positions of
a landmark window) summed over all processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from landmark.checkpoint import (
    CheckpointError,
    clean_partial,
    latest_checkpoint,
    model_config_diff,
    open_checkpoint,
    save_checkpoint,
)
from landmark.data import Batch, PreparedData, WindowSampler, bundled_books, prepare_data
from landmark.data.passkey import PasskeyMixSampler
from landmark.model import GPT, IGNORE_INDEX, ModelConfig
from landmark.train_config import ConfigError, RunConfig

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.json"
EVAL_SEED = 1234  # the validation windows: fixed, the same for every run seed
CHECKSUM_ENV = "LANDMARK_WRITE_CHECKSUMS"  # when "1", each process writes param_checksum.rank<r>.txt


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


def _setup_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    d = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return d


def _device(cfg: RunConfig, d: _Dist) -> torch.device:
    kind = cfg.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but CUDA is not available: use 'cpu' or 'auto'")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _prepare(cfg: RunConfig, progress: bool) -> PreparedData:
    dc = cfg.data
    corpus = bundled_books() if dc.corpus == "bundled" else Path(dc.corpus)
    return prepare_data(
        corpus,
        folder=dc.prepared_dir or None,
        tokenizer=dc.tokenizer,
        vocab_size=dc.vocab_size,
        gpt2_dir=dc.gpt2_dir or None,
        progress=progress,
    )


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
            ignore_index=IGNORE_INDEX,
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- loop


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
            run folder is written before these checks pass.
    """
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, resume: bool) -> TrainResult:
    t = cfg.train
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    d = _setup_distributed("cuda" if cuda else "cpu")
    device = _device(cfg, d)
    out_dir = Path(t.out_dir)
    show = d.main and t.progress

    # 1. Data: process 0 prepares (trains the tokenizer, tokenises) while the others wait, then load.
    if d.main:
        data = _prepare(cfg, progress=show)
    if d.on:
        dist.barrier()
    if not d.main:
        data = _prepare(cfg, progress=False)
    tok = data.tokenizer
    mc = cfg.model_config(tok.vocab_size, tok.landmark_id)
    train_split, val_split = data.splits["train"].tokens, data.splits["validation"].tokens
    sampler = _sampler(train_split, mc, t.batch_size, t.seed, d.rank, "train")
    if cfg.data.passkey_fraction > 0 or cfg.data.repeat_fraction > 0:  # synthetic retrieval samples
        try:
            pairs = cfg.data.passkey_pairs
            sampler = PasskeyMixSampler(
                sampler,
                tok,
                cfg.data.passkey_fraction,
                seed=t.seed,
                rank=d.rank,
                pairs=pairs,
                near=cfg.data.passkey_near,
                near_gap=cfg.data.passkey_near_gap,
                repeat_fraction=cfg.data.repeat_fraction,
            )
        except ValueError as err:
            raise ConfigError(
                f"data.passkey_fraction, data.passkey_pairs, data.repeat_fraction: {err}"
            ) from None
    eval_sampler = _sampler(val_split, mc, t.eval_batch_size or t.batch_size, EVAL_SEED, 0, "validation")
    eval_batches = [eval_sampler.batch(i) for i in range(t.eval_batches)]

    # 2. The run folder: refuse to overwrite a run, or to resume a different model, before writing.
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise ConfigError(
            f"{out_dir} already holds checkpoints ({ckpt.name}): pass --resume to continue that run, "
            "or choose another train.out_dir"
        )
    checkpoint = open_checkpoint(ckpt) if (resume and ckpt is not None) else None
    if checkpoint is not None:
        diff = model_config_diff(checkpoint.model_config, mc)
        if diff:
            raise CheckpointError(
                f"cannot resume {checkpoint.path}: it holds a different model ({'; '.join(diff)}); "
                "use the run's [model] settings or another train.out_dir"
            )
        saved_tok = checkpoint.config["data"].get("tokenizer_fingerprint")
        if saved_tok != tok.fingerprint:
            raise CheckpointError(
                f"cannot resume {checkpoint.path}: it was trained with another tokenizer "
                f"({saved_tok} != {tok.fingerprint}): use the run's [data] settings"
            )

    resolved = {
        "model": mc.to_dict(),
        "data": {
            **asdict(cfg.data),
            "prepared_dir": str(data.folder),
            "tokenizer_path": str(data.folder / "tokenizer.json"),
            "tokenizer_vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint,
            "eot_id": tok.eot_id,
            "landmark_id": tok.landmark_id,
            "block_size": mc.block_size,
            "landmarks": mc.attention == "landmark",
            "train_tokens": len(train_split),
            "validation_tokens": len(val_split),
        },
        "train": asdict(t),
        "world_size": d.world,
    }

    # 3. Model and optimizer, seeded; restored from the checkpoint when resuming.
    torch.manual_seed(t.seed)
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, cfg)
    step, tokens, elapsed, loss_acc = 0, 0, 0.0, [0.0, 0]
    if checkpoint is not None:
        checkpoint.load_weights(model)
        state = checkpoint.load_state(map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        loss_acc = list(state["loss_acc"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
    raw_model = model
    if d.on:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    metrics_path = out_dir / METRICS_FILE
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(out_dir)
        _write_json(out_dir / RUN_CONFIG_FILE, resolved)
        kept = _read_metrics(metrics_path, step) if checkpoint is not None else []
        tmp = metrics_path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, metrics_path)  # drop lines logged after the checkpoint we resume from
    metrics = open(metrics_path, "a", encoding="utf-8") if d.main else None  # noqa: SIM115

    def log(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def checkpoint_now() -> None:
        state = {
            "step": step,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "loss_acc": loss_acc,
            "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        if d.main:
            save_checkpoint(out_dir, step, raw_model, resolved, tok, state, keep=t.keep_checkpoints)

    total_steps = t.schedule_steps or t.max_steps
    step_tokens = t.batch_size * t.grad_accum * mc.seq_len * d.world
    if d.main:
        kind = f"{mc.attention}" + (f", block {mc.block_size}" if mc.attention == "landmark" else "")
        kind += f", segment {mc.xl_segment}" if mc.attention == "xl" else ""
        print(
            f"model: {raw_model.num_parameters() / 1e6:.2f}M parameters, {mc.n_layer} layers, width "
            f"{mc.n_embd}, {mc.n_head} heads, {kind}, seq_len {mc.seq_len}, vocab {mc.vocab_size}\n"
            f"data: {len(train_split):,} train / {len(val_split):,} validation tokens in {data.folder}\n"
            f"run: {out_dir} on {device} x {d.world} process(es), {step_tokens:,} tokens per step"
            + (f", resuming at step {step} from {checkpoint.path}" if checkpoint is not None else ""),
            flush=True,
        )

    bar = tqdm(total=t.max_steps, initial=step, disable=not show, unit="step", dynamic_ncols=True)
    val_loss = None
    if step == 0 and t.eval_every:
        val_loss = evaluate(raw_model, eval_batches, device, t.bf16, d)
        lr0 = lr_at(0, t.lr, t.min_lr, t.warmup_steps, total_steps)
        log({"step": 0, "lr": lr0, "tokens": 0, "elapsed_s": 0.0, "val_loss": val_loss})
        if show:
            bar.write(f"step 0: val_loss {val_loss:.4f}")
    clock = time.perf_counter() - elapsed  # elapsed_s = wall time of the run, evaluation included
    run_tokens, run_time = 0, 0.0  # this invocation's training tokens and time (evaluation excluded)
    interval_tokens, interval_time = 0, 0.0
    last_loss = None
    model.train()
    while step < t.max_steps:
        step_start = time.perf_counter()
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(t.grad_accum):
            batch = sampler.batch(step * t.grad_accum + micro).to(device, non_blocking=True)
            sync = not d.on or micro == t.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync(), _autocast(device, t.bf16):
                loss = model(batch.input_ids, batch.targets).loss / t.grad_accum
            loss.backward()
            step_loss += loss.detach().double()
        grad_norm = None
        if t.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if d.on:
            dist.all_reduce(step_loss)
            step_loss /= d.world
        loss_value = step_loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the training loss is {loss_value} at step {step}: lower train.lr")
        step += 1
        tokens += step_tokens
        loss_acc[0] += loss_value
        loss_acc[1] += 1
        dt = time.perf_counter() - step_start
        run_tokens, run_time = run_tokens + step_tokens, run_time + dt
        interval_tokens, interval_time = interval_tokens + step_tokens, interval_time + dt
        elapsed = time.perf_counter() - clock
        if show:
            rate = run_tokens / max(run_time, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

        out_of_time = t.max_minutes > 0 and elapsed >= 60 * t.max_minutes
        if d.on and t.max_minutes > 0:  # process 0's clock decides, so that all stop together
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        last = step >= t.max_steps or out_of_time
        evaluate_now = t.eval_every > 0 and (step % t.eval_every == 0 or last)
        if step % t.log_every == 0 or evaluate_now or last:
            row = {
                "step": step,
                "loss": loss_acc[0] / loss_acc[1],
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": interval_tokens / max(interval_time, 1e-9),
                "elapsed_s": round(elapsed, 3),
            }
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            last_loss, loss_acc = row["loss"], [0.0, 0]
            interval_tokens, interval_time = 0, 0.0
            if evaluate_now:
                val_loss = row["val_loss"] = evaluate(raw_model, eval_batches, device, t.bf16, d)
                if show:
                    bar.write(f"step {step}: loss {row['loss']:.4f}, val_loss {val_loss:.4f}")
            log(row)
        if (t.ckpt_every and step % t.ckpt_every == 0) or last:
            elapsed = time.perf_counter() - clock
            checkpoint_now()
        if out_of_time:
            if show:
                bar.write(f"stopping at step {step}: train.max_minutes = {t.max_minutes} reached")
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    if os.environ.get(CHECKSUM_ENV) == "1":
        (out_dir / f"param_checksum.rank{d.rank}.txt").write_text(param_checksum(raw_model) + "\n")
    rate = run_tokens / max(run_time, 1e-9)
    if d.main:
        loss_text = "n/a" if last_loss is None else f"{last_loss:.4f}"
        val_text = "n/a" if val_loss is None else f"{val_loss:.4f}"
        print(
            f"done: step {step}, {tokens:,} tokens, loss {loss_text}, val_loss {val_text}, "
            f"{rate:,.0f} tokens/s; latest checkpoint {latest_checkpoint(out_dir)}",
            flush=True,
        )
    if d.on:
        dist.barrier()
    return TrainResult(out_dir, step, tokens, last_loss, val_loss, rate)


def shutdown_distributed() -> None:
    """Destroy the process group if :func:`train` created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
