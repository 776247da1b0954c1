"""Benchmark: how much of the landmark scan the super-block bounds of ``search="bounded"`` could skip on a
real model's landmark keys.

A Hugging Face landmark model (default: the shipped SmolLM2 delta) reads ``--length`` tokens of the
bundled books with ``search="bounded"`` (the exact scan's selection, ties included); at every selection
of old blocks (each layer, row group and step) the script records, for two kinds of bound over
super-blocks of about sqrt(N) consecutive blocks:

* ``minmax``: per-channel minimum and maximum of the members' landmark keys (the library's, as Quest);
* ``ball``: the members' centroid and the largest distance to it (q . c + |q| r);

the share of super-blocks whose bound reaches the query's k-th best exact score: those an exact
search must visit (the rest it may skip). 1.0 means no saving. Reported per bound: that share over all
queries, and over the queries of the last chunk (the most blocks in memory).

Usage::

    python benchmarks/superblock_bounds.py --length 4096 --out benchmarks/results/superblock_bounds_cpu.json
    python benchmarks/superblock_bounds.py --smoke --model DIR --out /tmp/bounds.json   # seconds: a test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import command_line, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
BOUNDS = ("minmax", "ball")


def needed_share(q, keys, k: int) -> dict[str, tuple[float, int]]:
    """Per bound kind: (super-blocks whose bound reaches each query's k-th best score, summed over the
    queries; super-blocks x queries)."""
    import torch

    from landmark.inference import superblocks

    n = keys.shape[-2]
    group = superblocks.default_group(n)
    blocks = superblocks.summarize(keys, group)
    scores = superblocks.landmark_scores(q, keys).double()
    kth = scores.topk(min(k, n), dim=-1).values[..., -1:]
    count = blocks.count
    padded = torch.cat(
        [keys, keys[..., -1:, :].expand(*keys.shape[:-2], count * group - n, keys.shape[-1])], -2
    )
    grouped = padded.double().reshape(*keys.shape[:-2], count, group, keys.shape[-1])
    centre = grouped.mean(-2)
    radius = (grouped - centre[..., None, :]).norm(dim=-1).amax(-1)
    qd = q.double()
    bounds = {
        "minmax": superblocks.upper_bounds(q, blocks),
        "ball": qd @ centre.transpose(-1, -2) + qd.norm(dim=-1, keepdim=True) * radius[..., None, :],
    }
    total = kth.numel() * count
    return {name: (float((b >= kth).sum()), total) for name, b in bounds.items()}


@contextlib.contextmanager
def recording(calls: list[dict]):
    """Record ``needed_share`` at every bounded selection of old blocks while the block runs."""
    from landmark.inference import retrieval

    original = retrieval.bounded_candidates

    def recorded(q, keys, k, blocks=None):
        calls.append({"blocks": keys.shape[-2], **needed_share(q, keys, k)})
        return original(q, keys, k, blocks)

    retrieval.bounded_candidates = recorded
    try:
        yield
    finally:
        retrieval.bounded_candidates = original


def share(calls: list[dict], name: str) -> float | None:
    hit = sum(c[name][0] for c in calls)
    total = sum(c[name][1] for c in calls)
    return hit / total if total else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "checkpoints" / "smollm2-landmark"))
    p.add_argument("--length", type=int, default=4096, help="tokens of the bundled books read")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="400 tokens in chunks of 64 (a test)")
    p.add_argument("--out", default=str(RESULTS / "superblock_bounds_cpu.json"))
    given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(given)
    if args.smoke:
        args.length, args.chunk_len = min(args.length, 400), 64

    import torch

    import landmark.hf
    from landmark.data.books import bundled_books
    from landmark.hf.generate import hf_reader
    from landmark.inference.generate import prompt_streams
    from landmark.inference.options import Reading

    torch.set_num_threads(1)
    model, tokenizer = landmark.hf.load_pretrained(args.model)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(bundled_books().rglob("*.txt"))[:6])
    ids = tokenizer(text[: 8 * args.length]).input_ids[: args.length]
    reading = Reading(k=args.k, chunk_len=args.chunk_len, search="bounded")
    cache = landmark.hf.LandmarkRetrievalCache(model.eval(), reading.retrieval, **reading.cache_kwargs())
    stream, lengths = prompt_streams([ids], model.config.landmark_block_size, model.config.landmark_token_id)
    calls: list[dict] = []
    t0 = time.process_time()
    with recording(calls), torch.no_grad():
        hf_reader(model, cache, args.chunk_len, threads=1)(stream, lengths)
    seconds = time.process_time() - t0
    most = max((c["blocks"] for c in calls), default=0)
    last = [c for c in calls if c["blocks"] == most]
    rows = [{"bound": name, "share_needed": share(calls, name), "share_needed_last": share(last, name)}
            for name in BOUNDS]  # fmt: skip
    for r in rows:
        print(f"{r['bound']:>7}: super-blocks an exact search must visit {r['share_needed']:.3f} of all, "
              f"{r['share_needed_last']:.3f} at {most} blocks")  # fmt: skip
    write_results(args.out, {"rows": rows, "selections": len(calls), "blocks_at_end": most, "cpu_s": seconds},
                  command=command_line(__file__, given), model=args.model, length=len(ids), k=args.k,
                  chunk_len=args.chunk_len)  # fmt: skip


if __name__ == "__main__":
    main()
