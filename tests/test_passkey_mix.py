"""The passkey training mix (``landmark.data.passkey.PasskeyMix``): one set of options and one sampling core
(``PasskeySamples``) for both model families, the from-scratch sampler (``PasskeyMixSampler``) and the
Hugging Face fine-tuning windows (``PasskeyMixWindows``); ``near`` means the same in both."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from landmark.data import Tokenizer
from landmark.data.passkey import (
    EXTRA_STREAM,
    PASSKEY_STREAM,
    VARIANT_STREAM,
    BookHaystack,
    PasskeyMix,
    PasskeyMixSampler,
    PasskeyPrompts,
    PasskeySamples,
)
from landmark.data.windows import WindowSampler
from landmark.train_config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
KEY = re.compile(r"The pass key is (\d+)\. Remember it\.")
NAMED = re.compile(r"The pass key for (\w+) is (\d+)\. Remember it\.")
PROSE = "The lighthouse keeper counted the ships. Rain fell over the harbour all night. "


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(
        ["The grass is green. The pass key is 12345. " * 50, "What is it? 0123456789"], 300
    )


@pytest.fixture(scope="module")
def haystack(tmp_path_factory) -> BookHaystack:
    root = tmp_path_factory.mktemp("corpus")
    for split in ("train", "validation"):
        (root / split).mkdir()
        (root / split / "book.txt").write_text(PROSE * 40)
    return BookHaystack(root, split="train")


def scratch_sampler(tok: Tokenizer, mix: PasskeyMix, haystack=None) -> PasskeyMixSampler:
    tokens = np.array(tok.encode("the sea and the ship. " * 500), dtype=np.uint16)
    base = WindowSampler(tokens, 512, 8, landmark_id=tok.landmark_id, block_size=16, seed=3)
    return PasskeyMixSampler(base, tok, mix, seed=3, haystack=haystack)


def scratch_samples(tok: Tokenizer, mix: PasskeyMix, steps: int = 4, haystack=None) -> list[list[int]]:
    """The passkey rows of the first batches of a from-scratch sampler: regular tokens, landmarks removed."""
    sampler, rows = scratch_sampler(tok, mix, haystack), []
    for step in range(steps):
        for row in sampler.batch(step).input_ids:
            raw = row[row != tok.landmark_id].tolist()
            if "What is the pass key" in tok.decode(raw):
                rows.append(raw)
    return rows


def hf_windows(mix: PasskeyMix, n: int = 40, haystack=None):
    """(its passkey encoder, the HF fine-tuning windows of ``mix``: 400 tokens, block 8, (ids, text) each)."""
    pytest.importorskip("transformers")
    from hf_helpers import make_tokenizer

    from landmark.hf.passkey import HFTokenEncoder, PasskeyMixWindows

    hf_tok = make_tokenizer()
    base = [{"input_ids": torch.zeros(400, dtype=torch.long)}] * n
    windows = PasskeyMixWindows(base, hf_tok, 400, 8, mix, seed=3, haystack=haystack)
    ids = [windows[i]["input_ids"].tolist() for i in range(n) if windows.is_passkey(i)]
    return HFTokenEncoder(hf_tok), [(x, hf_tok.decode(x)) for x in ids]


def find(ids: list[int], part: list[int], start: int = 0) -> int:
    return next(i for i in range(start, len(ids)) if ids[i : i + len(part)] == part)


def key_gap(ids: list[int], prompts: PasskeyPrompts, text: str) -> int:
    """Filler tokens between the (one unnamed) key sentence of a sample and the question after it."""
    sentence = prompts.key_sentence(int(KEY.search(text).group(1)))
    end = find(ids, sentence) + len(sentence)
    return find(ids, prompts.question, end) - end


@pytest.mark.parametrize("near_gap", [0, 12])
def test_near_means_the_same_in_both_families(tok, near_gap):
    """near = 1: in both families every question follows its key within near_gap filler tokens (0: right
    after it; else at varying distances); near = 0: every key at least one block back."""
    near, far = PasskeyMix(1.0, near=1.0, near_gap=near_gap), PasskeyMix(1.0)
    prompts = PasskeyPrompts(tok)
    gaps = [key_gap(ids, prompts, tok.decode(ids)) for ids in scratch_samples(tok, near)]
    assert len(gaps) == 32 and max(gaps) <= near_gap and len(set(gaps)) >= min(near_gap + 1, 5)
    assert min(key_gap(ids, prompts, tok.decode(ids)) for ids in scratch_samples(tok, far)) >= 15
    encoder, samples = hf_windows(near)
    hf_prompts = PasskeyPrompts(encoder)  # type: ignore[arg-type]
    hf_gaps = [key_gap(ids, hf_prompts, text) for ids, text in samples]
    assert len(hf_gaps) == 40 and max(hf_gaps) <= near_gap and len(set(hf_gaps)) >= min(near_gap + 1, 5)
    assert min(key_gap(ids, hf_prompts, text) for ids, text in hf_windows(far)[1]) >= 7


def test_near_gap_none_is_anywhere_before_the_question(tok):
    """near_gap None (the fine-tuning default): a near key anywhere in the filler, the local context too."""
    gaps = [
        key_gap(ids, PasskeyPrompts(tok), tok.decode(ids))
        for ids in scratch_samples(tok, PasskeyMix(1.0, near=1.0, near_gap=None), steps=8)
    ]
    assert min(gaps) < 15 and max(gaps) > 200


def test_both_families_make_the_same_kinds_of_samples(tok, haystack):
    """The same options give both families samples of every kind: prose filler, several named keys (one
    asked, at least a block back unless near), near keys within near_gap."""
    mix = PasskeyMix(1.0, near=0.4, near_gap=3, books=0.5, multikey=0.5)
    encoder, hf_samples = hf_windows(mix, n=60, haystack=haystack)
    families = {
        "scratch": [(ids, tok.decode(ids)) for ids in scratch_samples(tok, mix, steps=8, haystack=haystack)],
        "hf": hf_samples,
    }
    for name, samples in families.items():
        kinds = set()
        for _, text in samples:
            prose, named = "The grass is green." not in text, NAMED.findall(text)
            kinds.add((prose, len(named) > 1))
            if named:
                asked = re.search(r"What is the pass key for (\w+)\?", text).group(1)
                assert asked in dict(named), name
        assert kinds == {(False, False), (False, True), (True, False), (True, True)}, name
    prompts = {"scratch": PasskeyPrompts(tok), "hf": PasskeyPrompts(encoder)}  # type: ignore[arg-type]
    for name, samples in families.items():
        gaps = [key_gap(ids, prompts[name], t) for ids, t in samples if not NAMED.search(t) and "grass" in t]
        assert min(gaps) <= 3 and max(gaps) >= 7, name  # near keys and far ones


def test_the_mixers_are_the_shared_core(tok):
    """Both families' samples are exactly PasskeySamples.sample of their seeded streams."""
    mix = PasskeyMix(0.5, near=0.5, near_gap=6, multikey=0.5)
    sampler = scratch_sampler(tok, mix)
    core = PasskeySamples(tok, mix)
    for step in range(3):
        batch = sampler.batch(step)
        rng = np.random.default_rng([3, 0, step, PASSKEY_STREAM])
        rows = np.flatnonzero(rng.random(8) < mix.share)
        variants = np.random.default_rng([3, 0, step, VARIANT_STREAM])
        for row in rows:
            expected = core.sample(rng, mix.variant(variants), sampler.n_raw, sampler.min_gap)
            ids = batch.input_ids[row]
            assert ids[ids != tok.landmark_id].tolist() == expected[:-1]  # the last token is a target only
    encoder, samples = hf_windows(mix)
    hf_core = PasskeySamples(encoder, mix)  # type: ignore[arg-type]
    passkey = [i for i in range(40) if np.random.default_rng([3, i, PASSKEY_STREAM]).random() < mix.share]
    assert len(passkey) == len(samples) > 5
    for i, (ids, _) in zip(passkey, samples):
        variant = mix.variant(np.random.default_rng([3, i, VARIANT_STREAM]))
        assert ids == hf_core.sample(np.random.default_rng([3, i, EXTRA_STREAM]), variant, 400, 7)


