"""Wordings of the passkey task: the families and their split, the value kinds' matchers, prompts in
every family, training samplers that never use a held-out family, and ``eval passkey --wording``."""

from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from argv_helpers import last_wins

from landmark.data import Tokenizer
from landmark.data import wordings as W
from landmark.data.passkey import (
    KEY_SENTENCE,
    NAMED_KEY_SENTENCE,
    NAMED_QUESTION,
    QUESTION,
    Needle,
    PasskeyPrompts,
    multikey_needles,
)
from landmark.eval.passkey import PasskeyTask, build_trials, cell_keys, cell_trials, trial_needles

HELD_OUT = [
    "account-email",
    "meeting-date",
    "ticket-record",
    "guest-name",
    "flight-date",
    "pilot-name",
    "favourite-thing",
    "captain-name",
]  # fmt: skip  (the split of the table as first shipped: appending families must never change it)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = " ".join(w.key + " " + w.question_text() for w in W.FAMILIES)
    return Tokenizer.train([text * 5, "0123456789 abcdef-ABCDEF " * 20], 400)


def test_at_least_twenty_key_and_question_phrasings():
    assert len({w.key for w in W.FAMILIES}) >= 20
    assert len({w.question_text() for w in W.FAMILIES}) >= 20
    assert len({w.name for w in W.FAMILIES} | {"paper"}) == len(W.FAMILIES) + 1  # names are unique
    for w in W.FAMILIES:  # every template states the value and names its owner in multikey prompts
        assert "{value}" in w.key and all(k in W.KINDS for k in w.kinds)
        assert "Priya" in w.key_text(1, "Priya") and "Priya" in w.question_text("Priya")
        assert "Priya" not in w.key_text(1) + w.question_text() and "{" not in w.key_text(1)


def test_train_and_held_out_families_are_disjoint_and_cover_every_kind():
    train, held = set(W.families("train")), set(W.families("held-out"))
    assert train and held and not train & held and train | held == set(W.FAMILIES)
    assert set(W.families("all")) == set(W.FAMILIES) and W.families("paper") == (W.PAPER,)
    for kind in W.KINDS:
        assert any(kind in w.kinds for w in train), kind
        assert any(kind in w.kinds for w in held), kind
    with pytest.raises(ValueError, match="wording set must be one of"):
        W.families("test")


def test_the_split_rule_is_by_index_and_stable_when_families_are_appended(monkeypatch):
    assert [w.name for w in W.families("held-out")] == HELD_OUT
    assert all(W.is_held_out(i) == (i % 3 == 2) for i in range(100))
    assert all(W.held_out(w.name) == W.is_held_out(i) for i, w in enumerate(W.FAMILIES))
    before = {w.name: w in W.families("held-out") for w in W.FAMILIES}
    extra = tuple(W.Wording(f"new-{i}", "x", ("word",), "X{of} is {value}.", "X{of}?", "") for i in range(7))
    monkeypatch.setattr(W, "FAMILIES", W.FAMILIES + extra)
    held = set(W.families("held-out"))
    assert {w.name: w in held for w in W.FAMILIES if w.name in before} == before


def test_the_paper_wording_gives_the_papers_prompts(tok):
    """The paper family's texts are the paper's constants, and wording "paper" composes a cell's trials
    exactly as before wordings existed (keys from cell_keys, the paper's sentences)."""
    assert W.PAPER.key_text(48213) == KEY_SENTENCE.format(key=48213)
    assert W.PAPER.key_text(48213, "Rosa") == NAMED_KEY_SENTENCE.format(key=48213, name="Rosa")
    assert W.PAPER.question_text() == QUESTION
    assert W.PAPER.question_text("Rosa") == NAMED_QUESTION.format(name="Rosa")
    prompts = PasskeyPrompts(tok)
    enc = tok.encode
    for task in (PasskeyTask(), PasskeyTask("multikey", keys=3)):
        for depth in (0.0, 0.5, 1.0):
            got = cell_trials(prompts, task, 5, 601, depth, 3)
            for t, key in enumerate(cell_keys(5, 601, depth, 3)):
                needles, ask = trial_needles(task, 5, 601, depth, t, key)
                filler = (prompts.filler * 100)[: 601 - prompts.needed(needles, ask)]
                assert got[t][1] == key and isinstance(key, int)
                assert tok.decode(got[t][0]).endswith(
                    QUESTION if ask is None else NAMED_QUESTION.format(name=ask)
                )
                sentences = [enc(" " + _paper_sentence(x)) for x in needles]
                assert len(got[t][0]) == 601 and all(_holds(got[t][0], s) for s in sentences)
                assert got[t][0][: len(prompts.instruction)] == prompts.instruction and filler
    assert PasskeyTask().cache_fields() is None
    assert set(PasskeyTask("multikey").cache_fields()) == {"task", "haystack", "keys", "corpus"}
    fields = PasskeyTask(wording="held-out").cache_fields()
    assert fields["wording"] == "held-out" and len(fields["families"]) == 16


