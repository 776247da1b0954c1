"""Bad input to `landmark eval`, `generate`, `hf generate` and `quickstart`, as a hostile user gives it.

Every case must end with exit status 2 and exactly one `error:` line on stderr that names the argument,
no traceback, and the disk exactly as it was (every file under the test's folders, the data cache
included, compared by listing, bytes and modification time before and after). Checks run in-process
(`landmark.cli.main`); two cases run the real command in a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from argv_helpers import last_wins

from landmark.checkpoint import CheckpointError, load_model, save_checkpoint
from landmark.cli import main
from landmark.data import prepare_data
from landmark.data.tokenizer import Tokenizer
from landmark.eval import cli as eval_cli
from landmark.inference import cli as inference_cli
from landmark.model import GPT, ModelConfig

REPO = Path(__file__).resolve().parents[1]
BS = 16  # block size of the tiny landmark model
WORDS = ["the", "sea", "ship", "whale", "sailor", "captain", "harbour", "wind", "rope", "deck", "night",
         "storm", "island", "boat"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(folder: Path, seed: int) -> Path:
    """Six small documents of seeded word salad (the splits come from whole documents)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(6):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(120)]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _save(run: Path, tok: Tokenizer, attention: str = "landmark", vocab: int | None = None) -> Path:
    """A randomly initialised tiny checkpoint whose config.json records the tokenizer's fingerprint."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab or tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, seq_len=64,
        block_size=BS, attention=attention, landmark_id=tok.landmark_id if attention == "landmark" else -1,
    )  # fmt: skip
    config = {"model": cfg.to_dict(), "data": {"tokenizer_fingerprint": tok.fingerprint}, "train": {}}
    return save_checkpoint(run, 1, GPT(cfg), config, tok, {})


DAMAGES = ("truncated", "empty", "no_tokenizer", "shapes", "bad_json", "other_tokenizer")
UNDERSPECIFIED = {
    "no_attention": ("model", "attention"),
    "no_block_size": ("model", "block_size"),
    "no_fingerprint": ("data", "tokenizer_fingerprint"),
}


def _damaged(ckpt: Path, root: Path) -> dict[str, Path]:
    """Copies of a checkpoint folder, each damaged in one way."""
    out = {}
    for name in (*DAMAGES, *UNDERSPECIFIED):
        out[name] = root / name
        shutil.copytree(ckpt, out[name])
    weights = (ckpt / "model.safetensors").read_bytes()
    (out["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (out["empty"] / "model.safetensors").write_bytes(b"")
    (out["no_tokenizer"] / "tokenizer.json").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["n_embd"] = 32  # the weights have width 16
    (out["shapes"] / "config.json").write_text(json.dumps(config))
    (out["bad_json"] / "config.json").write_text('{"format": ')
    other = Tokenizer.train(["a completely different text " * 30], vocab_size=280)
    (out["other_tokenizer"] / "tokenizer.json").write_text(other.to_json())
    for name, (section, key) in UNDERSPECIFIED.items():  # a setting missing is never defaulted
        config = json.loads((ckpt / "config.json").read_text())
        del config[section][key]
        (out[name] / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Tiny checkpoints (landmark, full, padded vocabulary), damaged copies, two prepared data folders
    (the models' tokenizer and another one), a file where a folder is expected; the data cache points
    inside the folder whose every byte the tests compare."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDMARK_CACHE", str(root / "cache"))
        data = prepare_data(_corpus(root / "corpus", 0), root / "data", "bpe", 300, progress=False)
        other = prepare_data(_corpus(root / "corpus2", 1), root / "other_data", "bpe", 280, progress=False)
        tok = data.tokenizer
        env = {"root": root, "data": root / "data", "other_data": other.folder, "tok": tok}
        env["lm"] = _save(root / "runs" / "lm", tok)
        env["full"] = _save(root / "runs" / "full", tok, attention="full")
        env["padded"] = _save(root / "runs" / "padded", tok, vocab=tok.vocab_size + 37)
        env["lm_other_tok"] = _save(root / "runs" / "lm_other", other.tokenizer)
        env.update(_damaged(env["lm"], root / "damaged"))
        env["hf"] = root / "hf_model"  # a landmark HF folder's config.json, without weights
        env["hf"].mkdir()
        (env["hf"] / "config.json").write_text(json.dumps({"model_type": "llama", "landmark_block_size": BS}))
        env["file"] = root / "a_file.txt"
        env["file"].write_text("not a folder\n")
        env["out"] = root / "out"  # never created by a refused command
        env["cache"] = root / "cache"
        env["state"] = root / "state.safetensors"
        env["elsewhere"] = tmp_path_factory.mktemp("elsewhere")  # a symbolic link loop, outside root
        (env["elsewhere"] / "loop").symlink_to(env["elsewhere"] / "loop")
        yield env


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under ``root``: its SHA-256 (files) and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (digest, p.stat().st_mtime_ns)
    return out


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """``landmark ARGV`` in-process: (exit status, stderr); argparse's own errors exit with 2."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _refused(env: dict, argv: list[str], names: str, capsys, monkeypatch) -> str:
    """Run a bad command: exit 2, one ``error:`` line naming ``names``, no traceback, disk unchanged."""
    monkeypatch.setenv("LANDMARK_CACHE", str(env["cache"]))
    before = _snapshot(env["root"])
    code, err = _run(argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert names in errors[0], errors[0]
    assert err.strip().splitlines() == [errors[0]] and errors[0].startswith("error: "), err  # no usage
    assert _snapshot(env["root"]) == before, "a refused command changed the disk"
    return errors[0]


def test_a_depth_of_minus_zero_is_depth_zero(env, tmp_path, capsys, monkeypatch):
    """``--depths -0.0`` is depth 0 (its column was labelled "depth -0%")."""
    monkeypatch.setenv("LANDMARK_CACHE", str(env["cache"]))
    out = tmp_path / "eval"
    argv = [a.format(lm=env["lm"], out=out) for a in PASSKEY[:-1]]
    code, err = _run([*argv, "-0.0", "--trials", "1"], capsys)
    assert code == 0, err
    table = (out / "passkey.md").read_text(encoding="utf-8")
    assert "-0%" not in table and "0%" in table


def _fill(argv: list[str], env: dict) -> list[str]:
    """The case's arguments with ``{name}`` replaced by the fixture's paths."""
    return last_wins([a.format(**{k: v for k, v in env.items() if isinstance(v, Path)}) for a in argv])


def _case_id(argv: list[str]) -> str:
    """A short test id: the command and what the case adds to its valid base."""
    for name, base in (("ppl", PPL), ("passkey", PASSKEY), ("generate", GENERATE), ("quickstart", QUICK)):
        if argv[: len(base)] == base:
            return f"{name} " + " ".join(argv[len(base) :])
    return " ".join(argv).replace("{", "").replace("}", "")


PPL = ["eval", "ppl", "--model", "lm={lm}", "--data", "{data}", "--out", "{out}", "--lengths", "64"]
PASSKEY = ["eval", "passkey", "--model", "lm={lm}", "--out", "{out}", "--lengths", "600", "--depths", "0.5"]
GENERATE = ["generate", "--checkpoint", "{lm}", "--prompt", "the sea", "--max-new-tokens", "2"]
QUICK = ["quickstart", "--no-hf", "--checkpoint", "{lm}", "--out", "{out}", "--ppl-lengths", "64",
         "128"]  # fmt: skip

EVAL_CASES = [
    # types
    ([*PPL, "--k", "four"], "argument --k"),
    ([*PPL, "--lengths", "1e3"], "argument --lengths"),
    ([*PPL, "--granularity", "row"], "argument --granularity"),
    ([*PASSKEY, "--depths", "half"], "argument --depths"),
    # ranges
    ([*PPL, "--k", "0"], "--k"),
    ([*PPL, "--k", "-3"], "--k"),
    ([*PPL, "--batch-size", "0"], "--batch-size"),
    ([*PPL, "--max-tokens", "0"], "--max-tokens"),
    ([*PPL, "--chunk-len", "8"], "--chunk-len"),
    ([*PPL, "--max-blocks", "0"], "--max-blocks"),
    ([*PPL, "--lengths", "8"], "--lengths"),
    ([*PPL, "--lengths", "64", "1000000"], "--lengths"),
    ([*PPL, "--lengths"], "--lengths"),
    ([*PPL, "--memory-device", "cuda:7"], "--memory-device"),
    ([*PPL, "--memory-device", "toaster"], "--memory-device"),
    ([*PPL, "--device", "cuda:7"], "--device"),
    ([*PASSKEY, "--device", "toaster"], "--device"),
    ([*PASSKEY, "--trials", "0"], "--trials"),
    ([*PASSKEY, "--depths", "1.5"], "--depths"),
    ([*PASSKEY, "--depths", "nan"], "--depths"),
    ([*PASSKEY, "--seed", "-1"], "--seed"),
    ([*PASSKEY, "--lengths", "20"], "--lengths"),
    ([*PASSKEY, "--k", "0"], "--k"),
    ([*PASSKEY, "--task", "multikey", "--keys", "0"], "--keys"),
    ([*PASSKEY, "--task", "multikey", "--keys", "1"], "--keys"),
    ([*PASSKEY, "--task", "multikey", "--keys", "21"], "--keys"),
    ([*PASSKEY, "--keys", "3"], "--keys"),
    ([*PASSKEY, "--haystack", "unknown"], "argument --haystack"),
    ([*PASSKEY, "--task", "needles"], "argument --task"),
    ([*PASSKEY, "--task", "multikey", "--keys", "20"], "--lengths"),
    # missing and damaged files
    ([*PPL, "--model", "x={root}/missing"], "--model"),
    (["eval", "ppl", "--data", "{data}", "--out", "{out}"], "--model"),
    ([*PPL[:4], "--data", "{root}/missing", "--out", "{out}"], "--data"),
    ([*PPL[:4], "--data", "{full}", "--out", "{out}"], "holds no prepared data"),  # a checkpoint
    # a split the corpus lacks: said before the corpus is prepared (it was prepared first, 9-15 s)
    ([*PPL[:4], "--corpus", "{root}/corpus", "--out", "{out}", "--split", "nope"], "--split 'nope': the"),
    ([*PPL, "--split", "nonesuch"], "--split"),
    *[
        (["eval", "ppl", "--model", f"lm={{{name}}}", "--data", "{data}", "--out", "{out}"], "--model")
        for name in (*DAMAGES, *UNDERSPECIFIED)
    ],
    (["eval", "passkey", "--model", "lm={truncated}", "--out", "{out}"], "--model"),
    ([*PASSKEY[:2], "--model", "x=hf:{root}/missing", "--out", "{out}"], "--model x"),
    ([*PASSKEY[:2], "--model", "x=hf:{hf}", "--out", "{out}"], "--model x"),
    ([*PPL[:2], "--model", "x=hf:{root}/missing", "--out", "{out}"], "--model x"),
    ([*PPL, "--corpus", "{root}/missing"], "--corpus"),
    ([*PASSKEY, "--haystack", "books", "--corpus", "{root}/missing"], "--corpus"),
    ([*PASSKEY, "--corpus", "{root}/corpus"], "--corpus"),  # a corpus without the books haystack
    # conflicting options
    ([*PPL, "--model", "lm={full}"], "--model"),  # the name lm twice
    ([*PPL, "--k", "2", "2"], "--k"),
    ([*PPL, "--lengths", "64", "64"], "--lengths"),
    ([*PPL, "--model", "other={lm_other_tok}"], "--model"),  # two tokenizers
    ([*PPL[:4], "--data", "{other_data}", "--out", "{out}"], "--data"),  # data of another tokenizer
    ([*PPL[:6], "--out", "{file}"], "--out"),
    ([*PPL[:6], "--out", "{lm}/results"], "/results is inside --model "),
    ([*PPL[:6], "--out", "{data}"], " is --data "),
    ([*PASSKEY, "--depths", "0.5", "0.5"], "--depths"),
    ([*PASSKEY[:5], "{cache}", *PASSKEY[6:]], "is inside the data cache"),  # --out the cache itself
    ([*PASSKEY[:5], "{cache}/prepared", *PASSKEY[6:]], "is inside the data cache"),
    ([*QUICK, "--out", "{cache}"], "is inside the data cache"),
    (["eval", "ppl", "--model", "a=", "--data", "{data}", "--out", "{out}"], "--model must be NAME=PATH"),
    (["eval", "ppl", "--model", "{root}/none", "--data", "{data}", "--out", "{out}"], "--model none"),  # PATH
    (["eval", "base-check", "--model", "lm=hf:{root}/none", "--out", "{out}"], "--model lm"),  # not loaded
    # bounded search selects per query row and head (a traceback after the first cells before)
    ([*PPL, "--granularity", "token_head", "head", "--search", "bounded"], "--search bounded selects"),
    ([*PASSKEY, "--granularity", "token", "--search", "bounded"], "--search bounded selects"),
    # memory that certainly cannot fit (a MemoryError from numpy before)
    ([*PASSKEY, "--trials", "1000000000000"], "--trials 1000000000000: holding the keys"),
    ([*PASSKEY, "--lengths", "1000000000000"], "--lengths 1000000000000: a prompt of that many tokens"),
    ([*PPL[:9], "1000000000000"], "--lengths 1000000000000: a prompt of that many tokens"),
    ([*QUICK[:7], "64", "1000000000000"], "--ppl-lengths 1000000000000: a prompt of that many tokens"),
    # results among the files of a model, a run or prepared data that the command does not read
    ([*PPL[:7], "{full}", *PPL[8:]], "holds a model: write the results to another folder"),
    ([*PASSKEY[:5], "{data}", *PASSKEY[6:]], "holds prepared data: write the results"),
    ([*QUICK[:5], "{full}", *QUICK[6:]], "holds a model: write the results"),
    # a model read with its own attention ignores the retrieval options
    ([*PPL[:3], "f={full}", *PPL[4:], "--k", "8"], "--k is a retrieval option, and no --model here reads"),
    ([*PPL[:3], "f={full}", *PPL[4:], "--block-dtype", "int8"], "--block-dtype is a retrieval option"),
    ([*PASSKEY[:3], "f={full}", *PASSKEY[4:], "--search", "bounded"], "--search is a retrieval option"),
]


@pytest.mark.parametrize(
    ("argv", "names"), EVAL_CASES, ids=lambda v: _case_id(v) if isinstance(v, list) else None
)
def test_eval_refuses(env, argv, names, capsys, monkeypatch):
    _refused(env, _fill(argv, env), names, capsys, monkeypatch)


GENERATE_CASES = [
    ([*GENERATE, "--temperature", "nan"], "--temperature"),
    ([*GENERATE, "--temperature", "-1"], "--temperature"),
    ([*GENERATE, "--temperature", "hot"], "argument --temperature"),
    ([*GENERATE, "--top-p", "0"], "--top-p"),
    ([*GENERATE, "--temperature", "0", "--top-p", "0.5"], "--top-p 0.5 samples, and --temperature 0"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--top-p", "0.9"], "--top-p 0.9 samples"),
    ([*GENERATE, "--max-new-tokens", "0"], "--max-new-tokens"),
    ([*GENERATE, "--device", "cuda"], "--device"),
    ([*GENERATE, "--device", "quantum"], "--device"),
    ([*GENERATE, "--k", "0"], "--k"),
    ([*GENERATE, "--chunk-len", "4"], "--chunk-len"),
    ([*GENERATE, "--load-state", "{root}/missing.safetensors"], "--load-state"),
    ([*GENERATE, "--save-state", "{root}/missing/state.safetensors"], "--save-state"),
    ([*GENERATE, "--save-state", "{root}"], "--save-state"),
    ([*GENERATE[:3], "--prompt-file", "{root}/missing.txt"], "--prompt-file"),
    ([*GENERATE[:3], "--prompt", ""], "--prompt"),
    (["generate", "--checkpoint", "{full}", "--prompt", "the sea"], "--checkpoint"),
    (["generate", "--checkpoint", "{root}/missing", "--prompt", "the sea"], "--checkpoint"),
    *[
        (["generate", "--checkpoint", f"{{{name}}}", "--prompt", "the sea"], "--checkpoint")
        for name in (*DAMAGES, *UNDERSPECIFIED)
    ],
    ([*GENERATE, "--batch-lines"], "--batch-lines"),
    ([*GENERATE[:3], "--prompt", "abc\udcff"], "--prompt"),  # bytes not UTF-8, as Python keeps them in argv
    (["hf", "generate", "--model", "{lm}", "--prompt", "abc\udcff"], "--prompt"),
    ([*GENERATE, "--seed", str(2**64)], "--seed"),
    ([*GENERATE, "--seed", "-1"], "--seed"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--seed", str(2**70)], "--seed"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--temperature", "-0.5"], "--temperature"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--temperature", "inf"], "--temperature"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--k", "-1"], "--k"),
    (["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--max-blocks", "0"], "--max-blocks"),
    (["hf", "generate", "--model", "{root}/missing", "--prompt", "hi"], "--model"),
    (["hf", "generate", "--model", "{hf}", "--prompt", "hi", "--k", "2", "--chunk-len", "8"], "--chunk-len"),
    (["hf", "generate", "--model", "{lm}", "--prompt", ""], "--prompt"),
    (
        ["hf", "generate", "--model", "{lm}", "--prompt", "hi", "--max-new-tokens", "x"],
        "argument --max-new-tokens",
    ),
    # memory that certainly cannot fit: nothing stops the generation early
    (
        [*GENERATE[:5], "--no-stop", "--max-new-tokens", "1000000000000000"],
        "--max-new-tokens 1000000000000000",
    ),
    ([*GENERATE, "--k", str(2**63)], "--k must be at most"),
    ([*GENERATE[:5], "--no-stop", "--max-new-tokens", str(10**9)], "--max-new-tokens 1000000000: holding"),
    ([*GENERATE, "--chunk-len", str(10**12)], "--chunk-len must be in [1, 1,048,576]"),
    ([*PPL, "--chunk-len", str(2**20 + 1)], "--chunk-len must be in [1, 1,048,576]"),
    ([*GENERATE, "--load-state", "{lm}"], "is a folder, not a file"),
    ([*GENERATE[:3], "--prompt-file", "{lm}"], "is a folder, not a file"),
    # the generated ids alone cannot fit, even if a stop token may end the generation early
    ([*GENERATE[:5], "--max-new-tokens", "1000000000000000"], "--max-new-tokens 1000000000000000"),
    ([*GENERATE, "--save-state", "{elsewhere}/loop"], "--save-state"),
    (["eval", "ruler", "--model", "m={lm}", "--lengths", "1000000000000", "--out", "{out}"], "--lengths"),
    (["eval", "ruler", "--model", "m={lm}", "--tokenizer", "{file}", "--out", "{out}"], "--tokenizer"),
]


