"""Tests of `landmark hf finetune` (single process, LoRA, torchrun DDP), FSDP2 on CPU, and SmolLM2 (slow).

The tiny tests run on a random 2-layer Llama and a small corpus in tmp_path; the token cache goes to
tmp_path through LANDMARK_CACHE. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from argv_helpers import last_wins

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_helpers import write_tiny

import landmark.hf as lhf
from landmark.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--block-size", "8", "--max-length", "64", "--steps", "6", "--batch-size", "2", "--lr", "1e-3"]
TINY_ARGS += ["--warmup-steps", "1", "--logging-steps", "2", "--eval-windows", "4"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return write_tiny(tmp_path)


def summary(out: Path) -> dict:
    return json.loads((out / "landmark-finetune.json").read_text())


def test_finetune_full(tiny, tmp_path):
    model_dir, corpus = tiny
    out = tmp_path / "out"
    assert (
        main(
            [
                "hf",
                "finetune",
                "--model",
                str(model_dir),
                "--corpus",
                str(corpus),
                "--out",
                str(out),
                *TINY_ARGS,
            ]
        )
        == 0
    )
    s = summary(out)
    assert s["world_size"] == 1 and s["block_size"] == 8
    assert s["eval_loss_after"] < s["eval_loss_before"]
    model, tok = lhf.load_pretrained(out)
    assert model.config.landmark_block_size == 8
    _, new = lhf.generate(model.eval(), tok, "Call me", max_new_tokens=4)
    assert len(new) >= 1


def test_finetune_lora_merges_and_trains_the_landmark_row(tiny, tmp_path):
    model_dir, corpus = tiny
    out = tmp_path / "out"
    args = [
        "hf",
        "finetune",
        "--model",
        str(model_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        *TINY_ARGS,
    ]
    assert main([*args, "--lora-r", "4"]) == 0
    s = summary(out)
    assert 0 < s["trainable_parameters"] < s["parameters"] / 10
    assert (out / "lora-adapter" / "adapter_config.json").is_file()
    model, _ = lhf.load_pretrained(out)
    emb = model.get_input_embeddings().weight.detach()
    lid = model.config.landmark_token_id
    keep = torch.ones(emb.shape[0], dtype=torch.bool)
    keep[lid] = False
    # the landmark row started as the mean of the other rows; LoRA's trainable token moved it
    assert (emb[lid] - emb[keep].mean(0)).abs().max() > 1e-4
    # merged: no LoRA modules left
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_finetune_passkey_mix_time_limit_and_resume(tiny, tmp_path, capsys):
    """--passkey-fraction 1 trains on passkey samples only; --max-minutes stops after the first step and
    leaves a resumable run (nothing published); --resume finishes it to the same weights as a run that
    was never interrupted."""
    from safetensors.torch import load_file

    model_dir, corpus = tiny
    out, straight = tmp_path / "out", tmp_path / "straight"
    args = ["hf", "finetune", "--model", str(model_dir), "--corpus", str(corpus)]
    args += ["--block-size", "8", "--max-length", "240", "--steps", "4", "--batch-size", "1"]
    args += ["--passkey-fraction", "1", "--save-steps", "3"]
    assert main([*args, "--out", str(out), "--max-minutes", "0.00001"]) == 0
    assert not out.exists() and "continue with the same command and --resume" in capsys.readouterr().out
    staging = tmp_path / ".out.partial"
    assert [p.name for p in staging.glob("checkpoint-*")] == ["checkpoint-1"]
    early = json.loads((staging / "landmark-finetune.json").read_text())  # what gpu_check reads
    assert early["stopped_early"] and early["steps_done"] == 1 and early["steady_tokens_per_s"] is None
    # neither a fresh start over the interrupted run nor a resume with other settings
    assert main([*args, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--resume", "--lr", "1e-3"]) == 2
    assert "--lr" in capsys.readouterr().err
    run_file = staging / "finetune-run.json"  # a run file of an older version, without newer settings
    settings = json.loads(run_file.read_text())
    del settings["passkey_books"], settings["passkey_multikey"], settings["passkey_near"]
    del settings["passkey_near_gap"], settings["passkey_pairs"]
    run_file.write_text(json.dumps(settings))
    assert main([*args, "--out", str(out), "--resume"]) == 0
    s = summary(out)
    assert s["steps_done"] == 4 and s["tokens_seen"] == 4 * (240 - 240 // 8)
    assert s["config"]["passkey_fraction"] == 1.0
    assert not list(out.glob("checkpoint-*")) and not staging.exists()
    assert main([*args, "--out", str(straight)]) == 0
    resumed, reference = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6)


def test_a_stopped_run_finishes_where_it_stopped(tiny, tmp_path, capsys):
    """A run stopped by --max-minutes is published at the step it reached with --resume --steps <done>
    (never below it); the published weights are those of its checkpoint."""
    from safetensors.torch import load_file

    model_dir, corpus = tiny
    out = tmp_path / "out"
    args = ["hf", "finetune", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out)]
    args += [
        "--block-size",
        "8",
        "--max-length",
        "64",
        "--steps",
        "4",
        "--batch-size",
        "1",
        "--save-steps",
        "3",
    ]
    assert main([*args, "--max-minutes", "0.00001"]) == 0
    checkpoint = tmp_path / ".out.partial" / "checkpoint-1"
    stopped = load_file(checkpoint / "model.safetensors")
    capsys.readouterr()
    ahead = checkpoint.with_name("checkpoint-3")  # as a run stopped after 3 steps would leave it
    checkpoint.rename(ahead)
    assert main(last_wins([*args, "--resume", "--steps", "2"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps 2: the interrupted run has done 3 steps") and "--steps 3" in err
    ahead.rename(checkpoint)
    assert main(last_wins([*args, "--resume", "--steps", "1"])) == 0
    finished = summary(out)
    assert finished["steps_done"] == 1 and finished["tokens_per_s"] is None and not checkpoint.parent.exists()
    published = load_file(out / "model.safetensors")
    assert published.keys() == stopped.keys()
    for name in stopped:
        assert torch.equal(published[name], stopped[name]), name


def test_finetune_resume_refusals(tiny, tmp_path, capsys):
    """--resume with nothing to continue is refused, naming the option; so is a run folder in use."""
    from landmark.files import RunLock

    model_dir, corpus = tiny
    out = tmp_path / "out"
    args = ["hf", "finetune", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out)]
    args += ["--block-size", "8", "--max-length", "64", "--steps", "2", "--batch-size", "1"]
    assert main([*args, "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume: no interrupted fine-tune")
    staging = tmp_path / ".out.partial"
    staging.mkdir()
    lock = RunLock(staging, option="--out")
    lock.acquire()
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "in use" in err and "--out" in err
    finally:
        lock.release()


def test_passkey_mix_windows(tiny):
    from hf_helpers import make_tokenizer

    from landmark.data.passkey import PasskeyMix, first_integer
    from landmark.hf.passkey import PasskeyMixWindows

    tok = make_tokenizer()
    base = [{"input_ids": torch.zeros(205, dtype=torch.long)}] * 40
    mix = PasskeyMixWindows(base, tok, raw_tokens=205, block_size=8, mix=PasskeyMix(0.5), seed=3)
    passkey = [i for i in range(40) if mix.is_passkey(i)]
    corpus_window = next(i for i in range(40) if i not in passkey)
    assert 5 < len(passkey) < 35 and mix[corpus_window]["input_ids"].eq(0).all()
    sample = mix[passkey[0]]["input_ids"]
    assert sample.shape == (205,) and torch.equal(sample, mix[passkey[0]]["input_ids"])  # seeded
    text = tok.decode(sample)
    key = first_integer(text.split("The pass key is")[1])
    assert text.endswith(f"What is the pass key? The pass key is {key}.")
    with pytest.raises(ValueError, match="at least"):
        PasskeyMixWindows(base, tok, raw_tokens=150, block_size=8, mix=PasskeyMix(0.5))


def test_passkey_mix_windows_with_prose_and_several_keys(tiny):
    """--passkey-books / --passkey-multikey: prose filler from the training split, named keys with the
    question about one of them (its key at least one block before the question); with both shares 0
    the samples are the paper's recipe's, unchanged."""
    import re

    from hf_helpers import make_tokenizer

    from landmark.data.passkey import BookHaystack, PasskeyMix, first_integer
    from landmark.hf.passkey import PasskeyMixWindows

    _, corpus = tiny
    tok = make_tokenizer()
    base = [{"input_ids": torch.zeros(400, dtype=torch.long)}] * 60
    plain = PasskeyMixWindows(base, tok, raw_tokens=400, block_size=8, mix=PasskeyMix(1.0), seed=3)
    same = PasskeyMixWindows(base, tok, 400, 8, PasskeyMix(1.0, books=0.0, multikey=0.0), seed=3)
    assert all(torch.equal(plain[i]["input_ids"], same[i]["input_ids"]) for i in range(10))
    haystack = BookHaystack(corpus, split="train")
    mix = PasskeyMixWindows(
        base, tok, 400, 8, PasskeyMix(1.0, books=0.5, multikey=0.5), seed=3, haystack=haystack
    )
    kinds = {(v.prose, v.keys > 1) for v in map(mix.variant, range(60))}
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}
    prose_seen = multikey_seen = 0
    for i in range(60):
        prose, keys, near, chat = mix.variant(i)
        assert not chat
        assert not near
        ids = mix[i]["input_ids"]
        assert ids.shape == (400,)
        text = tok.decode(ids)
        assert ("The grass is green." not in text) == prose
        if keys > 1:
            named = re.findall(r"The pass key for (\w+) is (\d+)\. Remember it\.", text)
            asked = re.findall(r"What is the pass key for (\w+)\? The pass key for \w+ is (\d+)\.", text)
            if len(named) == keys:  # else the window was too short for them: the one-key sample
                multikey_seen += 1
                assert len({n for n, _ in named}) == keys and len(asked) == 1
                name, answer = asked[0]
                assert dict(named)[name] == answer
        else:
            key = first_integer(text.split("The pass key is")[1])
            assert text.endswith(f"The pass key is {key}.")
        prose_seen += prose
    assert prose_seen > 10 and multikey_seen > 5


def test_finetune_fsdp_refused_on_cpu(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU processes")
    model_dir, corpus = tiny
    args = [
        "hf",
        "finetune",
        "--model",
        str(model_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, *TINY_ARGS, "--fsdp"]) == 2
    assert "error: --fsdp needs CUDA" in capsys.readouterr().err


def torchrun(args: list[str], env_extra: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_finetune_ddp_two_cpu_processes(tiny, tmp_path):
    model_dir, corpus = tiny
    out = tmp_path / "out"
    args = [
        "-m",
        "landmark",
        "hf",
        "finetune",
        "--model",
        str(model_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
    ]
    torchrun([*args, *TINY_ARGS], {"LANDMARK_CACHE": str(tmp_path / "cache")})
    s = summary(out)
    assert s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU", s  # DDP over gloo
    assert s["eval_loss_after"] < s["eval_loss_before"], s
    model, _ = lhf.load_pretrained(out)
    assert model.config.landmark_token_id is not None


FSDP2_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from hf_helpers import BS, converted
import landmark.hf as lhf

dist.init_process_group("gloo")
rank = dist.get_rank()
model, tok = converted()
model.train()
rows = [torch.arange(1, 60) + 3 * r for r in range(4)]
batch = lhf.LandmarkCollator(tok, BS, 32)(rows)
full = model(**batch)
full.loss.backward()
ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
model.zero_grad()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert all(type(p).__name__ == "DTensor" for p in model.parameters())
half = {{k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}}
loss = model(**half).loss
loss.backward()  # FSDP averages gradients over ranks; both halves hold the same number of targets
grad = model.model.layers[0].self_attn.q_proj.weight.grad.full_tensor()
losses = [torch.zeros(()) for _ in range(2)]
dist.all_gather(losses, loss.detach())
if rank == 0:
    assert abs(sum(losses).item() / 2 - full.loss.item()) < 1e-5, (losses, full.loss)
    assert torch.allclose(grad, ref_grad, atol=1e-6), (grad - ref_grad).abs().max()
    print("FSDP2 OK")
dist.barrier()  # both ranks done with their collectives before either tears gloo down (a racing
dist.destroy_process_group()  # teardown aborted rank 0 with "terminate called" about once in 5 runs)
"""


