"""Smoke tests of the benchmark scripts: each one runs at toy size in seconds, in this process (its
``main(argv)``, loaded from its path; the benchmarks folder is not a package), writes its JSON or plot
under a temporary folder, and the test checks what it wrote: a row for every requested size, both
sides of every comparison present, ratios positive and finite, counters that agree with sizes. No test
here asserts a timing: at these sizes the numbers mean nothing. The scripts that read with retrieval
take the library's reading options (``add_retrieval_arguments``); their tests give some of them other
values than the defaults and check that the measurement used them.

Which test runs each script (``test_every_benchmark_is_listed`` fails when a script of benchmarks/ is
missing here, or when a named test does not exist):

- benchmarks/attention.py: test_attention_smoke
- benchmarks/attention_gpu.py: tests/test_gpu_check.py::test_smoke_mode_runs_every_step
- benchmarks/decode.py: test_decode_smoke, test_decode_worker_process
- benchmarks/dispatch_count.py: tests/test_hf.py::test_dispatch_count_benchmark_counts_every_reading
- benchmarks/hf_heldout_loss.py: tests/test_hf.py::test_heldout_loss_script_equals_the_models_own_loss,
  test_hf_heldout_loss_script
- benchmarks/hf_passkey_probe.py:
  tests/test_hf.py::test_passkey_probe_answer_loss_equals_step_by_step_log_probs, test_hf_passkey_probe_script
- benchmarks/hf_prefill.py: test_hf_prefill_smoke
- benchmarks/kernel_replay.py: test_kernel_replay_capture_and_compare
- benchmarks/llamacpp.py: test_llamacpp_smoke
- benchmarks/passkey_grid.py: tests/test_passkey_grid.py::test_cells_of_two_seeds_add_up_and_tasks_stay_apart
- benchmarks/passkey_probe.py: tests/test_eval.py::test_passkey_probe_runs_on_the_shipped_checkpoint
- benchmarks/plot_reading.py: test_plot_reading
- benchmarks/prefill.py: test_prefill_smoke, test_prefill_nll_mode
- benchmarks/read_once.py: test_read_once_smoke
- benchmarks/reading_args.py: test_reading_args_round_trip
- benchmarks/results_json.py: test_results_json_writes_whole_files
- benchmarks/retrieval_trace.py: tests/test_eval_hf.py::test_retrieval_trace_answers_as_eval_passkey_does
- benchmarks/superblock_bounds.py: test_superblock_bounds_smoke
- benchmarks/threads.py: test_threads_smoke
- benchmarks/train_runs_summary.py: test_train_runs_summary
- benchmarks/train_throughput.py: test_train_throughput_smoke

The scripts that measure in fresh processes (attention, decode, hf_prefill, prefill, read_once,
threads) take ``--smoke``: toy sizes, every measurement in the calling process; the process path itself
is run once, for decode (test_decode_worker_process). The models are the shipped small checkpoint
(checkpoints/passkey-landmark), random small GPTs and the tiny Llama of tests/hf_helpers.py; nothing is
downloaded. Marked slow (not in the default run): kernel_replay building a source with the C++ compiler
(test_kernel_replay_builds_a_source; the default test replays the library's own compiled kernel), and
decode's ``--compiled`` side (test_decode_compiled_side: torch.compile of the decode step, about a
minute on a 2-core CPU).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from landmark.inference.options import Reading

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def bench(name: str):
    """``benchmarks/<name>.py`` as a module (each script puts its folder on sys.path itself)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    """A positive, finite number."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def refuse_constant(name: str):
    raise AssertionError(f"non-finite number {name} in the JSON")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=refuse_constant)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """The library's cache (tokenized corpora) in a temporary folder, never the repository's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDMARK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _threads():
    """torch's thread count as it was, after every test (the scripts set their own)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------- the list


def listed() -> dict[str, list[str]]:
    """{script: [tests]} from this module's docstring."""
    text = re.sub(r"\n[ \t]+", " ", __doc__)  # entries continued on the next (indented) line
    entries = re.findall(r"^- benchmarks/(\w+)\.py: (.+)$", text, flags=re.MULTILINE)
    return {name: [t.strip() for t in tests.split(",")] for name, tests in entries}


