"""``landmark eval ppl`` and ``landmark eval passkey``: tables (markdown + JSON) and PNG plots.

Both cache every finished cell under ``--out``/cells, so an interrupted run picks up where it stopped.
Every argument is checked (models loaded, data read) before anything is computed or written: a mistake
is one line ``error: ...`` with exit status 2 and leaves the disk as it was. The retrieval options are
the group every retrieval command shares (``landmark/inference/options.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from landmark.inference.options import (
    add_retrieval_arguments,
    check_chunk_len,
    check_distinct,
    check_retrieval_arguments,
    session_options,
)

PPL_LENGTHS = [512, 2048, 4096, 8192, 16384]
PASSKEY_LENGTHS = [1024, 4096, 8192, 32768]
PASSKEY_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _models_help() -> str:
    return "checkpoint to evaluate as NAME=PATH (a run folder or checkpoint folder); repeat for several"


def _check_common(args: argparse.Namespace) -> None:
    """Checks shared by both evaluations that need no model: retrieval options, --out, --lengths."""
    check_retrieval_arguments(args)
    check_distinct("--lengths", args.lengths)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the results")


def _load(args: argparse.Namespace):
    """The ``--model`` checkpoints, checked against ``--lengths`` and ``--chunk-len``."""
    from landmark.eval.common import check_lengths, load_models

    models = load_models(args.model)
    check_lengths(args.lengths, models)
    for m in models:
        if m.kind == "landmark":
            check_chunk_len(args, m.model.config.block_size, f"model {m.name!r}")
    return models


def _split_tokens(args: argparse.Namespace, tokenizer):
    """The tokens of ``--split`` from ``--data`` (default: the bundled books, prepared with ``tokenizer``);
    refused when the data was prepared with another tokenizer than the models'."""
    from landmark.data import load_split, prepare_data

    if args.data is None:
        folder, option = prepare_data(tokenizer=tokenizer, progress=True).folder, "--split"
    else:
        folder, option = Path(args.data), "--data"
        if not folder.is_dir():
            raise ValueError(f"--data {folder}: no such folder (a folder written by `landmark prepare`)")
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


def _ppl_inputs(args: argparse.Namespace):
    """Checked models and tokens of ``eval ppl``; a ValueError names the first bad argument."""
    _check_common(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1; got {args.max_tokens}")
    models = _load(args)
    if len({m.tokenizer.fingerprint for m in models}) > 1:
        raise ValueError("--model: all checkpoints must share one tokenizer to be scored on the same tokens")
    tokens = _split_tokens(args, models[0].tokenizer)
    too_long = [n for n in args.lengths if n > len(tokens)]
    if too_long:
        raise ValueError(
            f"--lengths: {too_long} longer than the {args.split!r} split ({len(tokens)} tokens); "
            "use shorter lengths or a larger split"
        )
    return models, tokens


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from landmark.eval.common import CellCache
    from landmark.eval.perplexity import evaluate_perplexity, perplexity_table, plot_perplexity

    try:
        models, tokens = _ppl_inputs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results = evaluate_perplexity(
        models, tokens, args.lengths, args.k, args.granularity, CellCache(out),
        max_tokens=args.max_tokens, batch_size=args.batch_size, chunk_len=args.chunk_len, split=args.split,
        options=session_options(args),
    )  # fmt: skip
    return _write(out, "perplexity", "Perplexity against context length", perplexity_table(results),
                  results, args, plot_perplexity)  # fmt: skip


def _passkey_inputs(args: argparse.Namespace):
    """Checked models of ``eval passkey``; a ValueError names the first bad argument."""
    from landmark.eval.passkey import check_passkey_cells

    _check_common(args)
    check_distinct("--depths", args.depths)
    models = _load(args)
    check_passkey_cells(models, args.lengths, args.depths, args.trials, args.seed)
    return models


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from landmark.eval.common import CellCache
    from landmark.eval.passkey import evaluate_passkey, passkey_table, plot_passkey

    try:
        models = _passkey_inputs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results = evaluate_passkey(
        models, args.lengths, args.depths, args.trials, CellCache(out), seed=args.seed, k=args.k,
        granularity=args.granularity, chunk_len=args.chunk_len, options=session_options(args),
    )  # fmt: skip
    return _write(
        out, "passkey", "Passkey retrieval accuracy", passkey_table(results), results, args, plot_passkey
    )


def _write(out: Path, name: str, title: str, table: str, results: list[dict], args, plot) -> int:
    """``<name>.md`` (the table), ``<name>.json`` (arguments and every cell), ``<name>.png``; print them."""
    from landmark.eval.common import write_json_atomic, write_text_atomic

    write_text_atomic(out / f"{name}.md", f"# {title}\n\n{table}\n")
    write_json_atomic(out / f"{name}.json", {"args": vars(args) | {"func": None}, "results": results})
    plot(results, out / f"{name}.png")
    print(table)
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
    q.add_argument("--data", default=None, help="prepared data folder (default: the bundled corpus)")
    q.add_argument("--max-tokens", type=int, default=16384, help="tokens per length (whole windows, >= 1)")
    q.add_argument("--batch-size", type=int, default=4, help="windows evaluated together (>= 1)")
    q.add_argument("--out", default="runs/eval-ppl", help="output folder (and result cache)")
    add_retrieval_arguments(q, multiple=True)
    q.set_defaults(func=cmd_eval_ppl)

    q = ev.add_parser("passkey", help="passkey retrieval accuracy by length and depth (table, JSON, heatmap)")
    q.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help=_models_help())
    q.add_argument("--lengths", type=int, nargs="*", default=PASSKEY_LENGTHS, help="tokens")
    q.add_argument("--depths", type=float, nargs="*", default=PASSKEY_DEPTHS, help="fractions in [0, 1]")
    q.add_argument("--trials", type=int, default=10, help="seeded random keys per cell (>= 1)")
    q.add_argument("--seed", type=int, default=0, help="seed of the keys (>= 0)")
    q.add_argument("--out", default="runs/eval-passkey", help="output folder (and result cache)")
    add_retrieval_arguments(q)
    q.set_defaults(func=cmd_eval_passkey)
