"""Bad input to `landmark train`, as a hostile user gives it.

Every mistake ends with exit status 2 and exactly one `error:` line on stderr that names the setting or
file, no traceback, and the disk as it was: a fresh run's folder is not created, and a resumed run's
folder (and the prepared data) keeps every file, byte and modification time. Two runs into one folder:
the second refuses while the first holds it, and a run killed with SIGKILL leaves nothing stuck. A full
disk while checkpointing and a non-finite loss are one-line errors too.

Checks run in-process (`landmark.cli.main`) on the tiny preset and a small synthetic corpus; two cases
run real processes (a training run held and then killed, and torchrun against a held folder).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from argv_helpers import last_wins
from safetensors import SafetensorError

from landmark import checkpoint as checkpoint_module
from landmark import train as train_module
from landmark.checkpoint import latest_checkpoint
from landmark.cli import main
from landmark.data import dataset as dataset_module
from landmark.files import RunLock
from landmark.train import train
from landmark.train_config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def env(prepared_corpus) -> dict:
    """The shared prepared corpus (conftest.py) and the --set overrides that train on it."""
    extra = ["train.eval_every=0", 'data.gpt2_dir="/nonexistent/gpt2"']
    return {**prepared_corpus, "overrides": [*prepared_corpus["overrides"], *extra]}


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory) -> Path:
    """A finished 2-step run with its checkpoint at step 2 (tests work on copies of it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(
        load_config(TINY, [*env["overrides"], f"train.out_dir={json.dumps(str(out))}", "train.max_steps=2"])
    )
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))  # never touch the repository's cache


