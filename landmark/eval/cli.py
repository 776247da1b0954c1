"""``landmark eval ppl`` and ``landmark eval passkey``: tables (markdown + JSON) and PNG plots.

Models are the library's checkpoints (``--model NAME=PATH``) or Hugging Face model folders
(``--model NAME=hf:FOLDER``: a landmark-converted model reads with retrieval, any other with its own
attention). Both commands cache every finished cell under ``--out``/cells, so an interrupted run picks
up where it stopped.
Every argument is checked (models loaded, data read) before anything is computed or written: a mistake
is one line ``error: ...`` with exit status 2 and leaves the disk as it was. The retrieval options are
the group every retrieval command shares (``landmark/inference/options.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from landmark.data import CorpusError, bundled_books, load_split, prepare_data, read_corpus
from landmark.data.passkey import DEFAULT_MULTIKEY_KEYS, HAYSTACKS, NAMES, TASKS
from landmark.data.wordings import WORDING_SETS
from landmark.eval.base_check import (
    answers_table,
    chat_prompts_record,
    prose_windows,
    run_base_check,
    summary_table,
)
from landmark.eval.common import (
    CellCache,
    check_common_arguments,
    check_lengths,
    eval_command,
    load_models,
    record_results,
    recorded_args,
    result_files,
    write_json_atomic,
    write_text_atomic,
)
from landmark.eval.models import HF_PREFIX, Reading, load_hf, parse_model_arg
from landmark.eval.passkey import (
    PasskeyGrid,
    PasskeyTask,
    check_passkey_cells,
    check_prompt_memory,
    evaluate_passkey,
    passkey_report,
    plot_passkey,
)
from landmark.eval.perplexity import evaluate_perplexity, perplexity_table, plot_perplexity
from landmark.eval.ruler import add_ruler_parsers  # ruler, prepare-ruler, lm-eval
from landmark.files import models_held
from landmark.hf.checks import option_name
from landmark.hf.data import tokenize_corpus
from landmark.hf.delta import base_mismatch, is_delta
from landmark.hf.smollm2 import default_smollm2_dir
from landmark.inference.options import (
    add_device_argument,
    add_retrieval_arguments,
    add_weights_argument,
    check_chunk_len,
    check_distinct,
    note_k_above_blocks,
    option_values,
    resolve_device,
    without_negative_zero,
)

PPL_LENGTHS = [512, 2048, 4096, 8192, 16384]
PASSKEY_LENGTHS = [1024, 4096, 8192, 32768]
PASSKEY_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
BASE_CHECK_FILES = ("base_check.md", "base_check.json")


def _models_help() -> str:
    return (
        "model to evaluate as NAME=PATH (a run or checkpoint folder of this library) or NAME=hf:FOLDER (a "
        "Hugging Face model folder: landmark-converted, read with retrieval, or not, read with its own "
        "attention); repeat for several"
    )


def _load(args: argparse.Namespace):
    """The ``--model`` checkpoints, checked against ``--lengths`` and ``--chunk-len``."""

    if all(_plain_hf_model(spec) for spec in args.model or [None]):  # (before loading them: seconds)
        _check_no_retrieval_options(args)
    models = load_models(args.model, resolve_device(args.device), args.weights)
    check_lengths(args.lengths, models)
    if not any(m.retrieves for m in models):
        _check_no_retrieval_options(args)
    for m in models:
        if m.retrieves:
            check_chunk_len(args, m.block_size, f"model {m.name!r}")
            for k in option_values(args.k):
                note_k_above_blocks(k, max(args.lengths), m.block_size)
    return models


def _plain_hf_model(spec: str | None) -> bool:
    """Whether ``--model spec`` is, by its files, a Hugging Face model without landmarks (read with its
    own attention: no retrieval option applies); False when unsure (loading it will tell)."""
    if spec is None:
        return False
    path = parse_model_arg(spec)[1]
    return path.startswith(HF_PREFIX) and _plain_model(Path(path.removeprefix(HF_PREFIX)))


def _check_no_retrieval_options(args: argparse.Namespace) -> None:
    """No ``--model`` reads with retrieval (all read with their own attention): a retrieval option given
    away from its default (``--k``, ``--block-dtype``, ...) would be ignored: refused."""
    ks, granularities = option_values(args.k), option_values(args.granularity)
    readings = [Reading.from_args(args, k=k, granularity=g) for k in ks for g in granularities]
    names = ["k"] * any(r.k != Reading.k for r in readings)
    names += [name for r in readings for name in r.retrieval_options_set()]
    for name in names[:1]:
        raise ValueError(
            f"{option_name(name)} is a retrieval option, and no --model here reads with retrieval (each "
            f"reads with its own attention): drop {option_name(name)}, or evaluate a landmark model"
        )


def _split_tokens(args: argparse.Namespace, tokenizer):
    """The tokens of ``--split`` from ``--data`` (default: ``--corpus``, the bundled books unless given,
    prepared with ``tokenizer``); refused when the data was prepared with another tokenizer than the
    models'."""

    if args.data is None:
        corpus = read_corpus(args.corpus if args.corpus is not None else bundled_books())
        if args.split not in corpus.splits:  # before anything is prepared
            raise ValueError(f"--split {args.split!r}: the corpus has the splits {sorted(corpus.splits)}")
        folder = prepare_data(corpus, tokenizer=tokenizer, progress=True).folder
        option = "--split"
    else:
        folder, option = Path(args.data), "--data"
        if not folder.is_dir():
            raise ValueError(f"--data {folder}: no such folder (a folder written by `landmark prepare`)")
        if models_held(folder) != "prepared data":
            raise ValueError(f"--data {folder} holds no prepared data (a folder `landmark prepare` writes)")
    try:
        split = load_split(folder, args.split)
    except FileNotFoundError:
        found = sorted(p.stem for p in folder.glob("*.bin"))
        raise ValueError(f"--split {args.split!r} is not prepared in {folder} (found: {found})") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{option} {folder}: the {args.split!r} split is damaged ({err})") from None
    recorded = split.meta.get("tokenizer")
    if recorded != tokenizer.fingerprint:
        raise ValueError(
            f"{option} {folder} was prepared with another tokenizer (fingerprint {recorded}) than the "
            f"models' tokenizer.json ({tokenizer.fingerprint}): prepare it with the checkpoint's tokenizer"
        )
    return split.tokens


