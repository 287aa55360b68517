"""A prompt built from sources (documents, sentences) and a query, and which tokens belong to which source.

``build_prompt(tokenizer, sources, query)`` puts the sources into a template (``{context}``: the sources joined by
``separator``; ``{query}``: the query), wraps the result in the tokenizer's chat template when it has one (as the
user's message, followed by the generation prompt), tokenizes it once and records, by character offsets, where
every source and the query lie in the prompt text. ``ContextPrompt.weights()`` turns that into a
token × part matrix W: the attribution of a source is ``Σ_t W[t, source] · score[t]``.

**A token shared by two parts** (e.g. a BPE merge across a boundary, or a leading space that belongs to the
separator while the word belongs to the source) is split between them in proportion to the characters it shares
with each, counting non-whitespace characters only (a token made only of whitespace counts all of its characters).
So `" The"` after a separator `" "` belongs wholly to the source that starts with "The", and a token `"ab"` made of
the last character of one source and the first of the next gives each half of its score. The share of a token that
lies in no source and not in the query (template text, the chat template's markup, special tokens, separators)
goes to the part ``"other"``.
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ContextPrompt", "PromptFormat", "build_prompt", "check_template", "check_sources", "has_chat_template",
           "DEFAULT_TEMPLATE", "DEFAULT_PLAIN_TEMPLATE",
           "DEFAULT_SEPARATOR"]

# ContextCite's prompt (github.com/MadryLab/context-cite): the user's message under a chat template ...
DEFAULT_TEMPLATE = "Context: {context}\n\nQuery: {query}"
# ... and, for a tokenizer without a chat template, the same with a cue for the answer
DEFAULT_PLAIN_TEMPLATE = DEFAULT_TEMPLATE + "\nAnswer:"
DEFAULT_SEPARATOR = "\n"
_FIELDS = ("context", "query")


def check_template(template) -> list[tuple[str, str | None]]:
    """The template's pieces as (literal text, field name or None); a clear error unless it has exactly one
    ``{context}`` and one ``{query}`` and no other field (literal braces are written ``{{`` and ``}}``)."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string with the fields {{context}} and {{query}}, got "
                        f"{type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e}); write literal braces as "
                         "{{ and }}") from None
    pieces, seen = [], []
    for literal, field, spec, conversion in parsed:
        if field is not None and (field not in _FIELDS or spec or conversion):
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"template {template!r} has the field {shown}; accepted fields: {{context}} (the sources) "
                             "and {query}, each exactly once (write literal braces as {{ and }})")
        pieces.append((literal, field))
        if field is not None:
            seen.append(field)
    for name in _FIELDS:
        if seen.count(name) != 1:
            where = "the sources" if name == "context" else "the query"
            problem = "has no place for" if name not in seen else f"has {seen.count(name)} places for"
            raise ValueError(f"template {template!r} {problem} {where}: it needs {{{name}}} exactly once "
                             f"(e.g. {DEFAULT_TEMPLATE!r})")
    return pieces


def check_sources(sources, query) -> list[str]:
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a list of strings (documents, sentences), got {type(sources).__name__}"
                        + ("; wrap a single text in a list: [text]" if isinstance(sources, str) else ""))
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty: give at least one source (a list of non-empty strings)")
    for i, s in enumerate(sources):
        if not isinstance(s, str):
            raise TypeError(f"source {i} is a {type(s).__name__}, not a string; sources must be a list of strings")
        if not s.strip():
            raise ValueError(f"source {i} is empty{' (only whitespace)' if s else ''}: every source needs some text "
                             "(drop empty ones before calling)")
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty: give the question (or instruction) the answer responds to")
    return sources


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class PromptFormat:
    """How sources and a query become a prompt: the template, the separator and whether the tokenizer's chat
    template wraps it (see :func:`build_prompt`)."""

    template: str
    separator: str
    chat: bool

    @classmethod
    def resolve(cls, tokenizer, template: str | None = None, separator: str = DEFAULT_SEPARATOR,
                chat: bool | None = None) -> PromptFormat:
        if chat is None:
            chat = has_chat_template(tokenizer)
        elif not isinstance(chat, bool):
            raise TypeError(f"chat must be True, False or None (when the tokenizer has a chat template), got {chat!r}")
        elif chat and not has_chat_template(tokenizer):
            raise ValueError("chat=True, but this tokenizer has no chat template; pass chat=False (or None: use one "
                             "when the tokenizer has it)")
        if template is None:
            template = DEFAULT_TEMPLATE if chat else DEFAULT_PLAIN_TEMPLATE
        check_template(template)
        if not isinstance(separator, str):
            raise TypeError(f"separator must be a string, got {type(separator).__name__}")
        return cls(template, separator, chat)

    def render(self, tokenizer, sources: Sequence[str], query: str):
        """(prompt text, each source's character span, the query's span). Any number of sources, none included
        (an ablation that removes them all)."""
        message, context_at, query_span = "", 0, (0, 0)
        for literal, field in check_template(self.template):
            message += literal
            if field == "context":
                context_at = len(message)
                message += self.separator.join(sources)
            elif field == "query":
                query_span = (len(message), len(message) + len(query))
                message += query
        text, shift = message, 0
        if self.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True)
            shift = text.find(message)
            if shift < 0:
                raise ValueError("the tokenizer's chat template changes the message text (e.g. strips or escapes "
                                 "it), so the sources cannot be located in the prompt; pass chat=False, or a template "
                                 "and sources without leading or trailing whitespace")
        spans, at = [], shift + context_at
        for s in sources:
            spans.append((at, at + len(s)))
            at += len(s) + len(self.separator)
        return text, spans, (shift + query_span[0], shift + query_span[1])

    def encode(self, tokenizer, texts: list[str], *, offsets: bool = False):
        """The tokenizer's encoding of prompt texts: a chat template writes its own special tokens (BOS) into the
        text, a plain prompt gets the tokenizer's."""
        try:
            return tokenizer(texts, add_special_tokens=not self.chat, return_offsets_mapping=offsets)
        except NotImplementedError:
            raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; attributing sources needs a "
                            "fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))") from None