def args_for(env: dict, out: Path, *extra: str, resume: bool = False) -> list[str]:
    args = ["train", str(TINY)]
    overrides = {o.split("=", 1)[0]: o for o in [*env["overrides"], f"train.out_dir={json.dumps(str(out))}"]}
    overrides |= {o.split("=", 1)[0]: o for o in extra}  # a case's value replaces the base's (given once)
    for o in overrides.values():
        args += ["--set", o]
    return [*args, "--resume"] if resume else args


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: (kind, size, mtime_ns, sha256 of a file's bytes)."""
    state = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            state[str(p)] = ("file" if p.is_file() else "dir", st.st_size, st.st_mtime_ns, digest)
    return state


def one_error_line(rc: int, err: str, *needles: str) -> None:
    """Exit status 2, exactly one line on stderr, ``error: `` first, every needle in it, no traceback."""
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


# -------------------------------------------------------------------------------------- bad values


BAD_VALUES = [
    ("train.lr=inf", "train.lr must be > 0 and finite; got inf"),
    ("train.lr=nan", "train.lr must be > 0 and finite; got nan"),
    ("train.lr=-0.001", "train.lr must be > 0; got -0.001"),
    ("train.min_lr=inf", "train.min_lr must be in [0, train.lr] and finite"),
    ("train.eps=0", "train.eps must be > 0"),
    ("train.grad_clip=nan", "train.grad_clip must be >= 0"),
    ("train.weight_decay=inf", "train.weight_decay must be >= 0 and finite"),
    ("train.max_minutes=inf", "train.max_minutes must be >= 0 and finite"),
    ("train.betas=[0.9, 1.0]", "train.betas must be two numbers in [0, 1)"),
    ("train.eval_batch_size=-1", "train.eval_batch_size must be >= 0"),
    ("train.threads=1000000", "train.threads must be in [0, 1024]"),  # ran the machine out of processes
    # beyond 2**24 micro-batches a float32 gradient sum takes in no more shares (it ran until killed)
    ("train.grad_accum=1000000000000", "train.grad_accum must be <= 16,777,216 (2**24: gradients are"),
    ('train.device="tpu"', "train.device must be one of auto, cpu, cuda; got 'tpu'"),
    ("model.rope_base=-10000.0", "model.rope_base must be > 0; got -10000.0"),
    ("model.rope_base=0", "model.rope_base must be > 0; got 0.0"),
    ("model.rope_base=inf", "model.rope_base must be > 0 and finite"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1); got 1.5"),
    ("model.dropout=-0.1", "model.dropout must be in [0, 1); got -0.1"),
    ("model.n_embd=0", "model.n_embd must be an integer >= 1; got 0"),
    ("model.n_embd=-64", "model.n_embd must be an integer >= 1; got -64"),
    ("model.n_layer=0", "model.n_layer must be an integer >= 1; got 0"),
    ("model.n_head=0", "model.n_head must be an integer >= 1; got 0"),
    ("model.n_kv_head=0", "model.n_kv_head must be an integer >= 1; got 0"),
    ("model.mlp_ratio=0", "model.mlp_ratio must be an integer >= 1; got 0"),
    ("model.seq_len=0", "model.seq_len must be an integer >= 1; got 0"),
    ("model.vocab_size=0", "model.vocab_size must be an integer >= 1"),
    ("model.n_head=3", "error: model.n_head (3) must divide n_embd (64)"),
    ("model.n_embd=12", "head_dim = n_embd / n_head must be even"),
    ("model.n_kv_head=3", "error: model.n_kv_head (3) must divide n_head (4)"),
    ("model.block_size=1", "error: model.block_size must be >= 2"),
    ('model.attn_impl="fast"', "model.attn_impl must be one of auto, reference, blockwise, triton"),
    (
        "data.vocab_size=100",
        "data.vocab_size must be between 258 (256 bytes + 2 special tokens) and 1,048,576; got 100",
    ),
    ("data.vocab_size=100000000000", "data.vocab_size must be between 258"),
    ('data.tokenizer="word"', "data.tokenizer must be 'bpe' or 'gpt2'"),
    (f"train.out_dir={json.dumps(str(TINY))}", "train.out_dir must be a folder, not an existing file"),
    ('data.tokenizer="gpt2"', "data.gpt2_dir: /nonexistent/gpt2 lacks encoder.json and vocab.bpe"),
    # found only once the tokenizer exists (after the cached data is loaded), still before any write
    ("model.vocab_size=300", "model.vocab_size (300) is smaller than the tokenizer's"),
    ("model.seq_len=65536", "train split"),
    # memory that certainly cannot fit (a lower bound against MemTotal), refused before any allocation
    ("model.n_embd=1048576", "model.n_embd=1048576: training the model ("),
    ("model.n_layer=100000000", "model.n_layer=100000000: training the model ("),
    ("model.vocab_size=1000000000000", "model.vocab_size=1000000000000: training the model ("),
    ("model.mlp_ratio=1000000000", "model.mlp_ratio=1000000000: training the model ("),
    ("train.batch_size=100000000", "train.batch_size=100000000: a training step ("),
    ("train.eval_batch_size=100000000", "train.eval_batch_size=100000000: a training step ("),
    # integers beyond TOML's 64 bits
    ("train.seed=1180591620717411303424", "train.seed must be an integer that fits in 64 bits"),
    ("train.max_steps=99999999999999999999999", "train.max_steps must be an integer that fits in 64 bits"),
    # folders that are not folders, and outputs onto inputs
    ('train.out_dir="LOOP"', "is a symbolic link loop"),
    ('data.prepared_dir="/dev/null"', "data.prepared_dir /dev/null is a file, not a folder"),
    ('data.prepared_dir="FILE"', "is a file, not a folder"),
    ('train.out_dir="PREPARED"', "is inside data.prepared_dir"),
    ('train.out_dir="CACHED"', "is inside the cache of prepared data"),  # data.prepared_dir's default
    ('train.out_dir="OTHER_PREPARED"', ", which holds prepared data: choose another train.out_dir"),
    ('train.out_dir="IN_CHECKPOINT"', ", which holds a model: choose another train.out_dir"),
    ('train.out_dir="IN_RUN"', ", which holds a training run: choose another train.out_dir"),
    ('data.prepared_dir="CORPUS"', "is inside data.corpus"),
    ("train.max_steps=4.0", "train.max_steps must be an integer (like"),
    # a NUL character, which no path holds (os.stat raised a ValueError: a traceback)
    ('train.out_dir="runs/a\\u0000b"', "holds a NUL character, which no path can"),
    ('data.corpus="c\\u0000d"', "holds a NUL character"),
    ('data.prepared_dir="p\\u0000q"', "holds a NUL character"),
]


@pytest.mark.parametrize("override, needle", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_writes_nothing(env, finished, tmp_path, capsys, override, needle):
    """The same check for a fresh run (no folder is created) and a resume (config.json is not rewritten)."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    other = tmp_path / "other-prepared"  # prepared data the run does not read
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    (other / "train.bin").write_bytes(b"")
    places = {"LOOP": loop, "FILE": TINY, "PREPARED": env["prepared"], "CORPUS": env["corpus"],
              "CACHED": tmp_path / "cache" / "prepared" / "books-bpe512" / "run",
              "OTHER_PREPARED": other / "run", "IN_CHECKPOINT": latest_checkpoint(finished) / "run",
              "IN_RUN": finished / "sub" / "run"}  # fmt: skip
    for name, path in places.items():
        override = override.replace(f'"{name}"', json.dumps(str(path)))
    fresh = tmp_path / "fresh"
    run_cli_args = args_for(env, fresh, override)
    one_error_line(main(run_cli_args), capsys.readouterr().err, needle)
    assert not fresh.exists()
    if "train.out_dir=" in override:
        return  # the resume would go to that folder, not to the copy
    resumed = copy_run(finished, tmp_path)
    before = snapshot(resumed, env["prepared"])
    one_error_line(main(args_for(env, resumed, override, resume=True)), capsys.readouterr().err, needle)
    assert snapshot(resumed, env["prepared"]) == before


@pytest.mark.parametrize(
    "override, needle",
    [
        ('model.attn_impl="triton"', "model.attn_impl = 'triton' cannot run"),
        ('train.device="cuda"', "train.device is 'cuda' but CUDA is not available"),
    ],
)
def test_gpu_settings_without_a_gpu(env, tmp_path, capsys, monkeypatch, override, needle):
    """Triton and CUDA on a machine without a GPU (simulated on a GPU machine; no interpreter)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    one_error_line(main(args_for(env, out, override)), capsys.readouterr().err, needle)
    assert not out.exists()


def test_the_python_api_checks_the_same(env, tmp_path):
    """train() on a RunConfig changed after load_config: the same checks, nothing written."""
    out = tmp_path / "run"
    cfg = load_config(TINY, [*env["overrides"], f"train.out_dir={json.dumps(str(out))}"])
    cfg.train.lr = float("inf")
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0 and finite; got inf"):
        train(cfg)
    cfg.train.lr, cfg.model["dropout"] = 1e-3, 2.0
    with pytest.raises(ConfigError, match=r"model\.dropout must be in \[0, 1\); got 2\.0"):
        train(cfg)
    assert not out.exists()


def test_a_home_path_means_the_home_folder(tmp_path, monkeypatch):
    """``--set train.out_dir=~/x`` (the shell leaves ``~`` after ``=``) and ``~`` in a TOML file: the
    home folder, never a folder named ``~`` under the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "c.toml"
    config.write_text('[data]\nprepared_dir = "~/prepared"\n', encoding="utf-8")
    cfg = load_config(config, ["train.out_dir=~/runs/a"])
    assert cfg.train.out_dir == str(tmp_path / "home" / "runs" / "a")
    assert cfg.data.prepared_dir == str(tmp_path / "home" / "prepared")


def test_config_files_that_are_not_plain_toml(tmp_path):
    """A byte-order mark (some editors write one) is read past; /dev/null is no config file."""
    config = tmp_path / "c.toml"
    config.write_bytes("\ufeff[train]\nlr = 0.002\n".encode())
    assert load_config(config).train.lr == 0.002
    with pytest.raises(ConfigError, match=r"^config file /dev/null is not a regular file"):
        load_config("/dev/null")


def test_a_larger_model_vocab_pads_the_embedding(env, tmp_path, capsys):
    """model.vocab_size above the tokenizer's is padding, and accepted (it was refused by a placeholder)."""
    out = tmp_path / "run"
    assert main(args_for(env, out, "model.vocab_size=600", "train.max_steps=1")) == 0, capsys.readouterr().err
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"]["vocab_size"] == 600 and resolved["data"]["tokenizer_vocab_size"] < 600


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--vocab-size", "100"], "--vocab-size must be between 258"),
        (["--vocab-size", "100000000000"], "--vocab-size must be between 258"),
        (["--tokenizer", "gpt2", "--gpt2-dir", "/nonexistent/gpt2"], "--gpt2-dir: /nonexistent/gpt2 lacks"),
        (["--out", "FILE"], "is a file: pass a folder"),
        (["--corpus", "/nonexistent/corpus"], "--corpus: corpus folder /nonexistent/corpus does not exist"),
        (["--tokenizer", "gpt2", "--gpt2-dir", "DAMAGED_GPT2"], "--gpt2-dir: GPT-2 BPE files in"),
    ],
)
def test_prepare_checks_its_options_first(env, tmp_path, capsys, extra, needle):
    """`landmark prepare`: the same checks as [data], with the option names, before any folder exists."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out = tmp_path / "prepared"
    damaged = tmp_path / "gpt2"  # BPE files that are not: a traceback, and an empty --out left
    damaged.mkdir()
    (damaged / "encoder.json").write_text("{bad")
    (damaged / "vocab.bpe").write_text("#version")
    extra = [{"FILE": str(a_file), "DAMAGED_GPT2": str(damaged)}.get(e, e) for e in extra]
    args = last_wins(
        [
            "prepare",
            "--corpus",
            str(env["root"] / "corpus"),
            *(extra if "--out" in extra else [*extra, "--out", str(out)]),
        ]
    )
    before = snapshot(tmp_path)
    one_error_line(main(args), capsys.readouterr().err, needle)
    assert snapshot(tmp_path) == before and not out.exists()


# ------------------------------------------------------------------------------- damaged checkpoints


def _damage(ckpt: Path, how: str) -> None:
    weights, state, config = ckpt / "model.safetensors", ckpt / "state.pt", ckpt / "config.json"
    if how == "empty weights":
        weights.write_bytes(b"")
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "missing weights":
        weights.unlink()
    elif how == "missing state":
        state.unlink()
    elif how == "truncated state":
        state.write_bytes(state.read_bytes()[:100])
    elif how == "config not JSON":
        config.write_text('{"format": ')
    else:  # the model settings of config.json changed by hand
        doc = json.loads(config.read_text())
        doc["model"].update({"shapes": {"n_embd": 32}, "zero heads": {"n_head": 0}}[how])
        config.write_text(json.dumps(doc))


DAMAGES = [
    ("empty weights", [], ["step_00000002/model.safetensors cannot be loaded", "damaged"]),
    ("truncated weights", [], ["step_00000002/model.safetensors cannot be loaded", "damaged"]),
    ("missing weights", [], ["step_00000002 is incomplete: model.safetensors missing"]),
    ("missing state", [], ["step_00000002/state.pt cannot be loaded", "missing"]),
    ("truncated state", [], ["step_00000002/state.pt is cut short or damaged (not a whole torch archive)"]),
    ("config not JSON", [], ["config.json is not valid JSON"]),
    ("shapes", ["model.n_embd=32"], ["model.safetensors cannot be loaded", "size mismatch"]),
    # the run's own config: refused first
    ("zero heads", ["model.n_head=0"], ["model.n_head must be an integer >= 1"]),
    ("zero heads", [], ["config.json: invalid model settings"]),
]


@pytest.mark.parametrize("how, extra, needles", DAMAGES, ids=[f"{d[0]}{d[1]}" for d in DAMAGES])
def test_damaged_checkpoint_on_resume(env, finished, tmp_path, capsys, how, extra, needles):
    run = copy_run(finished, tmp_path)
    _damage(latest_checkpoint(run), how)
    before = snapshot(run, env["prepared"])
    rc = main(args_for(env, run, *extra, resume=True))
    one_error_line(rc, capsys.readouterr().err, *needles)
    assert snapshot(run, env["prepared"]) == before


# ------------------------------------------------------------------------- failures while training


def test_full_disk_while_checkpointing(env, tmp_path, capsys, monkeypatch):
    """The second checkpoint's write fails with ENOSPC: one line; the first checkpoint stays complete and
    the run continues from it with --resume."""
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc = main(args_for(env, out, "train.max_steps=3", "train.ckpt_every=1"))
    one_error_line(rc, capsys.readouterr().err, "checkpoint of step 2", os.strerror(errno.ENOSPC), "ENOSPC")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]  # no partial folder
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args_for(env, out, "train.max_steps=3", "train.ckpt_every=1", resume=True)) == 0
    assert latest_checkpoint(out).name == "step_00000003"


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_save_on_a_full_disk(obj, f, *args, **kwargs):
    """What torch.save raises when the disk fills: a RuntimeError of its zip writer, raised while the
    OSError of the write is handled (no errno of its own)."""
    try:
        raise _enospc()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None


class _FullAfter:
    """A file whose writes fail with ENOSPC after ``ok`` of them, the failing one half-written first."""

    def __init__(self, real, ok: int) -> None:
        self.real, self.ok = real, ok

    def write(self, data) -> int:
        if self.ok <= 0:
            self.real.write(bytes(data)[: max(1, len(data) // 2)])
            raise _enospc()
        self.ok -= 1
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()


def _assert_nothing_partial(out: Path) -> None:
    """No temporary file or folder anywhere in the run folder, every checkpoint complete, every
    metrics.jsonl line whole."""
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers
    for ckpt in (out / "checkpoints").iterdir() if (out / "checkpoints").is_dir() else ():
        assert {p.name for p in ckpt.iterdir()} == {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "state.pt",
        }
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        text = metrics.read_text()
        assert text == "" or text.endswith("\n")
        for line in text.splitlines():
            json.loads(line)


FULL_DISKS = ["state.pt (torch.save)", "model.safetensors (safetensors)", "metrics.jsonl", "config.json"]


@pytest.mark.parametrize("where", FULL_DISKS)
def test_a_full_disk_is_one_line_and_resumable(env, tmp_path, capsys, monkeypatch, where):
    """The disk fills while writing each kind of file (as the libraries really report it: torch and
    safetensors raise their own errors): one line naming the file and ENOSPC, no partial file, the
    earlier checkpoint intact, and --resume finishes the run."""
    out = tmp_path / "run"
    steps = ["train.max_steps=3", "train.ckpt_every=1", "train.log_every=1", "train.keep_checkpoints=1"]
    calls = {"n": 0}

    def second_call(real):
        def fail_on_second(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                if real is torch.save:
                    return _torch_save_on_a_full_disk(*args, **kwargs)
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            return real(*args, **kwargs)

        return fail_on_second

    if where.startswith("state.pt"):
        monkeypatch.setattr(torch, "save", second_call(torch.save))
        needle = "the checkpoint of step 2"
    elif where.startswith("model.safetensors"):
        monkeypatch.setattr(checkpoint_module, "save_file", second_call(checkpoint_module.save_file))
        needle = "the checkpoint of step 2"
    elif where == "metrics.jsonl":
        real_open = open
        monkeypatch.setattr(
            train_module, "open", lambda *a, **k: _FullAfter(real_open(*a, **k), ok=1), raising=False
        )
        needle = "metrics.jsonl (step 2)"
    else:
        monkeypatch.setattr(
            train_module, "write_json_atomic", lambda *a, **k: (_ for _ in ()).throw(_enospc())
        )
        needle = "config.json"
    rc = main(args_for(env, out, *steps))
    one_error_line(rc, capsys.readouterr().err, needle, "No space left on device (ENOSPC)", "--resume")
    _assert_nothing_partial(out)
    if where != "config.json":
        assert latest_checkpoint(out).name == "step_00000001"
    monkeypatch.undo()
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    assert main(args_for(env, out, *steps, resume=True)) == 0, capsys.readouterr().err
    assert latest_checkpoint(out).name == "step_00000003"
    _assert_nothing_partial(out)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-3:] == [
        1,
        2,
        3,
    ]


def test_prepare_on_a_full_disk_is_one_line(env, tmp_path, capsys, monkeypatch):
    """`landmark prepare` when the disk fills while writing a token array (numpy's tofile said only "N
    requested and M written", a traceback): one line naming the array and ENOSPC, no temporary file."""
    real_open = open
    monkeypatch.setattr(
        dataset_module, "open", lambda *a, **k: _FullAfter(real_open(*a, **k), ok=0), raising=False
    )
    out = tmp_path / "prepared"
    rc = main(["prepare", "--corpus", str(env["corpus"]), "--vocab-size", "300", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # beside tqdm's progress bar
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
    assert f"{out / 'train.bin'}: No space left on device (ENOSPC)" in errors[0]
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".bin"]


def test_non_finite_loss_says_what_is_known(env, tmp_path, capsys):
    """An absurd learning rate: the loss turns NaN; the message gives the step, the lr and the weights'
    state, and lists the setting among possible causes (one line)."""
    out = tmp_path / "run"
    rc = main(
        args_for(env, out, "train.lr=1e30", "train.warmup_steps=0", "train.min_lr=0", "train.max_steps=5")
    )
    err = capsys.readouterr().err
    one_error_line(rc, err, "the training loss is nan at step", "(lr ", "train.lr", "possible causes")
    assert "not finite" in err or "weights were finite" in err


# ----------------------------------------------------------------------------- one run per folder


def test_a_held_folder_is_refused_and_left_alone(env, finished, tmp_path, capsys):
    """While another holder has the folder, neither --resume nor a fresh run into it may start; once it
    lets go, --resume works."""
    run = copy_run(finished, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    holds = [RunLock(run), RunLock(empty)]
    for lock in holds:
        lock.acquire()
    try:
        before = snapshot(run, empty)
        for out, resume in [(run, True), (run, False), (empty, False)]:
            rc = main(args_for(env, out, resume=resume))
            one_error_line(rc, capsys.readouterr().err, f"{out} is in use: another training run holds it")
        assert snapshot(run, empty) == before
    finally:
        for lock in holds:
            lock.release()
    assert main(args_for(env, run, "train.max_steps=3", resume=True)) == 0
    assert latest_checkpoint(run).name == "step_00000003"


def test_a_run_file_that_is_a_folder_changes_nothing(env, finished, tmp_path, capsys):
    """metrics.jsonl replaced by a folder: --resume refused (its config.json was rewritten first, with
    the new max_steps and out_dir); nothing in the run changes."""
    run = copy_run(finished, tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    before = snapshot(run)
    rc = main(args_for(env, run, "train.max_steps=3", resume=True))
    one_error_line(rc, capsys.readouterr().err, "metrics.jsonl is not a file")
    assert snapshot(run) == before


def test_a_run_that_may_not_start_leaves_the_prepared_data_alone(env, finished, tmp_path, capsys):
    """A new run (no --resume) into a folder holding checkpoints, with another corpus: refused, but the
    shared data.prepared_dir was prepared again from that corpus first."""
    from corpus_helpers import write_corpus

    run = copy_run(finished, tmp_path)
    other = write_corpus(tmp_path / "other-corpus", n_docs=6, seed=3)
    before = snapshot(run, env["prepared"])
    rc = main(args_for(env, run, f"data.corpus={json.dumps(str(other))}"))
    one_error_line(rc, capsys.readouterr().err, "already holds checkpoints")
    assert snapshot(run, env["prepared"]) == before


def test_a_checkpoint_folder_is_not_a_run_folder(env, finished, tmp_path, capsys):
    """train.out_dir pointing at a checkpoint (or any folder holding a model's weights): refused before
    anything is written, with or without --resume (its config.json was replaced by the new run's)."""
    checkpoint = copy_run(finished, tmp_path) / "checkpoints" / latest_checkpoint(finished).name
    before = snapshot(checkpoint)
    for resume in (False, True):
        rc = main(args_for(env, checkpoint, resume=resume))
        one_error_line(rc, capsys.readouterr().err, "which holds a training run: choose another")
    assert snapshot(checkpoint) == before


def _subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_a_running_training_holds_its_folder_until_killed(env, tmp_path, capsys):
    """A real `landmark train` process: a second run into its folder refuses while it trains; after
    SIGKILL, --resume continues from its last checkpoint (the kernel dropped the hold)."""
    out = tmp_path / "run"
    steps = ["train.max_steps=100000", "train.ckpt_every=5", "train.log_every=1"]
    cmd = [sys.executable, "-m", "landmark", *args_for(env, out, *steps)]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=_subprocess_env())
    try:
        deadline = time.monotonic() + 90
        while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and latest_checkpoint(out) is not None, log.read_text()[-2000:]
        for resume in (True, False):
            rc = main(args_for(env, out, "train.max_steps=100000", resume=resume))
            one_error_line(rc, capsys.readouterr().err, f"{out} is in use")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    step = int(latest_checkpoint(out).name.split("_")[1])
    assert main(args_for(env, out, f"train.max_steps={step + 1}", "train.log_every=1", resume=True)) == 0
    assert f"resuming at step {step}" in capsys.readouterr().out
    assert latest_checkpoint(out).name == f"step_{step + 1:08d}"


def test_torchrun_against_a_held_folder_stops_every_process(env, finished, tmp_path):
    """Only process 0 takes the hold; when it refuses, process 1 must stop too instead of waiting for it."""
    run = copy_run(finished, tmp_path)
    lock = RunLock(run)
    lock.acquire()
    try:
        before = snapshot(run)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "landmark", *args_for(env, run, resume=True)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_subprocess_env())
    finally:
        lock.release()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("is in use" in line for line in errors), proc.stderr[-2000:]
    assert "another process stopped the run" in errors[0] + errors[1]  # process 1 heard of it
    assert not re.search(r'File "[^"]*/landmark/[^"]*"', proc.stderr)  # torchrun's own report aside
    assert snapshot(run) == before


# ------------------------------------------------------------------ outputs never destroy inputs


def test_training_into_a_folder_of_someone_elses_files_is_refused(env, tmp_path, capsys):
    """A train.out_dir holding a config.json and a metrics.jsonl that no run wrote (they were
    overwritten): refused, nothing changed."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "metrics.jsonl").write_text("notes\n")
    before = snapshot(out)
    rc = main(args_for(env, out, "train.max_steps=1"))
    one_error_line(
        rc, capsys.readouterr().err, "config.json and metrics.jsonl that no run of this library wrote"
    )
    assert snapshot(out) == before


def test_data_prepared_into_a_checkpoint_folder_is_refused(env, finished, tmp_path, capsys):
    """data.prepared_dir (or `landmark prepare --out`) naming a checkpoint: refused before its
    tokenizer.json is replaced by a new one (the checkpoint could no longer be loaded)."""
    ckpt = copy_run(latest_checkpoint(finished), tmp_path)
    before = snapshot(ckpt)
    rc = main(args_for(env, tmp_path / "r", f"data.prepared_dir={json.dumps(str(ckpt))}"))
    one_error_line(rc, capsys.readouterr().err, "data.prepared_dir:", "holds config.json, model.safetensors")
    rc = main(["prepare", "--corpus", str(env["corpus"]), "--vocab-size", "300", "--out", str(ckpt)])
    one_error_line(rc, capsys.readouterr().err, "--out ", "not prepared data")
    assert snapshot(ckpt) == before


def test_resuming_with_another_vocabulary_is_refused_before_the_data_is_prepared(
    env, finished, tmp_path, capsys
):
    """--resume with data.vocab_size changed: refused before the shared prepared folder is rewritten
    with a new BPE (it was, and then the resume was refused)."""
    run = copy_run(finished, tmp_path)
    before = snapshot(env["prepared"])
    rc = main(args_for(env, run, "data.vocab_size=600", "train.max_steps=4", resume=True))
    one_error_line(rc, capsys.readouterr().err, "cannot resume", "data.vocab_size = 512, not 600")
    assert snapshot(env["prepared"]) == before


def test_prepare_refuses_gpt2_dir_with_a_bpe(env, tmp_path, capsys):
    rc = main(
        ["prepare", "--corpus", str(env["corpus"]), "--gpt2-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    one_error_line(rc, capsys.readouterr().err, "--gpt2-dir goes with --tokenizer gpt2")
    assert not (tmp_path / "o").exists()


def test_resume_with_nothing_to_resume_says_a_new_run_starts(env, tmp_path, capsys):
    """--resume on a folder without checkpoints starts a new run (a restart script may always pass it),
    and says so."""
    assert main(args_for(env, tmp_path / "new", "train.max_steps=1", resume=True)) == 0
    err = capsys.readouterr().err
    assert "note: --resume:" in err and "holds no checkpoint yet: a new run starts" in err


def test_prepare_interrupted_before_writing_leaves_no_empty_folder(env, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the tokenizer trains left an empty --out folder behind."""
    import landmark.data.dataset as dataset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "_bpe_tokenizer", interrupted)
    out = tmp_path / "prepared"
    assert main(["prepare", "--corpus", str(env["root"] / "corpus"), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    assert not out.exists()
    out.mkdir()  # a folder that was there before is kept
    assert main(["prepare", "--corpus", str(env["root"] / "corpus"), "--out", str(out)]) == 130
    assert out.is_dir()


def test_a_folder_given_as_the_config_file_is_named_as_such(tmp_path, capsys):
    """`landmark train FOLDER` said "config file FOLDER not found"."""
    assert main(["train", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: config file {tmp_path} is a folder: pass a TOML file such as configs/tiny.toml"
    )


def test_one_set_key_given_twice_and_a_corpus_file_are_named(env, tmp_path, capsys):
    """`--set train.max_steps=2 --set train.max_steps=3` ran 3 steps in silence; `prepare --corpus FILE`
    said the folder does not exist."""
    argv = ["train", str(TINY), "--set", "train.max_steps=2", "--set", "train.max_steps=3"]
    assert main(argv) == 2
    assert "--set train.max_steps is given more than once" in capsys.readouterr().err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("words")
    assert main(["prepare", "--corpus", str(a_file), "--out", str(tmp_path / "p")]) == 2
    assert f"corpus folder {a_file} is a file" in capsys.readouterr().err
