"""How many CPU threads inference uses, and why one by default.

Reading and generating run many short parallel regions per step (matrix products of a chunk, the
retrieval kernel of each layer). With two or more threads every region ends at a barrier that waits
for its slowest thread; when another CPU-bound process shares the cores, one of our threads is often
descheduled and the others spin or sleep at the barrier, so a step takes several times longer than
with one thread (on this project's 2-core machine two threads next to a busy neighbour took 2.2x
(prompt) and 3.0x (decoding) the time of one thread on the idle machine; docs/inference.md "Threads").
One thread never waits for another: with a neighbour on the other core it runs as fast as on an idle
machine, and on an idle machine it gives up at most the speed-up of the second core.

So inference entry points (``InferenceSession.feed``/``read``, ``landmark.hf.generate``, the
evaluations) run with ``inference_threads()`` threads: ``LANDMARK_THREADS`` from the environment
(an integer >= 1), else 1. Set ``LANDMARK_THREADS=2`` (or more) on a machine whose cores are yours
alone. Training is not affected: it keeps torch's own setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from landmark.config import MAX_THREADS

DEFAULT_THREADS = 1  # see the module docstring
ENV = "LANDMARK_THREADS"


def inference_threads() -> int:
    """Threads for inference: ``$LANDMARK_THREADS`` (>= 1) or ``DEFAULT_THREADS``."""
    value = os.environ.get(ENV)
    if value is None or value == "":
        return DEFAULT_THREADS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{ENV} must be an integer in [1, {MAX_THREADS}]; got {value!r}")
    return n


@contextmanager
def using_threads(n: int | None = None) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads (default ``inference_threads()``), then restore."""
    n = inference_threads() if n is None else n
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
