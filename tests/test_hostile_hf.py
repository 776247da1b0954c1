"""Hostile inputs to the Hugging Face commands: every bad value a one-line error, nothing written.

Each refused call of ``landmark hf convert|finetune|prepare-smollm2`` must exit with status 2, print
exactly one ``error:`` line naming the option, no traceback, and leave every file under the test's
folders (the token cache included) as it was. ``<landmark>`` in user text is plain text on the HF path,
as on the native one, and prompt ids holding the landmark id are refused. Tiny models built in-process:
nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil
from pathlib import Path

import pytest
import torch
from argv_helpers import last_wins
from safetensors import SafetensorError
from safetensors.torch import save_file

pytest.importorskip("transformers")

from hf_helpers import converted, make_model, make_tokenizer, write_tiny

import landmark.hf as lhf
from landmark import resources
from landmark.cli import main
from landmark.hf import cli as hf_cli
from landmark.hf import finetune as finetune_module
from landmark.hf import smollm2
from landmark.hf.convert import encode_text
from landmark.hf.generate import prompt_ids
from landmark.inference import cache as cache_module

REPO = Path(__file__).resolve().parents[1]

# One window of the tiny model: block size 8, 32 positions, a few windows of the small corpus.
TINY = ["--block-size", "8", "--max-length", "32", "--batch-size", "1", "--warmup-steps", "0"]

# (option, bad value): ranges, nan, inf, of every numeric option of `hf finetune`.
FINETUNE_BAD = [
    ("--steps", "0"),
    ("--steps", "-3"),
    ("--batch-size", "0"),
    ("--grad-accum", "0"),
    ("--grad-accum", "1000000000000"),  # beyond 2**24: float32 gradient sums take in no more shares
    ("--max-length", "1"),
    ("--max-length", "100000"),  # beyond the model's max_position_embeddings (256)
    ("--block-size", "1"),
    ("--block-size", "512"),
    ("--lr", "0"),
    ("--lr", "nan"),
    ("--lr", "inf"),
    ("--lr", "-1e-4"),
    ("--warmup-steps", "-1"),
    ("--weight-decay", "nan"),
    ("--weight-decay", "-0.1"),
    ("--lora-r", "-1"),
    ("--lora-alpha", "0"),
    ("--lora-dropout", "1"),
    ("--lora-dropout", "nan"),
    ("--logging-steps", "0"),
    ("--eval-windows", "-1"),
    ("--max-windows", "0"),
    ("--passkey-fraction", "1.5"),
    ("--passkey-fraction", "nan"),
    ("--passkey-books", "1.5"),
    ("--passkey-multikey", "-0.1"),
    ("--passkey-books", "0.5"),  # without --passkey-fraction
    ("--passkey-near", "1.5"),
    ("--passkey-near", "0.2"),  # without --passkey-fraction
    ("--save-steps", "0"),
    ("--passkey-fraction", "-0.1"),
    ("--max-minutes", "0"),
    ("--max-minutes", "inf"),
    ("--max-minutes", "-1"),
    ("--seed", "-1"),
    ("--seed", str(2**32)),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """An unconverted tiny Llama folder and a small corpus (shared, never written by the tests)."""
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A test folder; the token cache lives in it, so a refusal that wrote tokens would be seen."""
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    return tmp_path


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: path -> (size, mtime in ns). The roots' own modification
    times are left out: a fine-tune holds its staging folder (made in the root) while it loads the model,
    and removes it again when the model is refused, which leaves the root as it was but for its time."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            stat = path.stat()
            when = 0 if path == root else stat.st_mtime_ns
            seen[str(path)] = (stat.st_size if path.is_file() else -1, when)
    return seen


def refused(argv: list[str], capsys, names: str, *roots: Path) -> str:
    """Run ``landmark <argv>``: exit 2, exactly one ``error:`` line mentioning ``names``, no traceback,
    nothing under ``roots`` changed. Returns the error line."""
    before = snapshot(*roots)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals (a value of the wrong type)
        code = exit_.code
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if "error:" in line]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, out + err
    assert names in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert snapshot(*roots) == before
    return lines[0]


def finetune_argv(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return last_wins(
        [
            "hf",
            "finetune",
            "--model",
            str(model),
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            *TINY,
            *extra,
        ]
    )


# ---- hf finetune -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value"), FINETUNE_BAD, ids=[f"{o}={v}" for o, v in FINETUNE_BAD])
def test_finetune_refuses_bad_numbers(tiny, home, capsys, option, value):
    model, corpus = tiny
    argv = finetune_argv(model, corpus, home / "out", f"{option}={value}")  # "=": "-1e-4" is a value
    line = refused(argv, capsys, option, home, model)
    assert line.startswith("error: ") and "; got " in line
    assert not (home / "out").exists() and not (home / "cache").exists()


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_finetune_refuses_a_non_integer_steps(tiny, home, capsys, value):
    model, corpus = tiny
    refused(finetune_argv(model, corpus, home / "out", "--steps", value), capsys, "--steps", home)


def test_finetune_refuses_an_existing_out_without_overwrite(tiny, home, capsys):
    model, corpus = tiny
    out = home / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    line = refused(finetune_argv(model, corpus, out, "--steps", "1"), capsys, "--out", home)
    assert "--overwrite" in line
    (home / "file").write_text("x", encoding="utf-8")
    refused(finetune_argv(model, corpus, home / "file", "--steps", "1"), capsys, "--out", home)


def test_finetune_into_a_staging_folder_in_use_is_refused_before_loading(tiny, home, capsys, monkeypatch):
    """Another live fine-tune holds ``--out``'s staging folder: refused before the model is loaded (the
    SmolLM2 load took 6-10 s before the refusal)."""
    from landmark.files import RunLock
    from landmark.hf import finetune as finetune_module

    model, corpus = tiny
    out = home / "out"
    staging = finetune_module.staging_folder(out)
    staging.mkdir()
    lock = RunLock(staging)
    lock.acquire()
    monkeypatch.setattr(finetune_module, "_load_model", lambda cfg: pytest.fail("the model was loaded"))
    try:
        refused(finetune_argv(model, corpus, out, "--steps", "1"), capsys, f"{staging} is in use", home)
    finally:
        lock.release()


def damage(folder: Path, kind: str) -> None:
    """Damage a copy of a model folder in one of several ways."""
    if kind == "truncated-weights":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    elif kind == "empty-weights":
        (folder / "model.safetensors").write_bytes(b"")
    elif kind == "no-weights":
        (folder / "model.safetensors").unlink()
    elif kind == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif kind == "bad-json":
        (folder / "config.json").write_text("{oops", encoding="utf-8")
    elif kind == "wrong-shapes":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 32}), encoding="utf-8")
    elif kind == "unknown-architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "nope"}), encoding="utf-8")


DAMAGES = ["missing", "a-file", "no-config", "truncated-weights", "empty-weights", "no-weights"]
DAMAGES += ["no-tokenizer", "bad-json", "wrong-shapes", "unknown-architecture"]


def bad_model(tiny_model: Path, home: Path, kind: str) -> Path:
    """A model folder argument of the given kind of wrongness, under ``home``."""
    path = home / "models" / kind
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "a-file":
        path.write_text("not a folder", encoding="utf-8")
    elif kind == "no-config":
        path.mkdir()
        (path / "weights.bin").write_bytes(b"0")
    elif kind != "missing":
        shutil.copytree(tiny_model, path)
        damage(path, kind)
    return path


