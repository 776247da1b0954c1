"""Evaluations of the paper: perplexity against context length, passkey retrieval (method section 6)."""

from landmark.eval.models import GPTUnderTest, HFUnderTest, ModelUnderTest, Reading, load_models
from landmark.eval.passkey import PasskeyTask, evaluate_passkey, passkey_table, plot_passkey
from landmark.eval.perplexity import Setting, evaluate_perplexity, perplexity_table, plot_perplexity

__all__ = [
    "GPTUnderTest",
    "HFUnderTest",
    "ModelUnderTest",
    "PasskeyTask",
    "Reading",
    "Setting",
    "evaluate_passkey",
    "evaluate_perplexity",
    "load_models",
    "passkey_table",
    "perplexity_table",
    "plot_passkey",
    "plot_perplexity",
]
