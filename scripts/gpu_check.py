"""The GPU check: one command for a GPU machine, and a CPU smoke mode that CI runs.

Five steps, each a child process with its own time budget (a slow or hung step is killed and the
next one runs), within a total budget (560 s on a GPU):

1. ``triton_tests``: ``tests/test_triton.py`` with the kernels compiled for the GPU (TRITON_INTERPRET
   unset) against the dense reference: outputs and gradients, float64/float32/bfloat16/float16, GQA,
   unaligned query offsets, large scores, determinism, the torch.library registration; and
   ``tests/test_triton_retrieval.py``, the retrieval step's Triton attention against the reference.
2. ``attention_bench``: ``benchmarks/attention_gpu.py`` at 4k-32k tokens (its correctness check first),
   Triton landmark attention against SDPA FlashAttention, bfloat16 and float16.
3. ``train_small``: ``landmark train configs/small-landmark.toml`` and ``configs/small-full.toml``,
   bfloat16 autocast, one minute each: tokens/s of each and their ratio.
4. ``hf_finetune``: ``landmark hf finetune`` of a model with SmolLM2-135M's shape (random weights, built
   from a config: nothing is downloaded; throughput does not depend on the weights), bfloat16: tokens/s.
5. ``hf_reading``: the same kind of model converted with landmarks and read with top-4 retrieval
   through ``LandmarkRetrievalCache`` (``landmark.hf.forward_cached``, float32): the last position's
   logits on the GPU against the CPU's for one stream, ``landmark eval passkey --device cuda`` end to
   end (the path that once failed under a GPU machine's transformers: it needs no SmolLM2
   weights to be carried), and the seconds to read 16k tokens on the GPU: the reference (row groups of
   64 rows and whole chunks), the fixed graph of tensor operations (eager and, on the GPU, compiled),
   the graph attending through the Triton kernel (on the GPU), the model's own full attention.

Results go to ``<out>/gpu_check.json`` (rewritten after every step, so a killed run keeps what it
measured), ``<out>/attention_gpu.json`` (the benchmark's own file) and ``<out>/gpu_check.log`` (every
child's output); a summary table is printed at the end. ``<out>`` is ``--out``, else ``$OUT`` (the
device tool's folder), else ``runs/gpu_check``. Scratch (run folders, models) goes to ``--work``
(default a temporary folder, removed at the end).

``--smoke`` (or ``GPU_CHECK_SMOKE=1``): the same steps on a CPU at tiny sizes, the Triton kernels
through the interpreter (TRITON_INTERPRET=1), a few seconds each: this is what CI runs
(tests/test_gpu_check.py). Exit status: 0 if every step is ok, 1 otherwise.

    bash scripts/gpu_check.sh            # on the GPU machine
    bash scripts/gpu_check.sh --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = ("triton_tests", "attention_bench", "train_small", "hf_finetune", "hf_reading")
TOTAL_BUDGET_S = {"gpu": 560.0, "smoke": 300.0}  # the whole check
STEP_BUDGET_S = {  # each step at most this (and never past the total budget)
    "gpu": {"triton_tests": 100.0, "attention_bench": 90.0, "train_small": 190.0, "hf_finetune": 85.0,
            "hf_reading": 90.0},
    "smoke": {"triton_tests": 60.0, "attention_bench": 45.0, "train_small": 60.0, "hf_finetune": 60.0,
              "hf_reading": 60.0},
}  # fmt: skip
MIN_STEP_S = 10.0  # a step with less time left than this is skipped
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
TRAIN_MINUTES = 1.0  # per run on a GPU: landmark, then full attention (two minutes of training)
TRAIN_RUN_OVERHEAD_S = 25.0  # a training run's start (imports, model, data) and final checkpoint
HF_MINUTES = 0.75  # the HF fine-tune's training time on a GPU (at most)
SMOKE_HF_MINUTES = 1e-5  # smoke: the HF fine-tune stops by time after its first step, as on a GPU
HF_OVERHEAD_S = 40.0  # the HF step's imports, model building, tokenisation, Trainer set-up and saving

# Smoke: the Triton tests that cover float32/bfloat16/float16, GQA, an unaligned query offset and a
# single query, at the interpreter's tiny sizes.
SMOKE_TRITON_TESTS = (
    "test_float32_matches_reference and Tq37 or test_half_precision_within_twice_reference_error and Tq50"
    " or test_lse_matches_blockwise and float32 and Tq1"
)
BENCH_ARGS = {
    "gpu": ["--seqs", "4096", "8192", "16384", "32768"],
    "smoke": ["--device", "cpu", "--interpret", "--seqs", "64", "--dtypes", "bfloat16", "--heads", "2",
              "--head-dim", "16", "--block-size", "16", "--warmup", "0", "--repeats", "1"],
}  # fmt: skip
BENCH_KEYS = ("dtype", "seq", "sdpa_fwd_bwd_ms", "triton_fwd_bwd_ms", "ratio_fwd", "ratio_fwd_bwd")
# The tiny model of the smoke training (the small preset's structure, shrunk).
SMOKE_TRAIN_SETS = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2", "model.seq_len=64",
    "model.block_size=16", "data.vocab_size=300", "train.batch_size=2", "train.max_steps=4",
    "train.warmup_steps=1", "train.log_every=1", "train.device='cpu'",
]  # fmt: skip
SMOLLM2_135M_SHAPE = dict(  # SmolLM2-135M(-Instruct)'s config.json, weights aside
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
)  # fmt: skip
TINY_LLAMA_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip
HF_ARGS = {
    "gpu": ["--max-length", "512", "--batch-size", "8", "--steps", "100000", "--bf16",
            "--logging-steps", "20"],
    "smoke": ["--block-size", "16", "--max-length", "64", "--batch-size", "2", "--steps", "100000",
              "--logging-steps", "1"],
}  # fmt: skip
# hf_reading: landmark block size, the stream compared with the CPU, the lengths timed, the passkey
# evaluation's length (tokens), and the largest relative logit difference GPU/CPU accepted.
READ_BLOCK = {"gpu": 64, "smoke": 16}
READ_COMPARE = {"gpu": 2048, "smoke": 96}
READ_LENGTHS = {"gpu": (16384,), "smoke": (200,)}  # 16k took 26 s on an H200: 64k overran
READ_EVAL_LENGTH = {"gpu": 4096, "smoke": 400}
READ_MAX_REL_DIFF = 1e-3
CORPUS_DOCS = 8  # the synthetic corpus: documents, each CORPUS_CHARS of the docs repeated CORPUS_REPEAT times
CORPUS_CHARS, CORPUS_REPEAT = {"gpu": 10**6, "smoke": 12_000}, {"gpu": 2, "smoke": 1}
TOKENIZER_VOCAB = {"gpu": 4096, "smoke": 300}


@dataclass
class Check:
    """One run of the check: where things go, the clock, the results so far."""

    smoke: bool
    out: Path
    work: Path
    log: Path
    deadline: float
    env: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else "gpu"


class StepError(Exception):
    """A step failed: its message goes into the JSON and the table."""


# ------------------------------------------------------------------------------------------ plumbing


def child_env(smoke: bool, work: Path) -> dict[str, str]:
    """The children's environment: the source tree importable, offline, the interpreter only in smoke."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    if smoke:
        env["TRITON_INTERPRET"] = "1"
        env["LANDMARK_CACHE"] = str(work / "cache")
    else:
        env.pop("TRITON_INTERPRET", None)  # the kernels compiled for the GPU
    return env