def _hf_tokens(args: argparse.Namespace, tokenizer):
    """The tokens of ``--split`` of ``--corpus`` (default: the bundled books) with a Hugging Face
    model's own tokenizer (``landmark.hf.data.tokenize_corpus``, cached)."""

    try:
        return tokenize_corpus(tokenizer, args.corpus, args.split)
    except CorpusError as err:
        raise ValueError(f"--corpus: {err}") from None
    except ValueError as err:  # no such split
        raise ValueError(f"--split: {err}") from None


def _model_tokens(args: argparse.Namespace, m):
    """The evaluation tokens of one model, tokenized with its own tokenizer."""
    return _hf_tokens(args, m.tokenizer) if m.family == "hf" else _split_tokens(args, m.tokenizer)


def _ppl_inputs(args: argparse.Namespace):
    """Checked models and tokens of ``eval ppl``; a ValueError names the first bad argument."""

    check_common_arguments(args, result_files("perplexity"))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1; got {args.max_tokens}")
    check_prompt_memory(args.lengths)  # before any data is prepared
    if args.corpus is not None and not Path(args.corpus).is_dir():
        raise ValueError(f"--corpus {args.corpus}: no such folder (a folder of .txt documents)")
    if args.corpus is not None and args.data is not None:
        raise ValueError("--corpus and --data exclude each other: a corpus folder, or data prepared from one")
    if args.data is not None and any(parse_model_arg(spec)[1].startswith(HF_PREFIX) for spec in args.model):
        raise ValueError(
            "--data is a folder prepared for this library's models; Hugging Face models (hf:) read "
            "--corpus with their own tokenizer"
        )
    models = _load(args)
    gpt = {m.tokenizer.fingerprint for m in models if m.family == "gpt"}
    if len(gpt) > 1:
        raise ValueError("--model: all checkpoints must share one tokenizer to be scored on the same tokens")
    tokens = _model_tokens(args, models[0])
    for m in models[1:]:  # checkpoints of one tokenizer fingerprint read the same prepared tokens
        if {m.family, models[0].family} != {"gpt"} and not np.array_equal(_model_tokens(args, m), tokens):
            raise ValueError(
                f"--model: {m.name!r} tokenizes the split differently from {models[0].name!r}: models "
                "must share one tokenizer to be scored on the same tokens"
            )
    too_long = [n for n in args.lengths if n > len(tokens)]
    if too_long:
        raise ValueError(
            f"--lengths: {too_long} longer than the {args.split!r} split ({len(tokens)} tokens); "
            "use shorter lengths or a larger split"
        )
    return models, tokens


