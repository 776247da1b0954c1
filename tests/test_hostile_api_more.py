"""The Python API under hostile arguments, more: a TypeError or ValueError naming the argument, before any
work."""

from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from landmark import landmark_attention
from landmark.checkpoint import load_model
from landmark.inference import InferenceSession, chunked_logits, chunked_nll, generate
from landmark.inference.cache import StateFiles
from landmark.inference.generate import Hooks
from landmark.inference.options import check_save_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(REPO, "checkpoints", "passkey-landmark")
TEXT = "the sea and the ship and the whale"


@pytest.fixture(scope="module")
def small():
    """The small landmark checkpoint: (model, tokenizer)."""
    model, tok, _ = load_model(SMALL)
    return model, tok


def qkv(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 8, generator=g, dtype=dtype)
    k = torch.randn(1, 1, 10, 8, generator=g, dtype=dtype)
    v = torch.randn(1, 1, 10, 8, generator=g, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("scale", [True, False, "1", None.__class__, 1j])
def test_a_scale_that_is_not_a_number_is_a_type_error(scale):
    """``scale=True`` was taken as 1.0 (while ``block_size=True`` was refused)."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^scale must be a positive finite number"):
        landmark_attention(q, k, v, 4, scale=scale)


@pytest.mark.parametrize("scale", [1e308, 1e39, 1e6 * (1 + 1e-9)])
def test_a_scale_beyond_the_bound_is_refused(scale):
    """``scale=1e308`` passed the "positive finite" check and returned NaN everywhere (inf in float32)."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^scale must be a positive finite number at most 1e\+06"):
        landmark_attention(q, k, v, 4, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_the_largest_scale_gives_finite_outputs(dtype, impl):
    q, k, v = qkv(dtype)
    out = landmark_attention(q, k, v, 4, scale=1e6, impl=impl)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["auto", "reference", "blockwise"])
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_meta_and_fake_tensors_give_an_output_of_the_right_shape(impl, mode):
    """The ops have fake (meta) implementations for torch.compile: the public checks read no data."""
    if mode == "meta":
        q, k, v = (t.requires_grad_() for t in qkv(device="meta"))
        out = landmark_attention(q, k, v, 4, impl=impl)
        assert out.device.type == "meta"
        out.sum().backward()
    else:
        with FakeTensorMode():
            q, k, v = (t.requires_grad_() for t in qkv())
            out = landmark_attention(q, k, v, 4, impl=impl)
            assert isinstance(out, FakeTensor)
            out.sum().backward()  # (inside the mode: autograd's scalars must be fake too)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_a_state_that_is_not_state_files_is_a_type_error(small):
    """``state="x.st"`` was an AttributeError ('str' object has no attribute 'check')."""
    model, tok = small
    with pytest.raises(TypeError, match=r"^state must be a StateFiles\(load=\.\.\., save=\.\.\.\)"):
        generate(model, [tok.encode(TEXT)], 1, state="x.st")
    with pytest.raises(TypeError, match=r"^hooks must be a Hooks\("):
        generate(model, [tok.encode(TEXT)], 1, hooks=(0,))


@pytest.mark.parametrize("stop_ids", [(99999,), (8192,), (0, -1)])
def test_stop_ids_outside_the_vocabulary_are_refused(small, stop_ids):
    """A stop id that no token of the model can be was taken (the row then never stopped on it)."""
    model, tok = small
    with pytest.raises(ValueError, match=r"stop_ids"):
        generate(model, [tok.encode(TEXT)], 1, hooks=Hooks(stop_ids=stop_ids))
    assert len(generate(model, [tok.encode(TEXT)], 2, hooks=Hooks(stop_ids=(8191,)))[0]) <= 2