def test_every_benchmark_is_listed():
    """Every benchmarks/*.py is in this module's list, and every test the list names exists."""
    entries = listed()
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert sorted(entries) == scripts, "add the new script and its smoke test to the docstring's list"
    here = sys.modules[__name__]
    for name, tests in entries.items():
        assert tests, name
        for test in tests:
            if "::" in test:
                path, function = test.split("::")
                text = (REPO / path).read_text()
                assert f"def {function}(" in text and name in text, (name, test)
            else:
                assert callable(getattr(here, test, None)), (name, test)


# ------------------------------------------------------------------------------------- the helper


def test_results_json_writes_whole_files(tmp_path, monkeypatch):
    """results_json.write_results: the payload beside a meta of command, machine and extra keys; the
    folder made; nothing left beside the file; the command of this process unless one is given."""
    rj = bench("results_json")
    out = tmp_path / "a" / "b" / "r.json"
    assert rj.write_results(out, {"rows": [1, 2]}, command="python benchmarks/x.py --n 1", k=4) == out
    record = read_json(out)
    assert record["rows"] == [1, 2] and record["meta"]["k"] == 4
    assert record["meta"]["command"] == "python benchmarks/x.py --n 1" and record["meta"]["machine"]
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/y.py", "--out", "a b.json"])
    rj.write_results(out, {"rows": []})
    assert read_json(out)["meta"]["command"] == "python benchmarks/y.py --out 'a b.json'"
    argv = ["--contexts", "4096", "--out", "/tmp/d d.json"]
    assert shlex.split(rj.command_line("/x/benchmarks/decode.py", argv)) == [
        "python",
        "benchmarks/decode.py",
        *argv,
    ]


