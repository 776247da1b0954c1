"""``landmark quickstart``: the main job. A landmark model, evaluated, with a report.

On a fresh clone it

1. takes the small passkey-recipe landmark checkpoint the project ships in ``checkpoints/`` (made by
   ``landmark train configs/passkey-landmark.toml``; see checkpoints/README.md), or, with ``--train``
   (or when no checkpoint is shipped), trains one on the spot on the bundled books for
   ``--train-minutes`` minutes;
2. measures its perplexity on the bundled validation books at two lengths (the training length and
   eight times it) with top-k retrieval (``--k``, default 4, and the other retrieval options every
   retrieval command shares: ``landmark/inference/options.py``);
3. measures passkey retrieval at two lengths beyond the training length (keys at three depths);
4. writes ``report.md`` with the tables and PNG plots into ``--out`` and prints where it is.

Results are cached per cell (see ``landmark eval``): a second run only rewrites the report. Every
option is checked before any work starts (a mistake is one line ``error: ...``, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from landmark.inference.options import (
    add_retrieval_arguments,
    check_chunk_len,
    check_distinct,
    check_retrieval_arguments,
    session_options,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "passkey-landmark"
RECIPE = REPO / "configs" / "passkey-landmark.toml"
DEPTHS = [0.0, 0.5, 1.0]  # passkey depths of the report
SEED = 0  # passkey keys


def _train_on_the_spot(out: Path, minutes: float) -> Path:
    from landmark.train import train
    from landmark.train_config import load_config

    run = out / "model"
    overrides = [f"train.out_dir={json.dumps(str(run))}", f"train.max_minutes={minutes}",
                 "train.max_steps=400", "train.eval_every=50", "train.ckpt_every=50"]  # fmt: skip
    print(f"quickstart: training {RECIPE.name} for up to {minutes} minutes into {run}", flush=True)
    train(load_config(RECIPE, overrides), resume=True)
    return run


def _check_options(args: argparse.Namespace) -> None:
    """Every option that can be checked before a model is loaded, trained or evaluated."""
    check_retrieval_arguments(args)
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1; got {args.trials}")
    if args.ppl_tokens < 1:
        raise ValueError(f"--ppl-tokens must be >= 1; got {args.ppl_tokens}")
    if not (math.isfinite(args.train_minutes) and args.train_minutes > 0):
        raise ValueError(f"--train-minutes must be a number > 0; got {args.train_minutes}")
    if args.train and args.checkpoint:
        raise ValueError("--train and --checkpoint exclude each other: train a model or evaluate one")
    check_distinct("--ppl-lengths", args.ppl_lengths)
    check_distinct("--passkey-lengths", args.passkey_lengths)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the report")


def _check_recipe(args: argparse.Namespace) -> None:
    """Before training on the spot: the lengths against the recipe's block size (and the shipped
    checkpoint's tokenizer, the one the recipe prepares, for the passkey prompts)."""
    from landmark.config import DEFAULT_BLOCK_SIZE
    from landmark.eval.passkey import check_passkey_cells
    from landmark.train_config import load_config

    bs = load_config(RECIPE).model.get("block_size", DEFAULT_BLOCK_SIZE)
    short = [n for n in args.ppl_lengths if n < bs]
    if short:
        raise ValueError(f"--ppl-lengths: {short} shorter than one block ({bs} tokens) of the recipe's model")
    check_chunk_len(args, bs, "the recipe's model")
    if (SHIPPED / "tokenizer.json").is_file():
        from landmark.data.tokenizer import Tokenizer
        from landmark.eval.common import GPTUnderTest

        stand_in = GPTUnderTest("landmark", str(RECIPE), None, Tokenizer.load(SHIPPED))
        check_passkey_cells([stand_in], args.passkey_lengths, DEPTHS, args.trials, SEED, "--passkey-lengths")


def _load(path: Path):
    """The checkpoint at ``path`` as the one model under test (a landmark model), or a ValueError."""
    from landmark.checkpoint import CheckpointError, load_model
    from landmark.eval.common import GPTUnderTest

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
    """The lengths and chunk length against the model and its tokenizer."""
    from landmark.eval.common import check_lengths
    from landmark.eval.passkey import check_passkey_cells

    check_lengths(args.ppl_lengths, [m], "--ppl-lengths")
    check_chunk_len(args, m.model.config.block_size)
    check_passkey_cells([m], args.passkey_lengths, DEPTHS, args.trials, SEED, "--passkey-lengths")


