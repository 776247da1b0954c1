"""Benchmark: how many tensor operations (and host synchronisations) a Hugging Face landmark model
dispatches per layer and chunk while it reads a long input: the cost that bounds reading on a GPU,
where every operation is a kernel launch (an H200 read 16,384 tokens in 25.9 s on the eager path).

A random Llama with SmolLM2-135M's layout (30 layers, 9 query heads, 3 kv heads; small widths: the
counts do not depend on them) converted with landmarks (blocks of 64) reads ``--length`` random tokens
through :class:`landmark.hf.LandmarkRetrievalCache` (k = 4, chunks of 256), beside the unconverted
model's full attention (a ``DynamicCache``, the same chunks). The readings (``--readings``):

* ``reference``: the eager reference (``kernel="torch"``), once per ``--row-groups`` value (query rows
  whose blocks are gathered together; 64 is the default, 256 a whole chunk);
* ``graph``: the fixed graph of tensor operations (``kernel="graph"``, what ``"auto"`` takes on a GPU);
* ``graph-compiled``: the same with ``compile=True``: each layer's step one ``torch.compile``'d graph
  (inductor; its first chunks compile, a minute or two on a CPU, before the counted read).

``torch.profiler`` counts every ``aten::`` call (nested ones too: ``to`` -> ``_to_copy`` -> ``copy_``;
a compiled graph's generated kernels are not ``aten::`` calls, its matrix products are) and the host
synchronisations among them (``_local_scalar_dense``: ``.item()``/``int()``/``bool()`` of a tensor;
``nonzero``), per layer and chunk: what a layer's step dispatches plus its share of what the step does
once for every layer. Counts are deterministic: nothing here is timed.

Usage::

    python benchmarks/dispatch_count.py --length 2048 --row-groups 64 256
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import write_results

RESULTS = Path(__file__).parent / "results"
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero")  # operations that wait for the device
SHAPE = dict(hidden_size=144, intermediate_size=288, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=512, max_position_embeddings=8192)  # fmt: skip
BLOCK, CHUNK, K = 64, 256, 4
READINGS = ("full", "reference", "graph", "graph-compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048, help="tokens read (default 2048)")
    p.add_argument(
        "--row-groups", type=int, nargs="+", default=[64, 256], help="row_group values (reference)"
    )
    p.add_argument("--readings", nargs="+", choices=READINGS, default=list(READINGS), help="what to count")
    p.add_argument("--out", default=str(RESULTS / "dispatch_count.json"))
    args = p.parse_args(argv)
    if args.length < CHUNK:
        p.error(f"--length must be at least one chunk ({CHUNK}); got {args.length}")
    if min(args.row_groups) < 1:
        p.error(f"--row-groups must be >= 1; got {args.row_groups}")
    return args


def word_tokenizer():
    """A tokenizer of SHAPE's vocabulary (words t0, t1, ...): convert() only adds ``<landmark>`` to it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"] - 1)} | {"<unk>": SHAPE["vocab_size"] - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def count(read) -> collections.Counter:
    """aten operation names -> calls, while ``read()`` runs (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    read()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        read()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def main(argv: list[str] | None = None) -> list[dict]:
    """Count, print the table, write the JSON; returns its rows."""
    args = parse_args(argv)
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from landmark.data import insert_landmarks
    from landmark.hf.convert import convert
    from landmark.hf.generate import hf_reader
    from landmark.hf.retrieval import LandmarkRetrievalCache
    from landmark.inference import RetrievalConfig

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    model, _ = convert(LlamaForCausalLM(LlamaConfig(**SHAPE)).eval(), word_tokenizer(), block_size=BLOCK)
    landmark_id = model.config.landmark_token_id
    raw = torch.randint(0, SHAPE["vocab_size"], (1, args.length))
    ids = insert_landmarks(raw, BLOCK, landmark_id)

    def reader(m, cache, x):
        def read():
            with torch.no_grad():
                hf_reader(m, cache(), chunk_len=CHUNK, threads=1)(x, torch.tensor([x.shape[1]]))

        return read

    layers = SHAPE["num_hidden_layers"]
    runs = {}
    if "full" in args.readings:
        runs["full"] = reader(base, DynamicCache, raw)
    if "reference" in args.readings:
        for rg in args.row_groups:
            retrieval = RetrievalConfig(k=K, kernel="torch", row_group=rg)
            runs[f"reference, row_group={rg}"] = reader(
                model, lambda r=retrieval: LandmarkRetrievalCache(model, r), ids
            )
    for name, compiled in (("graph", False), ("graph-compiled", True)):
        if name in args.readings:
            retrieval = RetrievalConfig(k=K, kernel="graph", compile=compiled)
            runs[name] = reader(model, lambda r=retrieval: LandmarkRetrievalCache(model, r), ids)
    rows = []
    print(
        f"{'reading':<26} {'chunks':>6} {'ops/(layer,chunk)':>18} {'x full':>7} {'syncs/(layer,chunk)':>20}"
    )
    for name, read in runs.items():
        calls = count(read)
        x = raw if name == "full" else ids
        chunks = -(-x.shape[1] // CHUNK)
        per = sum(calls.values()) / (chunks * layers)
        syncs = sum(calls[s] for s in SYNCS) / (chunks * layers)
        ratio = per / rows[0]["ops_per_layer_chunk"] if rows and rows[0]["reading"] == "full" else None
        rows.append({"reading": name, "chunks": chunks, "ops_per_layer_chunk": round(per, 1),
                     "ops_vs_full": None if ratio is None else round(ratio, 2),
                     "syncs_per_layer_chunk": round(syncs, 2), "top": calls.most_common(12)})  # fmt: skip
        shown = "" if ratio is None else f"{ratio:.2f}"
        print(f"{name:<26} {chunks:>6} {per:>18.0f} {shown:>7} {syncs:>20.2f}", flush=True)
    write_results(args.out, {"rows": rows}, length=args.length, block=BLOCK, chunk=CHUNK, k=K, shape=SHAPE,
                  torch=torch.__version__)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