@pytest.mark.parametrize(
    ("argv", "names"), GENERATE_CASES, ids=lambda v: _case_id(v) if isinstance(v, list) else None
)
def test_generate_refuses(env, argv, names, capsys, monkeypatch):
    _refused(env, _fill(argv, env), names, capsys, monkeypatch)


DEMO_CASES = [
    (["demo", "--block-size", "0"], "--block-size"),
    (["demo", "--block-size", "1"], "--block-size"),
    (["demo", "--seqs", "0"], "--seqs"),
    (["demo", "--seqs", "64", "-5"], "--seqs"),
    (["demo", "--heads", "0"], "--heads"),
    (["demo", "--head-dim", "0"], "--head-dim"),
    (["demo", "--seqs", "100000000"], "--seqs"),
    (["demo", "--max-reference-seq", "-1"], "--max-reference-seq"),
    (["demo", "--seqs", "100000", "--max-reference-seq", "100000"], "--max-reference-seq"),
    (["demo", "--seed", str(2**64)], "--seed"),
    (["demo", "--seqs", "64", "64"], "--seqs lists 64 more than once"),
]


@pytest.mark.parametrize(
    ("argv", "names"), DEMO_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_demo_refuses(env, argv, names, capsys, monkeypatch):
    _refused(env, argv, names, capsys, monkeypatch)


def test_generate_refuses_standard_input_that_is_not_utf8(env, capsys, monkeypatch):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"the sea \xff\xfe"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    argv = ["generate", "--checkpoint", str(env["lm"]), "--prompt-file", "-", "--max-new-tokens", "1"]
    assert "standard input is not UTF-8" in _refused(env, argv, "--prompt-file", capsys, monkeypatch)


QUICKSTART_CASES = [
    ([*QUICK, "--k", "0"], "--k"),
    ([*QUICK, "--trials", "0"], "--trials"),
    ([*QUICK[:6], "--ppl-lengths", "1", "1"], "--ppl-lengths"),
    ([*QUICK[:6], "--ppl-lengths", "8", "64"], "--ppl-lengths"),
    ([*QUICK[:6], "--ppl-lengths", "64"], "argument --ppl-lengths"),
    ([*QUICK, "--passkey-lengths", "5", "400"], "--passkey-lengths"),
    ([*QUICK, "--base-lengths", "300", "300"], "--base-lengths"),
    ([*QUICK, "--depths", "1.5"], "--depths"),
    (["quickstart", *QUICK[2:], "--hf-model", "{out}/missing"], "--hf-model"),
    ([*QUICK, "--ppl-tokens", "0"], "--ppl-tokens"),
    ([*QUICK, "--train-minutes", "0"], "--train-minutes"),
    ([*QUICK, "--train-minutes", "nan"], "--train-minutes"),
    ([*QUICK, "--train"], "--train"),
    ([*QUICK, "--chunk-len", "8"], "--chunk-len"),
    ([*QUICK, "--granularity", "row"], "argument --granularity"),
    (["quickstart", "--checkpoint", "{truncated}", "--out", "{out}", "--no-hf"], "--checkpoint"),
    (["quickstart", "--checkpoint", "{full}", "--out", "{out}", "--no-hf"], "--checkpoint"),
    (["quickstart", "--out", "{file}", "--no-hf"], "--out"),
    (["quickstart", "--out", "{out}", "--ppl-lengths", "1", "1", "--no-hf"], "--ppl-lengths"),  # shipped
    (["quickstart", "--out", "{out}", "--trials", "0", "--no-hf"], "--trials"),
    # options another option makes meaningless; outputs among the inputs; memory checked before loading
    ([*QUICK, "--train-minutes", "5"], "--train-minutes is the budget of --train"),
    ([*QUICK, "--base-lengths", "16384", "32768"], "--base-lengths: options of the SmolLM2 evaluation"),
    ([*QUICK, "--base-lengths", "16384"], "--base-lengths: options of the SmolLM2 evaluation"),  # the default
    ([*GENERATE, "--block-folder", "{root}/bf", "--save-state", "{root}/bf"], "--save-state"),
    ([*QUICK, "--hf-model", "{lm}"], "--hf-model: options of the SmolLM2 evaluation, which --no-hf skips"),
    ([*QUICK[:4], "--out", "{lm}/report", *QUICK[6:]], "/report is inside --checkpoint "),
    (
        ["quickstart", "--out", "{out}", "--passkey-lengths", "1000000000000"],
        "--passkey-lengths 1000000000000",
    ),
]


@pytest.mark.parametrize(
    ("argv", "names"), QUICKSTART_CASES, ids=lambda v: _case_id(v) if isinstance(v, list) else None
)
def test_quickstart_refuses(env, argv, names, capsys, monkeypatch):
    _refused(env, _fill(argv, env), names, capsys, monkeypatch)


def test_the_real_command_exits_2_with_one_line(env):
    """Two cases through ``python -m landmark`` (the exit status and stderr a shell sees)."""
    before = _snapshot(env["root"])
    cases = [
        (["eval", "ppl", "--model", f"lm={env['truncated']}", "--data", str(env["data"]),
          "--out", str(env["out"])], "--model"),
        (["generate", "--checkpoint", str(env["lm"]), "--prompt", "x", "--device", "cuda"], "--device"),
    ]  # fmt: skip
    for argv, names in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "landmark", *argv], capture_output=True, text=True, cwd=REPO,
            env={**os.environ, "LANDMARK_CACHE": str(env["cache"])}, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith("error: ") and names in proc.stderr
    assert _snapshot(env["root"]) == before


