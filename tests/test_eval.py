"""Evaluation commands: perplexity vs length and passkey, end to end on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from landmark.cli import main
from landmark.data import Tokenizer
from landmark.data.passkey import (
    BookHaystack,
    PasskeyMix,
    PasskeyMixSampler,
    PasskeyPrompts,
    first_integer,
)
from landmark.data.windows import WindowSampler
from landmark.eval.perplexity import eval_windows
from landmark.train import train
from landmark.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_corpus) -> dict:
    """Three tiny checkpoints (landmark, full, xl) trained 2 steps each on the shared synthetic corpus."""
    root = tmp_path_factory.mktemp("eval")
    corpus, prepared = prepared_corpus["corpus"], prepared_corpus["prepared"]
    out = {"prepared": prepared}
    for kind in ("landmark", "full", "xl"):
        cfg = load_config(TINY, [
            f"data.corpus={json.dumps(str(corpus))}", f"data.prepared_dir={json.dumps(str(prepared))}",
            f"train.out_dir={json.dumps(str(root / kind))}", f'model.attention="{kind}"', "train.max_steps=2",
            "train.threads=1", "train.progress=false", "train.eval_every=0",
        ])  # fmt: skip
        train(cfg)
        out[kind] = root / kind
    return out


def test_eval_ppl_end_to_end_and_cache(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ppl"
    args = ["eval", "ppl", "--data", str(runs["prepared"]), "--lengths", "64", "256", "--max-tokens", "512",
            "--k", "1", "4", "--out", str(out)]  # fmt: skip
    for kind in ("landmark", "full", "xl"):
        args += ["--model", f"{kind}={runs[kind]}"]
    assert main(args) == 0
    table = (out / "perplexity.md").read_text()
    for label in (
        "landmark (landmark, k=1, token_head)",
        "landmark (landmark, k=4, token_head)",
        "full (full)",
        "xl (xl)",
    ):
        assert label in table
    results = json.loads((out / "perplexity.json").read_text())["results"]
    assert len(results) == 4 * 2 and all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in results)
    assert (out / "perplexity.png").stat().st_size > 1000
    # a rerun reads every cell from the cache: no model is run again
    from landmark.eval.models import GPTUnderTest

    monkeypatch.setattr(GPTUnderTest, "window_nll", lambda *a, **k: pytest.fail("recomputed a cached cell"))
    assert main(args) == 0


def test_eval_passkey_end_to_end(runs, tmp_path):
    out = tmp_path / "pk"
    args = [
        "eval",
        "passkey",
        "--lengths",
        "250",
        "400",
        "--depths",
        "0",
        "1",
        "--trials",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    for kind in ("landmark", "full"):
        args += ["--model", f"{kind}={runs[kind]}"]
    assert main(args) == 0
    written = json.loads((out / "passkey.json").read_text())
    results = written["results"]
    assert written["args"]["device"] == "cpu"
    assert len(results) == 2 * 2 * 2
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["trials"] == 2 for r in results)
    report = (out / "passkey.md").read_text()
    assert "| landmark (landmark) | 400 |" in report
    assert "top-4 retrieval (granularity token_head, chunks of 256 positions)" in report  # the settings
    assert (out / "passkey.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lengths"], "--lengths is empty"),
        (["--lengths", "8"], r"--lengths: \[8\] shorter than one block \(16 tokens\)"),
        (["--lengths", "64", "--k", "0"], "--k must be >= 1"),
    ],
)
def test_eval_bad_arguments(runs, tmp_path, capsys, extra, message):
    import re

    code = main(["eval", "ppl", "--model", f"lm={runs['landmark']}", "--data", str(runs["prepared"]),
                 "--out", str(tmp_path), *extra])  # fmt: skip
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def _changed_beyond_4k(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose tensors larger than 4 KiB differ from it only after their first 4 KiB."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            flat = t.view(-1)
            if flat.numel() * flat.element_size() > 4096:
                flat[4096 // flat.element_size() :] += 0.5
    return other


def test_weights_fingerprint_sees_bytes_beyond_the_first_4k(runs, tmp_path):
    """A fingerprint of each tensor's first 4 KiB gave a model another's cached
    perplexity. Tensors that differ only beyond it get different fingerprints, so different cells, and
    `landmark eval ppl` run on both into one --out reports each model's own perplexity."""
    from landmark.checkpoint import load_model, save_checkpoint
    from landmark.eval.common import weights_fingerprint

    model, tok, config = load_model(runs["landmark"])
    other = _changed_beyond_4k(model)
    changed = 0
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        head = 4096 // a.element_size()
        assert torch.equal(a.view(-1)[:head], b.view(-1)[:head]), name
        changed += not torch.equal(a, b)
    assert changed > 0 and weights_fingerprint(model) != weights_fingerprint(other)
    second = save_checkpoint(tmp_path / "other", 1, other, config, tok, {})

    out = tmp_path / "ppl"
    args = ["eval", "ppl", "--data", str(runs["prepared"]), "--lengths", "64", "--max-tokens", "128",
            "--out", str(out)]  # fmt: skip
    ppl = []
    for path in (runs["landmark"], second):
        assert main([*args, "--model", f"lm={path}"]) == 0
        ppl.append(json.loads((out / "perplexity.json").read_text())["results"][0]["ppl"])
    assert len(list((out / "cells").glob("*.json"))) == 2
    assert abs(ppl[0] - ppl[1]) > 1e-3 * ppl[0], ppl  # the second run did not reuse the first one's cell


