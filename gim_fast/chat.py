"""Special tokens and chat prompts: which tokens are markup rather than text, and a user's message wrapped in the
tokenizer's chat template.

**Special tokens.** ``tokenizer.all_special_ids`` lists only the named ones (``<bos>``, ``<eos>``, ``<pad>``, ...);
chat markup such as Gemma's ``<start_of_turn>``/``<end_of_turn>`` is special only in ``added_tokens_decoder``
(``special=True``). :func:`special_token_ids` is the union: every view keeps these tokens off its colour scale.

**Chat prompts.** An instruct model is used through its chat template: :func:`chat_prompt` renders the user's
message with ``tokenizer.apply_chat_template`` (the generation prompt included, so the model's answer comes next),
tokenizes the result once and records which tokens are the user's message and which are the template's (role
markers, a system prompt the template adds, special tokens). Attributions of a chat prompt score the message's
tokens only: the template's tokens are held at their value (as if part of the baseline), so their score is 0, and
every view marks them as special.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["special_token_ids", "special_mask", "has_chat_template", "ChatPrompt", "chat_prompt", "NoChatTemplate"]


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids of every special token: ``all_special_ids`` and the added tokens flagged ``special`` (chat markup
    like Gemma's ``<start_of_turn>``, which ``all_special_ids`` does not list)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


def special_mask(tokenizer, token_ids) -> list[bool]:
    """One flag per id: whether it is a special token (see :func:`special_token_ids`)."""
    special = special_token_ids(tokenizer)
    return [int(i) in special for i in token_ids]


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (``tokenizer.chat_template``)."""
    return bool(getattr(tokenizer, "chat_template", None))


class NoChatTemplate(ValueError):
    """A chat prompt was asked for, but the tokenizer has no chat template."""


@dataclass(frozen=True)
class ChatPrompt:
    """A user's message in the chat template: ``text`` (the rendered prompt, ending with the generation prompt),
    ``input_ids``, ``message_span`` (the message's characters in ``text``) and ``template`` (one flag per token:
    True for the template's tokens, False for the message's)."""

    text: str
    input_ids: list[int]
    message_span: tuple[int, int]
    template: list[bool]

    @property
    def message_tokens(self) -> int:
        return self.template.count(False)


def chat_prompt(tokenizer, message: str, *, what: str = "--chat") -> ChatPrompt:
    """``message`` as the user's turn of the tokenizer's chat template, followed by the generation prompt.

    A token belongs to the message when its characters overlap the message's in the rendered text and it is not a
    special token; every other token is the template's. Raises :class:`NoChatTemplate` (a ValueError) for a
    tokenizer without a chat template (a base model such as Gemma-3-270M), ValueError for an empty message or a
    template that changes the message's text, TypeError for a non-string message. ``what`` names the option in
    the messages."""
    if not isinstance(message, str):
        raise TypeError(f"{what}: the user's message must be a string, got {type(message).__name__}")
    if not message.strip():
        raise ValueError(f"{what}: the user's message is empty")
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise NoChatTemplate(f"{what}: this model's tokenizer ({name}) has no chat template, so there is no chat "
                             "format to put the message in (a base model, not an instruct one); leave out --chat "
                             "(chat=False) and give the text as the model should read it")
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    start = text.find(message)
    if start < 0:
        raise ValueError(f"{what}: the chat template changes the message's text (it strips or escapes it), so its "
                         "tokens cannot be told from the template's; strip leading and trailing whitespace")
    end = start + len(message)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise TypeError(f"{what}: {type(tokenizer).__name__} gives no character offsets; a chat prompt needs a fast "
                        "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))") from None
    ids = [int(i) for i in encoded["input_ids"]]
    special = special_token_ids(tokenizer)
    template = [i in special or not (s < end and e > start) for i, (s, e) in zip(ids, encoded["offset_mapping"])]
    return ChatPrompt(text, ids, (start, end), template)
