"""``landmark eval base-check``: chat answers, training-text leaks and next-token KL to the base model,
on tiny random Llamas (nothing downloaded)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from argv_helpers import last_wins

pytest.importorskip("transformers")

from hf_helpers import write_tiny

from landmark.cli import main
from landmark.data.landmarks import insert_landmarks
from landmark.data.passkey import FILLER, INSTRUCTION
from landmark.data.wordings import FAMILIES, PAPER, is_held_out
from landmark.eval import base_check
from landmark.eval.models import Reading, load_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import landmark.hf as lhf

    root = tmp_path_factory.mktemp("base-check")
    base, corpus = write_tiny(root)
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    model, tok = lhf.convert(model, tok, block_size=8)
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return {"base": base, "lm": root / "lm", "corpus": corpus, "root": root}


def test_training_text_finds_training_sentences_and_nothing_else():
    markers = base_check.training_markers()
    assert base_check.training_text("The pass key is 48213. Remember it.", markers)
    assert base_check.training_text("Sure! The grass is green. The grass is yellow.", markers)
    assert base_check.training_text(PAPER.question_text("Priya"), markers)
    assert base_check.training_text(INSTRUCTION.upper(), markers)  # case does not hide it
    trained = [w for i, w in enumerate(FAMILIES) if not is_held_out(i)]
    assert all(base_check.training_text(w.question_text(), markers) for w in trained)
    keys = [w.name for w in trained if base_check.training_text(w.key_text("12345"), markers)]
    assert len(keys) >= len(trained) - 1  # a key sentence as short as "- order id: X" is too common
    for answer in ("The capital of France is Paris.", "7 plus 5 is 12.", "Bees make honey."):
        assert base_check.training_text(answer, markers) == []
    assert all(FILLER.split(".")[0].lower() not in m or "grass" in m for m in markers)


def test_a_model_has_zero_divergence_from_itself(folders):
    base = load_hf("base", str(folders["base"]))
    window = torch.randint(0, 300, (1, 40))
    out = base_check.window_divergence(base, base, window, Reading())
    assert out["positions"] == 39
    assert abs(out["kl"]) < 1e-4
    assert out["nll"] == pytest.approx(out["nll_base"], rel=1e-5)


def test_divergence_of_a_landmark_model_matches_a_direct_computation(folders):
    """With k covering every block, retrieval is exact landmark attention: the KL and loss from the
    chunked reading equal those of one forward over the stream with its landmarks."""
    base, lm = load_hf("base", str(folders["base"])), load_hf("lm", str(folders["lm"]))
    torch.manual_seed(1)
    window = torch.randint(0, 300, (1, 45))
    got = base_check.window_divergence(lm, base, window, Reading(k=64, chunk_len=16))
    stream = insert_landmarks(window, lm.block_size, lm.landmark_id)
    with torch.no_grad():
        logits = lm.model(input_ids=stream).logits[0]
        base_logp = torch.log_softmax(base.model(input_ids=window).logits[0].float(), -1)
    vocab = base_logp.shape[-1]
    lm_logp = torch.log_softmax(logits[stream[0] != lm.landmark_id][:, :vocab].float(), -1)[:44]
    kl = float((base_logp[:44].exp() * (base_logp[:44] - lm_logp)).sum())
    nll = -float(lm_logp.gather(1, window[0, 1:, None]).sum())
    assert got["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-4)
    assert got["kl"] > 0.01  # the converted, untrained model is not its base
    assert got["nll"] == pytest.approx(nll, rel=1e-4)


def test_cli_writes_the_report_and_resumes_from_its_cells(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base_check, "CHAT_PROMPTS", base_check.CHAT_PROMPTS[:2])
    out = tmp_path / "out"
    argv = ["eval", "base-check", "--model", f"lm=hf:{folders['lm']}", "--base", str(folders["base"]),
            "--corpus", str(folders["corpus"]), "--windows", "2", "--window-len", "64", "--k", "2",
            "--chunk-len", "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "base_check.json").read_text())
    assert [r["model"] for r in report["chat"]] == ["base", "base", "lm", "lm"]
    (prose,) = report["prose"]
    assert prose["model"] == "lm" and prose["tokens"] == 2 * 63 and prose["kl_per_token"] > 0
    assert "| lm | " in (out / "base_check.md").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(base_check, "chat_check", fail)
    monkeypatch.setattr(base_check, "prose_check", fail)
    assert main(argv) == 0
    assert json.loads((out / "base_check.json").read_text())["prose"] == report["prose"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--windows", "0"], "--windows"),
        (["--window-len", "100000"], "--window-len"),
        (["--base", "{lm}"], "--base"),
        (["--k", "0"], "--k"),
        (["--model", "x=/nowhere"], "--model"),
    ],
)
def test_cli_refuses_bad_arguments(folders, tmp_path, monkeypatch, capsys, extra, says):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "base-check", "--model", f"lm=hf:{folders['lm']}", "--base", str(folders["base"]),
            "--corpus", str(folders["corpus"]), "--out", str(tmp_path / "out")]  # fmt: skip
    argv = last_wins(argv + [a.format(lm=folders["lm"]) for a in extra])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_judge_marks_right_answers_and_leaks():
    q = "At what temperature in Celsius does water freeze?"
    rows = [{"model": "m", "question": q, "answer": a} for a in ("It freezes at 0 °C.", "At -18.0°C.",
            "At 0 degrees. The pass key is 12345. Remember it.")]  # fmt: skip
    judged = base_check.judge(rows)
    assert [r["right"] for r in judged] == [True, False, True]
    assert [bool(r["leaks"]) for r in judged] == [False, False, True]
