"""A synthetic corpus for the training and evaluation tests: seeded word salad, one file per document."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the whale sea ship ahab and of to a in his was white captain boat harpoon deck sail".split()  # noqa: SIM905


def write_corpus(root: Path, n_docs: int = 10, seed: int = 0) -> Path:
    """``n_docs`` documents of 300 sentences of 3-12 words each under ``root``; returns ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(300)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
