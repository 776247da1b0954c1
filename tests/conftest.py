"""Shared test set-up.

* Triton kernels run through the interpreter on a machine without CUDA: TRITON_INTERPRET must be set
  before triton is first imported, so it is set here, at collection time.
* torch.compile's on-disk caches go to a fresh folder per test session: a cached graph compiled
  against an older signature of one of our custom ops would otherwise be replayed.
* ``poison_empty``: makes ``torch.empty``/``torch.empty_like`` return NaN-filled tensors, so that an
  implementation that reads memory it never wrote shows up as NaN in the results.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="landmark-tests-inductor-")


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest (and steadiest on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory) -> dict:
    """The synthetic corpus of tests/corpus_helpers.py, prepared once per test session (BPE 512), and
    the --set overrides that train on it (shared by the training, hostile-input and evaluation tests)."""
    import json

    from corpus_helpers import write_corpus

    from landmark.data import prepare_data

    root = tmp_path_factory.mktemp("corpus")
    corpus = write_corpus(root / "corpus")
    prepared = root / "prepared"
    prepare_data(corpus, prepared, "bpe", 512, progress=False)
    overrides = [
        f"data.corpus={json.dumps(str(corpus))}",
        f"data.prepared_dir={json.dumps(str(prepared))}",
        "train.threads=1",
        "train.progress=false",
    ]
    return {"root": root, "corpus": corpus, "prepared": prepared, "overrides": overrides}
