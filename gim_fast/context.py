"""``attribute_context``: which sources (documents, sentences) of a prompt an answer came from.

    result = gim_fast.attribute_context(model, tokenizer, sources, "What is the capital of Peru?")
    result                  # one row per source: its text, its score for the whole answer, its rank
    result.answer           # the answer (generated greedily when none is given)
    result.per_token()      # per answer token, its top sources

The prompt is built from the sources (``gim_fast.sources.build_prompt``: a template, the tokenizer's chat template
when it has one), the answer generated when none is given, and the answer attributed with
``gim_fast.explain_answer`` (one forward pass). A source's score is the sum of its tokens' scores (a token shared
with a neighbour is split by the characters it shares with each: see ``gim_fast.sources``).
"""
from __future__ import annotations

import torch

from .answers import explain_answer_with, max_positions
from .integration import check_model, eval_mode, tlens
from .settings import DEFAULTS, TARGETS, GIMSettings
from .sources import DEFAULT_SEPARATOR, build_prompt

__all__ = ["attribute_context", "attribute_context_with", "generate_answers"]


def generate_answers(model, tokenizer, prompts, max_new_tokens: int = 64, **generate_kwargs) -> list[list[int]]:
    """The model's own continuation of each prompt (lists of token ids; a batch is left-padded), greedy unless
    ``generate_kwargs`` say otherwise, up to ``max_new_tokens`` tokens, cut before the first end-of-sequence token
    (which is not part of the answer). ``generate_kwargs`` go to ``model.generate`` (e.g. ``do_sample=True``, or
    ``stop_strings=["\\n"]``, which gets the tokenizer passed along). The model is left as it was."""
    config = model.generation_config
    eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad = next((p for p in (config.pad_token_id, getattr(tokenizer, "pad_token_id", None)) if p is not None),
               min(eos, default=0))
    prompts = [[int(t) for t in p] for p in prompts]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    device = model.get_input_embeddings().weight.device
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad, **generate_kwargs}
    if kwargs.get("stop_strings") is not None:
        kwargs.setdefault("tokenizer", tokenizer)
    with eval_mode(model), torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
    answers = []
    for row in out[:, longest:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row))
        answers.append([int(t) for t in row[:stop]])
    return answers


def _answer_ids(tokenizer, answer) -> list[int]:
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string or None (generate one), got {type(answer).__name__}")
    if not answer.strip():
        raise ValueError("answer is empty: give the answer's text, or answer=None to generate one")
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise ValueError(f"answer {answer!r} encodes to no token")
    return [int(i) for i in ids]


def attribute_context(model, tokenizer, sources, query: str, answer: str | None = None, *, template: str | None = None,
                      separator: str = DEFAULT_SEPARATOR, chat: bool | None = None, per_token: bool = True,
                      target: str = "logprob", max_new_tokens: int = 64, baseline_token_id=None,
                      freeze_norm=DEFAULTS.freeze_norm, softmax_temperature=DEFAULTS.softmax_temperature,
                      q_scale=DEFAULTS.q_scale, k_scale=DEFAULTS.k_scale, v_scale=DEFAULTS.v_scale,
                      gate_scale=DEFAULTS.gate_scale, up_scale=DEFAULTS.up_scale, backend=DEFAULTS.backend,
                      chunk=None, **generate_kwargs):
    """Attribute an answer to the sources of its prompt.

    Args:
        model, tokenizer: a causal LM of a supported family and its (fast) tokenizer.
        sources: the documents or sentences of the context, a list of non-empty strings, in prompt order.
        query: the question or instruction, a non-empty string.
        answer: the answer to attribute (its text; tokenized alone, without special tokens). None: generate it
            with the model's own ``generate`` — greedy, at most ``max_new_tokens`` tokens, stopping at the
            end-of-sequence token; other keywords (``**generate_kwargs``) go to ``generate``.
        template: a format string with ``{context}`` (the sources joined by ``separator``) and ``{query}``, each
            once. Default: ContextCite's ``"Context: {context}\\n\\nQuery: {query}"``, as the user's message of the
            tokenizer's chat template when it has one (``chat=None``; ``True``/``False`` force it), else followed by
            ``"\\nAnswer:"``.
        per_token: also attribute every answer token on its own (M backward passes through one forward), for
            :meth:`per_token` and ``token_scores``; False attributes the whole answer only (one backward pass).
        target: ``"logprob"`` (default): the answer's log-probability, Σ_m log p(answer_m | before); ``"logit"``:
            the sum of the answer tokens' raw logits.
        baseline_token_id, freeze_norm … up_scale, backend, chunk: as for ``gim_fast.explain_answer``.

    Returns:
        A ``ContextAttribution`` (a pandas DataFrame, one row per source; see its docstring): the whole answer's
        score of each source is the sum of its tokens' scores in the attribution of Σ_m target_m — with
        ``per_token=True`` computed as the sum of the per-token rows (the backward is linear, so that is the same
        number up to float rounding).

    Raises ValueError/TypeError, before the model is touched, for empty or non-string sources, an empty query, a
    template without ``{context}`` or ``{query}``, an empty answer, a prompt longer than the model's positions.
    """
    settings = GIMSettings(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
                           k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
                           backend=backend)
    return attribute_context_with(model, tokenizer, sources, query, settings, answer, template=template,
                                  separator=separator, chat=chat, per_token=per_token, target=target,
                                  max_new_tokens=max_new_tokens, baseline_token_id=baseline_token_id, chunk=chunk,
                                  **generate_kwargs)


def attribute_context_with(model, tokenizer, sources, query: str, settings: GIMSettings, answer: str | None = None,
                           *, template: str | None = None, separator: str = DEFAULT_SEPARATOR,
                           chat: bool | None = None, per_token: bool = True, target: str = "logprob",
                           max_new_tokens: int = 64, baseline_token_id=None, chunk=None, **generate_kwargs):
    """:func:`attribute_context` with the GIM settings as one :class:`~gim_fast.settings.GIMSettings`."""
    # pandas (the result is a DataFrame) is imported only when a context is attributed: `import gim_fast` stays
    # light
    from .context_table import context_table

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {target!r}")
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be True or False, got {per_token!r}")
    check_model(model)
    prompt = build_prompt(tokenizer, sources, query, template=template, separator=separator, chat=chat)
    limit = max_positions(model)
    if answer is None:
        if tlens.is_transformer_lens_model(model):
            raise TypeError("generating the answer needs a Hugging Face model's generate(); for a TransformerLens "
                            "model, generate the answer yourself and pass it: attribute_context(..., answer=text)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if limit is not None and len(prompt.input_ids) >= limit:
            raise ValueError(f"the prompt is {len(prompt.input_ids)} tokens but the model's positions end at {limit}; "
                             "give fewer or shorter sources")
        answer_ids = generate_answers(model, tokenizer, [prompt.input_ids], max_new_tokens, **generate_kwargs)[0]
        if not answer_ids:
            raise ValueError("the model generated no answer (its first token was the end-of-sequence token); "
                             "nothing to attribute — pass an answer")
    else:
        if generate_kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(generate_kwargs)}: generate keywords apply only "
                            "when the answer is generated (answer=None)")
        answer_ids = _answer_ids(tokenizer, answer)

    result = explain_answer_with(model, torch.tensor(prompt.input_ids), torch.tensor(answer_ids), settings,
                                 tokenizer=tokenizer, target=target, total=not per_token,
                                 baseline_token_id=baseline_token_id, chunk=chunk)
    return context_table(prompt, answer_ids, tokenizer, result, target, per_token)


