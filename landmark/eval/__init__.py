"""Evaluations of the paper: perplexity against context length, passkey retrieval (method section 6)."""

from landmark.eval.passkey import evaluate_passkey, passkey_table, plot_passkey
from landmark.eval.perplexity import Setting, evaluate_perplexity, perplexity_table, plot_perplexity

__all__ = [
    "Setting",
    "evaluate_passkey",
    "evaluate_perplexity",
    "passkey_table",
    "perplexity_table",
    "plot_passkey",
    "plot_perplexity",
]