def test_reading_args_round_trip(capsys, tmp_path):
    """reading_args: a reading turned into options parses back into itself (what the worker processes
    get); values the library refuses are the parser's usage error before any work."""
    import argparse
    import dataclasses

    from landmark.inference.options import add_retrieval_arguments

    ra = bench("reading_args")
    parser = argparse.ArgumentParser(prog="x.py")
    add_retrieval_arguments(parser)
    readings = [
        Reading(),
        Reading(k=3, granularity="head", chunk_len=128, kernel="torch", memory_device="cpu", max_blocks=5),
        Reading(block_dtype="int8", block_folder=str(tmp_path)),  # (the workers read float32 blocks)
    ]
    for reading in readings:
        args = parser.parse_args(ra.reading_argv(reading))
        assert ra.parse_reading(parser, args, block_size=64) == reading
    assert ra.reading_argv(Reading()) == shlex.split(
        "--k 4 --granularity token_head --search exact --kernel auto --chunk-len 256 --block-dtype model"
    )
    with pytest.raises(ValueError, match="compile"):
        ra.reading_argv(dataclasses.replace(Reading(), compile=True))
    for argv, error in (
        (["--k", "0"], "--k must be >= 1; got 0"),
        (["--chunk-len", "32"], "--chunk-len (32) must be at least one block (64)"),
        (["--max-blocks", "0"], "--max-blocks must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            ra.parse_reading(parser, parser.parse_args(argv), block_size=64)
        assert exit_info.value.code == 2 and error in capsys.readouterr().err


# --------------------------------------------------------------------------------- the small GPTs


def test_attention_smoke(tmp_path):
    """attention.py: every implementation at every length, timed, against SDPA of the same length;
    blockwise checked exact against the reference first."""
    out = tmp_path / "attention.json"
    assert bench("attention").main(["--smoke", "--seqs", "64", "96", "--out", str(out)]) == 0
    record = read_json(out)
    assert record["meta"]["exactness_max_abs_diff"] <= 1e-9 and record["meta"]["smoke"] is True
    rows = {(r["impl"], r["seq"]): r for r in record["results"]}
    assert sorted(rows) == sorted((i, s) for i in ("sdpa", "blockwise", "reference") for s in (64, 96))
    for (impl, _), r in rows.items():
        assert "error" not in r and positive(r["time_s"]) and len(r["times_s"]) == 1
        assert r["time_vs_sdpa"] == 1.0 if impl == "sdpa" else positive(r["time_vs_sdpa"])
        assert r["threads"] == 1
    assert record["table"].count("\n") == 1 + len(rows)  # header, rule, a line per row


def test_decode_smoke(tmp_path):
    """decode.py: every side (landmark with the kernel, eager, full) at the random-fill context and the
    really prefilled one; the bytes read per token from sizes equal the session's counters (the step
    trace's ``selections``, None here, is not a counter). The reading is not the default (k = 2, at most
    5 blocks: the 6 blocks of the context evict one): the sizes of that reading are what was read."""
    out = tmp_path / "decode.json"
    assert bench("decode").main(["--smoke", "--k", "2", "--max-blocks", "5", "--out", str(out)]) == 0
    record = read_json(out)
    asked = Reading(k=2, max_blocks=5)
    assert Reading(**record["meta"]["reading"]) == asked
    assert positive(record["floor"]["cpu_ms_per_token"])
    assert [(r["context"], r["fill"]) for r in record["results"]] == [(420, "random"), (300, "prefill")]
    for row in record["results"]:
        for side in ("landmark", "eager", "full"):
            cell = row[side]
            assert "error" not in cell, (side, cell)
            assert cell["model"] == side and cell["tokens"] == 32
            assert positive(cell["cpu_ms_per_token"]) and positive(cell["kv_bytes_per_token"])
        for side in ("landmark", "eager"):
            cell = row[side]
            assert set(cell["counters"]) == {"landmarks_scored", "block_heads_fetched", "local_positions"}
            assert all(positive(v) for v in cell["counters"].values())
            assert cell["kv_bytes_per_token_counted"] == pytest.approx(cell["kv_bytes_per_token"], rel=1e-6)
        assert row["eager"]["kernel"] is False and row["landmark"]["kernel"] is True
        assert Reading(**row["landmark"]["reading"]) == asked
        assert Reading(**row["eager"]["reading"]) == Reading(k=2, max_blocks=5, kernel="torch")
        assert row["compiled"] == {}  # not asked for
        for key in ("speedup_cpu", "speedup_wall", "eager_speedup_cpu", "kv_bytes_ratio"):
            assert positive(row[key]), key
        assert math.isfinite(row["attention_speedup_cpu"])


def test_decode_worker_process(tmp_path):
    """decode.py's measurement in its own process (``--worker``, as every full run takes it): one JSON
    line, no error; the reading reaches the process as options."""
    import argparse

    decode = bench("decode")
    args = argparse.Namespace(tokens=8, warmup=1, threads=1, smoke=False)
    reading = Reading(k=3, granularity="token", chunk_len=128, max_blocks=4)
    cell = decode.run_one("landmark", 420, "random", args, reading)
    assert "error" not in cell, cell
    assert Reading(**cell["reading"]) == reading
    assert cell["context"] == 420 and cell["tokens"] == 8 and positive(cell["cpu_ms_per_token"])
    assert cell["kv_bytes_per_token_counted"] == pytest.approx(cell["kv_bytes_per_token"], rel=1e-6)


@pytest.mark.slow
def test_decode_compiled_side(tmp_path):
    """decode.py --compiled: the landmark model with compile=True, its counters agreeing with sizes."""
    out = tmp_path / "decode.json"
    argv = ["--smoke", "--compiled", "--prefill-context", "0", "--out", str(out)]
    assert bench("decode").main(argv) == 0
    (row,) = read_json(out)["results"]
    cell = row["compiled"]
    assert cell["model"] == "compiled" and cell["warmup_tokens"] == 128 and cell["kernel"] is False
    assert cell["kv_bytes_per_token_counted"] == pytest.approx(cell["kv_bytes_per_token"], rel=1e-6)
    assert positive(row["compiled_speedup_cpu"]) and positive(row["compiled_speedup_wall"])


@pytest.fixture(scope="module")
def prefill_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefill") / "prefill.json"
    bench("prefill").main(["--smoke", "--out", str(out)])
    return out


def test_prefill_smoke(prefill_json):
    """prefill.py: the trained landmark model and the full model at every length, their ratio; the
    library's default reading."""
    record = read_json(prefill_json)
    assert record["meta"]["mode"] == "read" and record["meta"]["smoke"] is True
    assert Reading(**record["meta"]["reading"]) == Reading()
    assert [r["length"] for r in record["results"]] == [300, 600]
    for row in record["results"]:
        for side in ("landmark", "full"):
            assert row[side]["model"] == side and row[side]["length"] == row["length"]
            assert positive(row[side]["cpu_s"]) and positive(row[side]["tokens_per_cpu_s"])
            assert len(row[side]["runs"]) == 1
        assert positive(row["ratio"])


def test_prefill_nll_mode(tmp_path):
    """prefill.py --mode nll: the per-position loss path of both sides, with a reading of its own."""
    out = tmp_path / "nll.json"
    argv = ["--smoke", "--mode", "nll", "--lengths", "300", "--k", "2", "--granularity", "head"]
    bench("prefill").main([*argv, "--chunk-len", "128", "--out", str(out)])
    record = read_json(out)
    assert record["meta"]["mode"] == "nll"
    asked = Reading(k=2, granularity="head", chunk_len=128)
    assert Reading(**record["meta"]["reading"]) == asked
    (row,) = record["results"]
    assert Reading(**row["landmark"]["reading"]) == asked
    assert row["length"] == 300 and positive(row["ratio"])
    assert positive(row["landmark"]["cpu_s"]) and positive(row["full"]["cpu_s"])


def test_read_once_smoke(tmp_path):
    """read_once.py: generation over the prompt with its memory figures; the document's state saved,
    loaded and asked, against reading it again."""
    out = tmp_path / "read_once.json"
    bench("read_once").main(["--smoke", "--out", str(out)])
    record = read_json(out)
    memory, reuse = record["memory"], record["reuse"]
    assert memory["prompt_tokens"] == 600 and memory["generated"] == 16
    assert positive(memory["block_memory_bytes"]) and positive(memory["seconds"])
    assert memory["peak_rss_growth_bytes"] >= 0 and math.isfinite(memory["growth_minus_memory_mb"])
    assert reuse["doc_tokens"] == 300 and positive(reuse["state_bytes"])
    for key in ("read_and_save_s", "read_again_and_answer_s", "load_and_answer_s", "speedup"):
        assert positive(reuse[key]), key
    assert [len(reuse["answers"][k]) for k in ("read_again", "loaded")] == [16, 16]


def test_threads_smoke(tmp_path):
    """threads.py: every (threads, neighbour) setting, with the threads each really used, against one
    thread on the idle machine."""
    from landmark.inference.threads import inference_threads

    out = tmp_path / "threads.json"
    bench("threads").main(["--smoke", "--out", str(out)])
    rows = read_json(out)["results"]
    settings = [(r["threads"], r["neighbour"]) for r in rows]
    assert settings == [(1, "idle"), ("default", "busy"), (1, "busy"), (2, "idle"), (2, "busy")]
    used = {1: 1, 2: 2, "default": inference_threads()}
    for r in rows:
        assert r["threads_used"] == used[r["threads"]]
        for key in ("prompt_s", "decode_s_per_token", "prompt_vs_idle_1t", "decode_vs_idle_1t"):
            assert positive(r[key]), key
    assert rows[0]["prompt_vs_idle_1t"] == rows[0]["decode_vs_idle_1t"] == 1.0


def test_train_throughput_smoke(tmp_path):
    """train_throughput.py: the three presets (shrunk by --smoke's overrides) trained side by side,
    tokens/s of each against full attention; a landmark window's landmarks are not text tokens."""
    out = tmp_path / "train.json"
    bench("train_throughput").main(["--smoke", "--threads", "1", "--out", str(out)])
    record = read_json(out)
    results = record["results"]
    assert sorted(results) == ["full", "landmark", "xl"] and record["smoke"] is True
    assert "model.n_layer=1" in record["sets"]
    for kind, res in results.items():
        assert res["model"]["attention"] == kind and res["model"]["n_layer"] == 1
        assert res["tokens_per_step"] == 2 * 64 and len(res["seconds_per_step_rounds"]) == 1
        for key in ("tokens_per_s", "text_tokens_per_s", "ratio_to_full", "text_ratio_to_full"):
            assert positive(res[key]), (kind, key)
    assert results["full"]["ratio_to_full"] == 1.0
    assert results["landmark"]["text_tokens_per_step"] == 2 * 64 * 15 // 16  # a landmark every 16
    assert results["xl"]["text_tokens_per_step"] == results["xl"]["tokens_per_step"]


def test_train_runs_summary(prepared_corpus, tmp_path):
    """train_runs_summary.py: two tiny training runs copied and summarised (steps, tokens, the first
    and last losses, the validation losses)."""
    from landmark.train import train
    from landmark.train_config import load_config

    runs = []
    for attention in ("landmark", "full"):
        run = tmp_path / f"tiny-{attention}"
        sets = [*prepared_corpus["overrides"], f"train.out_dir={json.dumps(str(run))}",
                f"model.attention={json.dumps(attention)}", "train.max_steps=4", "train.log_every=2",
                "train.eval_every=2", "train.eval_batches=1", "train.ckpt_every=100"]  # fmt: skip
        train(load_config(REPO / "configs" / "tiny.toml", sets))
        runs.append(run)
    out = tmp_path / "summary"
    summaries = bench("train_runs_summary").main([*map(str, runs), "--out", str(out)])
    assert read_json(out / "train_runs_summary.json") == json.loads(json.dumps(summaries))
    assert [s["run"] for s in summaries] == ["tiny-landmark", "tiny-full"]
    for run, s in zip(runs, summaries):
        assert (out / f"{run.name}.metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
        assert s["attention"] == run.name.removeprefix("tiny-")
        assert s["steps"] == 4 and s["tokens"] == 4 * 4 * 128  # steps x batch x positions (tiny preset)
        assert (s["first_loss"]["step"], s["last_loss"]["step"]) == (2, 4)
        assert [step for step, _ in s["val_losses"]] == [0, 2, 4]
        assert s["first_val_loss"]["step"] == 0 and s["last_val_loss"]["step"] == 4
        assert positive(s["tokens_per_s"]) and positive(s["wall_minutes"])
        assert all(positive(v) for _, v in s["val_losses"])


def test_kernel_replay_capture_and_compare(tmp_path):
    """kernel_replay.py: the kernel calls of a read captured (with k = 2 and chunks of 128: the kernel
    is called with that k), then replayed against the library's kernel twice: the same outputs and
    selections as itself."""
    replay = bench("kernel_replay")
    calls = tmp_path / "calls.pt"
    argv = ["capture", "--length", "600", "--calls", "4", "--k", "2", "--chunk-len", "128"]
    replay.main([*argv, "--out", str(calls)])
    captured = torch.load(calls)
    asked = Reading(k=2, chunk_len=128, kernel="cpp")  # cpp: capture's own default
    assert Reading(**captured["reading"]) == asked and captured["length"] == 600
    assert len(captured["calls"]) == 4  # the last chunk's 4 layers
    assert all(call[14] == 2 for call in captured["calls"])  # the kernel's k (its 15th argument)
    out = tmp_path / "replay.json"
    replay.main(["compare", str(calls), "@library", "@library", "--repeats", "1", "--out", str(out)])
    record = read_json(out)
    assert Reading(**record["meta"]["reading"]) == asked
    rows = record["results"]
    assert [r["source"] for r in rows] == ["@library", "@library"]
    assert rows[0]["vs_first"] == 1.0 and positive(rows[1]["vs_first"])
    assert all(r["max_diff"] == 0.0 and r["same_selection"] and positive(r["best_cpu_s"]) for r in rows)


@pytest.mark.slow
def test_kernel_replay_captures_chunks_against_random_old_blocks(tmp_path):
    """kernel_replay.py capture --old-blocks: two chunks of one layer of SmolLM2's layout against N random
    old blocks (int8), replayed against the library's kernel: the same outputs and selections."""
    replay = bench("kernel_replay")
    calls = tmp_path / "calls.pt"
    replay.main(["capture", "--old-blocks", "130", "--block-dtype", "int8", "--out", str(calls)])
    captured = torch.load(calls)
    assert captured["length"] == 130 * 64 and len(captured["calls"]) == 2
    assert Reading(**captured["reading"]) == Reading(kernel="cpp", block_dtype="int8")
    out = tmp_path / "replay.json"
    replay.main(["compare", str(calls), "@library", "@library", "--repeats", "1", "--out", str(out)])
    rows = read_json(out)["results"]
    assert all(r["max_diff"] == 0.0 and r["same_selection"] and positive(r["best_cpu_s"]) for r in rows)


def test_kernel_replay_captures_decode_steps_against_random_old_blocks(tmp_path):
    """kernel_replay.py capture --old-blocks N --decode-steps S: S decode steps (one query row each) of
    one layer against N random old blocks, enough for the decode step's float scan."""
    replay = bench("kernel_replay")
    calls = tmp_path / "calls.pt"
    replay.main(["capture", "--old-blocks", "100", "--decode-steps", "3", "--out", str(calls)])
    captured = torch.load(calls)
    assert len(captured["calls"]) == 3 and all(c[0].shape[2] == 1 for c in captured["calls"])  # q: 1 row
    out = tmp_path / "replay.json"
    replay.main(["compare", str(calls), "@library", "--repeats", "1", "--out", str(out)])
    assert positive(read_json(out)["results"][0]["best_cpu_s"])
    with pytest.raises(SystemExit):
        replay.main(["capture", "--decode-steps", "3", "--out", str(calls)])  # not without --old-blocks


def test_kernel_replay_builds_a_source(tmp_path):
    """kernel_replay.py compare with a source file: built here (the compiler: slow the first time), the
    same selections as the library's kernel built from the same file."""
    replay = bench("kernel_replay")
    calls = tmp_path / "calls.pt"
    replay.main(["capture", "--length", "600", "--calls", "4", "--out", str(calls)])
    out = tmp_path / "replay.json"
    source = str(REPO / "landmark" / "inference" / "csrc" / "retrieval.cpp")
    replay.main(["compare", str(calls), "@library", source, "--repeats", "1", "--out", str(out)])
    rows = read_json(out)["results"]
    assert rows[1]["source"] == source and rows[1]["same_selection"] and rows[1]["max_diff"] <= 1e-6


# ------------------------------------------------------------------------------- the tiny Llama


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama of tests/hf_helpers.py: unconverted (``base``) and converted, blocks of 8 (``lm``)."""
    pytest.importorskip("transformers")
    from hf_helpers import converted, write_tiny

    root = tmp_path_factory.mktemp("tiny-hf")
    base, _ = write_tiny(root)
    model, tok = converted()
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return {"base": base, "lm": root / "lm"}


@pytest.fixture(scope="module")
def hf_prefill_json(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_prefill") / "hf_prefill.json"
    argv = ["--smoke", "--base", str(tiny_hf["base"]), "--lengths", "200", "--profile", "--k", "2"]
    bench("hf_prefill").main([*argv, "--out", str(out)])
    return out


def test_hf_prefill_smoke(hf_prefill_json):
    """hf_prefill.py: the base model's forward and its landmark conversion's chunked read, their ratio;
    --profile splits the read into the kernel (per layer) and the rest; the reading asked for (k = 2,
    --smoke's chunks of 64) is the landmark side's."""
    record = read_json(hf_prefill_json)
    assert Reading(**record["meta"]["reading"]) == Reading(k=2, chunk_len=64)
    (row,) = record["results"]
    assert Reading(**row["landmark"]["reading"]) == Reading(k=2, chunk_len=64)
    assert row["length"] == 200 and positive(row["time_ratio"])
    for side in ("base", "landmark"):
        assert row[side]["model"] == side and positive(row[side]["cpu_s"])
    lm = row["landmark"]
    assert len(lm["kernel_s_per_layer"]) == 2 and all(positive(s) for s in lm["kernel_s_per_layer"])
    assert lm["kernel_s"] == pytest.approx(sum(lm["kernel_s_per_layer"])) and lm["kernel_s"] <= lm["cpu_s"]


def test_hf_prefill_profile_leaves_the_kernel_as_it_was(hf_prefill_json):
    """--profile times the kernel by wrapping ``kernel.kernel_plan``; in this process (--smoke) it is
    restored afterwards."""
    from landmark.inference import kernel

    assert kernel.kernel_plan.__module__ == "landmark.inference.kernel"


def test_llamacpp_smoke(tiny_hf, tmp_path):
    """llamacpp.py: the landmark model reads a passkey prompt and decodes, every token time-stamped;
    the llama.cpp rows are measured where llama-cpp-python is installed, else marked unavailable (it is
    an optional benchmark dependency, built from source)."""
    out = tmp_path / "llamacpp.json"
    argv = [
        "--smoke",
        "--model",
        str(tiny_hf["lm"]),
        "--systems",
        "landmark",
        "landmark int8",
        "llama.cpp q8_0",
    ]
    argv += ["--k", "2", "--chunk-len", "64", "--out", str(out), "--extrapolate-to", "320"]
    argv += ["--tokenizer", str(tiny_hf["lm"])]  # llama.cpp reads the same ids (valid in its vocabulary)
    bench("llamacpp").main(argv)
    record = read_json(out)
    assert Reading(**record["meta"]["reading"]) == Reading(k=2, chunk_len=64)
    ours, int8, theirs, *beyond = record["rows"]
    assert [(r["system"], r["length"]) for r in beyond] == [("landmark", 320), ("landmark int8", 320)]
    assert record["extrapolated"] == []  # llama.cpp ran at one length: nothing to fit
    assert int8["system"] == "landmark int8" and int8["key"] == ours["key"]
    assert positive(int8["prompt_cpu_s"]) and positive(int8["decode_cpu_ms_per_token"])
    assert Reading(**ours["reading"]) == Reading(k=2, chunk_len=64)
    assert ours["system"] == "landmark" and ours["length"] == 256 and ours["new_tokens"] == 4
    assert (
        positive(ours["prompt_s"]) and positive(ours["decode_ms_per_token"]) and positive(ours["peak_rss_mb"])
    )
    assert ours["prompt_tokens_per_s"] == pytest.approx(256 / ours["prompt_s"])
    assert positive(ours["prompt_cpu_s"]) and positive(ours["decode_cpu_ms_per_token"])
    assert ours["key"].isdigit() and ours["found"] == (ours["key"] in ours["answer"])
    assert theirs["system"] == "llama.cpp q8_0" and theirs["length"] == 256
    if importlib.util.find_spec("llama_cpp") is None:
        assert theirs["unavailable"] == "llama-cpp-python is not installed" and "prompt_s" not in theirs
        assert record["ratios"] == []
    else:
        assert positive(theirs["prompt_s"]) and theirs["key"] == ours["key"]  # the same prompt
        ratio, ratio_int8 = record["ratios"]
        assert ratio["against"] == "llama.cpp q8_0" and positive(ratio["reading_x"])
        assert (ratio["ours"], ratio_int8["ours"]) == ("landmark", "landmark int8")
        assert ratio_int8["decoding_cpu_x"] == pytest.approx(
            theirs["decode_cpu_ms_per_token"] / int8["decode_cpu_ms_per_token"]
        )
        assert ratio["reading_cpu_x"] == pytest.approx(theirs["prompt_cpu_s"] / ours["prompt_cpu_s"])


def test_llamacpp_extrapolation_fits_and_bounds_its_rows():
    """llamacpp.py --extrapolate-to: llama.cpp's time where it was not run, from the run's rows: an exact
    fit of reading a n + b n^2 and decoding c + d n on such data, and the bounds from the longest row."""
    llamacpp = bench("llamacpp")
    rows = [{"system": "landmark int8", "length": 4000, "prompt_s": 9.0, "prompt_cpu_s": 8.0,
             "decode_cpu_ms_per_token": 2.0}]  # fmt: skip
    for n in (100, 300, 1000):
        reading, decoding = 0.5 * n + 0.01 * n**2, 3.0 + 0.2 * n
        rows.append({"system": "llama.cpp f16", "length": n, "prompt_s": 1.0, "prompt_cpu_s": reading,
                     "decode_cpu_ms_per_token": decoding})  # fmt: skip
    rows.append({"system": "llama.cpp q8_0", "length": 1000, "error": ["failed"]})  # one row: no fit
    (e,) = llamacpp.extrapolate(rows, 4000)
    assert (e["against"], e["ours"], e["measured_lengths"]) == (
        "llama.cpp f16",
        "landmark int8",
        [100, 300, 1000],
    )
    assert e["reading_cpu_s_fit"] == pytest.approx(0.5 * 4000 + 0.01 * 4000**2)
    assert e["decoding_cpu_ms_fit"] == pytest.approx(3.0 + 0.2 * 4000)
    assert e["reading_cpu_s_bound"] == 4 * (0.5 * 1000 + 0.01 * 1000**2)
    assert e["decoding_cpu_ms_bound"] == pytest.approx(3.0 + 0.2 * 1000)
    assert e["reading_cpu_x_fit"] == pytest.approx(e["reading_cpu_s_fit"] / 8.0)
    assert e["decoding_cpu_x_bound"] == pytest.approx(e["decoding_cpu_ms_bound"] / 2.0)


def test_superblock_bounds_smoke(tiny_hf, tmp_path):
    """superblock_bounds.py: the shares of super-blocks an exact bounded search must visit, for both
    bound kinds, recorded at every bounded selection of a read."""
    out = tmp_path / "bounds.json"
    bench("superblock_bounds").main(["--smoke", "--model", str(tiny_hf["lm"]), "--k", "2", "--out", str(out)])
    record = read_json(out)
    assert record["selections"] > 0 and record["blocks_at_end"] > 2
    assert [r["bound"] for r in record["rows"]] == ["minmax", "ball"]
    for row in record["rows"]:
        assert 0 < row["share_needed"] <= 1 and 0 < row["share_needed_last"] <= 1


def test_plot_reading(prefill_json, hf_prefill_json, tmp_path):
    """plot_reading.py: a line per model of both benchmarks' JSON, every length a point."""
    out = tmp_path / "plots" / "reading.png"
    lines = bench("plot_reading").main(["--prefill", str(prefill_json), "--hf", str(hf_prefill_json),
                                        "--out", str(out)])  # fmt: skip
    assert out.read_bytes()[:8] == PNG and not list(out.parent.glob("*.tmp.png"))
    assert len(lines) == 4
    lengths = {label: sorted(x for x, _ in points) for label, points in lines.items()}
    assert [v for k, v in lengths.items() if k.startswith("small GPT")] == [[300, 600], [300, 600]]
    assert [v for k, v in lengths.items() if k.startswith("SmolLM2")] == [[200], [200]]
    assert all(positive(y) for points in lines.values() for _, y in points)


def test_hf_heldout_loss_script(tiny_hf, tmp_path):
    """hf_heldout_loss.py end to end: the base model, its conversion on the spot and a saved converted
    model (the same weights and block size: the same loss as the conversion on the spot)."""
    out = tmp_path / "heldout.json"
    argv = ["--base", str(tiny_hf["base"]), "--landmark", str(tiny_hf["lm"]), "--block-size", "8",
            "--max-length", "64", "--windows", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    bench("hf_heldout_loss").main(argv)
    rows = read_json(out)["rows"]
    assert len(rows) == 3 and rows[2]["model"] == str(tiny_hf["lm"])
    for r in rows:
        assert positive(r["loss"]) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert rows[1]["loss"] == pytest.approx(rows[2]["loss"], abs=1e-5)


def test_hf_passkey_probe_script(tiny_hf, tmp_path):
    """hf_passkey_probe.py end to end: a row per (model, length, depth) with a loss per trial."""
    out = tmp_path / "probe.json"
    argv = ["--base", str(tiny_hf["base"]), "--landmark", str(tiny_hf["lm"]), "--lengths", "200",
            "--depths", "0.25", "0.75", "--trials", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    bench("hf_passkey_probe").main(argv)
    rows = read_json(out)["rows"]
    cells = [(r["model"], r["length"], r["depth"]) for r in rows]
    assert cells == [(m, 200, d) for m in ("base", "landmark-full") for d in (0.25, 0.75)]
    for r in rows:
        assert len(r["trials"]) == 2 and 0 <= r["exact"] <= 2
        assert positive(r["loss"]) and all(positive(t["loss"]) for t in r["trials"])
