"""``landmark eval ppl`` and ``landmark eval passkey``: tables (markdown + JSON) and PNG plots.

Both cache every finished cell under ``--out``/cells, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from landmark.inference import GRANULARITIES


def _models_help() -> str:
    return "checkpoint to evaluate as NAME=PATH (a run folder or checkpoint folder); repeat for several"


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from landmark.data import load_split
    from landmark.data.dataset import prepare_data
    from landmark.eval.common import (
        CellCache,
        check_lengths,
        load_models,
    )
    from landmark.eval.perplexity import evaluate_perplexity, perplexity_table, plot_perplexity

    try:
        models = load_models(args.model)
        check_lengths(args.lengths, models)
        if any(k < 1 for k in args.k):
            raise ValueError(f"--k must be >= 1; got {args.k}")
        fingerprints = {m.tokenizer.fingerprint for m in models}
        if len(fingerprints) > 1:
            raise ValueError(
                "all --model checkpoints must share one tokenizer to be scored on the same tokens"
            )
        folder = Path(args.data) if args.data else None
        if folder is None:
            data = prepare_data(tokenizer=models[0].tokenizer, progress=True)
            folder = data.folder
        tokens = load_split(folder, args.split).tokens
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results = evaluate_perplexity(
        models, tokens, args.lengths, args.k, args.granularity, CellCache(out),
        max_tokens=args.max_tokens, batch_size=args.batch_size, chunk_len=args.chunk_len, split=args.split,
    )  # fmt: skip
    return _write(out, "perplexity", "Perplexity against context length", perplexity_table(results),
                  results, args, plot_perplexity)  # fmt: skip


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from landmark.eval.common import (
        CellCache,
        check_lengths,
        load_models,
    )
    from landmark.eval.passkey import evaluate_passkey, passkey_table, plot_passkey

    out = Path(args.out)
    try:
        models = load_models(args.model)
        check_lengths(args.lengths, models)
        if args.k < 1:
            raise ValueError(f"--k must be >= 1; got {args.k}")
        results = evaluate_passkey(
            models, args.lengths, args.depths, args.trials, CellCache(out),
            seed=args.seed, k=args.k, granularity=args.granularity, chunk_len=args.chunk_len,
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    q.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 4096, 8192, 16384], help="tokens")
    q.add_argument("--k", type=int, nargs="+", default=[4], help="landmark models: blocks retrieved (each)")
    q.add_argument("--granularity", nargs="+", default=["token_head"], choices=GRANULARITIES)
    q.add_argument("--split", default="validation", help="corpus split (default validation)")
    q.add_argument("--data", default=None, help="prepared data folder (default: the bundled corpus)")
    q.add_argument("--max-tokens", type=int, default=16384, help="tokens per length (whole windows, >= 1)")
    q.add_argument("--batch-size", type=int, default=4, help="windows evaluated together")
    q.add_argument("--chunk-len", type=int, default=256, help="landmark models: positions per chunk")
    q.add_argument("--out", default="runs/eval-ppl", help="output folder (and result cache)")
    q.set_defaults(func=cmd_eval_ppl)

    q = ev.add_parser("passkey", help="passkey retrieval accuracy by length and depth (table, JSON, heatmap)")
    q.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help=_models_help())
    q.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 8192, 32768], help="tokens")
    q.add_argument("--depths", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="fractions")
    q.add_argument("--trials", type=int, default=10, help="seeded random keys per cell")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--k", type=int, default=4, help="landmark models: blocks retrieved")
    q.add_argument("--granularity", default="token_head", choices=GRANULARITIES)
    q.add_argument("--chunk-len", type=int, default=256, help="landmark models: positions per chunk")
    q.add_argument("--out", default="runs/eval-passkey", help="output folder (and result cache)")
    q.set_defaults(func=cmd_eval_passkey)