@pytest.mark.parametrize("kind", DAMAGES)
def test_finetune_refuses_a_missing_or_damaged_model(tiny, home, capsys, kind):
    model, corpus = tiny
    path = bad_model(model, home, kind)
    line = refused(finetune_argv(path, corpus, home / "out", "--steps", "1"), capsys, "--model", home)
    assert "Repo id" not in line
    if kind == "missing":
        assert "does not exist" in line
    assert not (home / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_finetune_refuses_a_bad_corpus(tiny, home, capsys, kind):
    model, _ = tiny
    corpus = home / "corpus"
    if kind == "empty":
        corpus.mkdir()
    refused(finetune_argv(model, corpus, home / "out", "--steps", "1"), capsys, "--corpus", home)


def test_finetune_refuses_windows_too_short_for_passkeys(tiny, home, capsys):
    model, corpus = tiny
    argv = finetune_argv(model, corpus, home / "out", "--passkey-fraction", "0.5", "--steps", "1")
    refused(argv, capsys, "--max-length", home)


def test_finetune_refuses_fsdp_and_lora_together(tiny, home, capsys):
    model, corpus = tiny
    refused(finetune_argv(model, corpus, home / "out", "--fsdp", "--lora-r", "4"), capsys, "--fsdp", home)


def test_finetune_overwrite_replaces_out_without_stale_files(tiny, home, capsys):
    """--overwrite: the new model replaces an old one whole (a stale file of the old one is gone)."""
    model, corpus = tiny
    out = home / "out"
    shutil.copytree(model, out)  # an earlier model
    (out / "stale.txt").write_text("old run", encoding="utf-8")
    argv = finetune_argv(model, corpus, out, "--steps", "1", "--max-windows", "2", "--overwrite")
    assert main(argv) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "landmark-finetune.json").read_text())["steps_done"] == 1
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(".")) == []  # no staging left
    loaded, _ = lhf.load_pretrained(out)
    assert loaded.config.landmark_block_size == 8


# ---- hf convert and prepare-smollm2 ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "0", "-4", "1000"])
def test_convert_refuses_bad_block_size(tiny, home, capsys, value):
    model, _ = tiny
    argv = ["hf", "convert", "--model", str(model), "--out", str(home / "out"), "--block-size", value]
    refused(argv, capsys, "--block-size", home)


@pytest.mark.parametrize("kind", DAMAGES)
def test_convert_refuses_a_missing_or_damaged_model(tiny, home, capsys, kind):
    path = bad_model(tiny[0], home, kind)
    line = refused(
        ["hf", "convert", "--model", str(path), "--out", str(home / "out")], capsys, "--model", home
    )
    assert "Repo id" not in line and not (home / "out").exists()


