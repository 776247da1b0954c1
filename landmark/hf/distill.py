"""Distillation toward the base model: the landmark model stays its base inside the base's window.

A landmark fine-tune should add the blocks beyond the base model's window and keep everything else.
Inside a training window the base model sees the whole context with its own attention, so its
next-token distribution there is a target the landmark model can match at every position: the loss of
``landmark hf finetune --distill BASE`` is::

    loss = cross-entropy(student, next token) + weight * KL(teacher || student)

per scored position (regular tokens; landmarks are inputs, never targets), where the teacher is the
unconverted base model reading the window's regular tokens without landmarks, and the student's
distribution is renormalised over the teacher's vocabulary (without the landmark token). With a
passkey sample in the window the teacher still gives its own answer distribution: the key is inside
its window, so it can read it.

:class:`DistillCollator` adds the teacher's inputs to a :class:`~landmark.hf.collator.LandmarkCollator`
batch: ``teacher_ids`` (B, R) regular tokens, right-padded, with ``teacher_mask`` (B, R), and
``teacher_index`` (B, T): for each student position with a target, the teacher position that predicts
the same token (-1 elsewhere)::

    raw tokens      a b c d e f g h           (block_size 4, L landmark)
    input_ids       a b c L d e f L
    shift_labels    b c d - e f g -
    teacher_ids     a b c d e f g
    teacher_index   0 1 2 - 3 4 5 -
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from landmark.hf.checks import check_model_folder, for_option, load_causal_lm, loading, read_config
from landmark.hf.collator import IGNORE_INDEX, LandmarkCollator
from landmark.optional import require

TEACHER_KEYS = ("teacher_ids", "teacher_mask", "teacher_index")  # batch entries only the teacher reads


class DistillCollator(LandmarkCollator):
    """A :class:`LandmarkCollator` whose batches also carry the teacher's inputs (module docstring)."""

    def __call__(self, features: Sequence[Mapping[str, Any] | Sequence[int] | Tensor]) -> dict[str, Tensor]:
        batch = super().__call__(features)
        input_ids, targets = batch["input_ids"], batch["shift_labels"]
        regular = (input_ids != self.landmark_id) & (batch["attention_mask"] == 1)  # (B, T)
        position = torch.cumsum(regular.long(), 1) - 1  # (B, T) the regular token at each position
        width = int(regular.sum(1).max())
        teacher_ids = torch.full((input_ids.shape[0], width), self.pad_id, dtype=torch.long)
        teacher_mask = torch.zeros_like(teacher_ids)
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row][regular[row]]
            teacher_ids[row, : len(tokens)] = tokens
            teacher_mask[row, : len(tokens)] = 1
        scored = regular & (targets != IGNORE_INDEX)
        batch["teacher_ids"], batch["teacher_mask"] = teacher_ids, teacher_mask
        batch["teacher_index"] = torch.where(scored, position, torch.full_like(position, -1))
        return batch


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, teacher_index: Tensor) -> Tensor:
    """Summed KL(teacher || student) over the positions ``teacher_index >= 0``.

    Args:
        student_logits: (B, T, V_s) with V_s >= V_t (the landmark model's vocabulary holds the landmark
            token beyond the base's); renormalised over the first V_t entries.
        teacher_logits: (B, R, V_t).
        teacher_index: (B, T) the teacher position of each student position, -1 where not scored.

    Returns:
        A float32 scalar (nats, summed over positions).
    """
    rows, cols = torch.nonzero(teacher_index >= 0, as_tuple=True)
    vocab = teacher_logits.shape[-1]
    student = torch.log_softmax(student_logits[rows, cols, :vocab].float(), -1)  # (N, V_t)
    teacher = torch.log_softmax(teacher_logits[rows, teacher_index[rows, cols]].float(), -1)  # (N, V_t)
    return (teacher.exp() * (teacher - student)).sum()


def check_teacher_folder(folder: str | Path) -> Path:
    """``--distill``'s folder as a Path: a model folder, and not a landmark model (the teacher is the
    base model, read with its own attention). Checked from its files, before any model is loaded.

    Raises:
        ValueError: naming ``--distill``.
    """
    try:
        folder = check_model_folder(folder, "--distill")
    except ValueError as err:
        raise for_option(err, "--distill") from None
    if read_config(folder).get("landmark_token_id") is not None:
        raise ValueError(f"--distill {folder} is a landmark model: give the base model it was made from")
    return folder


def load_teacher(folder: str | Path, student_tokenizer: Any, max_tokens: int, dtype: Any = None) -> Any:
    """The frozen base model of ``folder`` (its own attention), checked against the student.

    Raises:
        ValueError (naming ``--distill``): not a model folder, a landmark model, a tokenizer whose
            tokens are not the student's (other than ``<landmark>``), or windows of ``max_tokens``
            beyond its positions.
    """
    transformers = require("transformers")

    folder = check_teacher_folder(folder)
    config = read_config(folder)
    limit = int(config.get("max_position_embeddings") or 0)
    if limit and max_tokens > limit:
        raise ValueError(
            f"--distill: windows of {max_tokens} tokens exceed the teacher's {limit} positions (it must "
            "see the whole window): use a shorter --max-length"
        )
    with loading(folder):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        teacher = load_causal_lm(folder, dtype=dtype)
    student = student_tokenizer.get_vocab()
    if any(student.get(token) != i for token, i in tokenizer.get_vocab().items()):
        raise ValueError(f"--distill {folder}: its tokenizer is not the fine-tuned model's base tokenizer")
    teacher.requires_grad_(False)
    return teacher.eval()


def distilling_trainer_class() -> type:
    """A ``transformers.Trainer`` subclass whose loss adds ``weight * KL(teacher || student)`` per
    scored token (built here so that transformers is imported only when needed)."""
    transformers = require("transformers")

    class DistillingTrainer(transformers.Trainer):
        """``Trainer(..., teacher=MODEL, distill_weight=W)`` with a :class:`DistillCollator`."""

        def __init__(self, *args: Any, teacher: Any, distill_weight: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher, self.distill_weight = teacher.to(self.args.device), float(distill_weight)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher_in = {key: inputs.pop(key) for key in TEACHER_KEYS}
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            with torch.no_grad():
                logits = self.teacher(
                    input_ids=teacher_in["teacher_ids"], attention_mask=teacher_in["teacher_mask"]
                ).logits
            kl = distillation_kl(outputs.logits, logits, teacher_in["teacher_index"])
            loss = loss + self.distill_weight * kl / self._scored(
                teacher_in["teacher_index"], num_items_in_batch
            )
            return (loss, outputs) if return_outputs else loss

        def _scored(self, index: Tensor, num_items_in_batch: Any) -> Tensor:
            """What the cross-entropy is divided by, so that the KL is per scored token as well: the
            tokens of the whole accumulated batch when the Trainer counts them (over every process,
            where it then multiplies the loss by the number of processes), else this micro-batch's."""
            if num_items_in_batch is None:
                return (index >= 0).sum().clamp_min(1)
            count = torch.as_tensor(num_items_in_batch, device=index.device).clamp_min(1)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                count = count / self.accelerator.num_processes
            return count

    return DistillingTrainer
