"""Loading a run folder while a run trains into it.

A run with ``train.keep_checkpoints = 1`` prunes its older ``step_*`` folder as soon as it writes a new
one; a loader (``landmark generate --checkpoint RUN``, ``eval``) that picked the latest checkpoint just
before can find it gone half-way through reading it. Loading a run folder then retries with the new
latest checkpoint; a checkpoint folder named explicitly that disappears is one precise line ("checkpoint
step_X was removed while loading (a run is training into RUN): try again"), never "the checkpoint is
incomplete". A pruned folder is renamed away before it is deleted, so a reader never sees it half-deleted.

The race runs for real: a writer thread saves checkpoints with ``keep=1`` as fast as it can while the
test loads in a loop (a few hundred loads, at most ~15 s each).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from landmark.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    open_checkpoint,
    save_checkpoint,
)
from landmark.train import train
from landmark.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
LOADS = 300  # per race
SECONDS = 15.0  # at most, per race


@pytest.fixture(scope="module")
def run(prepared_corpus, tmp_path_factory) -> Path:
    """A finished 1-step run of the tiny preset, its one checkpoint kept."""
    out = tmp_path_factory.mktemp("concurrency") / "run"
    overrides = [*prepared_corpus["overrides"], f"train.out_dir={json.dumps(str(out))}"]
    train(
        load_config(TINY, [*overrides, "train.max_steps=1", "train.eval_every=0", "train.keep_checkpoints=1"])
    )
    return out


class Pruner(threading.Thread):
    """Writes checkpoint after checkpoint into ``run`` with keep=1 (what a training run does), until
    stopped; counts what it wrote."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.stop, self.saved, self.error = run, threading.Event(), 0, None
        self.model, self.tokenizer, config = load_model(run)
        self.config = {k: v for k, v in config.items() if k not in ("format", "step")}
        self.step = open_checkpoint(run).step

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step += 1
                state = {"step": self.step, "optimizer": {}, "rng_cpu": torch.get_rng_state()}
                save_checkpoint(
                    self.run_dir, self.step, self.model, self.config, self.tokenizer, state, keep=1
                )
                self.saved += 1
        except BaseException as err:  # reported by the test
            self.error = err


def race(run: Path, pick) -> tuple[int, list[str], int]:
    """Load ``pick()`` in a loop while a Pruner writes; returns (loads that succeeded, the messages of the
    ones that failed, checkpoints written meanwhile)."""
    pruner = Pruner(run)
    pruner.start()
    ok, failures, deadline = 0, [], time.monotonic() + SECONDS
    try:
        for _ in range(LOADS):
            if time.monotonic() > deadline:
                break
            try:
                model, tokenizer, config = load_model(pick())
            except CheckpointError as err:
                failures.append(str(err))
            else:
                assert tokenizer.landmark_id == model.config.landmark_id and isinstance(config["step"], int)
                ok += 1
    finally:
        pruner.stop.set()
        pruner.join(timeout=30)
    assert pruner.error is None, repr(pruner.error)
    return ok, failures, pruner.saved


def test_loading_a_run_folder_survives_pruning(run, one_thread):
    """Every load of the run folder succeeds: a pruned pick is retried with the new latest checkpoint."""
    ok, failures, saved = race(run, lambda: run)
    assert saved >= 20, f"the writer wrote only {saved} checkpoints: no race"
    precise = [f for f in failures if "was removed while loading (a run is training into" in f]
    assert failures == precise, failures[:3]
    assert ok >= 0.9 * (ok + len(failures)), (ok, failures[:3])
    assert len(list_checkpoints(run)) == 1 and not any(
        p.name.startswith(".") for p in (run / "checkpoints").iterdir()
    )


def test_an_explicit_checkpoint_pruned_while_loading_says_so(run, one_thread):
    """A checkpoint folder named explicitly (picked as the latest a moment before): each load succeeds or
    says precisely that the checkpoint was removed by a training run, never that it is incomplete."""
    ok, failures, saved = race(run, lambda: latest_checkpoint(run) or run)
    assert saved >= 20, f"the writer wrote only {saved} checkpoints: no race"
    for message in failures:  # removed while loading, or before (pruned since it was picked)
        removed = "was removed while loading (a run is training into" in message and "try again" in message
        gone = "is gone (a training run prunes its older checkpoints as it goes)" in message
        assert removed or gone, message
        assert str(run) in message and message.count("\n") == 0
    assert ok > 0


def test_a_pruned_checkpoint_is_never_seen_half_deleted(run, tmp_path):
    """Pruning renames the folder away before deleting it: the step_* names a reader lists are always
    complete folders (or gone)."""
    pruner = Pruner(run)
    pruner.start()
    seen_incomplete, deadline = [], time.monotonic() + 5
    complete = ("config.json", "model.safetensors", "tokenizer.json", "state.pt")
    try:
        while time.monotonic() < deadline:
            for folder in list_checkpoints(run):
                missing = [name for name in complete if not (folder / name).is_file()]
                if missing and folder.is_dir():  # files gone while the folder keeps its step_* name
                    seen_incomplete.append((folder.name, missing))
    finally:
        pruner.stop.set()
        pruner.join(timeout=30)
    assert pruner.error is None and not seen_incomplete, seen_incomplete[:3]
