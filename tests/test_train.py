"""Tests of training: configs, the loop, checkpoints, resume (also after kill -9), torchrun, CLI errors.

Everything runs the tiny preset (configs/tiny.toml) on a small synthetic corpus in a temporary folder,
with one CPU thread per process; the token arrays are prepared once per session.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus_helpers import write_corpus

from landmark.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    open_checkpoint,
    save_checkpoint,
)
from landmark.cli import main
from landmark.model import GPT, ModelConfig
from landmark.train import CHECKSUM_ENV, lr_at, param_checksum, param_groups, train
from landmark.train_config import ConfigError, config_field_docs, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


@pytest.fixture(scope="session")
def env(prepared_corpus) -> dict:
    """A synthetic corpus, prepared once (BPE 512), and the --set overrides that use it."""
    return prepared_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))  # never touch the repository's cache


def config(env: dict, out_dir: Path, *extra: str):
    return load_config(TINY, [*env["overrides"], f"train.out_dir={json.dumps(str(out_dir))}", *extra])


def cli_args(env: dict, out_dir: Path, *extra: str) -> list[str]:
    args = ["train", str(TINY)]
    for o in [*env["overrides"], f"train.out_dir={json.dumps(str(out_dir))}", *extra]:
        args += ["--set", o]
    return args


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> list[tuple]:
    """What must be identical between runs: step, loss, lr, tokens, val_loss of every logged step."""
    return [(r["step"], r.get("loss"), r["lr"], r["tokens"], r.get("val_loss")) for r in metrics(run)]


@pytest.fixture(scope="session")
def reference(env, tmp_path_factory) -> Path:
    """The uninterrupted tiny run: 20 steps, checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(config(env, out))
    return out


# ------------------------------------------------------------------------------------------ config


