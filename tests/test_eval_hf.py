"""`landmark eval` on Hugging Face models (``--model NAME=hf:FOLDER``), with tiny random Llamas.

A converted tiny model (kind ``hf-landmark``: retrieval) and the unconverted one (kind ``hf``: its own
attention) go through the same evaluation code as the library's GPT; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from argv_helpers import last_wins

pytest.importorskip("transformers")

from hf_helpers import BS, benchmark_module, converted, make_model, make_tokenizer, write_tiny

from landmark.cli import main
from landmark.data.passkey import PasskeyPrompts, first_integer
from landmark.eval import cli as eval_cli
from landmark.eval.models import HFUnderTest, Reading, load_models
from landmark.eval.passkey import PasskeyTask, cell_trials, teacher_forced_correct

pytestmark = pytest.mark.usefixtures("one_thread")
PASSKEY = ["eval", "passkey", "--lengths", "200", "--depths", "0", "1", "--trials", "2", "--chunk-len", "16"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama unconverted (``base``), converted (``lm``) and a small corpus (``corpus``)."""
    root = tmp_path_factory.mktemp("eval-hf")
    base, corpus = write_tiny(root)
    model, tok = converted()
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return {"base": base, "lm": root / "lm", "corpus": corpus, "root": root}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_eval_passkey_runs_both_hf_kinds_and_reads_its_cache(folders, tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "pk"
    args = [
        *PASSKEY,
        "--model",
        f"a=hf:{folders['lm']}",
        "--model",
        f"b=hf:{folders['base']}",
        "--out",
        str(out),
    ]
    args = last_wins(args)
    assert main(args) == 0
    results = json.loads((out / "passkey.json").read_text())["results"]
    assert [(r["model"], r["kind"]) for r in results] == [("a", "hf-landmark")] * 2 + [("b", "hf")] * 2
    assert all(r["trials"] == 2 and 0 <= r["accuracy"] <= 1 for r in results)
    assert all(len(r["answers"]) == 2 for r in results[:2]) and results[2]["answers"] is None
    table = (out / "passkey.md").read_text()
    assert "| a (hf-landmark) | 200 |" in table and "| b (hf) | 200 |" in table
    assert (out / "passkey.png").stat().st_size > 1000
    cells = [json.loads(p.read_text())["key"] for p in (out / "cells").glob("*.json")]
    assert len(cells) == 4 and all(len(c["weights"]) == 16 for c in cells)
    assert {c["kind"] for c in cells} == {"hf", "hf-landmark"}
    # a second run reads every cell from the cache: no model is run
    monkeypatch.setattr(HFUnderTest, "generate", lambda *a, **k: pytest.fail("generated a cached cell"))
    monkeypatch.setattr(HFUnderTest, "tail_logits", lambda *a, **k: pytest.fail("scored a cached cell"))
    assert main(args) == 0
    again = json.loads((out / "passkey.json").read_text())["results"]
    assert [r["correct"] for r in again] == [r["correct"] for r in results]
    # another task is another cell: never read from the paper task's cache
    monkeypatch.undo()
    monkeypatch.setenv("LANDMARK_CACHE", str(cache_dir))
    multikey = last_wins([*args, "--task", "multikey", "--keys", "2", "--lengths", "300", "--depths", "0"])
    assert main(multikey) == 0
    assert len(list((out / "cells").glob("*.json"))) == 6
    books = last_wins([*args, "--haystack", "books", "--corpus", str(folders["corpus"]), "--depths", "0"])
    assert main(books) == 0
    assert len(list((out / "cells").glob("*.json"))) == 8


def test_eval_ppl_of_hf_models(folders, tmp_path, cache_dir):
    out = tmp_path / "ppl"
    args = ["eval", "ppl", "--model", f"a=hf:{folders['lm']}", "--model", f"b=hf:{folders['base']}",
            "--corpus", str(folders["corpus"]), "--lengths", "32", "64", "--max-tokens", "128",
            "--k", "1", "4", "--chunk-len", "16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "perplexity.json").read_text())["results"]
    labels = {r["setting"] for r in results}
    assert labels == {"a (hf-landmark, k=1, token_head)", "a (hf-landmark, k=4, token_head)", "b (hf)"}
    assert all(r["ppl"] > 1 and r["tokens"] == r["windows"] * (r["length"] - 1) for r in results)


def _hand_nll(logits: torch.Tensor, window: torch.Tensor, landmarks: bool) -> float:
    """-sum log p(window[t + 1]) from the logits of one whole-window forward: with landmarks, token t sits
    at stream position t + t // (BS - 1)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    at = [t + t // (BS - 1) if landmarks else t for t in range(len(window) - 1)]
    return -sum(float(logp[p, window[t + 1]]) for t, p in enumerate(at))


@pytest.mark.parametrize("chunk_len", [8, 16, 40])
def test_hf_landmark_window_nll_equals_the_whole_window_forward(chunk_len):
    """Chunked reading through a LandmarkRetrievalCache with k covering every block scores every window
    as one forward over the window with its landmarks (landmark positions not scored)."""
    from landmark.data import insert_landmarks

    model, tok = converted()
    m = HFUnderTest("lm", "", model, tok)
    g = torch.Generator().manual_seed(4)
    windows = torch.randint(0, model.config.landmark_token_id, (2, 61), generator=g)
    sums, counts = m.window_nll(windows, Reading(k=64, chunk_len=chunk_len))
    assert counts.tolist() == [60, 60]
    with torch.no_grad():
        for w, got in zip(windows, sums.tolist()):
            logits = model(insert_landmarks(w, BS, model.config.landmark_token_id)[None]).logits[0]
            assert got == pytest.approx(_hand_nll(logits, w, landmarks=True), rel=1e-5)
    few, _ = m.window_nll(windows, Reading(k=1, chunk_len=chunk_len))
    assert (few - sums).abs().max() > 1e-3  # k = 1 reads less: another NLL


def test_hf_base_window_nll_equals_one_forward():
    tok = make_tokenizer()
    model = make_model(vocab=len(tok))
    m = HFUnderTest("base", "", model, tok)
    windows = torch.randint(0, len(tok), (2, 50), generator=torch.Generator().manual_seed(5))
    sums, counts = m.window_nll(windows, Reading(chunk_len=16))
    assert counts.tolist() == [49, 49]
    with torch.no_grad():
        for w, got in zip(windows, sums.tolist()):
            assert got == pytest.approx(_hand_nll(model(w[None]).logits[0], w, landmarks=False), rel=1e-5)


def _tiny_gpt(attention: str = "full"):
    from landmark.data import Tokenizer
    from landmark.eval.models import GPTUnderTest
    from landmark.model import GPT, ModelConfig

    tok = Tokenizer.train(["The pass key is 12345. What is it? 0123456789 " * 30], 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, seq_len=64,
                      block_size=16, attention=attention, landmark_id=-1)  # fmt: skip
    return GPTUnderTest("gpt", "", GPT(cfg).eval(), tok)


@pytest.mark.parametrize("family", ["hf", "gpt"])
def test_tail_logits_predict_what_greedy_decoding_generates(family):
    """The teacher-forced pass over prompt + the greedy tokens predicts, at each of their positions, the
    token greedy decoding (one full forward per step) generated there: both families."""
    if family == "hf":
        tok = make_tokenizer()
        m = HFUnderTest("base", "", make_model(vocab=len(tok)), tok)
    else:
        m = _tiny_gpt()
    vocab = m.model.get_input_embeddings().weight.shape[0] if family == "hf" else m.tokenizer.vocab_size
    prompt = torch.randint(0, vocab, (37,), generator=torch.Generator().manual_seed(6)).tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(m.model(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy = seq[len(prompt) :]
    assert m.tail_logits(prompt + greedy[:-1], len(greedy)).argmax(-1).tolist() == greedy


class Oracle(HFUnderTest):
    """A "model" that answers ``said`` after ``prompt`` (then the eos token), whatever it reads."""

    def __init__(self, tok, prompt: list[int], said: list[int]):
        super().__init__("oracle", "", make_model(vocab=len(tok)), tok)
        self.prompt, self.said = prompt, said

    def next_token(self, prefix: list[int]) -> int:
        i = len(prefix) - len(self.prompt)
        on_track = prefix[: len(self.prompt)] == self.prompt and prefix[len(self.prompt) :] == self.said[:i]
        return self.said[i] if on_track and i < len(self.said) else self.tokenizer.eos_token_id

    def tail_logits(self, ids: list[int], count: int) -> torch.Tensor:
        logits = torch.zeros(count, len(self.tokenizer))
        for j in range(count):
            logits[j, self.next_token(ids[: len(ids) - count + j + 1])] = 1.0
        return logits

    def generate(self, prompts, max_new_tokens, reading):
        out = []
        for p in prompts:
            new = []
            for _ in range(max_new_tokens):
                new.append(self.next_token(list(p) + new))
            out.append(new)
        return out


@pytest.mark.parametrize(
    "said", [" 48213.", " 48213", " 48214.", " 4821.", " 482139.", " 48213 and 5", " no."]
)
def test_teacher_forced_scoring_agrees_with_greedy_generation(said):
    """For answers we control, teacher-forced scoring says "correct" exactly when the first integer of
    the greedy generation is the key."""
    tok = make_tokenizer()
    prompts = PasskeyPrompts(HFUnderTest("t", "", None, tok).encoder)
    prompt = prompts.prompt(200, 0.5, 48213)
    m = Oracle(tok, prompt, prompts.tokenizer.encode(said))
    greedy = m.generate([prompt], 8, Reading())[0]
    expected = first_integer(m.decode(greedy)) == 48213
    assert teacher_forced_correct(m, prompts, prompt, 48213) == expected
    assert expected == (said in (" 48213.", " 48213", " 48213 and 5"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "x=hf:{root}/missing"], "--model x"),
        (["--model", "x=hf:{corpus}"], "--model x"),
        (["--keys", "0", "--task", "multikey"], "--keys"),
        (["--task", "multikey", "--keys", "1"], "--keys"),
        (["--keys", "3"], "--keys"),
        (["--haystack", "books", "--corpus", "{root}/missing"], "--corpus"),
        (["--corpus", "{corpus}"], "--corpus"),
        (["--lengths", "100"], "--lengths"),
        (["--task", "multikey", "--keys", "4", "--lengths", "300"], "--lengths"),
        (["--haystack", "unknown"], "argument --haystack"),
        (["--task", "needles"], "argument --task"),
    ],
)
def test_eval_passkey_hf_refuses(folders, tmp_path, cache_dir, capsys, extra, message):
    extra = [a.format(root=folders["root"], corpus=folders["corpus"]) for a in extra]
    argv = last_wins([*PASSKEY, "--model", f"a=hf:{folders['lm']}", "--out", str(tmp_path / "out"), *extra])
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    if "argument " not in errors[0]:  # ours, not argparse's: one line and nothing else
        assert err.strip().splitlines() == [errors[0]] and errors[0].startswith("error: "), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_eval_ppl_hf_refuses_prepared_data(folders, tmp_path, cache_dir, capsys):
    argv = [
        "eval",
        "ppl",
        "--model",
        f"a=hf:{folders['lm']}",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path.with_name(f"{tmp_path.name}-out")),  # (not inside --data: refused first)
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --data is a folder prepared for this library's")


def test_retrieval_trace_answers_as_eval_passkey_does(folders, tmp_path, cache_dir, monkeypatch):
    """benchmarks/retrieval_trace.py reads the prompts in the evaluation's chunks (the trace must not
    change what is local and what is retrieved): the same answers as ``landmark eval passkey``; with k at
    least the number of blocks every selection holds the asked key's block once it is in memory."""
    trace = benchmark_module("retrieval_trace")
    common = [
        "--depths",
        "0",
        "0.5",
        "--trials",
        "2",
        "--chunk-len",
        "16",
        "--task",
        "multikey",
        "--keys",
        "3",
    ]
    runs = {}
    for k in ("2", "64"):
        out = tmp_path / f"trace-k{k}.json"
        argv = ["retrieval_trace.py", "--model", str(folders["lm"]), "--length", "400", "--k", k, *common]
        monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
        trace.main()
        record = json.loads(out.read_text())
        runs[k] = record["trials"]
        assert Reading(**record["reading"]) == Reading(k=int(k), chunk_len=16)  # the options reached it
    evaluated = tmp_path / "pk"
    args = ["eval", "passkey", "--lengths", "400", "--k", "2", *common, "--model", f"a=hf:{folders['lm']}"]
    assert main([*args, "--out", str(evaluated)]) == 0
    results = json.loads((evaluated / "passkey.json").read_text())["results"]
    assert [r["answer"] for r in runs["2"]] == [a for r in results for a in r["answers"]]
    # and the same generated text as the evaluation's reading (a random model's answers hold no number)
    (m,) = load_models([f"a=hf:{folders['lm']}"])
    task = PasskeyTask("multikey", keys=3)
    prompts = PasskeyPrompts(m.encoder)
    trials = [t for d in (0.0, 0.5) for t in cell_trials(prompts, task, 0, 400, d, 2)]
    new = len(prompts.answer(trials[0][1])) + 2
    texts = [
        m.decode(o)
        for o in m.generate([p for p, _ in trials], new, Reading(k=2, granularity="token_head", chunk_len=16))
    ]
    assert [r["text"] for r in runs["2"]] == texts
    for row in runs["2"] + runs["64"]:
        assert row["asked_blocks"] and len(row["asked_share"]) == row["answer_steps"] >= 1
        assert all(0.0 <= x <= 1.0 for x in row["asked_share"] + row["other_share"])
        assert len(row["keys_by_name"]) == 3 and row["keys_by_name"][row["asked_name"]] == row["key"]
    early = [row for row in runs["64"] if row["depth"] == 0.0]
    assert early and all(x == 1.0 for row in early for x in row["asked_share"])
    assert any(x < 1.0 for row in runs["2"] for x in row["asked_share"])  # k = 2 of ~57 blocks: a choice
    png = tmp_path / "by-layer.png"
    traces = [str(tmp_path / "trace-k2.json"), str(tmp_path / "trace-k64.json")]
    monkeypatch.setattr(sys, "argv", ["retrieval_trace.py", "--plot", *traces, "--png", str(png)])
    trace.main()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_cells_follow_the_landmark_block_size(folders, tmp_path, cache_dir):
    """The block size a landmark model reads with is in its config.json (a delta's in delta.json), not in
    its weights: edited, the passkey and perplexity cells of the earlier size were reused. Every cell key
    of a landmark model holds its block size and landmark id; a plain model's keys do not change."""
    import shutil

    lm = tmp_path / "lm"
    shutil.copytree(folders["lm"], lm)
    passkey = [*PASSKEY[:4], "--depths", "0", "--trials", "1", "--chunk-len", "16", "--model", f"a=hf:{lm}"]
    ppl = ["eval", "ppl", "--model", f"a=hf:{lm}", "--corpus", str(folders["corpus"]), "--lengths", "64",
           "--max-tokens", "64", "--k", "1", "--chunk-len", "16"]  # fmt: skip
    runs = [([*passkey, "--out", str(tmp_path / "pk")], tmp_path / "pk"),
            ([*ppl, "--out", str(tmp_path / "ppl")], tmp_path / "ppl")]  # fmt: skip
    for argv, _ in runs:
        assert main(argv) == 0
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "landmark_block_size": 16}), encoding="utf-8")
    for argv, out in runs:
        assert main(argv) == 0
        keys = [json.loads(p.read_text())["key"] for p in (out / "cells").glob("*.json")]
        assert sorted(k["landmark"]["block_size"] for k in keys) == [BS, 16], out
        assert {k["landmark"]["token_id"] for k in keys} == {config["landmark_token_id"]}
    (m,) = load_models([f"b=hf:{folders['base']}"])
    assert m.landmark_key() == {}


def test_retrieval_options_for_plain_models_are_refused_before_loading(
    folders, tmp_path, cache_dir, capsys, monkeypatch
):
    """``--k 2`` with only Hugging Face models without landmarks: refused from their config.json, before
    transformers loads them (5 s later before)."""
    monkeypatch.setattr(eval_cli, "load_models", lambda *a, **k: pytest.fail("loaded the models"))
    argv = [*PASSKEY, "--model", f"b=hf:{folders['base']}", "--out", str(tmp_path / "out"), "--k", "2"]
    assert main(argv) == 2
    assert "--k is a retrieval option, and no --model here reads with retrieval" in capsys.readouterr().err
