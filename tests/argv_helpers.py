"""Building command lines in tests: a case's options over a valid base command."""

from __future__ import annotations

REPEATABLE = {"--model", "--set", "--prompt"}  # options meant to be given several times


def last_wins(argv: list[str]) -> list[str]:
    """``argv`` with an earlier occurrence of an option that is given again removed (with its values):
    a case adds ``--lengths 20`` to a base that has ``--lengths 600``, and the command refuses an
    option given twice. Options in ``REPEATABLE`` are kept."""
    spans, start = [], 0
    for i in range(1, len(argv) + 1):
        if i == len(argv) or argv[i].startswith("--"):
            spans.append(argv[start:i])
            start = i
    names = [span[0].split("=", 1)[0] for span in spans]  # --option=value: the option's name
    kept = []
    for i, span in enumerate(spans):
        name = names[i]
        later = name in names[i + 1 :]
        if not (name.startswith("--") and name not in REPEATABLE and later):
            kept.extend(span)
    return kept
