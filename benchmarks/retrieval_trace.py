"""Which blocks does a landmark model retrieve when it answers a passkey question? A trace of the top-k
selections (``StepStats.selections``) while it generates the answer.

For the trials of ``landmark eval passkey`` (the same seeded prompts and keys: ``cell_trials``), the
prompt is read with top-k retrieval (the reading options of ``landmark eval passkey``, with its defaults;
the JSON records the reading) and the answer generated greedily, as the evaluation does; at the
positions whose logits chose the answer's digits (or its first token, when it has no digit), every
(layer, head) pair's k selected blocks are recorded. Reported per trial: the answer, where the asked
key sentence lies (the blocks holding its digits; ``local`` when they are not in the memory yet when
the prompt's last chunk starts: attended as local context), the share of (layer, head) pairs whose
selection holds the asked key's block, and the share holding another key's block (multikey), against
the share k / N of a selection that ignores content. A miss with a high "asked" share fetched the
right block and still answered wrong; a low one did not fetch it.

Usage::

    python benchmarks/retrieval_trace.py --model checkpoints/smollm2-landmark --length 4096 \\
        --task multikey --keys 4 --trials 2 --out benchmarks/results/retrieval_trace/mk-4k.json
    python benchmarks/retrieval_trace.py --plot A.json B.json --png trace.png   # shares by layer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from passkey_grid import task_label
from reading_args import parse_reading
from results_json import write_results

from landmark.inference.options import Reading, add_retrieval_arguments, check_chunk_len


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Reading | None]:
    """The parsed options and the checked reading (None with --plot: nothing is read)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="landmark-converted HF folder or delta folder (required to trace)")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens, landmarks not counted")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=2, help="trials per depth (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="multikey", choices=["passkey", "multikey"])
    p.add_argument("--keys", type=int, default=None, help="multikey: keys per prompt (default 4)")
    p.add_argument("--haystack", default="repeat", choices=["repeat", "books"])
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                   help="instead of tracing: draw these traces' shares by layer into --png")  # fmt: skip
    p.add_argument("--png", default=None, help="with --plot: the PNG to write")
    add_retrieval_arguments(p)
    args = p.parse_args(argv)
    if args.plot is not None and args.png is None:
        p.error("--plot needs --png (the picture to write)")
    if args.plot is not None:
        return args, None
    if args.model is None:
        p.error("--model is required (the landmark model to trace), or --plot JSON... --png PNG")
    return args, parse_reading(p, args)  # --chunk-len against the block size: when the model loads


def find(seq: list[int], sub: list[int]) -> int:
    """Index of the first occurrence of ``sub`` in ``seq`` (ValueError if absent)."""
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise ValueError("key sentence not found in the prompt")


