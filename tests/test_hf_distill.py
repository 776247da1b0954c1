"""Distillation toward the base model (``landmark hf finetune --distill``): the teacher's inputs in the
batch, the KL term, and a tiny fine-tune that stays closer to its base with it than without."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import make_tokenizer, write_tiny

from landmark.cli import main
from landmark.hf import finetune as finetune_module
from landmark.hf.collator import IGNORE_INDEX
from landmark.hf.convert import LANDMARK_TOKEN
from landmark.hf.distill import DistillCollator, distillation_kl

BS = 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [LANDMARK_TOKEN]})
    return tok


@pytest.mark.parametrize("lengths", [[9], [9, 5], [12, 2, 7], [13]])
def test_teacher_index_points_at_the_teacher_position_predicting_the_same_token(tokenizer, lengths):
    collate = DistillCollator(tokenizer, BS, max_length=15)
    raws = [torch.arange(10, 10 + n) for n in lengths]
    batch = collate([{"input_ids": r} for r in raws])
    index, labels, teacher = batch["teacher_index"], batch["shift_labels"], batch["teacher_ids"]
    for row, raw in enumerate(raws):
        kept = raw[: collate.max_raw_tokens]
        assert batch["teacher_mask"][row].sum() == len(kept) - 1
        assert torch.equal(teacher[row, : len(kept) - 1], kept[:-1])  # the regular tokens, no landmark
        scored = labels[row] != IGNORE_INDEX
        assert torch.equal(index[row] >= 0, scored)
        # the teacher at position j reads kept[: j + 1] and predicts kept[j + 1]: the student's target
        assert torch.equal(kept[index[row][scored] + 1], labels[row][scored])


def test_distillation_kl_is_zero_for_the_teacher_and_a_sum_otherwise():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 7)
    index = torch.tensor([[0, 1, -1, 2, 3, -1], [0, -1, 1, 2, -1, -1]])
    student = torch.randn(2, 6, 9)  # two more entries: the landmark and padding, renormalised away
    for b in range(2):
        for t in range(6):
            if index[b, t] >= 0:
                student[b, t, :7] = teacher[b, index[b, t]] + 3.0  # a shift leaves the softmax alone
    assert abs(float(distillation_kl(student, teacher, index))) < 1e-5
    student[0, 1, 2] += 2.0
    p = torch.softmax(teacher[0, 1], -1)
    want = float((p * (torch.log(p) - torch.log_softmax(student[0, 1, :7], -1))).sum())
    assert float(distillation_kl(student, teacher, index)) == pytest.approx(want, rel=1e-4)
    assert want > 0


def _kl_to_base(model_dir, out) -> float:
    from landmark.eval.base_check import window_divergence
    from landmark.eval.models import Reading, load_hf

    base, lm = load_hf("base", str(model_dir)), load_hf("lm", str(out))
    torch.manual_seed(3)
    window = torch.randint(0, 300, (1, 48))
    return window_divergence(lm, base, window, Reading(k=64, chunk_len=16))["kl"] / 47


def test_a_distilled_finetune_stays_closer_to_its_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = write_tiny(tmp_path)
    args = ["hf", "finetune", "--model", str(model_dir), "--corpus", str(corpus), "--block-size", "8",
            "--max-length", "64", "--steps", "8", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps",
            "1", "--logging-steps", "4"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "distilled"), "--distill", str(model_dir),
                 "--distill-weight", "50"]) == 0  # fmt: skip
    plain, distilled = (
        _kl_to_base(model_dir, tmp_path / "plain"),
        _kl_to_base(model_dir, tmp_path / "distilled"),
    )
    assert distilled < 0.6 * plain, (distilled, plain)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--distill", "{root}/missing"], "--distill"),
        (["--distill", "{model}", "--distill-weight", "0"], "--distill-weight"),
        (["--distill", "{model}", "--distill-weight", "nan"], "--distill-weight"),
        # a landmark model as the teacher: said after the model was loaded, with a staging file left
        (["--distill", "{landmark}"], "is a landmark model: give the base model it was made from"),
    ],
)
def test_distill_options_are_checked_before_any_work(tmp_path, monkeypatch, capsys, extra, says):
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = write_tiny(tmp_path)
    argv = [
        "hf",
        "finetune",
        "--model",
        str(model_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "o"),
        "--block-size",
        "8",
        "--max-length",
        "64",
    ]
    capsys.readouterr()  # what writing the tiny model printed
    landmark = tmp_path / "landmark-model"  # the tiny model's files, marked as a landmark model
    shutil.copytree(model_dir, landmark)
    config = json.loads((landmark / "config.json").read_text())
    (landmark / "config.json").write_text(json.dumps({**config, "landmark_token_id": 3}))
    monkeypatch.setattr(finetune_module, "_load_model", lambda cfg: pytest.fail("the model was loaded"))
    argv += [a.format(root=tmp_path, model=model_dir, landmark=landmark) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))
