"""Passkey samples in a chat template (``landmark hf finetune --passkey-chat``): the prompt is the user's
message, the answer prefix and the value the assistant's reply; exact lengths, seeded, and the plain
samples unchanged when the share is 0."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import make_tokenizer

from landmark.data.passkey import ChatTurns, Needle, PasskeyMix, PasskeyPrompts
from landmark.data.wordings import FAMILIES
from landmark.hf.passkey import HFTokenEncoder, PasskeyMixWindows, chat_turns

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_chat_turns_are_what_the_template_puts_around_the_message(tok):
    turns = chat_turns(tok)
    assert tok.decode(list(turns.user)) == "<|im_start|>user\n"
    assert tok.decode(list(turns.assistant)) == "<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match=r"--passkey-chat: .* no chat template"):
        chat_turns(make_tokenizer())


@pytest.mark.parametrize("length", [301, 444])
@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[4], FAMILIES[6]])
def test_a_chat_prompt_is_the_user_message_and_the_reply_opens_with_the_answer_prefix(tok, length, family):
    enc = HFTokenEncoder(tok)
    prompts = PasskeyPrompts(enc, wording=family, chat=chat_turns(tok))
    value = "48213" if "number5" in family.kinds else "Quentin"
    for depth in (0.0, 0.5, 1.0):
        prompt, _ = prompts.compose(length, [Needle(value, depth)])
        assert len(prompt) == length
        text = tok.decode(prompt)
        assert text.startswith("<|im_start|>user\n" + "There is an important info")
        assert family.key_text(value) in text
        reply = (
            f"{family.question_text(answer=False)}<|im_end|>\n<|im_start|>assistant\n{family.answer_text()}"
        )
        assert text.endswith(reply), text[-200:]


def test_plain_prompts_are_unchanged_by_the_chat_option(tok):
    enc = HFTokenEncoder(tok)
    plain, chat = PasskeyPrompts(enc), PasskeyPrompts(enc, chat=ChatTurns((), ()))
    assert plain.compose(300, [Needle(12345, 0.5)]) != chat.compose(300, [Needle(12345, 0.5)])  # no space
    # empty turns differ from plain text only in the answer prefix's leading space
    assert tok.decode(chat.question).replace("? The", "?The") == tok.decode(plain.question).replace(
        "? The", "?The"
    )


def test_the_mix_puts_a_share_of_its_samples_in_the_chat_template(tok):
    base = [{"input_ids": torch.zeros(400, dtype=torch.long)}] * 80
    plain = PasskeyMixWindows(
        base, tok, raw_tokens=400, block_size=8, mix=PasskeyMix(1.0, multikey=0.3), seed=3
    )
    mix = PasskeyMixWindows(
        base, tok, 400, 8, PasskeyMix(1.0, multikey=0.3, chat=0.5, wordings="train"), seed=3
    )
    chats = [i for i in range(80) if mix.variant(i).chat]
    assert 20 < len(chats) < 60
    assert [mix.variant(i)[:3] for i in range(80)] == [plain.variant(i)[:3] for i in range(80)]
    for i in range(80):
        ids = mix[i]["input_ids"]
        assert ids.shape == (400,) and torch.equal(ids, mix[i]["input_ids"])  # exact length, seeded
        text = tok.decode(ids)
        assert (text.count("<|im_start|>assistant\n") == 1) == (i in chats)
        if i in chats:  # the reply holds the answer prefix and the value, nothing of the prompt
            reply = text.split("<|im_start|>assistant\n")[1]
            assert reply.endswith(".") and "<|im_end|>" not in reply and len(reply) < 80
    again = PasskeyMixWindows(base, tok, 400, 8, PasskeyMix(1.0, multikey=0.3, chat=0.0), seed=3)
    assert all(torch.equal(again[i]["input_ids"], plain[i]["input_ids"]) for i in range(20))
    with pytest.raises(ValueError, match="chat must be in"):
        PasskeyMixWindows(base, tok, 400, 8, PasskeyMix(1.0, chat=1.5))