def _paper_sentence(x: Needle) -> str:
    if x.name is None:
        return KEY_SENTENCE.format(key=x.key)
    return NAMED_KEY_SENTENCE.format(key=x.key, name=x.name)


def _holds(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


@pytest.mark.parametrize("index", range(len(W.FAMILIES)))
def test_prompts_have_the_asked_length_in_every_family_and_kind(tok, index):
    family = W.FAMILIES[index]
    prompts = PasskeyPrompts(tok).with_wording(family)
    rng = np.random.default_rng(index)
    for kind in family.kinds:
        value = W.KINDS[kind].draw(rng)
        assert tok.decode(tok.encode(f" {value}")) == f" {value}"
        for length in (prompts.needed([Needle(value, 0.0)]) + 1, 333, 777):
            for depth in (0.0, 1.0):
                ids, _ = prompts.compose(length, [Needle(value, depth)])
                text = tok.decode(ids)
                assert len(ids) == length and family.key_text(value) in text
                assert text.endswith(" " + family.question_text())
        needles, ask = multikey_needles(rng, value, 0.5, 3, W.KINDS[kind].draw)
        ids, _ = prompts.compose(901, needles, ask)
        text = tok.decode(ids)
        assert len(ids) == 901 and text.endswith(" " + family.question_text(ask))
        assert all(family.key_text(x.key, x.name) in text for x in needles)
        assert len({x.key for x in needles}) == 3 and len({x.name for x in needles}) == 3


@pytest.mark.parametrize(
    ("kind", "value", "answer", "right"),
    [
        ("number5", "48213", " 48213.", True),
        ("number5", "48213", " 48213 is the key", True),
        ("number5", "48213", " 482135.", False),
        ("number7", "4821391", " 4821391.", True),
        ("number7", "4821391", " 48213.", False),  # a 7-digit key cut to 5 digits
        ("number7", "4821391", " 482139.", False),
        ("number6", "100000", " 10000.", False),
        ("word", "lantern", " lantern.", True),
        ("word", "lantern", ' "Lantern"', True),
        ("word", "lantern", " lanterns.", False),
        ("word", "lantern", " the lantern.", False),
        ("word", "lantern", " lant", False),
        ("name", "Isolde", " isolde, of course", True),
        ("name", "Isolde", " Isold.", False),
        ("name", "Isolde", " Rosa Isolde", False),
        ("uuid", "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b", " 3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b.", True),
        ("uuid", "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b", " 3F2B8C1E-9A4D-4E6F-8B2A-1C3D5E7F9A0B", True),
        ("uuid", "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b", " 3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0c.", False),
        ("uuid", "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b", " 3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b7", False),
        ("uuid", "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b", " 3f2b8c1e-9a4d-4e6f-8b2a", False),
        ("date", "14 March 2031", " 14 March 2031.", True),
        ("date", "14 March 2031", " March 14th, 2031", True),
        ("date", "14 March 2031", " 14th of", False),
        ("date", "14 March 2031", " 14 March 2030.", False),
        ("date", "14 March 2031", " 14 March.", False),
        ("date", "14 March 2031", " 14 March 20315", False),
        ("date", "14 March 2031", " on 14 March 2031", False),  # not at the start
        ("date", "14 March 2031", " 4 March 2031", False),
    ],
)
def test_each_kind_matches_the_right_answer_and_rejects_near_misses(kind, value, answer, right):
    assert W.KINDS[kind].correct(answer, value) is right


def _fragments(w: W.Wording) -> list[str]:
    """The literal pieces of a family's templates, longest first (what marks a sentence as its)."""
    pieces = [*re.split(r"\{\w+\}", w.key), w.question.format(whose="the", Whose="The", of="")]
    return sorted((p.strip(" .,") for p in pieces if len(p.strip(" .,")) >= 12), key=len, reverse=True)


def test_the_training_sampler_never_emits_a_held_out_sentence(tok):
    train_text = " ".join(w.key + " " + w.question_text() for w in W.families("train"))
    marks = [_fragments(w)[0] for w in W.families("held-out")]
    assert all(m not in train_text for m in marks), marks  # each mark is the held-out family's own
    prompts = PasskeyPrompts(tok)
    questions = {w.name: w.question.split("{")[0].strip() for w in W.families("train")}
    seen = set()
    for seed in range(160):
        rng = np.random.default_rng(seed)
        if seed % 4 == 3:
            ids = prompts.training_window(rng, 900, 40, pairs=2, near=0.5, wordings="train")
        else:
            ids = prompts.training_sample(rng, 900, 40, keys=1 + seed % 3, wordings="train")
        text = tok.decode(ids)
        assert len(ids) == 900 and not [m for m in marks if m in text], text
        seen |= {name for name, q in questions.items() if q in text}
    assert len(seen) >= 12  # the training families are drawn, not the paper's alone
    assert "pass key" not in tok.decode(
        prompts.training_sample(np.random.default_rng(0), 900, 40, wordings="train")
    )
    paper = prompts.training_sample(np.random.default_rng(0), 900, 40)  # the default: the paper's
    assert "The pass key is" in tok.decode(paper)
    for bad in ("held-out", "all"):
        with pytest.raises(ValueError, match="training wordings must be one of paper, train"):
            prompts.training_sample(np.random.default_rng(0), 900, 40, wordings=bad)


def test_hf_mix_and_finetune_options_draw_training_wordings_only(tmp_path):
    pytest.importorskip("transformers")
    from hf_helpers import make_tokenizer

    from landmark.data.passkey import PasskeyMix
    from landmark.hf.finetune import FinetuneConfig
    from landmark.hf.passkey import PasskeyMixWindows

    tok = make_tokenizer()
    base = [{"input_ids": None}] * 40
    mix = PasskeyMixWindows(base, tok, 600, 8, PasskeyMix(1.0, multikey=0.5, wordings="train"), seed=1)
    marks = [_fragments(w)[0] for w in W.families("held-out")]
    texts = [tok.decode(mix[i]["input_ids"].tolist()) for i in range(40)]
    assert all(len(mix[i]["input_ids"]) == 600 for i in range(40))
    assert not [t for t in texts if any(m in t for m in marks)]
    assert sum("pass key" not in t for t in texts) >= 35
    with pytest.raises(ValueError, match="training wordings must be one of"):
        PasskeyMixWindows(base, tok, 600, 8, PasskeyMix(1.0, wordings="held-out"))
    with pytest.raises(ValueError, match="--passkey-wordings must be one of paper, train"):
        FinetuneConfig(
            str(tmp_path), str(tmp_path / "o"), passkey_fraction=0.5, passkey_wordings="all"
        ).check()
    with pytest.raises(ValueError, match="needs --passkey-fraction > 0"):
        FinetuneConfig(str(tmp_path), str(tmp_path / "o"), passkey_wordings="train").check()


def test_cell_trials_draw_families_of_the_set_seeded(tok):
    prompts = PasskeyPrompts(tok)
    for wording in ("train", "held-out", "all"):
        task = PasskeyTask("multikey", keys=3, wording=wording)
        trials = build_trials(prompts, task, 2, 700, 0.5, 12)
        assert trials == build_trials(prompts, task, 2, 700, 0.5, 12)
        names = {w.name for w in W.families(wording)}
        assert all(t.family in names and len(t.prompt) == 700 for t in trials)
        assert all(t.kind in dict((w.name, w.kinds) for w in W.FAMILIES)[t.family] for t in trials)
        assert len({t.family for t in trials}) >= 4


UUID = "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b"


@pytest.mark.parametrize(
    ("family", "kind", "value", "said", "right"),
    [
        ("password-word", "word", "lantern", " lantern.", True),
        ("password-word", "word", "lantern", " lantern's", True),
        ("password-word", "word", "lantern", " lanterns.", False),
        ("guest-name", "name", "Isolde", " Isolde, yes", True),
        ("guest-name", "name", "Isolde", " Isoldea.", False),
        ("order-list", "uuid", UUID, f" {UUID}.", True),
        ("order-list", "uuid", UUID, f" {UUID}7.", False),
        ("order-list", "uuid", UUID, f" {UUID[:-1]}c.", False),
        ("flight-date", "date", "14 March 2031", " 14 March 2031.", True),
        ("flight-date", "date", "14 March 2031", " 14 March 20315.", False),
        ("flight-date", "date", "14 March 2031", " 14 March 2030.", False),
        ("serial", "number7", "4821391", " 4821391 and", True),
        ("serial", "number7", "4821391", " 48213.", False),
        ("serial", "number7", "4821391", " 48213910.", False),
    ],
)
def test_teacher_forced_scoring_agrees_with_greedy_generation_for_every_kind(
    family, kind, value, said, right
):
    """Teacher-forced scoring (one pass over the answer's tokens and the one after) says "correct" exactly
    when the kind's matcher reads the value in the greedy generation."""
    pytest.importorskip("transformers")
    from hf_helpers import make_tokenizer
    from test_eval_hf import Oracle

    from landmark.eval.models import HFUnderTest, Reading
    from landmark.eval.passkey import teacher_forced_correct

    hf_tok = make_tokenizer()
    wording = next(w for w in W.FAMILIES if w.name == family)
    prompts = PasskeyPrompts(HFUnderTest("t", "", None, hf_tok).encoder).with_wording(wording)
    prompt, _ = prompts.compose(260, [Needle(value, 0.5)])
    m = Oracle(hf_tok, prompt, prompts.tokenizer.encode(said))
    greedy = m.generate([prompt], len(prompts.answer(value)) + 2, Reading())[0]
    assert W.KINDS[kind].correct(m.decode(greedy), value) is right
    assert teacher_forced_correct(m, prompts, prompt, value, kind) is right


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    from hf_helpers import converted, write_tiny

    root = tmp_path_factory.mktemp("wordings-hf")
    base, _ = write_tiny(root)
    model, hf_tok = converted()
    model.save_pretrained(root / "lm")
    hf_tok.save_pretrained(root / "lm")
    return {"base": base, "lm": root / "lm"}


@pytest.mark.usefixtures("one_thread")
def test_eval_passkey_held_out_wordings_end_to_end(tiny_hf, tmp_path, monkeypatch, capsys):
    from landmark.cli import main

    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pk"
    models = ["--model", f"a=hf:{tiny_hf['lm']}", "--model", f"b=hf:{tiny_hf['base']}"]
    args = ["eval", "passkey", "--lengths", "300", "--depths", "0", "1", "--trials", "3", "--chunk-len", "16",
            *models, "--out", str(out)]  # fmt: skip
    assert main([*args, "--wording", "held-out"]) == 0
    results = json.loads((out / "passkey.json").read_text())["results"]
    assert len(results) == 4 and all(r["wording"] == "held-out" and r["trials"] == 3 for r in results)
    held = set(HELD_OUT)
    assert all(set(r["families"]) <= held and all(r["held_out"]) and len(r["hits"]) == 3 for r in results)
    assert all(r["correct"] == sum(r["hits"]) for r in results)
    assert [r["keys"] for r in results[:2]] == [r["keys"] for r in results[2:]]  # the same trials for both
    assert all(len(r["answers"]) == 3 for r in results[:2]) and results[2]["answers"] is None
    report = (out / "passkey.md").read_text()
    assert "(passkey, held-out wordings)" in report and "Trials in held-out wording families only" in report
    cells = [json.loads(p.read_text())["key"] for p in (out / "cells").glob("*.json")]
    assert len(cells) == 4 and all(c["task"]["wording"] == "held-out" for c in cells)
    # all: another cell per (model, length, depth); the held-out families' table comes first
    multikey = ["--wording", "all", "--trials", "6", "--task", "multikey", "--keys", "2", "--lengths", "400"]
    assert main(last_wins([*args, *multikey])) == 0
    report = (out / "passkey.md").read_text()
    assert report.index("**Held-out wording families**") < report.index("**Training wording families**")
    printed = capsys.readouterr().out
    assert printed.index("Held-out wording families") < printed.index("Training wording families")
    results = json.loads((out / "passkey.json").read_text())["results"]
    assert len(list((out / "cells").glob("*.json"))) == 8
    assert all(h == W.held_out(f) for r in results for f, h in zip(r["families"], r["held_out"]))
    # paper (the default): the paper's cells, no wording in their keys
    assert main(args) == 0
    cells = [json.loads(p.read_text())["key"] for p in (out / "cells").glob("*.json")]
    assert len(cells) == 12 and sum("task" not in c for c in cells) == 4


@pytest.mark.usefixtures("one_thread")
def test_eval_passkey_refuses_a_bad_wording(tiny_hf, tmp_path, capsys):
    from landmark.cli import main

    argv = ["eval", "passkey", "--model", f"a=hf:{tiny_hf['lm']}", "--out", str(tmp_path / "o"),
            "--wording", "heldout"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_.value.code == 2 and len(errors) == 1 and "argument --wording: invalid choice" in errors[0]
    with pytest.raises(ValueError, match="--wording must be one of paper, train, held-out, all"):
        PasskeyTask(wording="heldout").check()
    assert not (tmp_path / "o").exists()