def cmd_eval_ppl(args: argparse.Namespace) -> int:

    try:
        models, tokens = _ppl_inputs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    readings = [Reading.from_args(args, k=k, granularity=g) for k in args.k for g in args.granularity]
    results = evaluate_perplexity(models, tokens, args.lengths, CellCache(out), readings=readings,
                                  max_tokens=args.max_tokens, batch_size=args.batch_size)  # fmt: skip
    return _write(out, "perplexity", "Perplexity against context length", perplexity_table(results),
                  results, args, plot_perplexity)  # fmt: skip


def _passkey_inputs(args: argparse.Namespace):
    """Checked models and task of ``eval passkey``; a ValueError names the first bad argument."""

    check_common_arguments(args, result_files("passkey"))
    check_distinct("--depths", args.depths)
    args.depths = without_negative_zero(args.depths)
    task = PasskeyTask(args.task, args.haystack, args.keys, args.corpus, args.wording)
    task.check()  # before the models are loaded
    models = _load(args)
    check_passkey_cells(models, args.lengths, args.depths, args.trials, args.seed, task=task)
    return models, task


def cmd_eval_passkey(args: argparse.Namespace) -> int:

    try:
        models, task = _passkey_inputs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    grid = PasskeyGrid(args.lengths, args.depths, args.trials, args.seed)
    results = evaluate_passkey(models, grid, CellCache(out), reading=Reading.from_args(args), task=task)
    title = f"Passkey retrieval accuracy ({task.label})"
    setting = (
        f"Landmark models read with top-{args.k} retrieval (granularity {args.granularity}, chunks of "
        f"{args.chunk_len} positions); other models with their own attention."
    )
    table = passkey_report(results, task.wording)
    return _write(out, "passkey", title, table, results, args, plot_passkey, setting)