def test_tiny_preset_and_overrides_parse():
    cfg = load_config(
        TINY, ["train.lr=3e-4", "model.n_layer=4", "train.out_dir=runs/x", "train.betas=[0.8, 0.9]"]
    )
    assert cfg.train.lr == 3e-4 and cfg.model["n_layer"] == 4 and cfg.train.out_dir == "runs/x"
    assert cfg.train.betas == [0.8, 0.9] and cfg.model["block_size"] == 16
    assert parse_override("train.bf16=true") == ("train", "bf16", True)
    assert parse_override('data.corpus="a b"') == ("data", "corpus", "a b")
    for preset in ["small-landmark", "small-full", "small-xl"]:
        c = load_config(REPO / "configs" / f"{preset}.toml")
        assert (c.model["n_layer"], c.model["n_embd"], c.model["n_head"], c.model["seq_len"]) == (
            6,
            256,
            8,
            512,
        )
        assert c.data.vocab_size == 8192 and c.model["attention"] == preset.split("-")[1]
    assert load_config(REPO / "configs" / "small-xl.toml").model["xl_segment"] == 256


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["train.lrr=1"],
            r"unknown key train\.lrr in --set; valid \[train\] keys: out_dir, batch_size, .*lr",
        ),
        (["optim.lr=1"], r"unknown section \[optim\] in --set; valid sections: model, data, train"),
        (["model.n_layers=2"], r"unknown key model\.n_layers .* valid \[model\] keys: vocab_size, n_layer"),
        (["model.landmark_id=3"], r"model\.landmark_id .* is set from the tokenizer"),
        (["train.lr=fast"], r"train\.lr must be a number .*; got 'fast'"),
        (["model.block_size=48"], r"block_size \(48\) must divide seq_len \(128\)"),
        (["train.batch_size=0"], r"train\.batch_size must be >= 1"),
        (["data.tokenizer=word"], r"data\.tokenizer must be 'bpe' or 'gpt2'"),
        (["data.passkey_near_gap=-1"], r"data\.passkey_near_gap must be >= 0"),
        (["data.passkey_wordings=held-out"], r"data\.passkey_wordings must be one of paper, train"),
        (["data.passkey_pairs=2", "data.passkey_books=0.5"], r"data\.passkey_pairs.* repeated filler"),
        (["data.repeat_fraction=1.5"], r"data\.repeat_fraction must be in \[0, 1 - data\.passkey_fraction\]"),
        (["lr=1"], r"must look like section\.key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(TINY, overrides)
    assert "\n" not in str(err.value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = 1e-3\nwarmup = 5\n")
    with pytest.raises(ConfigError, match=rf"unknown key train\.warmup in {bad}; valid \[train\] keys"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_config_key_is_documented():
    docs = (REPO / "docs" / "training.md").read_text()
    for section, rows in config_field_docs().items():
        for key, _, comment in rows:
            assert comment, f"{section}.{key} has no comment"
            assert f"`{section}.{key}`" in docs, f"{section}.{key} missing from docs/training.md"


# -------------------------------------------------------------------------------------- optimizer


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)  # cosine midpoint
    assert lrs[110] == lrs[119] == 0.1 and all(a >= b for a, b in itertools.pairwise(lrs[9:]))


def test_weight_decay_groups():
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, seq_len=16,
                            block_size=8, landmark_id=63))  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in param_groups(model, 0.1))
    assert (
        "embed.weight" in decay
        and "blocks.0.attn.q_proj.weight" in decay
        and "blocks.0.mlp.up.weight" in decay
    )
    assert set(no_decay) == {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight"}
    decay, _ = ([names[id(p)] for p in g["params"]] for g in param_groups(model, 0.1, decay_embedding=False))
    assert "embed.weight" not in decay


# -------------------------------------------------------------------------------------- training


def test_run_writes_metrics_checkpoints_and_config(reference):
    rows = metrics(reference)
    assert rows[0]["step"] == 0 and "val_loss" in rows[0] and "loss" not in rows[0]
    assert [r["step"] for r in rows[1:]] == list(range(2, 21, 2))
    for r in rows[1:]:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "grad_norm"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 128
    assert {r["step"] for r in rows if "val_loss" in r} == {0, 10, 20}
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5  # it learns
    assert [p.name for p in list_checkpoints(reference)] == ["step_00000010", "step_00000020"]
    resolved = json.loads((reference / "config.json").read_text())
    assert resolved["model"]["landmark_id"] == resolved["data"]["landmark_id"]
    assert resolved["data"]["block_size"] == 16 and resolved["data"]["landmarks"] is True
    assert Path(resolved["data"]["tokenizer_path"]).is_file()


def test_same_seed_same_losses_other_seed_other_losses(env, reference, tmp_path):
    train(config(env, tmp_path / "same", "train.max_steps=6", "train.schedule_steps=20"))
    same = curve(tmp_path / "same")  # ends with an evaluation at step 6, which the reference lacks
    assert [c[:4] for c in same] == [c[:4] for c in curve(reference)[:4]] and same[0] == curve(reference)[0]
    train(config(env, tmp_path / "other", "train.max_steps=6", "train.seed=1"))
    assert [c[1] for c in curve(tmp_path / "other")[1:]] != [c[1] for c in curve(reference)[1:4]]


def test_checkpoint_round_trip_is_bit_identical(reference, tmp_path):
    model, tok, cfg = load_model(reference)
    ckpt = open_checkpoint(reference)
    assert ckpt.path.name == "step_00000020" and cfg["step"] == 20 and not model.training
    assert tok.landmark_id == model.config.landmark_id == cfg["data"]["landmark_id"]
    again = save_checkpoint(
        tmp_path, 7, model, {k: cfg[k] for k in ("model", "data", "train")}, tok, {"step": 7}
    )
    reloaded, _, _ = load_model(again)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert param_checksum(model) == param_checksum(reloaded)
    with pytest.raises(CheckpointError, match=r"does not exist: pass the run.s out_dir"):
        load_model(tmp_path / "nothing")


def test_checkpoint_write_is_atomic(reference, tmp_path, monkeypatch):
    model, tok, cfg = load_model(reference)
    meta = {k: cfg[k] for k in ("model", "data", "train")}
    first = save_checkpoint(tmp_path, 1, model, meta, tok, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, meta, tok, {"step": 2})
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


@pytest.mark.parametrize("attention", ["full", "xl"])
def test_baselines_train_on_windows_without_landmarks(env, tmp_path, attention):
    result = train(config(env, tmp_path / attention, f"model.attention={attention!r}", "train.max_steps=4",
                          "train.grad_accum=2", "train.bf16=true"))  # fmt: skip
    assert result.step == 4 and math.isfinite(result.loss)
    resolved = json.loads((tmp_path / attention / "config.json").read_text())
    assert resolved["data"]["landmarks"] is False and resolved["model"]["attention"] == attention


def test_resume_in_another_process_equals_the_uninterrupted_run(env, reference, tmp_path):
    out = tmp_path / "run"
    train(config(env, out, "train.max_steps=10", "train.schedule_steps=20"))
    assert latest_checkpoint(out).name == "step_00000010"
    proc = subprocess.run(
        [sys.executable, "-m", "landmark", *cli_args(env, out), "--resume"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "resuming at step 10" in proc.stdout
    assert curve(out) == curve(reference)


def test_resume_after_kill_9_equals_the_uninterrupted_run(env, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "landmark", *cli_args(env, out, "train.ckpt_every=4", "train.max_steps=20")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait(timeout=30)
    assert rc == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and killed_at.name != "step_00000020"
    assert main([*cli_args(env, out, "train.ckpt_every=4", "train.max_steps=20"), "--resume"]) == 0
    assert curve(out) == curve(reference)
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def test_torchrun_two_processes_keep_identical_replicas(env, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "landmark", *cli_args(env, out, "train.max_steps=4", "train.eval_every=2")]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**subprocess_env(), CHECKSUM_ENV: "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [(out / f"param_checksum.rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert len(sums[0]) == 64 and sums[0] == sums[1]
    rows = metrics(out)
    assert rows[-1]["step"] == 4 and rows[-1]["tokens"] == 4 * 2 * 4 * 128  # two processes' windows
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    model, _, _ = load_model(out)
    assert param_checksum(model) == sums[0]


# ------------------------------------------------------------------------------------ CLI errors


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "latin1"])
def test_bad_corpus_is_a_one_line_error_and_writes_nothing(env, tmp_path, capsys, case):
    corpus = tmp_path / "corpus"
    if case != "missing":
        corpus.mkdir()
    if case == "latin1":
        write_corpus(corpus, n_docs=3)
        (corpus / "doc01.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    out = tmp_path / "run"
    args = ["train", str(TINY), "--set", f"data.corpus={json.dumps(str(corpus))}", "--set",
            f"train.out_dir={json.dumps(str(out))}", "--set", "train.progress=false"]  # fmt: skip
    rc, err = run_cli(args, capsys)
    needle = {"missing": "does not exist", "empty": "no .txt files", "latin1": "doc01.txt is not valid UTF-8"}
    assert rc == 2 and err.startswith("error: ") and needle[case] in err and err.count("\n") == 1
    assert not out.exists()


def test_config_errors_through_the_cli(env, tmp_path, capsys):
    rc, err = run_cli(cli_args(env, tmp_path / "r", "train.lrr=1"), capsys)
    assert rc == 2 and err.startswith("error: unknown key train.lrr") and err.count("\n") == 1
    rc, err = run_cli(cli_args(env, tmp_path / "r", "model.block_size=24"), capsys)
    assert rc == 2 and "block_size (24) must divide seq_len (128)" in err
    assert not (tmp_path / "r").exists()


def test_resume_with_another_model_is_refused_and_changes_nothing(env, reference, tmp_path, capsys):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    rc, err = run_cli([*cli_args(env, reference, "model.n_layer=3", "model.n_embd=32"), "--resume"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "different model (n_layer: 2 (checkpoint) != 3 (config); n_embd: 64 (checkpoint) != 32" in err
    rc, err = run_cli(cli_args(env, reference), capsys)  # no --resume on a run that has checkpoints
    assert rc == 2 and "pass --resume" in err
    # a target below the checkpoint's step would train nothing and rewrite config.json
    rc, err = run_cli([*cli_args(env, reference, "train.max_steps=5"), "--resume"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "train.max_steps (5) is below the step" in err
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_plot_metrics_writes_a_png(reference, tmp_path, capsys):
    out = tmp_path / "loss.png"
    assert (
        main(["plot-metrics", str(reference), str(reference), "--out", str(out), "--labels", "a", "b"]) == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot-metrics", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_prepare_command_says_where(env, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--corpus", str(env["corpus"]), "--vocab-size", "300", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"prepared data in {out}" in text and "train:" in text and (out / "train.bin").is_file()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every shipped config parses and validates (keys, values, model shape)."""
    cfg = load_config(path)
    assert cfg.train.out_dir