def _validation_tokens(args: argparse.Namespace, m):
    """The bundled validation split, tokenised with the model's tokenizer; --ppl-lengths must fit in it."""
    from landmark.data import load_split, prepare_data

    tokens = load_split(prepare_data(tokenizer=m.tokenizer, progress=True).folder, "validation").tokens
    too_long = [n for n in args.ppl_lengths if n > len(tokens)]
    if too_long:
        raise ValueError(f"--ppl-lengths: {too_long} longer than the validation split ({len(tokens)} tokens)")
    return tokens


def _model_and_tokens(args: argparse.Namespace):
    """Check the options, take (or train) the model, check it and read the validation tokens."""
    _check_options(args)
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
    from landmark.eval.common import CellCache, write_text_atomic
    from landmark.eval.passkey import evaluate_passkey, passkey_table, plot_passkey
    from landmark.eval.perplexity import evaluate_perplexity, perplexity_table, plot_perplexity

    t0 = time.perf_counter()
    try:
        source, m, tokens = _model_and_tokens(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out, path, cfg, models = Path(args.out), m.path, m.model.config, [m]
    print(
        f"quickstart: model {path} ({source}): {m.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{cfg.n_layer} layers, trained at {cfg.seq_len} positions, block {cfg.block_size}",
        flush=True,
    )
    cache, options = CellCache(out), session_options(args)
    ppl = evaluate_perplexity(models, tokens, args.ppl_lengths, [args.k], [args.granularity], cache,
                              max_tokens=args.ppl_tokens, batch_size=4, chunk_len=args.chunk_len,
                              options=options)  # fmt: skip
    plot_perplexity(ppl, out / "perplexity.png")
    pk = evaluate_passkey(models, args.passkey_lengths, DEPTHS, args.trials, cache, seed=SEED, k=args.k,
                          granularity=args.granularity, chunk_len=args.chunk_len,
                          options=options)  # fmt: skip
    plot_passkey(pk, out / "passkey.png")

    report = f"""# landmark-attention quickstart report

Model: `{path}` ({source}); {m.model.num_parameters() / 1e6:.1f}M parameters, {cfg.n_layer} layers, width
{cfg.n_embd}, trained on windows of {cfg.seq_len} positions in blocks of {cfg.block_size} (landmark included).
Inference: chunks of {args.chunk_len} positions, the top {args.k} blocks retrieved ({args.granularity}).

## Perplexity on the bundled validation books

Up to {args.ppl_tokens} tokens per length, non-overlapping windows, memory reset per window.

{perplexity_table(ppl)}

![perplexity](perplexity.png)

## Passkey retrieval

{args.trials} seeded random keys per cell; lengths in tokens (landmarks not counted).

{passkey_table(pk)}

![passkey](passkey.png)

Made by `landmark quickstart` in {time.perf_counter() - t0:.0f} s.
"""
    write_text_atomic(out / "report.md", report)
    print(perplexity_table(ppl))
    print()
    print(passkey_table(pk))
    print(f"\nquickstart: report written to {out / 'report.md'} (with perplexity.png, passkey.png)")
    return 0


def add_quickstart_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: a landmark model, evaluated, with a report")
    p.add_argument("--out", default="runs/quickstart", help="report folder (default runs/quickstart)")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of the shipped one")
    p.add_argument(
        "--train", action="store_true", help="train a model on the spot instead of the shipped one"
    )
    p.add_argument("--train-minutes", type=float, default=12.0, help="time budget of --train (default 12)")
    p.add_argument("--ppl-lengths", type=int, nargs=2, default=[512, 4096], metavar="N")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens evaluated per length (default 8192)")
    p.add_argument("--passkey-lengths", type=int, nargs=2, default=[1024, 4096], metavar="N")
    p.add_argument("--trials", type=int, default=4, help="passkey keys per (length, depth) cell (default 4)")
    add_retrieval_arguments(p)
    p.set_defaults(func=cmd_quickstart)
