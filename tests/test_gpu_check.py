"""The GPU check's smoke mode (scripts/gpu_check.sh --smoke), as CI runs it: every step on a CPU at tiny
sizes, the Triton kernels through the interpreter; and its time budget, which kills a slow step.

The smoke run takes about 65 s on an idle 2-core CPU (most of it starting Python with torch and
transformers in six child processes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check_module():
    """scripts/gpu_check.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def numbers(value):
    """Every number in a parsed JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def refuse_constant(name: str):
    raise AssertionError(f"non-finite number {name} in the JSON")


def test_smoke_mode_runs_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), "--work", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((out / "gpu_check.json").read_text(), parse_constant=refuse_constant)
    assert record["mode"] == "smoke"
    steps = record["steps"]
    assert list(steps) == ["triton_tests", "attention_bench", "train_small", "hf_finetune", "hf_reading"]
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step)
        assert all(math.isfinite(x) for x in numbers(step)), name
        assert step["seconds"] <= step["budget_s"]
    assert steps["triton_tests"]["tests"]["passed"] >= 3 and steps["triton_tests"]["tests"]["failed"] == 0
    assert (
        steps["attention_bench"]["correctness_ok"]
        and steps["attention_bench"]["rows"][0]["ratio_fwd_bwd"] > 0
    )
    train = steps["train_small"]
    for attention in ("landmark", "full"):
        assert train[attention]["steps"] == 4 and train[attention]["steady_tokens_per_s"] > 0
    assert train["landmark_over_full_tokens_per_s"] > 0
    # stopped by --max-minutes after one step (as on a GPU, where it runs for 45 s): the summary comes
    # from the staging folder of the resumable run
    assert steps["hf_finetune"]["steps_done"] == 1 and steps["hf_finetune"]["tokens_per_s"] > 0
    # the reading step (on a CPU: both reads on the CPU, so the same logits) ran every part
    reading = steps["hf_reading"]
    # two reads of the same weights on the CPU: equal to float32 rounding (bitwise under transformers
    # 5.24 in earlier CI runs; 6.6e-8 apart under 5.25, with this code and the code of before it alike)
    assert reading["device"] == "cpu" and reading["rel_diff"] <= 1e-6 and reading["same_argmax"]
    assert (
        reading["eval_tokens"] == 400
        and reading["eval_seconds"] > 0
        and list(reading["read_seconds"]) == ["200"]
    )
    # the same stream read in whole-chunk row groups, and the unconverted model's full attention, timed
    assert reading["whole_chunk_rel_diff"] < 1e-5
    # the fixed graph (kernel "graph"): the reference's logits, timed; compiled only on a GPU
    assert reading["graph_rel_diff"] < 1e-5 and list(reading["read_seconds_graph"]) == ["200"]
    assert "read_seconds_graph_compiled" not in reading and "graph_compiled_rel_diff" not in reading
    assert list(reading["read_seconds_whole_chunk"]) == list(reading["full_read_seconds"]) == ["200"]
    assert min(reading["read_seconds_whole_chunk"]["200"], reading["full_read_seconds"]["200"]) > 0
    assert (out / "attention_gpu.json").is_file() and (out / "gpu_check.log").stat().st_size > 0
    assert "hf_finetune" in proc.stdout and "ok" in proc.stdout.splitlines()[-3]  # the summary table


def test_a_step_past_its_budget_is_killed(tmp_path):
    gc = gpu_check_module()
    check = gc.Check(True, tmp_path, tmp_path, tmp_path / "log", time.monotonic() + 60, dict(os.environ))
    start = time.monotonic()
    with pytest.raises(gc.StepError, match="timed out"):
        gc.run(check, [sys.executable, "-c", "import time; time.sleep(60)"], time.monotonic() + 1)
    assert time.monotonic() - start < 1 + gc.KILL_GRACE_S + 5


def test_a_failing_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    gc = gpu_check_module()
    check = gc.Check(True, tmp_path, tmp_path, tmp_path / "log", time.monotonic() + 60, dict(os.environ))
    check.results = {"steps": {}}

    def broken(check, deadline):
        raise gc.StepError("boom")

    monkeypatch.setitem(gc.STEP_FUNCTIONS, "triton_tests", broken)
    monkeypatch.setitem(gc.STEP_FUNCTIONS, "attention_bench", lambda check, deadline: {"value": float("nan")})
    gc.run_step(check, "triton_tests")
    gc.run_step(check, "attention_bench")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert saved["triton_tests"]["status"] == "failed" and saved["triton_tests"]["error"] == "boom"
    assert saved["attention_bench"]["status"] == "failed" and saved["attention_bench"]["value"] is None
    check.deadline = time.monotonic()  # no time left: skipped, not started
    gc.run_step(check, "hf_finetune")
    assert check.results["steps"]["hf_finetune"]["status"] == "skipped"