@dataclass
class ContextPrompt:
    """A tokenized prompt and where its parts are: ``source_spans[j]`` and ``query_span`` are [start, end) character
    ranges of ``text``; ``offsets[t]`` is token t's character range (special tokens: an empty range)."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    sources: list[str]
    query: str
    source_spans: list[tuple[int, int]]
    query_span: tuple[int, int]
    format: PromptFormat

    @property
    def chat(self) -> bool:
        return self.format.chat

    def weights(self) -> np.ndarray:
        """``[P, n + 2]`` float64: the share of token t in source j (columns 0 … n−1), in the query (column n) and
        in the rest of the prompt (n + 1). Every row sums to 1 (see the module docstring for shared tokens)."""
        parts = len(self.sources) + 2
        owner = np.full(len(self.text), parts - 1)          # the part each character of the text belongs to
        for j, (start, end) in enumerate([*self.source_spans, self.query_span]):
            owner[start:end] = j
        visible = np.array([not c.isspace() for c in self.text], dtype=bool)
        w = np.zeros((len(self.input_ids), parts))
        for t, (start, end) in enumerate(self.offsets):
            chars = owner[start:end]
            if chars.size == 0:          # a special token: no characters of the text
                w[t, -1] = 1.0
                continue
            shown = visible[start:end]
            if shown.any():
                chars = chars[shown]
            w[t] = np.bincount(chars, minlength=parts) / chars.size
        return w

    def ablated_ids(self, tokenizer, keep) -> list[list[int]]:
        """The token ids of the prompt rebuilt from the kept sources only, one list per row of ``keep``
        (``[A, n]`` booleans, True = kept), as ContextCite ablates: a removed source's text (and its separator) is
        not in the prompt at all."""
        keep = np.asarray(keep, dtype=bool).reshape(-1, len(self.sources))
        texts = [self.format.render(tokenizer, [s for s, k in zip(self.sources, row) if k], self.query)[0]
                 for row in keep]
        return [list(map(int, ids)) for ids in self.format.encode(tokenizer, texts)["input_ids"]]


def build_prompt(tokenizer, sources: Sequence[str], query: str, *, template: str | None = None,
                 separator: str = DEFAULT_SEPARATOR, chat: bool | None = None) -> ContextPrompt:
    """The prompt for ``sources`` and ``query``, tokenized, with every source's span.

    ``template``: a format string with ``{context}`` and ``{query}`` (default :data:`DEFAULT_TEMPLATE` under a
    chat template, else :data:`DEFAULT_PLAIN_TEMPLATE`). ``chat``: wrap the filled-in template in the tokenizer's
    chat template as the user's message, with the generation prompt (default: when the tokenizer has one).
    Sources are joined by ``separator``. Needs a fast tokenizer (character offsets)."""
    sources = check_sources(sources, query)
    fmt = PromptFormat.resolve(tokenizer, template, separator, chat)
    text, spans, query_span = fmt.render(tokenizer, sources, query)
    encoded = fmt.encode(tokenizer, [text], offsets=True)
    offsets = [tuple(map(int, o)) for o in encoded["offset_mapping"][0]]
    return ContextPrompt(text, [int(i) for i in encoded["input_ids"][0]], offsets, sources, query, spans, query_span,
                         fmt)