def test_eval_missing_checkpoint_and_no_model(tmp_path, capsys):
    assert main(["eval", "passkey", "--model", f"x={tmp_path / 'nope'}", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["eval", "passkey", "--out", str(tmp_path)]) == 2
    assert "give at least one --model" in capsys.readouterr().err


def test_passkey_prompts_exact_length_and_depth():
    tok = Tokenizer.train(["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300)
    prompts = PasskeyPrompts(tok)
    for length in (prompts.min_length(), 200, 1000):
        for depth in (0.0, 0.5, 1.0):
            p = prompts.prompt(length, depth, 48213)
            assert len(p) == length
            text = tok.decode(p)
            assert "The pass key is 48213. Remember it. 48213 is the pass key." in text
            assert text.endswith("What is the pass key? The pass key is")
    early, late = (tok.decode(prompts.prompt(1000, d, 48213)).index("48213") for d in (0.0, 1.0))
    assert early < 300 < late
    with pytest.raises(ValueError, match="too short for a passkey prompt"):
        prompts.prompt(10, 0.5, 48213)
    assert first_integer(" 48213. And") == 48213 and first_integer("no digits") is None


def _tokenizer() -> Tokenizer:
    return Tokenizer.train(
        ["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300
    )


def test_the_paper_prompt_is_the_filler_cut_at_whole_filler_groups():
    """The default prompt, spelled out: instruction, the repeated filler cut at ``round(depth * n / unit)``
    whole filler groups (at most n), the key sentence, the rest of the filler, the question."""
    tok = _tokenizer()
    prompts = PasskeyPrompts(tok)
    unit = len(prompts.filler)
    for length in (prompts.min_length(48213), 333, 1000):
        for depth in (0.0, 0.3, 0.5, 0.97, 1.0):
            n = length - prompts.min_length(48213)
            filler = (prompts.filler * (n // unit + 1))[:n]
            cut = min(n, round(depth * n / unit) * unit)
            expected = prompts.instruction + filler[:cut] + prompts.key_sentence(48213) + filler[cut:]
            assert prompts.prompt(length, depth, 48213) == expected + prompts.question


def _books_corpus(folder: Path) -> Path:
    """Six documents of numbered, distinct sentences (the validation split: one whole document)."""
    folder.mkdir(parents=True)
    for d in range(6):
        lines = [
            f"Book {d} tells in line {i} of the {('sea', 'ship', 'whale')[i % 3]}."
            for i in range(80 + 20 * d)
        ]
        (folder / f"doc_{d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_books_haystack_prompts(tmp_path):
    """Exact length; the prose comes from the validation split, starts at a sentence and is seeded; the
    key sentence follows a whole sentence, at the boundary nearest to its depth."""
    from landmark.data.corpus import read_corpus
    from landmark.data.passkey import Needle

    corpus = _books_corpus(tmp_path / "books")
    splits = read_corpus(corpus).splits
    validation, train = (
        " ".join(" ".join(d.read_text() for d in splits[s]).split()) for s in ("validation", "train")
    )
    haystack = BookHaystack(corpus)
    assert all(s in validation and s not in train for s in haystack.sentences)
    tok = _tokenizer()
    prompts = PasskeyPrompts(tok, haystack)
    key_ids, unit = prompts.key_sentence(48213), max(len(tok.encode(" " + s)) for s in haystack.sentences)

    def compose(length, depth, trial=0):
        rng = np.random.default_rng([1, length, round(depth * 1000), trial])
        return prompts.compose(length, [Needle(48213, depth)], rng=rng)

    for length in (prompts.min_length(48213), 400, 1500):
        for depth in (0.0, 0.4, 1.0):
            p, (cut,) = compose(length, depth)
            assert len(p) == length and compose(length, depth)[0] == p  # the same seed, the same prose
            start = len(prompts.instruction) + cut
            assert p[start : start + len(key_ids)] == key_ids
            filler = p[len(prompts.instruction) : start] + p[start + len(key_ids) : -len(prompts.question)]
            assert abs(cut - depth * len(filler)) <= unit, (cut, depth, len(filler))
            if filler:
                text = tok.decode(filler)
                assert text.startswith(" Book ") and text[1:60] in validation, text[:60]  # a sentence's start
                before = tok.decode(p[len(prompts.instruction) : start])
                assert before == "" or before.endswith("."), before  # after a whole sentence
    assert compose(1500, 0.5, trial=1)[0] != compose(1500, 0.5)[0]  # another trial, other prose
    with pytest.raises(ValueError, match="needs rng"):
        prompts.prompt(400, 0.5, 48213)


def test_multikey_prompt_holds_distinct_named_keys_and_asks_for_one():
    """N key sentences with distinct names and keys; the question names the asked key's owner; the asked
    key sits at the cell's depth, the others at the evenly spaced depths; cell trials are seeded."""
    import re

    from landmark.data.passkey import multikey_needles
    from landmark.eval.passkey import PasskeyTask, cell_trials

    tok = _tokenizer()
    prompts = PasskeyPrompts(tok)
    sentence = r"The pass key for (\w+) is (\d+)\. Remember it\. (\d+) is the pass key for (\w+)\."
    for depth in (0.0, 0.4, 1.0):
        needles, ask = multikey_needles(np.random.default_rng(7), 48213, depth, 4)
        ids, cuts = prompts.compose(900, needles, ask)
        text = tok.decode(ids)
        found = re.findall(sentence, text)
        names, keys = [f[0] for f in found], [int(f[1]) for f in found]
        assert len(ids) == 900 and all(f[0] == f[3] and f[1] == f[2] for f in found)
        assert len(set(names)) == 4 and len(set(keys)) == 4 and 48213 in keys
        assert text.endswith(f" What is the pass key for {ask}? The pass key for {ask} is")
        assert names[keys.index(48213)] == ask
        n, asked = 900 - prompts.needed(needles, ask), [x.key for x in needles].index(48213)
        assert abs(cuts[asked] - depth * n) <= len(prompts.filler)
        others = sorted(x.depth for x in needles if x.key != 48213)
        assert len(others) == 3 and set(others) < {0.0, 1 / 3, 2 / 3, 1.0}
    task = PasskeyTask("multikey", keys=4)
    assert cell_trials(prompts, task, 3, 900, 0.5, 3) == cell_trials(prompts, task, 3, 900, 0.5, 3)
    assert len({tuple(ids) for ids, _ in cell_trials(prompts, task, 3, 900, 0.5, 3)}) == 3


def test_passkey_mix_sampler_is_reproducible_and_keeps_the_key_in_an_earlier_block():
    tok = Tokenizer.train(["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300)
    tokens = np.array(tok.encode("the sea and the ship. " * 500), dtype=np.uint16)
    base = WindowSampler(tokens, 256, 6, landmark_id=tok.landmark_id, block_size=16, seed=3)
    mix = PasskeyMixSampler(base, tok, PasskeyMix(0.5), seed=3)
    a, b = mix.batch(7), mix.batch(7)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    question = PasskeyPrompts(tok).question
    n_passkey = 0
    for row in a.input_ids:
        raw = row[row != tok.landmark_id].tolist()
        text = tok.decode(raw)
        if "pass key is" not in text:
            continue
        n_passkey += 1
        pos = row.tolist()
        q_start = next(i for i in range(len(pos)) if pos[i : i + 3] == question[:3] and i > 60)
        key_pos = next(
            i for i in range(len(pos)) if tok.decode(pos[i : i + 4]).strip().startswith("The pass")
        )
        assert key_pos // 16 < q_start // 16, "the key must sit in an earlier block than the question"
    assert n_passkey >= 1


def test_eval_windows_non_overlapping():
    tokens = np.arange(1000)
    w = eval_windows(tokens, 300, 700)
    assert w.shape == (2, 300) and w[1, 0] == 300


def test_quickstart_main_job_on_a_given_checkpoint(runs, tmp_path, monkeypatch, capsys):
    """The README's main job, end to end, at toy sizes (the bundled books tokenised with the tiny BPE)."""
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--checkpoint",
        str(runs["landmark"]),
        "--out",
        str(out),
        "--ppl-lengths",
        "64",
        "256",
    ]
    code = main([*args, "--ppl-tokens", "512", "--no-hf"])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "## Perplexity" in report and "Skipped (`--no-hf`)" in report
    assert (out / "perplexity.png").is_file() and not (out / "passkey.png").exists()
    assert "report written to" in capsys.readouterr().out


def test_passkey_training_window_with_several_pairs():
    """Each question asks for the latest key, which lies at least min_gap tokens before it; the window
    has exactly the length asked for and ends with the last answer."""
    import re

    tok = Tokenizer.train(["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300)
    prompts = PasskeyPrompts(tok)
    question = tok.decode(prompts.question)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        window = prompts.training_window(rng, 700, 40, pairs=3)
        assert len(window) == 700
        text = tok.decode(window)
        keys = re.findall(r"The pass key is (\d+)\. Remember it\.", text)
        answers = [int(a) for a in re.findall(re.escape(question.strip()) + r" (\d+)\.", text)]
        assert len(keys) == 3 and [int(k) for k in keys] == answers
        assert text.endswith(f"The pass key is {answers[-1]}.")
        # the key sentence ends at least min_gap tokens before its question starts
        q_ids = prompts.question
        q_starts = [i for i in range(len(window)) if window[i : i + len(q_ids)] == q_ids]
        for key, q_start in zip(keys, q_starts):
            sentence = prompts.key_sentence(int(key))
            k_end = next(i for i in range(len(window)) if window[i : i + len(sentence)] == sentence)
            assert q_start - (k_end + len(sentence)) >= 40
    # near = 1: every question follows its key sentence directly
    window = prompts.training_window(np.random.default_rng(0), 700, 40, pairs=3, near=1.0)
    text = tok.decode(window)
    assert len(window) == 700
    assert len(re.findall(r"is the pass key\. What is the pass key\?", text)) == 3
    with pytest.raises(ValueError, match="near must be in"):
        prompts.training_window(np.random.default_rng(0), 700, 40, pairs=3, near=2.0)
    # near_gap: near questions follow their key after 0..near_gap filler tokens, at varying distances
    gaps = set()
    for seed in range(20):
        window = prompts.training_window(np.random.default_rng(seed), 400, 40, pairs=1, near=1.0, near_gap=12)
        assert len(window) == 400
        key = re.findall(r"The pass key is (\d+)\. Remember it\.", tok.decode(window))[0]
        sentence = prompts.key_sentence(int(key))
        k_end = next(i for i in range(len(window)) if window[i : i + len(sentence)] == sentence) + len(
            sentence
        )
        q_start = next(i for i in range(k_end, len(window)) if window[i : i + len(q_ids)] == q_ids)
        assert 0 <= q_start - k_end <= 12
        gaps.add(q_start - k_end)
    assert len(gaps) >= 5  # not one fixed distance
    with pytest.raises(ValueError, match="near_gap must be >= 0"):
        prompts.training_window(np.random.default_rng(0), 700, 40, near=0.5, near_gap=-1)
    with pytest.raises(ValueError, match="cannot hold 9 passkey pairs"):
        prompts.training_window(np.random.default_rng(0), 300, 40, pairs=9)
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        prompts.training_window(np.random.default_rng(0), 300, 40, pairs=0)


def _has_repeat(row: list[int], m: int) -> bool:
    seen = set()
    for i in range(len(row) - m + 1):
        gram = tuple(row[i : i + m])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def test_repeat_span_copies_a_span_later_in_the_window():
    from landmark.data.passkey import REPEAT_SPAN, repeat_span

    raw = np.arange(1000, 1300)  # no repeats of its own
    for seed in range(20):
        out = repeat_span(raw, np.random.default_rng(seed))
        assert out.shape == raw.shape and _has_repeat(out.tolist(), REPEAT_SPAN[0])
        changed = np.flatnonzero(out != raw)
        assert REPEAT_SPAN[0] <= len(changed) <= REPEAT_SPAN[1] and changed[0] > 0
    with pytest.raises(ValueError, match="cannot repeat a span"):
        repeat_span(np.arange(20), np.random.default_rng(0))


def test_passkey_mix_sampler_repeat_windows():
    """repeat_fraction turns other rows into repeat windows without touching the passkey rows."""
    tok = Tokenizer.train(["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300)
    tokens = np.array(
        tok.encode(" ".join(f"word{i % 997} thing{i % 13}" for i in range(3000))), dtype=np.uint16
    )
    base = WindowSampler(tokens, 320, 8, landmark_id=tok.landmark_id, block_size=16, seed=3)
    plain = PasskeyMixSampler(base, tok, PasskeyMix(0.5), seed=3)
    mixed = PasskeyMixSampler(base, tok, PasskeyMix(0.5), seed=3, repeat_fraction=0.5)
    for step in range(3):
        a, b = plain.batch(step), mixed.batch(step)
        for row in range(8):
            ids_a = a.input_ids[row][a.input_ids[row] != tok.landmark_id].tolist()
            ids_b = b.input_ids[row][b.input_ids[row] != tok.landmark_id].tolist()
            if "What is the pass key?" in tok.decode(ids_a):
                assert ids_a == ids_b  # the passkey rows are the same draw
            else:  # every other row repeats a span (the base text itself has none of 16 tokens)
                assert not _has_repeat(ids_a, 16) and _has_repeat(ids_b, 16)
    with pytest.raises(ValueError, match="repeat_fraction must be in"):
        PasskeyMixSampler(base, tok, PasskeyMix(0.5), repeat_fraction=0.6)


def test_passkey_mix_sampler_pairs_need_room():
    tok = Tokenizer.train(["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300)
    tokens = np.array(tok.encode("the sea and the ship. " * 500), dtype=np.uint16)
    base = WindowSampler(tokens, 320, 2, landmark_id=tok.landmark_id, block_size=16, seed=3)
    mix = PasskeyMixSampler(base, tok, PasskeyMix(1.0, pairs=2), seed=3)
    batch = mix.batch(0)
    for row in batch.input_ids:
        assert tok.decode(row[row != tok.landmark_id].tolist()).count("What is the pass key?") == 2
    with pytest.raises(ValueError, match="8 passkey pair"):
        PasskeyMixSampler(base, tok, PasskeyMix(1.0, pairs=8))


def test_passkey_probe_runs_on_the_shipped_checkpoint():
    """benchmarks/passkey_probe.py: every line of its report, finite, on the shipped checkpoint."""
    import importlib.util
    import math
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("passkey_probe", repo / "benchmarks" / "passkey_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    r = probe.probe(
        str(repo / "checkpoints" / "passkey-landmark"), samples=2, length=449, seed=0, gaps=[0, 96]
    )
    assert set(r["loss_per_key_token"]) == {
        "first mention",
        "second mention",
        "answer",
        "answer, key adjacent",
    }
    assert set(r["answer_loss_by_gap"]) == {0, 96} and set(r["repeat_loss_by_gap"]) == {0, 96}
    values = [
        *r["loss_per_key_token"].values(),
        *r["answer_loss_by_gap"].values(),
        *r["repeat_loss_by_gap"].values(),
    ]
    assert all(math.isfinite(v) and v > 0 for v in values)
    with pytest.raises(ValueError, match="--gaps: 2000 filler tokens do not fit a 449-token sample"):
        probe.probe(
            str(repo / "checkpoints" / "passkey-landmark"), samples=1, length=449, seed=0, gaps=[2000]
        )