def digit_blocks(m, prompt: list[int], sentence: list[int], bs: int) -> list[int]:
    """The blocks (of bs - 1 regular tokens each, one landmark closing each) holding the digits of a key
    sentence in ``prompt``."""
    start = find(prompt, sentence)
    digits = [start + i for i, t in enumerate(sentence) if any(ch.isdigit() for ch in m.decode([t]))]
    return sorted({p // (bs - 1) for p in digits})


def trace_trial(m, prompt: list[int], new_tokens: int, reading: Reading):
    """Generate greedily after ``prompt`` with retrieval (``reading``), as ``landmark eval passkey`` does,
    recording the selections of the prompt's last chunk and of every decode step.

    Returns:
        (generated ids, steps, memory blocks): ``steps[j]`` (L, H, k) are the blocks selected by the
        position whose logits chose generated token j (the prompt's last position for j = 0).
    """
    from landmark.hf.convert import landmark_token_id
    from landmark.hf.generate import hf_reader
    from landmark.hf.retrieval import LandmarkRetrievalCache
    from landmark.inference.generate import Hooks, Landmarks, generate_with

    model, tok = m.model, m.tokenizer
    cache = LandmarkRetrievalCache(model, reading.retrieval, **reading.cache_kwargs())
    chunk_len = reading.chunk_len
    layers = model.config.num_hidden_layers
    read = hf_reader(model, cache, chunk_len)
    state = {"last_chunk": None, "blocks": 0}

    def split_read(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The prompt (the first call) read in the same chunks, the trace started before its last one
        (reading it in other pieces would change what is local and what is retrieved)."""
        if state["last_chunk"] is not None:
            return read(ids, lengths)
        n = int(lengths[0])
        c_last = (n - 1) // chunk_len * chunk_len
        if c_last:
            read(ids[:, :c_last], torch.full_like(lengths, c_last))
            state["blocks"] = int(cache.stream.layers[0].memory.count[0])  # memory when the chunk starts
        state["last_chunk"] = n - c_last
        cache.stats.selections = []
        return read(ids[:, c_last:n], lengths - c_last)

    stop = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    new = generate_with(
        split_read,
        [prompt],
        new_tokens,
        landmarks=Landmarks(m.block_size, landmark_token_id(model)),
        hooks=Hooks(stop),
    )[0]
    return new, trace_steps(cache.stats.selections, layers, state["last_chunk"]), state["blocks"]


def trace_steps(selections: list[torch.Tensor], layers: int, chunk_rows: int) -> list[torch.Tensor]:
    """The recorded (1, H, C, k) entries -> per answer step (L, H, k): the prompt's last chunk first (each
    layer's rows in one or more entries; its last row is the prompt's last position), then one entry
    per layer and decode step (a step feeds [landmark, token] when a block closes: the token is last)."""
    entries, last_rows = iter(selections), []
    for _ in range(layers):
        rows, entry = 0, None
        while rows < chunk_rows:
            entry = next(entries)
            rows += entry.shape[2]
        last_rows.append(entry[0, :, -1])
    steps = [torch.stack(last_rows)]
    rest = list(entries)
    if len(rest) % layers:
        raise RuntimeError(f"{len(rest)} decode entries for {layers} layers: the trace is not per layer")
    steps += [torch.stack([s[0, :, -1] for s in rest[i : i + layers]]) for i in range(0, len(rest), layers)]
    return steps


def share(step: torch.Tensor, blocks: list[int]) -> float:
    """Share of (layer, head) pairs whose k selected blocks (step: (L, H, k)) include one of ``blocks``."""
    if not blocks:
        return 0.0
    hit = torch.zeros(step.shape[:2], dtype=torch.bool)
    for b in blocks:
        hit |= (step == b).any(-1)
    return float(hit.float().mean())


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def trial_row(m, prompts, task, args, reading, depth: float, t: int, prompt: list[int], key: int) -> dict:
    """Trace one trial: its answer, where its keys lie, and the shares of (layer, head) selections that
    hold the asked key's block and another key's block at the steps that chose the answer."""
    from landmark.data.passkey import first_integer
    from landmark.eval.passkey import trial_needles

    t0 = time.perf_counter()
    needles, ask = trial_needles(task, args.seed, args.length, depth, t, key)
    where = {
        x.key: digit_blocks(m, prompt, prompts.key_sentence(x.key, x.name), m.block_size) for x in needles
    }
    asked_blocks = where[key]
    other_blocks = sorted({b for x, blocks in where.items() if x != key for b in blocks})
    new, steps, n_blocks = trace_trial(m, prompt, len(prompts.answer(key)) + 2, reading)
    text = m.decode(new)
    answer = first_integer(text)
    # the steps that chose the answer's digits; without any, the one that chose the first token
    digit = [j for j in range(min(len(steps), len(new))) if m.decode([new[j]]).strip().isdigit()] or [0]
    by_layer = [mean([share(steps[i][layer : layer + 1], asked_blocks) for i in digit])
                for layer in range(steps[0].shape[0])] if steps else []  # fmt: skip
    return {
        "depth": depth, "trial": t, "key": key, "answer": answer, "correct": answer == key, "text": text,
        "asked_name": ask, "keys_by_name": {x.name: x.key for x in needles if x.name is not None},
        "answer_is_other_key": answer is not None and answer != key and answer in where,
        "asked_blocks": asked_blocks, "other_blocks": other_blocks,
        "memory_blocks": n_blocks, "asked_local": all(b >= n_blocks for b in asked_blocks),
        "answer_steps": len(digit), "asked_share": [share(steps[i], asked_blocks) for i in digit],
        "other_share": [share(steps[i], other_blocks) for i in digit], "asked_share_by_layer": by_layer,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def plot_by_layer(paths: list[str], png: str) -> None:
    """One panel per trace file: the share of heads that retrieved the asked key's block, per layer, at
    the steps that chose the answer, averaged over the right and over the wrong answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(4.2 * len(paths), 3.4), squeeze=False, sharey=True)
    for ax, path in zip(axes[0], paths):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        a = data["args"]
        for label, want, color in (("right answers", True, "C2"), ("wrong answers", False, "C3")):
            rows = [r for r in data["trials"] if r["correct"] == want and r["asked_share_by_layer"]]
            if rows:
                layers = range(1, len(rows[0]["asked_share_by_layer"]) + 1)
                ys = [mean([r["asked_share_by_layer"][i - 1] for r in rows]) for i in layers]
                ax.plot(layers, ys, color=color, marker="o", markersize=3, label=f"{label} ({len(rows)})")
        task = task_label({"task": a["task"], "keys_per_prompt": a["keys"] or 4, "haystack": a["haystack"]})
        ax.set_title(f"{task} @ {a['length']} tokens, seed {a['seed']}, k={a['k']}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("heads retrieving the asked key's block")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    args, reading = parse_args(argv)
    if args.plot is not None:
        plot_by_layer(args.plot, args.png)
        return
    from landmark.eval.models import load_models
    from landmark.eval.passkey import PasskeyPrompts, PasskeyTask, cell_trials, check_passkey_cells

    task = PasskeyTask(args.task, args.haystack, args.keys)
    (m,) = load_models([f"lm=hf:{args.model}"])
    if not m.retrieves:
        raise SystemExit(f"--model: {args.model} is not a landmark-converted model (nothing to trace)")
    try:
        check_chunk_len(args, m.block_size, args.model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    check_passkey_cells([m], [args.length], args.depths, args.trials, args.seed, "--length", task)
    prompts = PasskeyPrompts(m.encoder, task.source())
    rows = []
    head = f"{'depth':>5} {'trial':>5} {'key':>6} {'answer':>7} ok  {'asked key blocks':22s}"
    print(head + " memory  asked  other  k/N")
    for depth in args.depths:
        for t, (prompt, key) in enumerate(
            cell_trials(prompts, task, args.seed, args.length, depth, args.trials)
        ):
            row = trial_row(m, prompts, task, args, reading, depth, t, prompt, key)
            rows.append(row)
            where = str(row["asked_blocks"]) + (" (local)" if row["asked_local"] else "")
            print(
                f"{depth:5.2f} {t:5d} {key:6d} {row['answer']!s:>7} {'y' if row['correct'] else 'n':>2}  "
                f"{where:22s} {row['memory_blocks']:6d}  {mean(row['asked_share']):5.2f}  "
                f"{mean(row['other_share']):5.2f}  {reading.k / max(1, row['memory_blocks']):4.2f}",
                flush=True,
            )
    ok = [r for r in rows if r["correct"]]
    bad = [r for r in rows if not r["correct"]]
    for label, group in (("right", ok), ("wrong", bad)):
        asked, other = (mean([mean(r[f"{x}_share"]) for r in group]) for x in ("asked", "other"))
        print(f"{label} answers: {len(group)}; mean share asked {asked:.2f}, other {other:.2f}")
    if args.out:
        options = {name: value for name, value in vars(args).items() if not name.startswith("_")}
        write_results(
            args.out, {"args": options, "reading": dataclasses.asdict(reading), "trials": rows},
            threads=torch.get_num_threads(),
        )  # fmt: skip


if __name__ == "__main__":
    main()