def test_feeding_or_reading_no_positions_is_refused_and_changes_nothing(small):
    """``feed`` of (1, 0) ids was torch's "torch.cat(): expected a non-empty list of Tensors"; ``read``
    returned None."""
    model, tok = small
    ids = torch.tensor([tok.encode(TEXT)])[:, :5]
    session = InferenceSession(model, 1)
    with pytest.raises(ValueError, match=r"^ids must hold at least one position"):
        session.feed(torch.zeros(1, 0, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^ids must hold at least one position"):
        session.read(torch.zeros(1, 0, dtype=torch.long))
    assert int(session.length[0]) == 0
    assert torch.equal(session.feed(ids), InferenceSession(model, 1).feed(ids))


def test_chunked_logits_targets_must_be_a_bool(small):
    model, tok = small
    ids = torch.tensor([tok.encode(TEXT)])
    with pytest.raises(TypeError, match=r"^targets must be a bool"):
        chunked_logits(model, ids, targets="yes", k=4)
    with pytest.raises(TypeError, match=r"^targets must be a bool"):
        chunked_logits(model, ids, targets=ids, k=4)
    with pytest.raises(ValueError, match=r"^tokens must hold at least one token"):
        chunked_logits(model, ids[:, :0], k=4)
    assert chunked_logits(model, ids, targets=True, k=4)[1] is not None


def test_the_api_says_overwrite_true_and_the_command_line_says_overwrite(small, tmp_path):
    """The Python API's refusal said "or --overwrite to replace it" (the command line's words)."""
    model, tok = small
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    session = InferenceSession(model, 1)
    session.read(torch.tensor([tok.encode(TEXT)]))
    with pytest.raises(ValueError, match=r"or overwrite=True to replace it$") as raised:
        session.save_state(notes)
    assert "--overwrite" not in str(raised.value)
    with pytest.raises(ValueError, match=r"or overwrite=True to replace it$"):
        generate(model, [tok.encode(TEXT)], 1, state=StateFiles(save=notes))
    args = argparse.Namespace(save_state=str(notes), load_state=None, overwrite=False)
    with pytest.raises(ValueError, match=r"^--save-state .* or --overwrite to replace it$"):
        check_save_state(args, [])  # the command line's check
    assert notes.read_text() == "keep me"


def test_chunked_nll_of_tokens_holding_landmarks_says_to_pass_tokens_without_them(small):
    """The hint was "(use insert_landmarks)", but chunked_nll takes tokens without landmarks."""
    model, tok = small
    ids = torch.tensor([tok.encode(TEXT)])
    ids[0, 2] = model.config.landmark_id
    with pytest.raises(ValueError, match=r"^tokens must not contain the landmark token id") as raised:
        chunked_nll(model, ids, k=4)
    assert "use insert_landmarks" not in str(raised.value)
    with pytest.raises(ValueError, match=r"^tokens must not contain the landmark token id"):
        chunked_logits(model, ids, k=4)


def test_api_states_never_replace_the_files_the_model_was_loaded_from(tmp_path):
    """``save_state(..., overwrite=True)`` onto a file of the checkpoint the model was loaded from (its
    tokenizer.json): refused, as the command line refuses it; a new file in that folder is allowed."""
    folder = tmp_path / "ckpt"
    shutil.copytree(SMALL, folder)
    model, tok, _ = load_model(folder)
    before = (folder / "tokenizer.json").read_bytes()
    session = InferenceSession(model, 1)
    session.read(torch.tensor([tok.encode(TEXT * 4)]))
    with pytest.raises(ValueError, match=r"^save_state .*tokenizer\.json is a file of .*, the model's"):
        session.save_state(folder / "tokenizer.json", overwrite=True)
    assert (folder / "tokenizer.json").read_bytes() == before
    ids = [tok.encode(TEXT)]
    with pytest.raises(ValueError, match=r"config\.json is a file of"):
        generate(model, ids, 1, state=StateFiles(save=folder / "config.json", overwrite=True))
    with pytest.raises(TypeError, match=r"^save_state must be a file path"):
        session.save_state(None)


def test_api_hooks_hold_functions(small):
    model, tok = small
    for hooks in (Hooks(on_token="x"), Hooks(after_prompt=5)):
        with pytest.raises(TypeError, match=r"^Hooks\.(on_token|after_prompt) must be a function"):
            generate(model, [tok.encode(TEXT)], 1, hooks=hooks)