def test_fsdp2_on_cpu_with_gloo(tmp_path):
    """torch's FSDP2 shards a converted model over 2 CPU processes (gloo): same loss and gradients as one
    process on the whole batch. (The Trainer cannot use it on CPU: accelerate enables FSDP on GPUs only.)"""
    script = tmp_path / "fsdp2.py"
    script.write_text(textwrap.dedent(FSDP2_SCRIPT.format(tests=str(REPO / "tests"))))
    proc = torchrun([str(script)], {})
    assert "FSDP2 OK" in proc.stdout


@pytest.mark.slow
def test_smollm2_prepare_finetune_save_load_generate(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct: GGUF -> safetensors, a few landmark fine-tuning steps on the bundled books,
    save, reload, generate. About 3 minutes on 2 CPU cores."""
    from landmark.hf.smollm2 import is_prepared, prepare_smollm2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    base = prepare_smollm2(tmp_path / "smollm2", log=lines.append)
    assert is_prepared(base)
    prepare_smollm2(base, log=lines.append)  # idempotent
    assert "already prepared" in lines[-1]
    out = tmp_path / "ft"
    args = ["hf", "finetune", "--model", str(base), "--out", str(out), "--max-length", "256", "--steps", "3"]
    args += [
        "--batch-size",
        "2",
        "--lr",
        "1e-4",
        "--warmup-steps",
        "1",
        "--logging-steps",
        "1",
        "--eval-windows",
        "4",
    ]
    assert main(args) == 0
    s = summary(out)
    assert s["block_size"] == 64 and s["parameters"] > 100e6
    model, tok = lhf.load_pretrained(out)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.config.landmark_token_id == 49152 == tok.convert_tokens_to_ids("<landmark>")
    text, new = lhf.generate(model.eval(), tok, "The capital of France is", max_new_tokens=5)
    assert len(new) >= 1 and isinstance(text, str)


def test_passkey_mix_windows_near_keys():
    """--passkey-near: that share of the passkey samples may put the key right before the question
    (no one-block gap; some do), the others keep the gap; the earlier draws (prose, keys) are unchanged
    by the new share."""
    from hf_helpers import make_tokenizer

    from landmark.data.passkey import PasskeyMix
    from landmark.hf.passkey import PasskeyMixWindows

    tok = make_tokenizer()
    base = [{"input_ids": torch.zeros(400, dtype=torch.long)}] * 200
    far = PasskeyMixWindows(base, tok, 400, 8, PasskeyMix(1.0, multikey=0.3), seed=3)
    mix = PasskeyMixWindows(base, tok, 400, 8, PasskeyMix(1.0, multikey=0.3, near=0.5, near_gap=None), seed=3)
    assert [far.variant(i)[:2] for i in range(200)] == [mix.variant(i)[:2] for i in range(200)]

    def find(ids: list[int], text: str) -> int:
        part = tok.encode(text, add_special_tokens=False)
        return next(j for j in range(len(ids)) if ids[j : j + len(part)] == part)

    gaps: dict[bool, list[int]] = {True: [], False: []}
    for i in range(200):
        v = mix.variant(i)
        if v.keys == 1:
            ids = mix[i]["input_ids"].tolist()
            key_end = find(ids, " is the pass key.") + len(
                tok.encode(" is the pass key.", add_special_tokens=False)
            )
            gaps[v.near].append(find(ids, " What is the pass key?") - key_end)  # filler tokens between
    assert min(gaps[False]) >= 7 and len(gaps[True]) > 30
    assert min(gaps[True]) < 7  # some keys right before the question