def run(check: Check, cmd: list[str], deadline: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` in the repository, its output appended to the log, killed (its whole process group)
    at ``deadline``. Returns the output; raises StepError on a non-zero exit or the deadline."""
    with open(check.log, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env or check.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise StepError(f"timed out: {' '.join(cmd[1:4])} ... killed at the step's budget") from None
    output = check.log.read_bytes()[start:].decode("utf-8", errors="replace")
    if code != 0:
        tail = "\n".join(output.strip().splitlines()[-25:])
        print(tail, flush=True)
        raise StepError(f"{' '.join(cmd[1:4])} ... exited with {code}")
    return output


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it if it is still there after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def finite(value: Any) -> bool:
    """Every number in ``value`` (nested dicts and lists) is finite."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically (temporary file + rename); non-finite numbers become null."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_nulled(record), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _nulled(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ------------------------------------------------------------------------------------------ steps


def step_triton_tests(check: Check, deadline: float) -> dict[str, Any]:
    """The Triton kernel tests: compiled on the GPU (in parallel processes when pytest-xdist is there),
    a selection through the interpreter in smoke mode."""
    report = check.work / "triton-tests.xml"
    tests = ["tests/test_triton.py", "tests/test_triton_retrieval.py"]
    cmd = [sys.executable, "-m", "pytest", *tests, "-m", "triton", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(report)]
    if check.smoke:
        cmd += ["-k", SMOKE_TRITON_TESTS]
    elif _has_module("xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    try:
        run(check, cmd, deadline)
    finally:
        counts = _junit_counts(report)
    if counts["passed"] == 0:
        raise StepError(f"no Triton test passed: {counts}")
    return {"tests": counts, "compiled": not check.smoke}


def step_attention_bench(check: Check, deadline: float) -> dict[str, Any]:
    """benchmarks/attention_gpu.py (its correctness check, then the timings) into <out>/attention_gpu.json."""
    out = check.out / "attention_gpu.json"
    run(
        check,
        [sys.executable, "benchmarks/attention_gpu.py", *BENCH_ARGS[check.mode], "--out", str(out)],
        deadline,
    )
    record = json.loads(out.read_text(encoding="utf-8"))
    rows = [{key: row.get(key) for key in BENCH_KEYS} for row in record["rows"]]
    check_ok = all(c["ok"] for c in record["correctness_check"])
    if not check_ok or any(r["triton_fwd_bwd_ms"] is None for r in rows):
        raise StepError("the benchmark's correctness check failed or a size ran out of memory")
    return {"device": record["device"], "correctness_ok": check_ok, "rows": rows, "file": out.name}


def step_train_small(check: Check, deadline: float) -> dict[str, Any]:
    """The small preset with landmark attention, then with full attention, bfloat16: tokens/s each.

    The data are prepared first (``landmark prepare``, the same cache the runs read), so that each run's
    ``train.max_minutes`` can be fitted into what is left of the step's budget."""
    sets = ["train.bf16=true", "train.progress=false", "train.eval_every=0", "train.ckpt_every=0"]
    prepare = [sys.executable, "-m", "landmark", "prepare"]
    if check.smoke:
        corpus = write_corpus(check.work / "corpus", "smoke")
        sets += [*SMOKE_TRAIN_SETS, f"data.corpus='{corpus}'"]
        prepare += ["--corpus", str(corpus), "--vocab-size", "300"]
    else:
        sets += ["train.device='cuda'", "train.max_steps=1000000"]
    prepared = run(check, prepare, deadline)
    result: dict[str, Any] = {"prepare": prepared.strip().splitlines()[-4:]}
    for runs_left, attention in ((2, "landmark"), (1, "full")):
        run_dir = check.work / f"small-{attention}"
        minutes = fitted_minutes(TRAIN_MINUTES, deadline, runs_left, TRAIN_RUN_OVERHEAD_S)
        extra = [] if check.smoke else [f"train.max_minutes={minutes:.3f}"]
        cmd = [sys.executable, "-m", "landmark", "train", f"configs/small-{attention}.toml"]
        cmd += [arg for s in [*sets, *extra, f"train.out_dir='{run_dir}'"] for arg in ("--set", s)]
        run(check, cmd, deadline)
        result[attention] = throughput(run_dir / "metrics.jsonl")
    ratio = result["landmark"]["steady_tokens_per_s"] / result["full"]["steady_tokens_per_s"]
    result["landmark_over_full_tokens_per_s"] = ratio
    return result


def fitted_minutes(wanted: float, deadline: float, runs_left: int, overhead_s: float) -> float:
    """``wanted`` minutes of training, or less so that ``runs_left`` runs (each with ``overhead_s`` of
    start-up and saving) end before ``deadline``; at least 0.1."""
    left = (deadline - time.monotonic()) / runs_left - overhead_s
    return max(0.1, min(wanted, left / 60))


def throughput(metrics: Path) -> dict[str, Any]:
    """tokens/s of a run from its metrics.jsonl: over all training intervals, and the median interval
    after the first (compilation and warm-up excluded)."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("tokens_per_s")]
    if not rows:
        raise StepError(f"{metrics} holds no training interval")
    tokens, seconds, previous = 0, 0.0, 0
    for r in rows:
        tokens += r["tokens"] - previous
        seconds += (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
    steady = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    return {
        "steps": rows[-1]["step"],
        "tokens": rows[-1]["tokens"],
        "tokens_per_s": tokens / seconds,
        "steady_tokens_per_s": statistics.median(steady),
        "last_loss": rows[-1].get("loss"),
    }


def step_hf_finetune(check: Check, deadline: float) -> dict[str, Any]:
    """``landmark hf finetune`` of a random model with SmolLM2-135M's shape (tiny in smoke mode)."""
    model_dir, out = check.work / "hf-model", check.work / "hf-finetuned"
    env = {**check.env, "LANDMARK_CACHE": str(check.work / "hf-cache")}
    minutes = fitted_minutes(HF_MINUTES, deadline, 1, HF_OVERHEAD_S)
    cmd = [sys.executable, str(Path(__file__)), "--hf-child", str(model_dir), str(out), f"{minutes:.3f}"]
    run(check, cmd + (["--smoke"] if check.smoke else []), deadline, env=env)
    from landmark.hf.checks import staging_folder

    # a run stopped by --max-minutes (always, on a GPU) leaves its summary in the staging folder
    name = "landmark-finetune.json"
    path = out / name if (out / name).is_file() else staging_folder(out) / name
    summary = json.loads(path.read_text(encoding="utf-8"))
    keys = ("steps_done", "tokens_seen", "train_seconds", "tokens_per_s", "steady_tokens_per_s", "train_loss")
    return {"shape": "tiny" if check.smoke else "SmolLM2-135M", "parameters": summary["parameters"]} | {
        k: summary.get(k) for k in keys
    }


def hf_child(model_dir: Path, out: Path, minutes: float, smoke: bool) -> int:
    """In the HF step's child process: build the model, then ``landmark hf finetune`` it (one import of
    transformers for both) for at most ``minutes`` of training (on a GPU; a few steps in smoke mode)."""
    from landmark.cli import main as landmark_main

    make_hf_model(model_dir, smoke)
    argv = ["hf", "finetune", "--model", str(model_dir), "--corpus", str(model_dir / "corpus")]
    argv += ["--out", str(out), *HF_ARGS["smoke" if smoke else "gpu"]]
    # stopped by time, as on a GPU; in smoke mode after its first step (SMOKE_HF_MINUTES)
    return landmark_main([*argv, "--max-minutes", str(SMOKE_HF_MINUTES if smoke else minutes)])


def make_hf_model(folder: Path, smoke: bool) -> None:
    """A LlamaForCausalLM with SmolLM2-135M's shape (tiny in smoke mode), random weights, a byte-level
    BPE trained on a synthetic corpus (also written, to ``folder/corpus``): no download anywhere."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    mode = "smoke" if smoke else "gpu"
    corpus = write_corpus(folder / "corpus", mode)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB[mode],
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train([str(corpus / "doc_00.txt")], trainer)  # the documents are copies
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY_LLAMA_SHAPE if smoke else SMOLLM2_135M_SHAPE)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder}: {sum(p.numel() for p in model.parameters()):,} parameters, random weights")


def write_corpus(folder: Path, mode: str) -> Path:
    """A folder of .txt documents made of this repository's documentation (the content does not matter
    for throughput; it only has to be text)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md")))
    text = ((REPO / "README.md").read_text(encoding="utf-8") + "\n\n" + text)[: CORPUS_CHARS[mode]]
    for i in range(CORPUS_DOCS):
        (folder / f"doc_{i:02d}.txt").write_text(text * CORPUS_REPEAT[mode], encoding="utf-8")
    return folder


def step_hf_reading(check: Check, deadline: float) -> dict[str, Any]:
    """Long-context reading of a random landmark model with SmolLM2-135M's shape (tiny in smoke mode):
    GPU against CPU, timings, ``landmark eval passkey`` on the device (the child writes a JSON)."""
    result = check.work / "hf-reading.json"
    env = {**check.env, "LANDMARK_CACHE": str(check.work / "hf-cache")}
    cmd = [
        sys.executable,
        str(Path(__file__)),
        "--reading-child",
        str(check.work / "read-model"),
        str(result),
    ]
    try:
        run(check, cmd + (["--smoke"] if check.smoke else []), deadline, env=env)
    except StepError as err:  # what the child measured before it failed or was killed
        partial = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {}
        raise StepError(f"{err}; measured: {json.dumps(partial)}") from None
    record = json.loads(result.read_text(encoding="utf-8"))
    if record["rel_diff"] > READ_MAX_REL_DIFF:
        raise StepError(
            f"logits GPU/CPU differ by {record['rel_diff']:.2e} (relative), over {READ_MAX_REL_DIFF}"
        )
    if record["whole_chunk_rel_diff"] > READ_MAX_REL_DIFF:
        raise StepError(
            f"logits with whole-chunk row groups differ by {record['whole_chunk_rel_diff']:.2e} (relative), "
            f"over {READ_MAX_REL_DIFF}"
        )
    return record


def reading_child(folder: Path, result: Path, smoke: bool) -> int:
    """In the reading step's child: build and convert the model, compare one stream's last logits on the
    device and on the CPU, run ``landmark eval passkey`` there, time longer streams on the device; each
    number goes into ``result`` as soon as it is measured (a step killed at its budget keeps them)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from landmark.cli import main as landmark_main
    from landmark.data import insert_landmarks
    from landmark.hf.convert import convert
    from landmark.hf.generate import hf_reader
    from landmark.hf.retrieval import LandmarkRetrievalCache
    from landmark.inference import RetrievalConfig
    from landmark.inference.cache import DEFAULT_CHUNK_LEN

    mode = "smoke" if smoke else "gpu"
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    make_hf_model(folder, smoke)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model, tokenizer = convert(model, tokenizer, block_size=READ_BLOCK[mode])
    converted = folder.parent / f"{folder.name}-landmark"
    model.save_pretrained(converted)
    tokenizer.save_pretrained(converted)
    record: dict[str, Any] = {"device": device, "block_size": READ_BLOCK[mode], "k": 4}
    landmark_id = model.config.landmark_token_id
    generator = torch.Generator().manual_seed(0)

    def stream(n: int) -> torch.Tensor:  # (1, n + n // (block - 1)) random tokens, landmarks inserted
        return insert_landmarks(torch.randint(0, landmark_id, (1, n), generator=generator), READ_BLOCK[mode],
                                landmark_id)  # fmt: skip

    @torch.no_grad()
    def read(m: Any, ids: torch.Tensor, row_group: int | None = None, full: bool = False,
             **options: Any) -> torch.Tensor:  # fmt: skip
        """(1, vocab) logits of the last position: top-4 retrieval (kernel "torch": the same code on
        both devices, and no C++ build on a fresh machine's CPU; ``row_group`` None: the default;
        ``options``: other ``RetrievalConfig`` fields), or ``full`` attention (a DynamicCache)."""
        from transformers import DynamicCache

        groups = {} if row_group is None else {"row_group": row_group}
        retrieval = RetrievalConfig(**{"k": 4, "kernel": "torch", **groups, **options})
        cache = DynamicCache() if full else LandmarkRetrievalCache(m, retrieval)
        logits = hf_reader(m, cache, threads=min(8, os.cpu_count() or 1))(ids, torch.tensor([ids.shape[1]]))
        if device == "cuda":
            torch.cuda.synchronize()
        return logits.float().cpu()

    model.eval()
    on_device = copy.deepcopy(model).to(device)
    ids = stream(READ_COMPARE[mode])
    cpu, dev = read(model, ids), read(on_device, ids)
    record["compare_tokens"] = READ_COMPARE[mode]
    record["max_abs_diff"] = float((cpu - dev).abs().max())
    record["rel_diff"] = record["max_abs_diff"] / max(float(cpu.abs().max()), 1e-30)
    record["same_argmax"] = bool(cpu.argmax() == dev.argmax())
    # every query row of a chunk in one group (fewer, larger operations): the same logits
    whole = read(on_device, ids, row_group=DEFAULT_CHUNK_LEN)
    record["whole_chunk_rel_diff"] = float((whole - dev).abs().max()) / max(float(dev.abs().max()), 1e-30)
    # the fixed graph of tensor operations (what kernel "auto" takes on a GPU), eager and compiled (on
    # the GPU only: inductor's C++ code generation takes minutes on a CPU)
    # and the graph attending through the Triton kernel (on the GPU: the interpreter is for the tests)
    graphs = [("graph", "graph", False)]
    if device == "cuda":
        graphs += [("graph_compiled", "graph", True), ("triton", "triton", False)]
    for name, kernel, compiled in graphs:
        logits = read(on_device, ids, kernel=kernel, compile=compiled)
        record[f"{name}_rel_diff"] = float((logits - cpu).abs().max()) / max(float(cpu.abs().max()), 1e-30)
    write_json(result, record)
    evaluation = result.parent / "hf-reading-eval"
    start = time.perf_counter()
    code = landmark_main(["eval", "passkey", "--model", f"lm=hf:{converted}", "--device", device,
                          "--kernel", "torch", "--lengths", str(READ_EVAL_LENGTH[mode]), "--depths", "0.5",
                          "--trials", "1", "--out", str(evaluation)])  # fmt: skip
    if code != 0:
        print(f"landmark eval passkey --device {device} exited with {code}", flush=True)
        return 1
    record["eval_tokens"] = READ_EVAL_LENGTH[mode]
    record["eval_seconds"] = round(time.perf_counter() - start, 2)
    write_json(result, record)
    # the same random tokens read three ways: retrieval in the default row groups (64 rows) and in whole
    # chunks, and the unconverted model's own full attention (the baseline retrieval replaces)
    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval().to(device)
    ways = {
        "read_seconds": lambda ids: read(on_device, ids),
        "read_seconds_whole_chunk": lambda ids: read(on_device, ids, row_group=DEFAULT_CHUNK_LEN),
        "read_seconds_graph": lambda ids: read(on_device, ids, kernel="graph"),
        **(
            {
                "read_seconds_graph_compiled": lambda ids: read(on_device, ids, kernel="graph", compile=True),
                "read_seconds_triton": lambda ids: read(on_device, ids, kernel="triton"),
            }
            if device == "cuda"
            else {}
        ),
        "full_read_seconds": lambda ids: read(base, ids[ids != landmark_id][None], full=True),
    }
    for n in READ_LENGTHS[mode]:
        ids = stream(n)
        for name, way in ways.items():
            if name == "read_seconds_graph_compiled":
                way(ids)  # its graphs compiled (once per kind of step and memory size) before timing
            start = time.perf_counter()
            way(ids)
            record.setdefault(name, {})[str(n)] = round(time.perf_counter() - start, 4)
            write_json(result, record)
    return 0


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _junit_counts(report: Path) -> dict[str, int]:
    """passed / failed / errors / skipped of a pytest JUnit XML report (zeros if there is none)."""
    import xml.etree.ElementTree as ET

    if not report.is_file():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (
        int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
    )
    return {
        "passed": total - failed - errors - skipped,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
    }


# ------------------------------------------------------------------------------------------ driver

STEP_FUNCTIONS: dict[str, Callable[[Check, float], dict[str, Any]]] = {
    "triton_tests": step_triton_tests,
    "attention_bench": step_attention_bench,
    "train_small": step_train_small,
    "hf_finetune": step_hf_finetune,
    "hf_reading": step_hf_reading,
}


def run_step(check: Check, name: str) -> None:
    """Run one step within its budget; record status, seconds and results; rewrite the JSON."""
    budget = min(STEP_BUDGET_S[check.mode][name], check.deadline - time.monotonic())
    record: dict[str, Any] = {"budget_s": round(budget, 1)}
    print(f"\n== {name} (budget {budget:.0f} s)", flush=True)
    start = time.monotonic()
    if budget < MIN_STEP_S:
        record.update(status="skipped", error="no time left in the total budget")
    else:
        try:
            record.update(STEP_FUNCTIONS[name](check, start + budget))
            record["status"] = "ok" if finite(record) else "failed"
            if record["status"] == "failed":
                record["error"] = "a non-finite number in the results"
        except StepError as err:
            record.update(status="timeout" if str(err).startswith("timed out") else "failed", error=str(err))
        except Exception as err:  # a bug in the step itself: report it, keep going
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
    record["seconds"] = round(time.monotonic() - start, 1)
    print(f"== {name}: {record['status']} in {record['seconds']} s", flush=True)
    check.results["steps"][name] = record
    write_json(check.out / "gpu_check.json", check.results)


def environment() -> dict[str, Any]:
    """Versions and the device, read in this process (the children import the same)."""
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "tokenizers", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # a missing or broken package: recorded, the steps will say more
            info[name] = f"unavailable ({type(err).__name__})"
    try:
        import torch

        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        info["device"] = "unknown"
    return info


def summary_table(results: dict[str, Any]) -> str:
    """The table printed at the end: one line per step, its key numbers."""
    lines = [f"{'step':16s} {'status':8s} {'seconds':>8s} {'budget':>7s}  result", "-" * 100]
    for name, r in results["steps"].items():
        lines.append(
            f"{name:16s} {r['status']:8s} {r['seconds']:8.1f} {r['budget_s']:7.0f}  {_headline(name, r)}"
        )
    return "\n".join(lines)


def _headline(name: str, r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return r.get("error", "")[:70]
    if name == "triton_tests":
        return ", ".join(f"{v} {k}" for k, v in r["tests"].items()) + (
            " (compiled)" if r["compiled"] else " (interpreted)"
        )
    if name == "attention_bench":
        return "triton/sdpa fwd+bwd: " + ", ".join(
            f"{x['dtype'][:4]} {x['seq']}: {x['ratio_fwd_bwd']:.2f}" for x in r["rows"]
        )
    if name == "train_small":
        lm, full = r["landmark"]["steady_tokens_per_s"], r["full"]["steady_tokens_per_s"]
        ratio = r["landmark_over_full_tokens_per_s"]
        return f"landmark {lm:,.0f} tok/s, full {full:,.0f} tok/s, ratio {ratio:.2f}"
    if name == "hf_finetune":
        rate = r["steady_tokens_per_s"] or r["tokens_per_s"]
        return f"{r['shape']}: {rate:,.0f} tok/s (steady), {r['steps_done']} steps"
    if name == "hf_reading":
        reads = ", ".join(
            f"{n} tok {t:.1f} s (whole chunks {r['read_seconds_whole_chunk'][n]:.1f} s, graph "
            f"{r['read_seconds_graph'][n]:.1f} s, compiled "
            f"{r.get('read_seconds_graph_compiled', {}).get(n, float('nan')):.2f} s, triton "
            f"{r.get('read_seconds_triton', {}).get(n, float('nan')):.2f} s, "
            f"full attention {r['full_read_seconds'][n]:.2f} s)"
            for n, t in r["read_seconds"].items()
        )
        diff = f"{r['device']}/cpu logits rel diff {r['rel_diff']:.1e}"
        return f"{diff}; read {reads}; eval {r['eval_seconds']:.0f} s"
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("GPU_CHECK_SMOKE") == "1",
        help="tiny sizes on a CPU, Triton through the interpreter (also GPU_CHECK_SMOKE=1)",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="JSON and log folder")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these")
    p.add_argument("--hf-child", nargs=3, metavar=("MODEL", "OUT", "MIN"), help=argparse.SUPPRESS)
    p.add_argument("--reading-child", nargs=2, metavar=("MODEL", "JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hf_child:  # internal: the HF step's child process
        model_dir, out, minutes = args.hf_child
        return hf_child(Path(model_dir), Path(out), float(minutes), args.smoke)
    if args.reading_child:  # internal: the reading step's child process
        model_dir, result = args.reading_child
        return reading_child(Path(model_dir), Path(result), args.smoke)
    mode = "smoke" if args.smoke else "gpu"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("", encoding="utf-8")
    start = time.monotonic()
    check = Check(args.smoke, out, work, log, start + TOTAL_BUDGET_S[mode], child_env(args.smoke, work))
    check.results = {
        "check": "landmark-attention GPU check (scripts/gpu_check.py)",
        "mode": mode,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_budget_s": TOTAL_BUDGET_S[mode],
        "environment": environment(),
        "steps": {},
    }
    print(f"gpu_check ({mode}): {check.results['environment']}; results in {out}", flush=True)
    try:
        for name in args.steps:
            run_step(check, name)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    check.results["total_seconds"] = round(time.monotonic() - start, 1)
    write_json(out / "gpu_check.json", check.results)
    print("\n" + summary_table(check.results), flush=True)
    print(f"\nwrote {out / 'gpu_check.json'} (total {check.results['total_seconds']} s)")
    return 0 if all(r["status"] == "ok" for r in check.results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