def test_convert_refuses_an_existing_out_and_overwrites_when_told(tiny, home, capsys):
    model, _ = tiny
    out = home / "out"
    argv = ["hf", "convert", "--model", str(model), "--out", str(out), "--block-size", "8"]
    assert main(argv) == 0
    (out / "stale.txt").write_text("old", encoding="utf-8")
    line = refused(argv, capsys, "--out", home)
    assert "--overwrite" in line
    assert main([*argv[:-1], "16", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["landmark_block_size"] == 16
    assert [p.name for p in home.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("held", ["documents", "a training run"])
def test_convert_overwrite_replaces_only_a_model(tiny, home, capsys, held):
    """--overwrite replaces a model or a delta, never a folder of documents or a training run (whose
    config.json is not a Hugging Face one)."""
    model, _ = tiny
    out = home / "out"
    out.mkdir()
    if held == "documents":
        (out / "notes.txt").write_text("mine", encoding="utf-8")
    else:
        (out / "config.json").write_text(json.dumps({"format": 1, "model": {}}), encoding="utf-8")
        (out / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    argv = ["hf", "convert", "--model", str(model), "--out", str(out), "--block-size", "8", "--overwrite"]
    assert "not a Hugging Face model or a delta" in refused(argv, capsys, "--out", home)


def test_hf_outputs_never_go_into_the_data_cache(tiny, home, capsys):
    """``hf convert --out $LANDMARK_CACHE/models/SmolLM2-...`` replaced the prepared base every delta
    loads by default: the cache is refused as an output (prepare-smollm2 alone writes there)."""
    model, _ = tiny
    (home / "cache" / "models").mkdir(parents=True)
    out = home / "cache" / "models" / "SmolLM2-135M-Instruct"
    argv = ["hf", "convert", "--model", str(model), "--out", str(out), "--block-size", "8", "--overwrite"]
    refused(argv, capsys, "is inside the data cache", home)


def test_a_damaged_prepared_smollm2_is_prepared_again(tmp_path, monkeypatch):
    """A prepared folder whose weights were cut short is not "already prepared": it is prepared again
    (said), and left as it was while the conversion has not succeeded."""
    folder = tmp_path / "smollm2"
    folder.mkdir()
    save_file({"w": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", smollm2.SOURCE_FILE):
        (folder / name).write_text("{}", encoding="utf-8")
    assert smollm2.is_prepared(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert not smollm2.is_prepared(folder) and "model.safetensors is damaged" in smollm2.damage(folder)
    lines: list[str] = []

    def no_package(*args, **kwargs):
        raise FileNotFoundError("no GGUF here")

    monkeypatch.setattr(smollm2, "find_gguf", no_package)
    before = snapshot(folder)
    with pytest.raises(FileNotFoundError, match="no GGUF here"):
        smollm2.prepare_smollm2(folder, log=lines.append)
    assert "preparing it again" in lines[0] and snapshot(folder) == before


def test_a_prepared_smollm2_with_other_weights_is_prepared_again(tiny, tmp_path, monkeypatch):
    """Bytes of the weights changed in place (the file whole, the size kept): the fingerprint of the
    loaded weights is not the prepared model's, so the folder is prepared again (it was "already
    prepared", and every delta then refused its base)."""
    model, _ = tiny
    folder = tmp_path / "smollm2"
    shutil.copytree(model, folder)
    (folder / smollm2.SOURCE_FILE).write_text("{}", encoding="utf-8")
    assert smollm2.is_prepared(folder)

    def no_package(*args, **kwargs):
        raise FileNotFoundError("no GGUF")

    monkeypatch.setattr(smollm2, "find_gguf", no_package)
    lines: list[str] = []
    with pytest.raises(FileNotFoundError, match="no GGUF"):
        smollm2.prepare_smollm2(folder, log=lines.append)
    assert "holds other weights (fingerprint" in lines[0] and "preparing it again" in lines[0]


def test_prepare_smollm2_refuses_a_foreign_folder(home, capsys):
    out = home / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    refused(["hf", "prepare-smollm2", "--out", str(out), "--no-install"], capsys, "--out", home)
    (home / "file").write_text("x", encoding="utf-8")
    refused(["hf", "prepare-smollm2", "--out", str(home / "file"), "--no-install"], capsys, "--out", home)


# ---- <landmark> in user text, landmark ids in prompts (defect 4) ---------------------------------------


@pytest.fixture(scope="module")
def landmark_model():
    model, tok = converted()
    return model.eval(), tok


def test_landmark_string_in_text_is_plain_text(landmark_model):
    model, tok = landmark_model
    lid = model.config.landmark_token_id
    text = "Call me <landmark> Ishmael <|endoftext|>."
    ids = prompt_ids(model, tok, text)
    assert lid not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == text  # the strings survive as characters
    assert encode_text(tok, [text, "<landmark>"])[1] == encode_text(tok, "<landmark>")
    # generating from the text equals generating from its plain-text ids
    _, text_ids = lhf.generate(model, tok, text, max_new_tokens=6)
    _, id_ids = lhf.generate(model, tok, torch.tensor(ids), max_new_tokens=6)
    assert torch.equal(text_ids, id_ids) and lid not in text_ids.tolist()


def test_hf_api_refuses_what_it_cannot_honour(landmark_model):
    """``generate(model, tok, 123, 3)`` generated from the token 123 (an int taken for ids);
    ``max_new_tokens=10**12`` ran until killed; ``forward_cached`` through a retrieval cache read ids
    without landmarks and answered (blocks without an address). Each is refused, naming the argument."""
    model, tok = landmark_model
    with pytest.raises(TypeError, match="prompt must be text or"):
        lhf.generate(model, tok, 123, 3)
    with pytest.raises(ValueError, match="max_new_tokens=1000000000000: holding the ids generated"):
        lhf.generate(model, tok, "hi", 10**12)
    bs = model.config.landmark_block_size
    cache = lhf.LandmarkRetrievalCache(model, k=2)
    ids = torch.arange(1, 2 * bs + 3)[None]  # no landmark where the stream needs one
    with pytest.raises(ValueError, match=f"row 0, stream position {bs - 1}: landmarks must sit"):
        lhf.forward_cached(model, ids, cache)
    with pytest.raises(ValueError, match=r"^input_ids must be a \(B, T\) tensor .*got \(1, 0\)"):
        lhf.forward_cached(model, torch.zeros(1, 0, dtype=torch.long), cache)  # (a reshape error)
    assert cache.get_seq_length() == 0


def test_landmark_id_lookup_fast_and_slow_paths_agree(landmark_model):
    """The landmark id comes from the fast tokenizer's backend (one lookup, not a copy of the vocabulary:
    encoding passkey samples was ~1 s each before); a tokenizer without a backend uses its vocabulary."""
    from types import SimpleNamespace

    from landmark.hf.convert import _tokenizer_landmark_id

    model, tok = landmark_model
    assert _tokenizer_landmark_id(tok) == model.config.landmark_token_id == tok.get_vocab()["<landmark>"]
    slow = SimpleNamespace(get_vocab=tok.get_vocab)  # no backend_tokenizer attribute
    assert _tokenizer_landmark_id(slow) == model.config.landmark_token_id
    assert _tokenizer_landmark_id(SimpleNamespace(get_vocab=dict)) is None


def test_passkey_and_corpus_tokenisation_keep_the_string_as_text(landmark_model, tmp_path):
    from landmark.hf.data import tokenize_corpus
    from landmark.hf.passkey import HFTokenEncoder

    model, tok = landmark_model
    lid = model.config.landmark_token_id
    assert lid not in HFTokenEncoder(tok).encode("a <landmark> b")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text("x <landmark> y. " * 50, encoding="utf-8")
    tokens = tokenize_corpus(tok, corpus, "train", cache=tmp_path / "cache", progress=False)
    assert lid not in set(tokens.tolist())


@pytest.mark.parametrize("kind", ["landmark", "negative", "too-large", "float"])
def test_prompt_ids_are_checked(landmark_model, kind):
    model, tok = landmark_model
    lid = model.config.landmark_token_id
    ids = {
        "landmark": torch.tensor([5, 6, lid, 7]),
        "negative": torch.tensor([5, -1]),
        "too-large": torch.tensor([5, lid + 1000]),
        "float": torch.tensor([5.0, 6.0]),
    }[kind]
    with pytest.raises(ValueError, match=r"^prompt: ") as info:
        lhf.generate(model, tok, ids, max_new_tokens=2)
    if kind == "landmark":
        assert str(lid) in str(info.value)
    with pytest.raises(ValueError, match=r"^prompt: "):
        lhf.generate(model, tok, torch.tensor([], dtype=torch.long), max_new_tokens=2)


def test_hf_generate_command_reads_the_string_as_text(landmark_model, home, capsys):
    model, tok = landmark_model
    folder = home / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompt = "Call me <landmark> Ishmael"
    argv = ["hf", "generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "3", "--k", "0"]
    want = lhf.generate(model, tok, prompt, 3)[0] + "\n"  # the continuation only, not the prompt again
    assert main(argv) == 0
    assert capsys.readouterr().out == want
    assert main([*argv, "--device", "cpu"]) == 0  # named explicitly: the same text
    assert capsys.readouterr().out == want


@pytest.mark.parametrize("device", ["cuda:99", "abacus"])
def test_hf_generate_checks_the_device_before_loading(home, capsys, device):
    argv = ["hf", "generate", "--model", str(home), "--prompt", "x", "--device", device]
    refused(argv, capsys, "--device", home)


def test_hf_generate_names_a_missing_model_folder(home, capsys):
    argv = ["hf", "generate", "--model", str(home / "nope"), "--prompt", "x", "--k", "0"]
    line = refused(argv, capsys, "does not exist", home)
    assert "Repo id" not in line


# ---- outputs onto inputs, memory, a full disk ---------------------------------------------------------


def test_convert_and_finetune_never_write_over_the_model_they_read(tiny, home, capsys):
    """--out naming --model (or a folder inside it) with --overwrite would replace the model being read
    (convert did, in place); refused before anything is loaded, the model folder untouched."""
    model, corpus = tiny
    for out, says in ((model, f"--out {model} is --model"), (model / "sub", "is inside --model")):
        line = refused(["hf", "convert", "--model", str(model), "--out", str(out), "--block-size", "8",
                        "--overwrite"], capsys, says, home, model)  # fmt: skip
        assert "which this command reads" in line
        refused(finetune_argv(model, corpus, out, "--steps", "1", "--overwrite"), capsys, says, home, model)
    refused(finetune_argv(model, corpus, corpus, "--steps", "1", "--overwrite"), capsys, "is --corpus", home)


def test_finetune_refuses_a_batch_that_certainly_cannot_fit(tiny, home, capsys):
    """--batch-size 10**8 (the run sat allocating): the windows' activations and logits alone need more
    than this machine has; one line naming --batch-size, before anything is loaded."""
    model, corpus = tiny
    argv = finetune_argv(model, corpus, home / "out", "--steps", "1")
    argv[argv.index("--batch-size") + 1] = "100000000000"
    line = refused(argv, capsys, "--batch-size 100000000000: fine-tuning", home, model)
    assert "needs at least" in line


def test_hf_generate_on_a_full_disk_keeps_the_earlier_state(landmark_model, home, capsys, monkeypatch):
    """`hf generate --save-state F` when the disk fills (safetensors' own error): one line naming
    --save-state and ENOSPC, F as it was, no temporary file."""
    model, tok = landmark_model
    folder = home / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = home / "book.safetensors"
    argv = ["hf", "generate", "--model", str(folder), "--prompt", "the sea " * 8, "--max-new-tokens", "1",
            "--k", "2", "--chunk-len", "16", "--save-state", str(state)]  # fmt: skip
    assert main(argv) == 0
    before = state.read_bytes()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cache_module, "save_file", full)
    line = refused(argv, capsys, f"--save-state {state}", folder)
    assert "No space left on device (ENOSPC)" in line
    assert state.read_bytes() == before and not [p for p in home.iterdir() if p.name.endswith(".tmp")]


def test_hf_generate_refuses_a_run_folder_before_loading(home, capsys, monkeypatch):
    """A `landmark train` run folder given to hf generate: refused from its config.json (no model_type),
    without importing a model (transformers took seconds to say "Unrecognized model")."""
    run = home / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "data": {}, "train": {}}), encoding="utf-8")
    monkeypatch.setattr(hf_cli, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    line = refused(["hf", "generate", "--model", str(run), "--prompt", "hi"], capsys, f"--model {run}", home)
    assert "no model_type" in line and "landmark generate --checkpoint" in line


def test_hf_generate_checks_the_load_state_before_loading_the_model(
    landmark_model, home, capsys, monkeypatch
):
    """A --load-state that is no saved state, or one of a model with other layers: refused from the file's
    header and config.json, before the model is loaded (that took 15 s for SmolLM2)."""
    model, tok = landmark_model
    folder = home / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    junk = home / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    other = home / "other.safetensors"
    meta = {
        "format": "landmark-stream-state-v1",
        "n_layers": "99",
        "block_size": str(model.config.landmark_block_size),
    }
    save_file({"length": torch.zeros(1, dtype=torch.long)}, str(other), metadata=meta)
    monkeypatch.setattr(hf_cli, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for state, says in (
        (junk, "is not a readable safetensors file"),
        (other, "was saved for a model with n_layers 99"),
    ):
        argv = ["hf", "generate", "--model", str(folder), "--prompt", "hi", "--load-state", str(state)]
        assert says in refused(argv, capsys, f"--load-state {state}", folder)


def test_hf_generate_checks_a_deltas_block_size_before_loading(home, capsys, monkeypatch):
    """--chunk-len below a delta's block size (read from its delta.json): refused before the base model
    is loaded (it took 12 s for SmolLM2)."""
    delta = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-landmark"
    monkeypatch.setattr(hf_cli, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["hf", "generate", "--model", str(delta), "--prompt", "hi", "--chunk-len", "63"]
    assert "at least one block (64)" in refused(argv, capsys, "--chunk-len (63)", delta)


# ---- limits that could never be reached, refusals that need nothing loaded -----------------------------


@pytest.mark.parametrize("extra", [[], ["--k", "0"], ["--k", "2", "--max-blocks", "4"]])
def test_hf_generate_refuses_a_limit_the_ids_alone_cannot_reach(
    landmark_model, home, capsys, monkeypatch, extra
):
    """--max-new-tokens 10**15 ran until killed (no end-of-text came): the ids alone would need 8 PB, so
    the limit is refused from the option, before the model is loaded, whatever the cache."""
    model, tok = landmark_model
    folder = home / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setattr(hf_cli, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    big = "1000000000000000"
    argv = ["hf", "generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", big, *extra]
    line = refused(argv, capsys, f"--max-new-tokens {big}: holding the ids", home)
    assert "needs at least 8 PB" in line


@pytest.mark.parametrize(
    ("extra", "cache"),
    [(["--k", "0"], "the attention cache (--k 0)"), (["--k", "2"], "the block memory (no --max-blocks)")],
)
def test_hf_generate_refuses_a_limit_the_cache_cannot_reach(
    landmark_model, home, capsys, monkeypatch, extra, cache
):
    """On a machine of 16 GB, 10**9 new tokens: the ids (8 GB) would fit, but a cache that keeps every
    position needs at least 2 bytes x 2 layers x 2 x 2 key/value heads x 16 = 256 bytes per position (from
    config.json); with --max-blocks the memory is capped and nothing is refused before loading."""
    model, tok = landmark_model
    folder = home / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setattr(resources, "cpu_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(hf_cli, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["hf", "generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1000000000",
            "--device", "cpu", *extra]  # fmt: skip
    line = refused(argv, capsys, "--max-new-tokens 1000000000: holding the keys and values", home)
    assert cache in line and "needs at least 256 GB, this machine has 16 GB" in line
    if "--k 0" in cache:
        return

    class Loaded(Exception):
        pass

    def loaded(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(hf_cli, "load_pretrained", loaded)
    with pytest.raises(Loaded):  # capped: past the checks, to loading
        main([*argv, "--max-blocks", "4"])


def test_finetune_resume_with_nothing_to_resume_is_refused_at_once(tiny, home, capsys, monkeypatch):
    """--resume for an --out with no interrupted run (a missing folder, an empty one): refused from the
    folder, without importing transformers' Trainer utilities (that took about 5 s)."""
    model, corpus = tiny
    monkeypatch.setattr(finetune_module, "require", lambda name: pytest.fail(f"{name} was imported"))
    empty = home / "empty"
    empty.mkdir()
    for out in (home / "nothing", empty):
        argv = finetune_argv(model, corpus, out, "--steps", "1", "--resume")
        refused(argv, capsys, f"--resume: no interrupted fine-tune to continue for --out {out}", home)
        assert not (home / "cache").exists()
    assert not (home / "nothing").exists() and list(empty.iterdir()) == []


# ---- a probe round: refusals read from the files, before anything is loaded or written -----------------

SHIPPED_DELTA = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-landmark"


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    """A saved landmark model (block size 8) converted from the weights of ``tiny``'s model."""
    model, tok = converted()
    folder = tmp_path_factory.mktemp("lm") / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """An unconverted tiny Llama of another shape (hidden size 32): the base of no model here."""
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("other") / "other"
    make_model(vocab=len(tok), hidden_size=32, intermediate_size=64).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def never(what: str):
    """A stand-in for a function that must not be reached: it fails the test."""
    return lambda *args, **kwargs: pytest.fail(f"{what} before the refusal")


def test_convert_refuses_a_model_converted_already(lm_folder, home, capsys, monkeypatch):
    """`hf convert` of a landmark model silently set its block size again (8 -> the default 64): refused
    from its config.json, before transformers is imported."""
    monkeypatch.setattr(hf_cli, "require", never("transformers was imported"))
    argv = ["hf", "convert", "--model", str(lm_folder), "--out", str(home / "out")]
    line = refused(argv, capsys, f"--model {lm_folder} is already a landmark model", home, lm_folder)
    assert "landmark_block_size 8" in line and "--block-size" in line


def test_convert_checks_the_architecture_before_loading(tiny, home, capsys, monkeypatch):
    """A GPT-2 config.json (model_type gpt2, GPT2LMHeadModel): refused from the file, not after loading."""
    path = home / "gpt2"
    shutil.copytree(tiny[0], path)
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.setattr(hf_cli, "require", never("transformers was imported"))
    argv = ["hf", "convert", "--model", str(path), "--out", str(home / "out")]
    line = refused(argv, capsys, f"--model {path}", home)
    assert "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line


@pytest.mark.parametrize("source", ["--block-size", "the model's"])
def test_finetune_refuses_windows_shorter_than_two_blocks(tiny, lm_folder, home, capsys, monkeypatch, source):
    """--max-length 10 with --block-size 16 trained windows without a landmark: a window must hold two
    blocks (the block size given, else the landmark model's), refused before the model is loaded."""
    model, corpus = tiny
    monkeypatch.setattr(finetune_module, "load_for_finetune", never("the model was loaded"))
    if source == "--block-size":
        argv = finetune_argv(model, corpus, home / "out", "--steps", "1", "--max-length", "15")
        says = "--max-length 15 must be at least 2 blocks (16 positions"
    else:
        argv = ["hf", "finetune", "--model", str(lm_folder), "--corpus", str(corpus), "--out",
                str(home / "out"), "--steps", "1", "--max-length", "10", "--batch-size", "1"]  # fmt: skip
        says = "--max-length 10 must be at least 2 blocks (16 positions"
    refused(argv, capsys, says, home)


IGNORED = [
    (["--lora-dropout", "0.1"], "--lora-dropout", "--lora-r > 0"),
    (["--lora-targets", "all"], "--lora-targets", "--lora-r > 0"),
    (["--lora-targets", "attention"], "--lora-targets", "--lora-r > 0"),  # its default, given: refused too
    (["--lora-alpha", "16"], "--lora-alpha", "--lora-r > 0"),
    (["--passkey-near-gap", "4"], "--passkey-near-gap", "--passkey-near > 0"),
    (["--distill-weight", "2"], "--distill-weight", "--distill BASE"),
    (["--distill-weight", "1"], "--distill-weight", "--distill BASE"),
]


@pytest.mark.parametrize(("extra", "option", "needs"), IGNORED, ids=[" ".join(e) for e, _, _ in IGNORED])
def test_finetune_refuses_options_that_would_be_ignored(
    tiny, home, capsys, monkeypatch, extra, option, needs
):
    """An option that acts only beside another, given without it, was silently ignored: one line naming
    both, before the model is loaded."""
    model, corpus = tiny
    monkeypatch.setattr(finetune_module, "load_for_finetune", never("the model was loaded"))
    line = refused(finetune_argv(model, corpus, home / "out", *extra), capsys, f"error: {option} ", home)
    assert needs in line


def test_finetune_config_refuses_settings_that_would_be_ignored(tiny, home):
    """The Python API: a setting away from its default without the one it needs is a ValueError naming
    both; with it, accepted."""
    model, corpus = tiny
    base = dict(model=str(model), out=str(home / "out"), corpus=str(corpus), block_size=8, max_length=32)
    for setting, option in (
        ({"lora_dropout": 0.1}, "--lora-dropout"),
        ({"lora_targets": "all"}, "--lora-targets"),
        ({"lora_alpha": 7}, "--lora-alpha"),
        ({"passkey_near_gap": 4}, "--passkey-near-gap"),
        ({"distill_weight": 2.0}, "--distill-weight"),
    ):
        with pytest.raises(ValueError, match=f"^{option} .* needs "):
            finetune_module.FinetuneConfig(**base, **setting).check()
    finetune_module.FinetuneConfig(
        **base, lora_r=4, lora_dropout=0.1, lora_targets="all", passkey_fraction=0.5, passkey_near=0.5,
        passkey_near_gap=4, distill=str(model), distill_weight=2.0,
    ).check()  # fmt: skip


K0_IGNORED = [["--max-blocks", "2"], ["--search", "bounded"], ["--block-dtype", "int8"],
              ["--granularity", "head"], ["--kernel", "torch"], ["--memory-device", "cpu"],
              ["--block-folder", "blocks"]]  # fmt: skip


@pytest.mark.parametrize("extra", K0_IGNORED, ids=[e[0] for e in K0_IGNORED])
def test_hf_generate_k0_refuses_retrieval_options(
    lm_folder, landmark_model, home, capsys, monkeypatch, extra
):
    """--k 0 reads with the model's own attention over the whole context: a retrieval option away from
    its default would be ignored; refused naming it, before the model is loaded (and by the Python API)."""
    monkeypatch.setattr(hf_cli, "load_pretrained", never("the model was loaded"))
    extra = [*extra[:-1], str(home / extra[-1]) if extra[0] == "--block-folder" else extra[-1]]
    argv = ["hf", "generate", "--model", str(lm_folder), "--prompt", "hi", "--max-new-tokens", "1",
            "--k", "0"]  # fmt: skip
    line = refused([*argv, *extra], capsys, f"{extra[0]} {extra[1]}", home, lm_folder)
    assert "--k 0" in line
    from landmark.inference.options import Reading

    model, tok = landmark_model
    name = extra[0][2:].replace("-", "_")
    value = int(extra[1]) if name == "max_blocks" else extra[1]
    with pytest.raises(ValueError, match=f"reading.{name}"):
        lhf.generate(model, tok, "hi", 1, reading=Reading(k=0, **{name: value}))


def test_prepare_smollm2_checks_out_can_be_written_before_converting(home, capsys, monkeypatch):
    """--out /proc/nope/x failed only after 30 s of conversion: a folder that cannot be created is refused
    first (root too: /proc takes no new folder)."""
    monkeypatch.setattr(hf_cli, "prepare_smollm2", never("the conversion began"))
    (home / "file").write_text("x", encoding="utf-8")
    outs = [str(home / "file" / "x")] + (["/proc/nope/x"] if Path("/proc/self").exists() else [])
    for out in outs:
        line = refused(["hf", "prepare-smollm2", "--no-install", "--out", out], capsys, f"--out {out}", home)
        assert "cannot be created" in line


def fake_run(lm_folder: Path, home: Path, summary: str) -> Path:
    """A LoRA run folder as far as export-delta's checks look (the model, an adapter's two files), with
    ``summary`` as its landmark-finetune.json."""
    run = home / "run"
    shutil.copytree(lm_folder, run)
    (run / "lora-adapter").mkdir()
    (run / "lora-adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (run / "lora-adapter" / "adapter_model.safetensors").write_bytes(b"0")
    (run / "landmark-finetune.json").write_text(summary, encoding="utf-8")
    return run


def test_export_delta_refuses_a_damaged_run_summary(lm_folder, home, capsys, monkeypatch):
    """A damaged landmark-finetune.json (where the run's base is recorded) fell back to SmolLM2 and failed
    on shapes seconds later: refused at once naming the file."""
    run = fake_run(lm_folder, home, '{"model": \n')
    monkeypatch.setattr(hf_cli, "export_delta", never("the export began"))
    argv = ["hf", "export-delta", "--run", str(run), "--out", str(home / "e11")]
    line = refused(argv, capsys, f"--run {run}", home)
    assert "landmark-finetune.json" in line


def test_export_delta_compares_the_base_config_before_loading(
    tiny, lm_folder, other_base, home, capsys, monkeypatch
):
    """--base a model of another shape than the run's: refused from the two config.json files (hidden
    size), before the base is loaded; the run's own base passes."""
    run = fake_run(lm_folder, home, json.dumps({"config": {"model": str(tiny[0])}}))
    monkeypatch.setattr(hf_cli, "export_delta", never("the export began"))
    argv = ["hf", "export-delta", "--run", str(run), "--out", str(home / "e11"), "--base", str(other_base)]
    line = refused(argv, capsys, f"--base {other_base}", home)
    assert "hidden_size 32" in line and "64" in line
    from landmark.hf.delta import check_export

    check_export(run, None, home / "e12", False)  # the recorded base: its shape is the run's
    check_export(run, tiny[0], home / "e12", False)


@pytest.mark.parametrize("base", ["landmark", "delta", "checkpoint"])
def test_export_delta_refuses_a_base_that_is_not_a_plain_model_before_loading(
    base, tiny, lm_folder, home, capsys, monkeypatch
):
    """--base a landmark model (converted, a delta or a `landmark train` checkpoint): it was refused only
    once the export had loaded it; now from its files, before the export begins."""
    run = fake_run(lm_folder, home, json.dumps({"config": {"model": str(tiny[0])}}))
    folder = {
        "landmark": lm_folder,
        "delta": REPO / "checkpoints" / "smollm2-landmark",
        "checkpoint": REPO / "checkpoints" / "passkey-landmark",
    }[base]
    monkeypatch.setattr(hf_cli, "export_delta", never("the export began"))
    argv = ["hf", "export-delta", "--run", str(run), "--out", str(home / "e"), "--base", str(folder)]
    refused(argv, capsys, f"--base {folder}", home)


def test_a_truncated_delta_is_refused_before_the_base_is_loaded(home, capsys, monkeypatch):
    """delta.safetensors cut short: refused from its header by load_pretrained and hf generate, before the
    540 MB base is found or loaded."""
    from landmark.hf import delta as delta_module

    if not (SHIPPED_DELTA / "delta.safetensors").is_file():
        pytest.skip("no shipped delta")
    folder = home / "sm-trunc"
    folder.mkdir()
    shutil.copy(SHIPPED_DELTA / "delta.json", folder)
    with open(SHIPPED_DELTA / "delta.safetensors", "rb") as f:
        (folder / "delta.safetensors").write_bytes(f.read(2_000_000))
    monkeypatch.setattr(delta_module, "resolve_base", never("the base was looked for"))
    monkeypatch.setattr(delta_module, "load_base", never("the base was loaded"))
    with pytest.raises(ValueError, match=r"delta\.safetensors is damaged"):
        lhf.load_pretrained(folder)
    line = refused(["hf", "generate", "--model", str(folder), "--prompt", "hi"], capsys, "--model", home)
    assert "delta.safetensors is damaged" in line


def test_base_check_refuses_a_base_the_model_was_not_made_from(
    tiny, lm_folder, other_base, home, capsys, monkeypatch
):
    """`eval base-check --base` of another shape than the landmark model (or the delta's recorded base):
    refused from the config.json files naming --base, before either is loaded; its real base passes."""
    from landmark.eval import cli as eval_cli

    class Loaded(Exception):
        pass

    def loaded(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(eval_cli, "load_hf", loaded)
    argv = ["eval", "base-check", "--model", f"a=hf:{lm_folder}", "--windows", "1", "--window-len", "64",
            "--out", str(home / "out"), "--base"]  # fmt: skip
    line = refused([*argv, f"hf:{other_base}"], capsys, f"--base hf:{other_base}", home)
    assert "'a'" in line and "hidden_size 32" in line
    if (SHIPPED_DELTA / "delta.json").is_file():
        argv[3] = f"b=hf:{SHIPPED_DELTA}"
        line = refused([*argv, f"hf:{tiny[0]}"], capsys, f"--base hf:{tiny[0]}", home)
        assert "'b'" in line and "vocab_size" in line
    argv[3] = f"a=hf:{lm_folder}"
    with pytest.raises(Loaded):
        main([*argv, f"hf:{tiny[0]}"])


# ---- a third round: interrupted saves, edited files, impossible configs --------------------------------


def test_resume_skips_a_checkpoint_stopped_while_saving(tiny, home, capsys):
    """Ctrl-C while the Trainer wrote checkpoint-2 left it with the adapter alone (no trainer_state.json):
    --resume took it and failed (ENOENT). The newest complete checkpoint is resumed from, the other one
    named on stderr and removed; with no complete one, --resume is refused naming the incomplete ones."""
    model, corpus = tiny
    out, staging = home / "out", home / ".out.partial"
    argv = finetune_argv(model, corpus, out, "--steps", "3", "--save-steps", "1", "--lora-r", "2")
    assert main([*argv, "--max-minutes", "0.00001"]) == 0  # stopped after step 1: checkpoint-1
    complete, partial = staging / "checkpoint-1", staging / "checkpoint-2"
    partial.mkdir()
    for name in ("README.md", "adapter_model.safetensors"):
        shutil.copy(complete / name, partial / name)
    assert finetune_module.last_checkpoint(staging) == complete
    assert [c.name for c, _ in finetune_module.incomplete_checkpoints(staging)] == ["checkpoint-2"]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "checkpoint-2" in line]
    assert len(notes) == 1 and "incomplete" in notes[0] and "resuming from checkpoint-1" in notes[0]
    assert f"resuming from {complete}" in captured.out
    assert json.loads((out / "landmark-finetune.json").read_text())["steps_done"] == 3

    staging.mkdir()  # only a half-written checkpoint: nothing to resume, said so
    (staging / "finetune-run.json").write_text("{}", encoding="utf-8")
    (staging / "checkpoint-1").mkdir()
    (staging / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1', encoding="utf-8")
    argv = finetune_argv(model, corpus, home / "out2", "--steps", "3", "--save-steps", "1", "--resume")
    staging.rename(home / ".out2.partial")
    line = refused(argv, capsys, "--resume: no interrupted fine-tune to continue", home)
    assert "checkpoint-1" in line and "without --resume" in line


# config.json values transformers refuses (StrictDataclassClassValidationError) or builds a broken model from
BAD_CONFIGS = {
    "heads-7": ({"num_attention_heads": 7}, "not a multiple of num_attention_heads 7"),
    "layers--1": ({"num_hidden_layers": -1}, "num_hidden_layers -1"),
    "kv-heads-3": ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    "vocab-text": ({"vocab_size": "big"}, "vocab_size 'big'"),
}


def edited_config(source: Path, folder: Path, **changes) -> Path:
    """A copy of the model folder ``source`` at ``folder`` with ``changes`` made in its config.json."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}), encoding="utf-8")
    return folder


@pytest.mark.parametrize("kind", BAD_CONFIGS)
def test_config_values_transformers_refuses_are_refused_before_loading(
    tiny, lm_folder, home, capsys, monkeypatch, kind
):
    """num_attention_heads 7 (of a hidden size 64) ended convert, finetune and eval in a traceback
    (StrictDataclassClassValidationError); num_hidden_layers -1 was converted into a model without
    layers. Each command refuses the folder in one line naming it and config.json, before loading."""
    from landmark.eval import models as eval_models

    changes, says = BAD_CONFIGS[kind]
    model, corpus = tiny
    bad = edited_config(model, home / "bad", **changes)
    monkeypatch.setattr(hf_cli, "require", never("transformers was imported"))
    monkeypatch.setattr(finetune_module, "_load_model", never("the model was loaded"))
    monkeypatch.setattr(eval_models, "require", never("transformers was imported"))
    monkeypatch.setattr(eval_models, "load_pretrained", never("the model was loaded"))
    for argv in (
        ["hf", "convert", "--model", str(bad), "--out", str(home / "out")],
        finetune_argv(bad, corpus, home / "out", "--steps", "1"),
        ["eval", "passkey", "--model", f"a=hf:{bad}", "--lengths", "64", "--out", str(home / "e")],
    ):
        line = refused(argv, capsys, f"{bad}: config.json has", home)
        assert says in line, line
    landmark = edited_config(lm_folder, home / "bad-lm", **changes)
    monkeypatch.setattr(hf_cli, "load_pretrained", never("the model was loaded"))
    argv = ["hf", "generate", "--model", str(landmark), "--prompt", "hi", "--max-new-tokens", "1"]
    assert says in refused(argv, capsys, f"--model {landmark}: config.json has", home)


def test_config_validation_errors_of_transformers_are_one_line(home):
    """What transformers' config validation raises (not a ValueError) reads as a loading error naming
    the folder."""
    import transformers

    from landmark.hf.checks import loading

    says = r"^--model m: cannot load the model: The hidden size \(64\) is not a multiple"
    with pytest.raises(ValueError, match=says), loading("m", "--model"):
        transformers.LlamaConfig(hidden_size=64, num_attention_heads=7)


def test_a_damaged_tokenizer_json_is_named_before_loading(tiny, home, capsys, monkeypatch):
    """tokenizer.json cut short: `hf convert` loaded the weights first and then said only "Expecting ','
    delimiter"; refused at once, naming the file."""
    bad = home / "bad"
    shutil.copytree(tiny[0], bad)
    (bad / "tokenizer.json").write_text('{"version":"1.0","truncation":null', encoding="utf-8")
    monkeypatch.setattr(hf_cli, "require", never("transformers was imported"))
    argv = ["hf", "convert", "--model", str(bad), "--out", str(home / "out")]
    assert "tokenizer.json is not valid JSON" in refused(argv, capsys, f"--model {bad}", home)


def test_export_delta_refuses_a_recorded_base_that_is_not_a_path(lm_folder, home, capsys, monkeypatch):
    """landmark-finetune.json with "model": 12345 ended in a TypeError traceback: one line naming the file
    and the field."""
    run = fake_run(lm_folder, home, json.dumps({"config": {"model": 12345}}))
    monkeypatch.setattr(hf_cli, "export_delta", never("the export began"))
    argv = ["hf", "export-delta", "--run", str(run), "--out", str(home / "e")]
    line = refused(argv, capsys, f"--run {run}: landmark-finetune.json has config.model = 12345", home)
    assert "--base" in line


def test_base_check_refuses_a_model_without_landmarks(tiny, home, capsys, monkeypatch):
    """`eval base-check --model v=hf:<a plain model>` ran the whole check: refused before any model is
    loaded (the check compares a landmark model with its base)."""
    from landmark.eval import cli as eval_cli

    monkeypatch.setattr(eval_cli, "load_hf", never("a model was loaded"))
    argv = ["eval", "base-check", "--model", f"v=hf:{tiny[0]}", "--base", f"hf:{tiny[0]}", "--windows", "1",
            "--window-len", "64", "--out", str(home / "out")]  # fmt: skip
    refused(argv, capsys, "--model v is not a landmark model (or delta)", home)


def tiny_delta(folder: Path, targets: list[str]) -> Path:
    """A delta folder whose tensors hold LoRA (r 2) for q_proj and up_proj of one layer, with ``targets``
    recorded in its delta.json."""
    folder.mkdir()
    tensors = {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = torch.zeros(2, 64), torch.zeros(64, 2)
    tensors["model.embed_tokens.weight.landmark_row"] = torch.zeros(64)
    save_file(tensors, folder / "delta.safetensors")
    meta = {"format": "landmark-lora-delta", "version": 1, "base": {"name": "model", "fingerprint": "f"},
            "landmark": {"token": "<landmark>", "token_id": 320, "block_size": 8},
            "lora": {"r": 2, "alpha": 4, "scaling": 2.0, "targets": targets}}  # fmt: skip
    (folder / "delta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def test_a_delta_whose_targets_are_not_its_tensors_is_refused(home, capsys, monkeypatch):
    """delta.json's lora.targets edited to ["q_proj"] over tensors for more projections was accepted
    (every module applied): the targets must be the module kinds the tensors hold, else one line naming
    delta.json, before the base is looked for."""
    from landmark.hf import delta as delta_module

    good = tiny_delta(home / "good", ["q_proj", "up_proj"])
    assert delta_module.read_meta(good)["lora"]["targets"] == ["q_proj", "up_proj"]
    monkeypatch.setattr(delta_module, "resolve_base", never("the base was looked for"))
    for name, targets in (
        ("fewer", ["q_proj"]),
        ("more", ["q_proj", "up_proj", "v_proj"]),
        ("text", "q_proj"),
    ):
        folder = tiny_delta(home / name, targets)
        with pytest.raises(ValueError, match=r"delta\.json records lora\.targets"):
            lhf.load_pretrained(folder)
        argv = ["hf", "generate", "--model", str(folder), "--prompt", "hi"]
        line = refused(argv, capsys, "delta.json records lora.targets", home)
        assert "['q_proj', 'up_proj']" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [("k=-3", "k=-3 must be an integer >= 1"), ("chunk_len=0", "chunk_len=0"),
     ("granularity=row", "granularity=row must be one of"), ("kk=4", "unknown arguments ['kk']")],
)  # fmt: skip
def test_lm_eval_model_args_are_checked_before_lm_eval_starts(
    lm_folder, home, capsys, monkeypatch, args, says
):
    """`eval lm-eval --model landmark --model_args pretrained=...,k=-3` was refused only after lm_eval had
    built its tasks (about 20 s): the values are checked with the folder, before lm_eval is run."""
    from landmark.eval import ruler

    pytest.importorskip("lm_eval")
    monkeypatch.setattr(ruler, "_harness", never("lm_eval was started"))
    argv = ["eval", "lm-eval", "--model", "landmark", "--model_args", f"pretrained={lm_folder},{args}",
            "--tasks", "niah_single_1"]  # fmt: skip
    refused(argv, capsys, says, home)
    ruler.check_lm_eval_model(["--model", "landmark", "--model_args", f"pretrained={lm_folder},k=4"])


def test_hf_generate_names_a_file_given_as_the_model_folder(capsys):
    """`hf generate --model FOLDER/delta.json` said the folder does not exist."""
    from landmark.cli import main

    model = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-landmark" / "delta.json"
    assert main(["hf", "generate", "--model", str(model), "--prompt", "hi"]) == 2
    assert f"--model {model}: is a file, not a folder" in capsys.readouterr().err


def test_a_model_folder_whose_weights_lack_tensors_is_refused(tmp_path):
    """A converted model whose model.safetensors lost a tensor (or holds an int8 model's q/scale
    tensors, saved after compact_weights) ran on weights transformers initialised at random."""
    from hf_helpers import converted
    from safetensors.torch import load_file, save_file

    import landmark.hf as lhf
    from landmark.inference.weights import compact_weights

    model, tok = converted()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    lhf.load_pretrained(folder)  # intact: loads
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"its weights do not match its config\.json: 1 missing "
                                         r"\(model\.layers\.0\.self_attn\.q_proj\.weight\)"):  # fmt: skip
        lhf.load_pretrained(folder)
    compact_weights(model).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"missing .* unexpected"):
        lhf.load_pretrained(folder)


def test_distill_from_a_checkpoint_of_landmark_train_is_refused_before_loading(tiny, home, capsys):
    """`--distill` of a `landmark train` checkpoint (not a Hugging Face folder) was refused after loading
    the model and cutting the windows, naming no option, with a staging folder left."""
    model, corpus = tiny
    small = Path(__file__).resolve().parents[1] / "checkpoints" / "passkey-landmark"
    argv = finetune_argv(model, corpus, home / "out", "--distill", str(small))
    line = refused(argv, capsys, "--distill", home, model)
    assert line == f"error: --distill {small}: config.json has no model_type: not a Hugging Face model folder"


# ---- outputs that cannot be made, refusals after loading, messages --------------------------------------


@pytest.fixture
def loop(home) -> Path:
    """A symbolic link loop (a -> b -> a)."""
    (home / "b").symlink_to(home / "a")
    (home / "a").symlink_to(home / "b")
    return home / "a"


@pytest.mark.parametrize("where", ["loop", "beneath a file", "/proc"])
@pytest.mark.parametrize("command", ["convert", "finetune", "export-delta"])
def test_an_out_that_cannot_be_made_is_refused_before_loading(
    command, where, tiny, lm_folder, home, loop, capsys, monkeypatch
):
    """--out a symbolic link loop crashed with RuntimeError; --out beneath a file or in /proc was said
    after the model loaded, naming a staging folder, not --out. One line naming --out, at once."""
    (home / "file").write_text("x")
    out = {"loop": loop, "beneath a file": home / "file" / "sub", "/proc": Path("/proc/landmark-nope/x")}[
        where
    ]
    monkeypatch.setattr("landmark.hf.checks.load_causal_lm", never("a model was loaded"))
    model, corpus = tiny
    argv = {
        "convert": ["hf", "convert", "--model", str(model), "--out", str(out)],
        "finetune": finetune_argv(model, corpus, out),
        "export-delta": [
            "hf",
            "export-delta",
            "--run",
            str(fake_run(lm_folder, home, "{}")),
            "--out",
            str(out),
        ],
    }[command]
    refused(argv, capsys, f"--out {out}", model)


def test_a_refused_finetune_leaves_no_staging_folder(tiny, home, capsys):
    """A corpus of two words is refused once the model is loaded (its token stream is shorter than a
    window): the staging folder made for the run, with its settings file, was left behind."""
    model, _ = tiny
    corpus = home / "words"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello")
    (corpus / "b.txt").write_text("world")
    assert main(finetune_argv(model, corpus, home / "ft")) == 2
    err = capsys.readouterr().err
    assert "shorter than one window" in err and f"--corpus {corpus}: its train split" in err
    assert "--max-length" in err
    assert not [p.name for p in home.iterdir() if p.name.startswith(".ft")]


def test_passkey_windows_are_checked_before_the_model_loads(tiny, home, capsys, monkeypatch):
    """--passkey-fraction 1 with windows too short for a passkey sample: said after loading the model;
    now from the tokenizer alone."""
    model, corpus = tiny
    monkeypatch.setattr(finetune_module, "load_for_finetune", never("the model was loaded"))
    argv = finetune_argv(model, corpus, home / "ft", "--passkey-fraction", "1")
    refused(argv, capsys, "--max-length", model)


def test_an_interrupted_conversion_leaves_nothing(tiny, home, monkeypatch, capsys):
    """Ctrl-C while `hf convert` wrote its 538 MB left a hidden staging folder (a conversion has nothing
    to resume)."""
    from transformers import PreTrainedTokenizerBase

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    argv = ["hf", "convert", "--model", str(tiny[0]), "--out", str(home / "cv"), "--block-size", "8"]
    assert main(argv) == 130
    assert [p.name for p in home.iterdir() if "cv" in p.name] == []


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
        ({"attention_dropout": 0.1}, "attention_dropout 0.1"),
        ({"max_position_embeddings": 0}, "max_position_embeddings 0"),
        ({"vocab_size": 7}, "gives vocab_size 7"),  # (transformers printed a load report, then failed)
    ],
)
def test_convert_refuses_what_retrieval_cannot_read_before_loading(
    tiny, home, capsys, monkeypatch, edit, says
):
    """A RoPE-scaled model was converted (and failed only when generating); attention dropout was
    refused after loading; max_position_embeddings 0 blamed --block-size: from config.json, at once."""
    model = home / "m"
    shutil.copytree(tiny[0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **edit}))
    monkeypatch.setattr("landmark.hf.checks.load_causal_lm", never("the model was loaded"))
    line = refused(["hf", "convert", "--model", str(model), "--out", str(home / "cv")], capsys, "--model")
    assert says in line


@pytest.mark.parametrize(("meta", "says"), [("[1, 2]", "not an object"), ('{"base": null}', "format")])
def test_a_damaged_delta_json_is_said_in_words(lm_folder, home, capsys, meta, says):
    """delta.json holding a list, or "base": null, leaked Python's AttributeError/TypeError text."""
    delta = home / "delta"
    shutil.copytree(REPO / "checkpoints" / "smollm2-landmark", delta)
    (delta / "delta.json").write_text(meta)
    line = refused(["hf", "generate", "--model", str(delta), "--prompt", "hi"], capsys, "delta.json")
    assert says in line and "object has no attribute" not in line and "subscriptable" not in line


def test_base_null_in_an_otherwise_valid_delta_json_is_named(home):
    from landmark.hf.delta import read_meta

    delta = home / "delta"
    shutil.copytree(REPO / "checkpoints" / "smollm2-landmark", delta)
    meta = json.loads((delta / "delta.json").read_text())
    (delta / "delta.json").write_text(json.dumps({**meta, "base": None}))
    with pytest.raises(ValueError, match=r"base = null is not a JSON object"):
        read_meta(delta)


def test_a_finished_resume_with_no_logged_loss_writes_no_nan(home):
    """--resume --steps <done> of a run that logged no loss wrote "train_loss": NaN (not JSON)."""
    checkpoint = home / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))

    class Trainer:
        state = type("State", (), {"global_step": 0})()

        def _load_from_checkpoint(self, folder):
            self.loaded = folder

    trainer = Trainer()
    assert finetune_module._finish_at(trainer, checkpoint) is None
    assert trainer.state.global_step == 5


@pytest.mark.parametrize("cut", ["optimizer.pt", "model.safetensors", None])
def test_a_checkpoint_with_a_truncated_file_is_not_resumed_from(home, cut):
    """A truncated optimizer.pt in the newest checkpoint: --resume failed with "Invalid argument (EINVAL)"
    naming nothing. Such a checkpoint counts as incomplete (the one before it is resumed, with a note)."""
    from landmark.hf.finetune import checkpoint_problem

    checkpoint = home / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_file({"w": torch.zeros(64)}, str(checkpoint / "model.safetensors"))
    torch.save({"state": torch.zeros(64)}, checkpoint / "optimizer.pt")
    if cut is not None:
        data = (checkpoint / cut).read_bytes()
        (checkpoint / cut).write_bytes(data[: len(data) // 2])
    problem = checkpoint_problem(checkpoint)
    assert problem == (None if cut is None else f"a damaged {cut} (cut short?)")


def test_prepare_smollm2_without_out_names_the_default_folder(home):
    """No ``--out`` given: a foreign default folder is named as such (the message spoke of an --out the
    user never gave)."""
    folder = smollm2.default_smollm2_dir()
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^the default folder \(--out not given\) .* holds no prepared"):
        smollm2.check_destination(None)
