"""``landmark quickstart``: the main job. A landmark model, evaluated, with a report.

On a fresh clone it

1. takes the small passkey-recipe landmark checkpoint the project ships in ``checkpoints/`` (made by
   ``landmark train configs/passkey-landmark.toml``; see checkpoints/README.md), or, with ``--train``
   (or when no checkpoint is shipped), trains one on the spot on the bundled books for
   ``--train-minutes`` minutes;
2. measures its perplexity on the bundled validation books at two lengths (the training length and
   eight times it) with k = 4 retrieved blocks;
3. measures passkey retrieval at two lengths beyond the training length (keys at three depths);
4. writes ``report.md`` with the tables and PNG plots into ``--out`` and prints where it is.

Results are cached per cell (see ``landmark eval``): a second run only rewrites the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "passkey-landmark"
RECIPE = REPO / "configs" / "passkey-landmark.toml"


def _train_on_the_spot(out: Path, minutes: float) -> Path:
    from landmark.train import train
    from landmark.train_config import load_config

    run = out / "model"
    overrides = [f"train.out_dir={json.dumps(str(run))}", f"train.max_minutes={minutes}",
                 "train.max_steps=400", "train.eval_every=50", "train.ckpt_every=50"]  # fmt: skip
    print(f"quickstart: training {RECIPE.name} for up to {minutes} minutes into {run}", flush=True)
    train(load_config(RECIPE, overrides), resume=True)
    return run


def cmd_quickstart(args: argparse.Namespace) -> int:
    from landmark.data import load_split, prepare_data
    from landmark.eval.common import CellCache, load_models, write_text_atomic
    from landmark.eval.passkey import evaluate_passkey, passkey_table, plot_passkey
    from landmark.eval.perplexity import evaluate_perplexity, perplexity_table, plot_perplexity

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        source, path = "given", Path(args.checkpoint)
    elif SHIPPED.is_dir() and not args.train:
        source, path = "shipped", SHIPPED
    else:
        source, path = "trained here", _train_on_the_spot(out, args.train_minutes)
    models = load_models([f"landmark={path}"])
    m = models[0]
    if m.kind != "landmark":
        print(f"error: {path} holds a {m.kind!r} model; quickstart needs a landmark model", file=sys.stderr)
        return 2
    cfg = m.model.config
    print(
        f"quickstart: model {path} ({source}): {m.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{cfg.n_layer} layers, trained at {cfg.seq_len} positions, block {cfg.block_size}",
        flush=True,
    )

    data = prepare_data(tokenizer=m.tokenizer, progress=True)
    tokens = load_split(data.folder, "validation").tokens
    cache = CellCache(out)
    ppl = evaluate_perplexity(models, tokens, args.ppl_lengths, [args.k], ["token_head"], cache,
                              max_tokens=args.ppl_tokens, batch_size=4, chunk_len=256)  # fmt: skip
    plot_perplexity(ppl, out / "perplexity.png")
    pk = evaluate_passkey(models, args.passkey_lengths, [0.0, 0.5, 1.0], args.trials, cache, k=args.k)
    plot_passkey(pk, out / "passkey.png")

    report = f"""# landmark-attention quickstart report

Model: `{path}` ({source}); {m.model.num_parameters() / 1e6:.1f}M parameters, {cfg.n_layer} layers, width
{cfg.n_embd}, trained on windows of {cfg.seq_len} positions in blocks of {cfg.block_size} (landmark included).
Inference: chunks of 256 positions, the top {args.k} blocks retrieved per token and head.

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
    p.add_argument("--k", type=int, default=4, help="blocks retrieved per token and head (default 4)")
    p.add_argument("--ppl-lengths", type=int, nargs=2, default=[512, 4096], metavar="N")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens evaluated per length (default 8192)")
    p.add_argument("--passkey-lengths", type=int, nargs=2, default=[1024, 4096], metavar="N")
    p.add_argument("--trials", type=int, default=4, help="passkey keys per (length, depth) cell (default 4)")
    p.set_defaults(func=cmd_quickstart)