_AS_USER = """
import contextlib, io, json, sys
from landmark.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        except BaseException as exc:
            code = repr(exc)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_permission_denied_is_one_line(env, tmp_path_factory):
    """Files and folders this user may not read or write (chmod 000; as root the cases run without the
    capabilities that let root read and write anything, so the permissions hold for them):
    a config, a prompt file, a checkpoint folder, the folder of --save-state and of train.out_dir. Each
    is one line naming it, never a PermissionError traceback."""
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv: permissions cannot be denied")
        # root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: chmod 000 denies it, while the repository
        # and its venv (root's, possibly in a private temporary folder) stay readable
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-all"]
    work = Path(tempfile.mkdtemp(prefix="landmark-perm-"))  # outside pytest's private folder
    try:
        work.chmod(0o755)
        ckpt = shutil.copytree(env["lm"], work / "lm")
        for p in [ckpt, *ckpt.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = work / "locked"
        locked.mkdir()
        secret = work / "secret.txt"
        secret.write_text("[train]\n")
        hidden = shutil.copytree(ckpt, work / "hidden")
        for p in (locked, secret, hidden):
            p.chmod(0)
        cases = [
            (["train", str(secret)], "config file"),
            (["train", str(REPO / "configs" / "tiny.toml"), "--set", f"train.out_dir={locked / 'x'}"],
             "train.out_dir"),
            (["generate", "--checkpoint", str(ckpt), "--prompt-file", str(secret)], "--prompt-file"),
            (["generate", "--checkpoint", str(hidden), "--prompt", "the sea"], "--checkpoint"),
            (["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--save-state", str(locked / "s.st")],
             "--save-state"),
        ]  # fmt: skip
        user_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "LANDMARK_CACHE": str(work / "cache"),
            "HOME": str(work),
        }
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", _AS_USER, json.dumps([argv for argv, _ in cases])],
            capture_output=True, text=True, cwd=work, timeout=300, env=user_env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        for (argv, names), (code, err) in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
            assert code == 2, (argv, code, err)
            assert err.startswith("error: ") and err.count("\n") == 1 and names in err, (argv, err)
        assert not (locked / "x").exists()
    finally:
        for p in (work / "locked", work / "secret.txt", work / "hidden"):
            p.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)


def test_load_model_refuses_another_tokenizer_and_allows_a_padded_vocabulary(env, capsys):
    """config.json's data.tokenizer_fingerprint is checked (defect 3); a model.vocab_size larger than the
    tokenizer's is padding and works end to end, a smaller one is refused (defect 5)."""
    with pytest.raises(CheckpointError, match="tokenizer_fingerprint"):
        load_model(env["other_tokenizer"])
    model, tok, _ = load_model(env["padded"])
    assert model.config.vocab_size == tok.vocab_size + 37
    out = env["root"].parent / "padded-eval"
    argv = ["eval", "ppl", "--model", f"p={env['padded']}", "--data", str(env["data"]), "--out", str(out),
            "--lengths", "64", "--max-tokens", "64"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "perplexity.json").read_text())["results"][0]["ppl"] > 1
    assert main(["generate", "--checkpoint", str(env["padded"]), "--prompt", "the sea", "--max-new-tokens",
                 "3", "--temperature", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    small = env["root"].parent / "small-vocab"
    ckpt = _save(small, env["tok"], attention="full", vocab=env["tok"].vocab_size - 1)
    with pytest.raises(CheckpointError, match="smaller than the tokenizer"):
        load_model(ckpt)


def test_a_huge_k_reads_as_every_block_without_allocating_for_it(env):
    """--k beyond the blocks that can exist is every block: no table or buffer sized by k (a k of 10**9
    once tried to allocate 68 GB), the same greedy tokens as a k that covers the memory."""
    from landmark.inference import generate

    model, tok, _ = load_model(env["lm"])
    prompt = [tok.encode("the sea and the ship and the whale at night " * 6)]
    for kernel in ("auto", "torch"):
        want = generate(model, prompt, 4, k=64, chunk_len=32, kernel=kernel)
        assert generate(model, prompt, 4, k=10**9, chunk_len=32, kernel=kernel) == want


@pytest.mark.parametrize(
    "extra, says",
    [(["--window-len", "100000"], "--window-len 100000 exceeds the base model's window (256)"),
     (["--windows", "10000000000", "--window-len", "128"], "--windows 10000000000 x --window-len 128: the")],
)  # fmt: skip
def test_base_check_refuses_windows_before_loading_a_model(env, capsys, monkeypatch, tmp_path, extra, says):
    """--window-len beyond the base's positions and more windows than the text can hold: refused from
    config.json and the corpus's size, before a model is loaded or a token counted (that took seconds)."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    monkeypatch.setattr(eval_cli, "load_hf", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["eval", "base-check", "--model", f"m=hf:{env['hf']}", "--base", str(base), "--corpus",
            str(env["root"] / "corpus"), "--out", str(env["out"]), *extra]  # fmt: skip
    line = _refused(env, argv, extra[0], capsys, monkeypatch)
    assert says in line


def test_a_k_above_the_blocks_of_the_input_is_used_with_a_note(env, capsys):
    """--k 1000000000: nothing grows with it (every block is retrieved), so it runs, and says so."""
    argv = _fill([*GENERATE, "--k", "1000000000", "--temperature", "0"], env)
    assert main(argv) == 0
    assert "note: --k 1000000000 is above the" in capsys.readouterr().err


def test_an_evaluation_with_a_k_above_the_blocks_of_its_lengths_says_so(env, capsys):
    """The evaluations know their longest input from --lengths: a --k above its blocks runs with a note."""
    argv = _fill([*PPL, "--k", "1000000000"], env)
    assert main(argv) == 0
    assert "note: --k 1000000000 is above the" in capsys.readouterr().err


def test_kernel_triton_on_the_cpu_needs_the_interpreter(env, capsys, monkeypatch):
    """``--kernel triton`` where no CUDA device reads and the interpreter is off: one line before the model
    loads (a RuntimeError "0 active drivers" from triton inside the first forward before)."""
    import landmark.inference.triton_retrieval  # noqa: F401 - imported with the interpreter on: triton
    # makes its kernels interpreted or compiled at import, and later tests run them through the interpreter

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = [*GENERATE, "--kernel", "triton", "--device", "cpu"]
    _refused(env, _fill(argv, env), "--kernel triton runs on a CUDA GPU; the model reads on cpu", capsys,
             monkeypatch)  # fmt: skip
    from landmark.inference import generate

    model, _, _ = load_model(env["lm"])
    with pytest.raises(ValueError, match='kernel="triton" runs on a CUDA device; the model is on cpu'):
        generate(model, [list(range(3, 3 + 3 * BS))], 2, kernel="triton", k=2)


def test_kernel_cpp_that_cannot_be_built_is_one_line(env, capsys, monkeypatch):
    """``--kernel cpp`` where the C++ kernel cannot be built (LANDMARK_KERNEL=0, an unwritable
    TORCH_EXTENSIONS_DIR): one line before the model loads (a KernelUnavailableError traceback before)."""
    from landmark.inference import kernel

    monkeypatch.setattr(
        kernel, "_build", lambda: kernel.KernelUnavailableError("LANDMARK_KERNEL=0 (simulated)")
    )
    _refused(env, _fill([*GENERATE, "--kernel", "cpp"], env), "--kernel cpp: LANDMARK_KERNEL=0 (simulated)",
             capsys, monkeypatch)  # fmt: skip


def test_ctrl_c_is_one_line_and_exit_130(env, capsys, monkeypatch):
    """Ctrl-C during any command: "interrupted" (with how to resume, for training), exit 130, no
    traceback; outputs are written atomically, so nothing half-written stays."""
    from landmark.inference import cli as inference_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference_cli, "generate", interrupted)
    assert main(_fill([*GENERATE, "--temperature", "0"], env)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    import landmark.cli as cli_module

    monkeypatch.setattr(cli_module, "load_config", lambda *a: None)
    monkeypatch.setattr(cli_module, "train", interrupted)
    assert main(["train", "any.toml"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (--resume continues from the last checkpoint)"


START_GENERATE = ["generate", "--checkpoint", "checkpoints/passkey-landmark", "--prompt", "hi"]


@pytest.mark.parametrize(("delay", "command"), [(0.2, ["demo"]), (1.0, ["demo"]), (0.28, START_GENERATE),
                                                (0.34, START_GENERATE), (0.6, START_GENERATE)])  # fmt: skip
def test_ctrl_c_while_the_command_starts_is_one_line(delay, command):
    """Ctrl-C in the first second, while the command imports torch (before any command runs), ends as
    Ctrl-C during a command does: "interrupted", exit 130, no traceback (generate at 0.34 s aborted in
    C++, exit -6, or was lost). (The child gets SIGINT's default action back: a job started in the
    background, as CI may be, inherits SIGINT ignored. Before about 0.05 s Python itself is starting.)"""
    import signal
    import time

    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 - a background job (CI)
    proc = subprocess.Popen([sys.executable, "-m", "landmark", *command], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (130, "interrupted")


def test_ctrl_c_inside_an_import_a_library_guards_ends_the_process(tmp_path):
    """Ctrl-C inside an import that a library wraps in a bare ``except:`` (its optional imports) was
    swallowed: the half-imported module stayed behind, and the command failed later with a traceback
    (numpy without ``intp``) or trained on, deaf to the Ctrl-C. Inside an import it now ends the
    process at once: "interrupted", exit 130."""
    module = "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(2)\n"
    (tmp_path / "slow_optional.py").write_text(module)
    code = ("import signal, sys; sys.path.insert(0, sys.argv[1]); import landmark.__main__ as entry\n"
            "signal.signal(signal.SIGINT, entry._on_interrupt)\n"
            "try:\n    import slow_optional\nexcept:\n    pass\nprint('ran on')\n")  # fmt: skip
    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 - a background job (CI)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, preexec_fn=default, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (130, "", "interrupted")


def test_ctrl_c_outside_imports_raises_keyboard_interrupt():
    """Outside imports the handler raises KeyboardInterrupt: the command closes what it writes."""
    import sys as sys_module

    import landmark.__main__ as entry

    with pytest.raises(KeyboardInterrupt):
        entry._on_interrupt(signal.SIGINT, sys_module._getframe())


def test_ctrl_c_after_the_command_is_ignored(monkeypatch, capsys):
    """Once the command returned, Ctrl-C is ignored: during the interpreter's shutdown (torch loaded: a
    second or so) Python no longer handles it, and a finished evaluation died of it with exit -2 and no
    message, its results already written."""
    import signal

    import landmark.__main__ as entry

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["landmark"])  # no command: the help, exit 2
    try:
        assert entry.main() == 2
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    capsys.readouterr()


def test_import_landmark_is_light():
    """`import landmark` loads no torch (what lets the command answer Ctrl-C while torch loads), and the
    operations still come from it on first use."""
    code = ("import sys, landmark; light = 'torch' not in sys.modules; "
            "print(light, callable(landmark.landmark_attention), 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import landmark

        landmark.nothing  # noqa: B018


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "x", "--prompt", "hi", "--k", "2", "--k", "3"],
        ["eval", "ppl", "--model", "a=x", "--k", "2", "3", "--k", "4"],
        ["hf", "generate", "--model", "x", "--prompt", "hi", "--temperature", "0", "--temperature", "1"],
        ["train", "a.toml", "--set", "train.lr=1", "--set", "train.lr=2", "--set", "x=1", "--kernel", "a"],
    ],
)
def test_a_valued_option_given_twice_is_refused(argv, capsys):
    """argparse keeps the last of a repeated option silently (``--k 2 --k 3`` read with k=3): refused,
    before anything runs. Options meant to repeat (``--model``, ``--set``, ``--prompt``) still do."""
    from landmark.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    if argv[0] == "train":  # --set repeats; the unknown option is what is refused
        assert "given more than once" not in err and "unrecognized arguments: --kernel a" in err
    else:
        assert len(err.strip().splitlines()) == 1, err  # one line: no usage first
        assert err.startswith("error: ") and "is given more than once: give it once (landmark " in err


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LANDMARK_THREADS", "-2", "LANDMARK_THREADS must be an integer in [1, 1024]; got '-2'"),
        ("LANDMARK_KERNEL", "banana", "LANDMARK_KERNEL must be 0 (the C++ kernels off) or 1; got 'banana'"),
        ("LANDMARK_CACHE", "FILE", "is a file: it must name a folder (created if missing)"),
    ],
)
def test_bad_environment_variables_are_refused_before_any_command(name, value, message, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    """LANDMARK_KERNEL=banana ran silently; LANDMARK_CACHE naming a file failed with EEXIST not naming
    it; hf generate checked LANDMARK_THREADS after loading the model (14 s): one line, before anything."""
    from landmark.cli import main

    if value == "FILE":
        value = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv(name, value)
    monkeypatch.setattr("landmark.hf.cli.load_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["hf", "generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith(message) and "\n" not in err


@pytest.mark.parametrize("cache", ["/proc/landmark-nope", "FILE/cache"])
def test_a_cache_folder_that_cannot_be_made_is_named_by_its_variable(cache, tmp_path, monkeypatch, capsys):
    """LANDMARK_CACHE=/proc/nope ended in "[Errno 2] No such file or directory: '/proc/nope'", not
    saying which setting named that folder."""
    from landmark.cli import main

    if cache.startswith("FILE"):
        (tmp_path / "FILE").write_text("x")
        cache = str(tmp_path / cache)
    monkeypatch.setenv("LANDMARK_CACHE", cache)
    assert main(["quickstart"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: LANDMARK_CACHE={cache} (the cache folder): cannot use ")
    assert "\n" not in err


@pytest.mark.parametrize("command", ["hf generate", "eval passkey", "generate"])
def test_a_block_folder_is_never_made_inside_a_model_the_command_reads(command, tmp_path, capsys):
    """`hf generate --model DELTA --block-folder BASE/blk` made its memory folder among the files of the
    delta's base model (and left it there): refused before anything is loaded or made."""
    from landmark.cli import main
    from landmark.hf.smollm2 import default_smollm2_dir

    delta = REPO / "checkpoints" / "smollm2-landmark"
    inside = default_smollm2_dir() / "blk" if command != "generate" else tmp_path / "blk"
    argv = {
        "hf generate": ["hf", "generate", "--model", str(delta), "--prompt", "hi"],
        "eval passkey": ["eval", "passkey", "--model", f"a=hf:{delta}", "--out", str(tmp_path / "o")],
        "generate": ["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"],
    }[command]
    assert main([*argv, "--block-folder", str(inside)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --block-folder {inside} is inside ") and "\n" not in err
    assert not inside.exists()


def test_evaluation_results_never_land_in_a_delta_s_base_model(capsys):
    """`eval passkey --model a=hf:DELTA --out BASE/o` wrote its cells inside the base model the delta is
    rebuilt over (an --out inside the delta itself was refused)."""
    from landmark.cli import main
    from landmark.hf.smollm2 import default_smollm2_dir

    out = default_smollm2_dir() / "results"
    delta = REPO / "checkpoints" / "smollm2-landmark"
    argv = ["eval", "passkey", "--model", f"a=hf:{delta}", "--lengths", "1024", "--out", str(out)]
    assert main(argv) == 2
    assert "is inside a delta's base model" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--checkpoint", "nope"], "error: --checkpoint nope does not exist"),
        (["--base", "nope"], "error: --base nope does not exist"),
        (["--ppl-lengths", "0", "512"], "error: --ppl-lengths: [0] shorter than one block"),
    ],
)
def test_quickstart_checks_its_options_before_loading_smollm2(extra, says, tmp_path, capsys, monkeypatch):
    """These were said after loading the SmolLM2 model (7-8 s), and a missing --base was blamed on
    --hf-model."""
    from landmark.cli import main

    monkeypatch.setattr("landmark.quickstart.load_hf", lambda *a, **k: pytest.fail("loaded SmolLM2"))
    assert main(["quickstart", "--out", str(tmp_path / "qs"), *extra]) == 2
    assert capsys.readouterr().err.strip().startswith(says) and not (tmp_path / "qs").exists()


# ---- outputs the library did not write, messages ------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "mine"),
    [
        (PPL, "perplexity.md"),
        (PPL, "perplexity.json"),
        (PASSKEY, "passkey.png"),
        (PASSKEY, "cells"),
        (QUICK, "report.md"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[0] + " " + v[1],
)
def test_a_user_s_file_in_out_is_never_replaced(env, base, mine, capsys, monkeypatch, tmp_path_factory):
    """`eval ppl --out myout` replaced the user's myout/perplexity.md (and quickstart their report.md;
    a file named cells failed with EEXIST after every cell was computed): refused before any work."""
    out = env["root"] / "mine"
    out.mkdir(exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    (out / mine).write_text("my notes\n")
    argv = last_wins([*_fill(base, env), "--out", str(out)])
    line = _refused(env, argv, f"--out {out} holds {mine}, which landmark did not write there", capsys,
                    monkeypatch)  # fmt: skip
    assert "\n" not in line


def test_results_written_by_the_library_are_replaced_by_its_next_run(env, capsys, monkeypatch, tmp_path):
    """The record of what an evaluation wrote (.landmark-results) lets the next run into the same --out
    replace its own files and reuse its cells."""
    monkeypatch.setenv("LANDMARK_CACHE", str(env["cache"]))
    argv = last_wins([*_fill(PPL, env), "--out", str(tmp_path / "r")])
    assert main(argv) == 0
    from landmark.files import results_owners

    owners = results_owners(tmp_path / "r")
    assert owners.pop("cells") is None
    assert owners == dict.fromkeys(["perplexity.json", "perplexity.md", "perplexity.png"], "eval ppl")
    assert main(argv) == 0


def test_one_command_never_replaces_another_s_result_in_a_shared_folder(tmp_path):
    """quickstart into a folder `eval ppl` wrote replaced its perplexity.png alone: the plot then showed
    other lengths than the table beside it. A name another command wrote is refused."""
    from landmark.files import check_results_folder, record_results

    record_results(tmp_path, ["perplexity.md", "perplexity.png"], "eval ppl")
    record_results(tmp_path, ["cells"])
    for name in ("perplexity.md", "perplexity.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "cells").mkdir()
    check_results_folder(tmp_path, ["perplexity.md", "perplexity.png", "cells"], command="eval ppl")
    with pytest.raises(ValueError, match=r"holds perplexity\.png from `landmark eval ppl`, which this"):
        check_results_folder(tmp_path, ["report.md", "perplexity.png", "cells"], command="quickstart")


def test_prepare_refuses_an_out_holding_a_lone_array(env, capsys, monkeypatch):
    """`prepare --out myprep` replaced a user's myprep/train.bin (a .bin with no tokenizer or description
    beside it is not prepared data)."""
    out = env["root"] / "myprep"
    out.mkdir(exist_ok=True)
    (out / "train.bin").write_bytes(b"mine")
    argv = ["prepare", "--corpus", str(env["root"] / "corpus"), "--out", str(out), "--vocab-size", "300"]
    _refused(env, argv, "holds train.bin, not prepared data", capsys, monkeypatch)


def test_a_checkpoint_that_never_existed_is_not_said_to_be_removed(env, capsys, monkeypatch):
    """`generate --checkpoint RUN/checkpoints/step_99` (no such step) said "removed while loading (a run is
    training into RUN): try again"."""
    missing = env["lm"] / "checkpoints" / "step_00000099"
    argv = last_wins([*_fill(GENERATE, env), "--checkpoint", str(missing)])
    line = _refused(env, argv, "does not exist", capsys, monkeypatch)
    assert "removed while loading" not in line
    beside = env["lm"].parent / "step_00000099"  # a step the run never had, beside the one it holds
    line = _refused(env, last_wins([*argv, "--checkpoint", str(beside)]), "is gone", capsys, monkeypatch)
    assert f"the run holds {env['lm'].name} now: pass {env['lm'].parent.parent}" in line


@pytest.mark.parametrize("command", ["generate", "hf generate"])
def test_a_seed_with_greedy_decoding_is_refused(env, command, capsys, monkeypatch):
    """--seed at temperature 0 was accepted and ignored (as --top-p is refused there)."""
    hf = ["hf", "generate", "--model", str(env["hf"]), "--prompt", "hi"]
    argv = [*(_fill(GENERATE, env) if command == "generate" else hf), "--temperature", "0", "--seed", "5"]
    _refused(env, argv, "--seed 5 seeds sampling, and --temperature 0 is greedy", capsys, monkeypatch)


def test_a_state_saved_with_other_weights_names_the_weights_option(env, capsys, monkeypatch, tmp_path):
    """A state read with the model's weights, loaded with --weights int8: "saved for other weights ...
    read the document again", not saying that --weights was the difference. From its header, at once."""
    from safetensors.torch import save_file

    from landmark.inference.cache import STATE_FORMAT

    state = tmp_path / "s.st"
    save_file({"length": torch.zeros(1, dtype=torch.long)}, str(state),
              metadata={"format": STATE_FORMAT, "model": "x", "weights": "model"})  # fmt: skip
    argv = [*_fill(GENERATE, env), "--load-state", str(state), "--weights", "int8"]
    says = "was saved with --weights model; this run has --weights int8"
    line = _refused(env, argv, says, capsys, monkeypatch)
    assert line.endswith("give --weights model")


def test_results_of_a_version_without_the_record_are_still_the_library_s(tmp_path):
    """A results folder written before the record was kept (its cells cache beside the outputs) is taken
    as the library's: rerunning into it works as it did."""
    from landmark.files import check_results_folder

    (tmp_path / "cells").mkdir()
    (tmp_path / "perplexity.md").write_text("# Perplexity\n")
    check_results_folder(tmp_path, ["perplexity.md", "perplexity.json", "cells"])
    (tmp_path / "cells").rmdir()
    with pytest.raises(ValueError, match=r"holds perplexity\.md, which landmark did not write there"):
        check_results_folder(tmp_path, ["perplexity.md", "perplexity.json", "cells"])


def test_a_training_run_is_refused_in_a_results_folder(tmp_path):
    """`train --set train.out_dir=RESULTS` wrote config.json, metrics.jsonl and checkpoints among an
    evaluation's results (which then refused its own folder as a training run)."""
    from landmark.files import record_results
    from landmark.train import _check_out_dir
    from landmark.train_config import ConfigError

    record_results(tmp_path, ["perplexity.md"], "eval ppl")
    with pytest.raises(ConfigError, match=r"holds results of an evaluation or a quickstart \(perplexity"):
        _check_out_dir(tmp_path, resume=False)


def test_a_prompt_file_s_byte_order_mark_is_not_text(tmp_path):
    """``--prompt-file`` with ``--batch-lines``: a byte-order mark (some editors write one) is not part of
    the first prompt (it was: another token count than the same line without it)."""
    doc = tmp_path / "prompts.txt"
    doc.write_bytes("\ufeffhello\nworld\n".encode())
    args = argparse.Namespace(prompt=None, prompt_file=str(doc), batch_lines=True)
    assert inference_cli._prompts(args) == ["hello", "world"]


def test_the_block_folder_a_command_made_is_removed_after(env, tmp_path, capsys, monkeypatch):
    """``--block-folder a/b/c`` that did not exist: made for the run, and the folders it made removed
    after (the memory's files are unlinked as soon as they are mapped); an existing folder stays."""
    monkeypatch.setenv("LANDMARK_CACHE", str(env["cache"]))
    argv = ["generate", "--checkpoint", str(env["lm"]), "--prompt", "the sea " * 40, "--max-new-tokens", "2"]
    code, err = _run([*argv, "--block-folder", str(tmp_path / "a" / "b" / "c")], capsys)
    assert code == 0, err
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    code, err = _run([*argv, "--block-folder", str(tmp_path / "mine" / "blocks")], capsys)
    assert code == 0 and (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "blocks").exists()


@pytest.mark.parametrize("command", ["ppl", "passkey"])
def test_an_evaluation_plot_replaces_a_link(env, tmp_path, capsys, monkeypatch, command):
    """A symbolic link where the evaluation writes its plot (from an earlier run, or planted): replaced
    by the new plot; the file it pointed to is untouched (the plot was written through the link)."""
    monkeypatch.setenv("LANDMARK_CACHE", str(env["cache"]))
    out, precious = tmp_path / "eval", tmp_path / "precious.txt"
    precious.write_text("mine", encoding="utf-8")
    out.mkdir()
    argv = [a.format(lm=env["lm"], data=env["data"], out=out) for a in (PPL if command == "ppl" else PASSKEY)]
    code, err = _run([*argv, *(["--trials", "1"] if command == "passkey" else [])], capsys)
    assert code == 0, err
    png = out / ("perplexity.png" if command == "ppl" else "passkey.png")
    png.unlink()
    png.symlink_to(precious)
    code, err = _run([*argv, *(["--trials", "1"] if command == "passkey" else [])], capsys)
    assert code == 0, err
    assert precious.read_text(encoding="utf-8") == "mine"
    assert not png.is_symlink() and png.read_bytes()[:4] == b"\x89PNG"
