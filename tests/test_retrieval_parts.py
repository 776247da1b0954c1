"""The pieces of retrieval inference: small functions over a Step, the reference's selection equal to
what the reference attends to, and a shared plan equal to planning per call."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from inference_helpers import random_memory

from landmark.inference.retrieval import (
    LayerInputs,
    RetrievalConfig,
    Step,
    StepStats,
    plan_step,
    reference_attention,
    reference_selection,
    retrieval_attention,
)

INFERENCE = Path(__file__).resolve().parents[1] / "landmark" / "inference"
# Public entry points whose signatures other modules, tests and benchmarks call: kept as they are.
PUBLIC_SIGNATURES = {"kernel_plan"}


def _functions(path: Path):
    """(qualified name, parameters without self, lines) of every function in a module."""
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                if prefix and params[:1] in (["self"], ["cls"]):
                    params = params[1:]
                found.append((prefix + child.name, len(params), child.end_lineno - child.lineno + 1))
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


@pytest.mark.parametrize("module", ["retrieval.py", "kernel.py", "memory.py", "graph.py", "step.py"])
def test_functions_are_small(module):
    """At most 6 parameters (the public entry points excepted) and 80 lines per function."""
    for name, params, lines in _functions(INFERENCE / module):
        assert params <= 6 or name in PUBLIC_SIGNATURES, f"{module}:{name} takes {params} parameters"
        assert lines <= 80, f"{module}:{name} is {lines} lines long"


def _step(granularity, rows, seed=3):
    bs, d, heads, kv_heads = 8, 16, 4, 2
    memory = random_memory(2, kv_heads, [14, 5], bs, d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tails, q_len = torch.tensor([3, 7]), torch.tensor([rows, max(rows - 2, 1)])
    width = int((tails + rows).max())
    q = torch.randn(2, heads, rows, d, generator=g)
    local_k, local_v = torch.randn(2, 2, kv_heads, width, d, generator=g)
    retrieval = RetrievalConfig(k=3, granularity=granularity, row_group=4, kernel="torch")
    step = Step(tails + q_len, tails, q_len, rows, width, retrieval, bs, d, 10000.0)
    return LayerInputs(q, local_k, local_v, memory, d**-0.5), step


@pytest.mark.parametrize("granularity", ["token_head", "token", "head"])
def test_reference_selection_is_what_the_reference_attends_to(granularity):
    """The selection the kernel is given (``reference_selection``) is the one the reference traces."""
    inputs, step = _step(granularity, rows=11)
    stats = StepStats(selections=[])
    reference_attention(inputs, step, None, stats)
    traced = torch.cat(stats.selections, dim=2)
    selection = reference_selection(inputs, step)
    assert torch.equal(selection[:, :, : traced.shape[2]], traced)
    assert bool((selection[:, :, traced.shape[2] :] == -1).all())


@pytest.mark.parametrize("rows", [1, 2])
def test_a_shared_decode_plan_equals_planning_per_call(rows):
    inputs, step = _step("token_head", rows=rows)
    plan = plan_step(step, inputs.memory, torch.float32)
    for q in (inputs.q, inputs.q * 0.5):  # two layers, one plan
        layer = LayerInputs(q, inputs.local_k, inputs.local_v, inputs.memory, inputs.scale)
        planned = retrieval_attention(layer, step, None, plan)
        assert torch.equal(planned, retrieval_attention(layer, step))