def _check_prose_request(args: argparse.Namespace, base: Path) -> None:
    """``--window-len`` against the base's config.json and ``--windows`` x ``--window-len`` against the
    most tokens the held-out text can hold (a token covers at least one byte; the factor 2 is slack),
    before any model is loaded or any text tokenized (that took seconds to refuse)."""
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        limit = int(config.get("max_position_embeddings") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        config, limit = {}, 0  # loading the base reports a bad folder
    if (base / "delta.json").is_file() or "landmark_token_id" in config:
        raise ValueError(f"--base {args.base} is a landmark model: give the model it was made from")
    if limit and args.window_len > limit:
        raise ValueError(f"--window-len {args.window_len} exceeds the base model's window ({limit})")
    try:
        corpus = read_corpus(args.corpus if args.corpus is not None else bundled_books())
    except CorpusError as err:
        raise ValueError(f"--corpus: {err}") from None
    docs = corpus.splits.get(args.split)
    if docs is None:
        raise ValueError(
            f"--split: corpus {corpus.root} has no split {args.split!r}; it has {sorted(corpus.splits)}"
        )
    most = 2 * (sum(d.size for d in docs) + len(docs))
    if args.windows * args.window_len > most:
        raise ValueError(
            f"--windows {args.windows} x --window-len {args.window_len}: the {args.split} text holds at most "
            f"{most:,} tokens"
        )


def _check_made_from_base(specs: list[tuple[str, str]], base: str) -> None:
    """Every ``--model`` was made from ``--base``, as far as the files tell before either is loaded: a
    landmark model's config.json has the base's shape (its vocabulary + the landmark token), a delta's
    delta.json records the base's vocabulary and architecture (``landmark.hf.delta.base_mismatch``).
    Unreadable files are left to loading, which reports them."""
    try:
        config = json.loads((Path(base.removeprefix(HF_PREFIX)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    for name, path in specs:
        mismatch = base_mismatch(Path(path.removeprefix(HF_PREFIX)), config)
        if mismatch is not None:
            raise ValueError(
                f"--base {base} is not the model {name!r} was made from: its config.json has {mismatch}; "
                "give that model's base with --base"
            )


def _plain_model(folder: Path) -> bool:
    """Whether ``folder`` holds a Hugging Face model without landmarks, as its files tell before it is
    loaded: a readable config.json with no landmark setting (``landmark_token_id``,
    ``landmark_block_size``) and no delta.json (a folder that is neither is left to loading, which says
    what it is)."""
    if is_delta(folder):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = ("landmark_token_id", "landmark_block_size")
    return isinstance(config, dict) and all(config.get(key) is None for key in keys)


def _base_check_inputs(args: argparse.Namespace):
    """``(models, base, windows)`` of ``eval base-check``, every argument checked before any work."""

    check_common_arguments(args, BASE_CHECK_FILES)
    if args.windows < 1 or args.window_len < 64:
        raise ValueError("--windows must be >= 1 and --window-len >= 64 tokens")
    specs = [parse_model_arg(spec) for spec in args.model]
    if not specs:
        raise ValueError("give at least one --model NAME=hf:FOLDER (a landmark model to check)")
    if any(not path.startswith(HF_PREFIX) for _, path in specs):
        raise ValueError("--model: base-check compares Hugging Face models (NAME=hf:FOLDER)")
    for name, path in specs:
        if _plain_model(Path(path.removeprefix(HF_PREFIX))):
            raise ValueError(
                f"--model {name} is not a landmark model (or delta): base-check compares a landmark model "
                "with the base it was made from"
            )
    device = resolve_device(args.device)
    if args.base is None:
        args.base = str(default_smollm2_dir())
    _check_made_from_base(specs, args.base)  # before the prose request extracts the bundled books
    _check_prose_request(args, Path(args.base.removeprefix(HF_PREFIX)))
    folder = args.base.removeprefix(HF_PREFIX)
    try:
        base = load_hf("base", folder, device)
    except ValueError as err:  # (load_hf names its model "--model base PATH")
        raise ValueError(str(err).replace(f"--model base {folder}", f"--base {args.base}")) from None
    if base.retrieves:
        raise ValueError(f"--base {args.base} is a landmark model: give the model it was made from")
    limit = int(getattr(base.model.config, "max_position_embeddings", 0) or 0)
    if limit and args.window_len > limit:
        raise ValueError(f"--window-len {args.window_len} exceeds the base model's window ({limit})")
    models = [load_hf(name, path.removeprefix(HF_PREFIX), device, weights=args.weights)
              for name, path in specs]  # fmt: skip
    for m in models:
        if m.retrieves:
            check_chunk_len(args, m.block_size, repr(m.name))
    return models, base, prose_windows(_hf_tokens(args, base.tokenizer), args.windows, args.window_len)


def cmd_eval_base_check(args: argparse.Namespace) -> int:
    """``landmark eval base-check``: chat answers and next-token KL beside the base model."""

    try:
        models, base, windows = _base_check_inputs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    reading = Reading.from_args(args)
    chat, prose = run_base_check(models, base, windows, reading, CellCache(out))
    summary, answers = summary_table(chat, prose, base.name), answers_table(chat)
    setting = (
        f"Chat: {len(chat) // (len(models) + 1)} short questions in the chat template, greedy. Prose: "
        f"{args.windows} windows of {args.window_len} tokens of the {args.split} split. Landmark models "
        f"read with top-{args.k} retrieval (granularity {args.granularity}); the base with its own attention."
    )
    text = f"# Beside the base model\n\n{setting}\n\n{summary}\n\n## Answers\n\n{answers}\n"
    record_results(out, BASE_CHECK_FILES, eval_command(args))
    write_text_atomic(out / "base_check.md", text)
    record = {"args": recorded_args(args), "prompts": chat_prompts_record(), "chat": chat,
              "prose": prose}  # fmt: skip
    write_json_atomic(out / "base_check.json", record)
    print(f"{setting}\n\n{summary}")
    print(f"\nwrote {out / 'base_check.md'}, {out / 'base_check.json'}")
    return 0


def _write(
    out: Path, name: str, title: str, table: str, results: list[dict], args, plot, setting: str = ""
) -> int:
    """``<name>.md`` (the title, the ``setting`` line if any, the table), ``<name>.json`` (arguments and
    every cell), ``<name>.png``; print them."""

    intro = f"{setting}\n\n" if setting else ""
    record_results(out, result_files(name), eval_command(args))
    write_text_atomic(out / f"{name}.md", f"# {title}\n\n{intro}{table}\n")
    write_json_atomic(out / f"{name}.json", {"args": recorded_args(args), "results": results})
    plot(results, out / f"{name}.png")
    print(intro + table)
    print(f"\nwrote {out / f'{name}.md'}, {out / f'{name}.json'}, {out / f'{name}.png'}")
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``landmark eval {ppl,passkey}``."""
    p = sub.add_parser("eval", help="evaluate checkpoints: perplexity vs length, passkey retrieval")
    ev = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    q = ev.add_parser("ppl", help="perplexity against context length (table, JSON, PNG)")
    q.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help=_models_help())
    q.add_argument("--lengths", type=int, nargs="*", default=PPL_LENGTHS, help="tokens, each >= one block")
    q.add_argument("--split", default="validation", help="corpus split (default validation)")
    q.add_argument("--data", default=None, help="prepared data folder of this library's models (default: "
                   "--corpus prepared with their tokenizer)")  # fmt: skip
    q.add_argument("--corpus", default=None, help="corpus folder of .txt documents, tokenized with each "
                   "model's tokenizer (default: the bundled books)")  # fmt: skip
    q.add_argument("--max-tokens", type=int, default=16384, help="tokens per length (whole windows, >= 1)")
    q.add_argument("--batch-size", type=int, default=4, help="windows evaluated together (>= 1)")
    q.add_argument("--out", default="runs/eval-ppl", help="output folder (and result cache)")
    add_device_argument(q)
    add_weights_argument(q)
    add_retrieval_arguments(q, multiple=True)
    q.set_defaults(func=cmd_eval_ppl)

    q = ev.add_parser("passkey", help="passkey retrieval accuracy by length and depth (table, JSON, heatmap)")
    q.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help=_models_help())
    q.add_argument("--lengths", type=int, nargs="*", default=PASSKEY_LENGTHS, help="prompt lengths in "
                   "tokens of each model's tokenizer, landmarks not counted")  # fmt: skip
    q.add_argument("--depths", type=float, nargs="*", default=PASSKEY_DEPTHS, help="fractions in [0, 1]")
    q.add_argument("--trials", type=int, default=10, help="seeded random keys per cell (>= 1)")
    q.add_argument("--seed", type=int, default=0, help="seed of the keys (>= 0)")
    q.add_argument("--task", choices=TASKS, default="passkey", help="passkey: the paper's one key (default); "
                   "multikey: --keys named keys at depths spread over the context, the one at --depths "
                   "asked for by name")  # fmt: skip
    q.add_argument("--keys", type=int, default=None, help=f"keys per multikey prompt, 2 to {len(NAMES)} "
                   f"(default {DEFAULT_MULTIKEY_KEYS})")  # fmt: skip
    q.add_argument("--haystack", choices=HAYSTACKS, default="repeat", help="repeat: the paper's repeated "
                   "filler sentences (default); books: prose from the validation split of --corpus, "
                   "seeded per trial, the keys at sentence boundaries")  # fmt: skip
    q.add_argument("--wording", choices=WORDING_SETS, default="paper", help="paper: the paper's key "
                   "sentence and question (default); train / held-out / all: each trial in a wording "
                   "family of that set, with numbers of 5-7 digits, words, UUIDs, names or dates "
                   "(docs/evaluation.md, Held-out wordings)")  # fmt: skip
    q.add_argument("--corpus", default=None, help="corpus folder of --haystack books (default: the bundled "
                   "books)")  # fmt: skip
    q.add_argument("--out", default="runs/eval-passkey", help="output folder (and result cache)")
    add_device_argument(q)
    add_weights_argument(q)
    add_retrieval_arguments(q)
    q.set_defaults(func=cmd_eval_passkey)

    q = ev.add_parser("base-check", help="does a landmark model still behave like its base inside the "
                      "window? chat answers, training-text leaks, KL on held-out prose")  # fmt: skip
    q.add_argument("--model", action="append", default=[], metavar="NAME=hf:FOLDER",
                   help="a landmark model (or delta) to check; repeat for several")  # fmt: skip
    q.add_argument("--base", default=None, metavar="[hf:]FOLDER", help="the base model folder "
                   "(default: the prepared SmolLM2-135M-Instruct)")  # fmt: skip
    q.add_argument("--windows", type=int, default=4, help="held-out prose windows for the KL (default 4)")
    q.add_argument("--window-len", type=int, default=2048, help="tokens per window, inside the base's "
                   "window (default 2048)")  # fmt: skip
    q.add_argument("--split", default="validation", help="corpus split of the prose (default validation)")
    q.add_argument("--corpus", default=None, help="corpus folder (default: the bundled books)")
    q.add_argument("--out", default="runs/base-check", help="output folder (and result cache)")
    add_device_argument(q)
    add_weights_argument(q)
    add_retrieval_arguments(q)
    q.set_defaults(func=cmd_eval_base_check)

    add_ruler_parsers(ev)