def test_the_options_are_checked_in_one_place(tok):
    for kwargs, message in [
        ({"near": 1.5}, r"passkey near must be in \[0, 1\]"),
        ({"share": -0.1}, r"passkey share must be in"),
        ({"near_gap": -1}, r"near_gap must be >= 0"),
        ({"pairs": 0}, r"pairs must be >= 1"),
        ({"pairs": 2, "multikey": 0.5}, r"2 passkey pairs per sample take the repeated filler"),
        ({"wordings": "held-out"}, r"training wordings must be one of paper, train"),
    ]:
        with pytest.raises(ValueError, match=message):
            PasskeyMix(**kwargs)
    with pytest.raises(ValueError, match="needs the turns of a chat template"):
        PasskeySamples(tok, PasskeyMix(1.0, chat=0.5))
    with pytest.raises(ValueError, match="needs a haystack"):
        PasskeySamples(tok, PasskeyMix(1.0, books=0.5))


def test_saved_configs_keep_their_meaning(tmp_path):
    """A from-scratch config's near pairs (data.passkey_near_gap, default 0: right before the question), and
    a fine-tuning run's --passkey-near without --passkey-near-gap: anywhere before the question, what it
    meant before the option existed."""
    gap = load_config(REPO / "configs" / "passkey-landmark-gap.toml").data.passkey_mix()
    assert (gap.near, gap.near_gap, gap.pairs) == (0.5, 62, 1)
    pairs = load_config(REPO / "configs" / "passkey-landmark-pairs.toml").data.passkey_mix()
    assert (pairs.near, pairs.near_gap, pairs.pairs) == (0.5, 0, 4)
    with pytest.raises(ConfigError, match=r"data\.passkey_pairs.*take the repeated filler"):
        load_config(None, ["data.passkey_pairs=2", "data.passkey_multikey=0.5", f"train.out_dir={tmp_path}"])
    pytest.importorskip("transformers")
    from landmark.hf.finetune import FinetuneConfig

    old = FinetuneConfig(str(tmp_path), str(tmp_path / "o"), passkey_fraction=0.5, passkey_near=0.2)
    assert old.passkey_mix() == PasskeyMix(0.5, near=0.2, near_gap=None)
    with pytest.raises(ValueError, match=r"--passkey-pairs.*take the repeated filler"):
        FinetuneConfig(str(tmp_path), str(tmp_path / "o"), passkey_fraction=0.5, passkey_pairs=2,
                       passkey_books=0.5).check()  # fmt: skip


def test_no_mixer_takes_more_than_eight_parameters():
    pytest.importorskip("transformers")
    from landmark.hf.passkey import PasskeyMixWindows

    functions = [
        PasskeyMixSampler.__init__, PasskeyMixWindows.__init__, PasskeySamples.__init__,
        WindowSampler.__init__, PasskeyPrompts.training_sample, PasskeyPrompts.training_window,
        PasskeySamples.sample,
    ]  # fmt: skip
    counts = {f.__qualname__: len(inspect.signature(f).parameters) - 1 for f in functions}  # without self
    assert max(counts.values()) <= 8, counts
