"""The Python API under hostile arguments: a ValueError naming the argument, before any work."""

from __future__ import annotations

import os

import pytest

from landmark.checkpoint import load_model
from landmark.hf.checks import check_out_folder
from landmark.inference import InferenceSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(REPO, "checkpoints", "passkey-landmark")


@pytest.mark.parametrize("device", ["bogus", "cuda:x", 3.5])
def test_an_unknown_memory_device_is_a_value_error(device):
    model, _, _ = load_model(SMALL)
    with pytest.raises(ValueError, match="memory_device must be a device"):
        InferenceSession(model, 1, memory_device=device)


@pytest.mark.parametrize("out", [".", "..", "{cwd}", "{parent}"])
def test_an_output_folder_never_is_the_current_folder_or_holds_it(tmp_path, monkeypatch, out):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = out.format(cwd=work, parent=work.parent)
    with pytest.raises(ValueError, match="is the current folder or holds it"):
        check_out_folder(out, overwrite=True, name="--out")
    assert check_out_folder(work / "new", overwrite=False) == work / "new"


@pytest.mark.parametrize("lengths", [[70], [-1], [3.0], [[2]], [1, 2]])
def test_impossible_lengths_are_refused_not_clamped(lengths):
    import torch

    model, tok, _ = load_model(SMALL)
    session = InferenceSession(model, 1)
    ids = torch.tensor([tok.encode("the sea and the ship")])[:, :5]
    with pytest.raises(ValueError, match="lengths must"):
        session.feed(ids, torch.tensor(lengths))
    assert int(session.length[0]) == 0  # nothing was read
