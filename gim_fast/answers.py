"""Attribution of a whole answer: every answer token × every prompt and answer token, from one forward pass.

``explain_answer(model, prompt_ids, answer_ids)`` explains each answer token m, predicted at the position just
before it (P + m − 1 without padding), over every token of prompt + answer: row m of the result equals
``explain(model, (prompt + answer)[: P + m], target_token_id=answer[m])`` up to float rounding. The forward
pass runs once; the backward is linear in its cotangent, so the M targets are M cotangents pushed back through
the same saved activations, ``chunk`` of them per backward pass (``gim_fast.engine.attribute_targets``).
``total=True`` attributes the sum of the M targets with one backward pass. ``explain_generation`` generates the
answer with the model's own ``generate`` first.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .chat import chat_prompt
from .engine import AnswerScores, attribute_targets
from .explain import as_id_tensor, as_mask, check_call, check_vocabulary, resolve_baseline
from .integration import eval_mode, model_io, tlens
from .settings import DEFAULTS, TARGETS, GIMSettings

__all__ = ["AnswerAttribution", "explain_answer", "explain_answer_with", "explain_generation",
           "explain_generation_with", "max_positions"]


@dataclass
class AnswerAttribution:
    """The attribution of an answer of M tokens after a prompt of P tokens (columns: prompt then answer).

    For a single prompt (1-D ``prompt_ids``); a batch adds a leading batch dim to every tensor and makes
    ``tokens`` a list per row.

    scores:          ``[M, P + M]``: row m attributes answer token m (its logit or log-probability, predicted
                     at ``target_positions[m]``) to every token; 0 after that position and at padding.
                     ``[1, P + M]`` with ``total=True``: the attribution of the sum over the answer.
    target_ids:      ``[M]`` the answer tokens (padded answer positions: the pad value given).
    target_logits:   ``[M]`` their raw logits; ``target_logprobs``: ``[M]`` their log-probabilities (0 at padding).
    target_positions: ``[M]`` the position (column) whose output predicts each answer token.
    attention_mask:  ``[P + M]`` 1 for real tokens, 0 for padding (prompt padding, then answer padding).
    answer_mask:     ``[M]`` 1 for real answer tokens.
    prompt_length:   P, the number of prompt columns (the answer starts at column P).
    tokens:          with a tokenizer: each column's token, decoded alone ('' at padding); else None.
    target, total:   what was explained (``"logit"``/``"logprob"``) and whether rows were summed.
    chunk:           how many cotangents each backward pass carried; checkpointing: whether decoder layers
                     were checkpointed (both chosen from the memory estimate unless given).
    template_mask:   with ``chat=True``: ``[P + M]`` bool, True at the chat template's tokens (not scored: their
                     columns are 0); else None.
    """

    scores: torch.Tensor
    target_ids: torch.Tensor
    target_logits: torch.Tensor
    target_logprobs: torch.Tensor
    target_positions: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    prompt_length: int
    tokens: list | None
    target: str
    total: bool
    chunk: int = 1
    checkpointing: bool = False
    template_mask: torch.Tensor | None = None

    @property
    def answer_scores(self) -> torch.Tensor:
        """The scores of the answer columns alone: ``[..., M or 1, M]``."""
        return self.scores[..., self.prompt_length:]

    @property
    def prompt_scores(self) -> torch.Tensor:
        """The scores of the prompt columns alone: ``[..., M or 1, P]``."""
        return self.scores[..., :self.prompt_length]


def _as_positive_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a positive int or None, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a positive int or None, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{what} must be a positive int or None, got {value}")
    return value


def max_positions(model) -> int | None:
    """The longest input the model's position embeddings cover (None when the config does not say)."""
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _answer_mask(answer_mask, answer: torch.Tensor) -> torch.Tensor:
    mask = as_mask(answer_mask, answer, "answer_mask", "answer_ids")
    # real answer tokens first: each row's answer is contiguous and right-padded
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("answer_mask must be right-padded: each row's real answer tokens (1) first, then "
                         "padding (0)")
    return mask


def explain_answer(model, prompt_ids, answer_ids, *, tokenizer=None, target="logit", total=False,
                   baseline_token_id=None, attention_mask=None, answer_mask=None,
                   freeze_norm=DEFAULTS.freeze_norm, softmax_temperature=DEFAULTS.softmax_temperature,
                   q_scale=DEFAULTS.q_scale, k_scale=DEFAULTS.k_scale, v_scale=DEFAULTS.v_scale,
                   gate_scale=DEFAULTS.gate_scale, up_scale=DEFAULTS.up_scale, backend=DEFAULTS.backend,
                   chunk=None, checkpointing="auto", chat=False) -> AnswerAttribution:
    """GIM attribution of every token of an answer to every token before it, from one forward pass.

    Args:
        model: as for ``explain`` (a Hugging Face causal LM of a supported family, or a TransformerLens model).
        prompt_ids: ``[P]`` or ``[B, P]`` token ids (tensor or lists); a batch is padded like ``explain``'s
            input, with ``attention_mask`` (1 = real token; left or right padding).
        answer_ids: ``[M]`` (the same answer after every prompt) or ``[B, M]`` token ids; answers of different
            lengths are right-padded, with ``answer_mask`` (1 = real answer token, real tokens first).
        tokenizer: gives the baseline token (as in ``explain``) and ``.tokens``.
        target: ``"logit"`` explains each answer token's raw logit (as ``explain``); ``"logprob"`` its
            log-probability (log_softmax of the whole logits row at that position).
        total: one row, the attribution of the sum of the answer's targets, from a single backward pass
            (for a whole answer's log-probability: ``target="logprob", total=True``).
        baseline_token_id, freeze_norm, softmax_temperature, q_scale, k_scale, v_scale, gate_scale, up_scale,
            backend, checkpointing: as for ``explain``.
        chunk: how many answer tokens' cotangents one backward pass carries (default: as many as the memory
            estimate allows, at most M). ``chunk=1`` runs one backward per answer token, through the same forward.
        chat: ``prompt_ids`` is the user's message (a string): it is put in the tokenizer's chat template with the
            generation prompt (``gim_fast.chat.chat_prompt``; a ValueError for a tokenizer without one), and only
            the message's tokens are scored: the template's columns are 0 and ``.template_mask`` marks them.

    Returns:
        An ``AnswerAttribution``: ``.scores`` ``[M, P + M]`` (``[1, P + M]`` with ``total=True``; a batch adds a
        leading ``B``), row m equal to ``explain(model, (prompt + answer)[: P + m], target_token_id=answer[m])``
        up to float rounding, 0 after its position; float32 (float64 for a float64 model).
    """
    settings = GIMSettings(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
                           k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
                           backend=backend)
    template = None
    if chat is not False:
        prompt_ids, template = _chat_ids(tokenizer, prompt_ids, chat, attention_mask)
    return explain_answer_with(model, prompt_ids, answer_ids, settings, tokenizer=tokenizer, target=target,
                               total=total, baseline_token_id=baseline_token_id, attention_mask=attention_mask,
                               answer_mask=answer_mask, chunk=chunk, checkpointing=checkpointing,
                               chat_template=template)


def _chat_ids(tokenizer, message, chat, attention_mask=None) -> tuple[torch.Tensor, list[bool]]:
    """``chat=True``: the user's ``message`` in the tokenizer's chat template, as ids and the template flags."""
    if chat is not True:
        raise TypeError(f"chat must be True or False, got {chat!r}")
    if tokenizer is None:
        raise ValueError("chat=True needs the tokenizer (its chat template): pass tokenizer=")
    if not isinstance(message, str):
        raise TypeError("with chat=True the prompt is the user's message as a string (one message; the template "
                        f"is applied to it), got {type(message).__name__}")
    if attention_mask is not None:
        raise ValueError("chat=True takes one message: attention_mask does not apply")
    prompt = chat_prompt(tokenizer, message, what="chat=True")
    return torch.tensor(prompt.input_ids), prompt.template


def explain_answer_with(model, prompt_ids, answer_ids, settings: GIMSettings, *, tokenizer=None, target="logit",
                        total=False, baseline_token_id=None, attention_mask=None, answer_mask=None, chunk=None,
                        checkpointing="auto", chat_template=None) -> AnswerAttribution:
    """:func:`explain_answer` with the GIM settings as one :class:`~gim_fast.settings.GIMSettings`.
    ``chat_template``: one flag per prompt token (a single 1-D prompt), True at a chat template's tokens: their
    columns are set to 0 (not scored) and recorded in ``.template_mask``.

    The steps: check the options, the prompts and the answers (:class:`_Inputs`) and them against the model;
    lay prompt and answer out contiguously (:class:`_Layout`); attribute every answer token from one forward
    pass (``engine.attribute_targets``); put the scores back in the caller's columns.
    """
    check_call(model, settings, checkpointing)
    chunk = _check_options(target, total, chunk)
    inputs = _Inputs.checked(prompt_ids, answer_ids, attention_mask, answer_mask)
    io = model_io(model)
    baseline = _check_against_model(model, io, inputs, baseline_token_id, tokenizer)
    layout = _Layout.of(inputs, baseline)
    device = io.weight.device
    result = attribute_targets(model, layout.ids.to(device), layout.mask.to(device), layout.positions.to(device),
                               layout.targets.to(device), inputs.answer_mask.to(device), baseline, settings,
                               target=target, total=total, chunk=chunk, checkpointing=checkpointing)
    out = _in_caller_columns(result, inputs, layout, tokenizer, target, total, device)
    if chat_template is not None:
        return _hold_template(out, chat_template)
    return out


def _hold_template(result: AnswerAttribution, template) -> AnswerAttribution:
    """The chat template's columns set to 0 (held at their value, as if part of the baseline: not scored)."""
    flags = [bool(t) for t in template]
    if result.scores.dim() != 2 or len(flags) != result.prompt_length:
        raise ValueError(f"chat_template needs one flag per token of one prompt ({result.prompt_length}), got "
                         f"{len(flags)}")
    mask = torch.zeros(result.scores.shape[-1], dtype=torch.bool, device=result.scores.device)
    mask[:len(flags)] = torch.tensor(flags, dtype=torch.bool)
    result.scores = result.scores.masked_fill(mask, 0.0)
    result.template_mask = mask
    return result


def _check_options(target, total, chunk) -> int | None:
    """``target`` and ``total`` checked; ``chunk`` as a positive int (or None)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {target!r}")
    if not isinstance(total, bool):
        raise TypeError(f"total must be True or False, got {total!r}")
    return None if chunk is None else _as_positive_int(chunk, "chunk")


@dataclass
class _Inputs:
    """The checked prompts and answers, always batched: prompt ``[B, P]`` with its mask, answer ``[B, M]`` with
    its (right-padded) mask; ``squeeze`` when the caller gave one 1-D prompt."""

    prompt: torch.Tensor
    prompt_mask: torch.Tensor
    answer: torch.Tensor
    answer_mask: torch.Tensor
    squeeze: bool

    @classmethod
    def checked(cls, prompt_ids, answer_ids, attention_mask, answer_mask) -> "_Inputs":
        prompt = as_id_tensor(prompt_ids, "prompt_ids")
        squeeze = prompt.dim() == 1
        prompt_mask = as_mask(attention_mask, prompt, "attention_mask", "prompt_ids")
        if squeeze:
            prompt, prompt_mask = prompt[None], prompt_mask[None]
        batch = prompt.shape[0]
        try:
            answer = as_id_tensor(answer_ids, "answer_ids")
        except ValueError as err:
            if "is empty" in str(err):      # said once, with what an answer needs
                raise ValueError("answer_ids is empty: an answer needs at least one token") from None
            raise
        if answer.dim() == 1:
            if answer_mask is not None and torch.as_tensor(answer_mask).dim() != 1:
                raise ValueError("answer_mask must have the shape of answer_ids")
            answer = answer[None].expand(batch, -1)
            answer_mask = None if answer_mask is None else torch.as_tensor(answer_mask)[None].expand(batch, -1)
        elif squeeze:
            raise ValueError(f"answer_ids is 2-D {tuple(answer.shape)} but prompt_ids is 1-D; give one answer [M] "
                             "for one prompt, or a batch of prompts [B, P] with answers [B, M]")
        elif answer.shape[0] != batch:
            raise ValueError(f"answer_ids has {answer.shape[0]} rows for {batch} prompts; give one answer per "
                             "prompt (or one 1-D answer for all)")
        return cls(prompt, prompt_mask, answer, _answer_mask(answer_mask, answer), squeeze)


def _check_against_model(model, io, inputs: _Inputs, baseline_token_id, tokenizer) -> int:
    """The ids within the model's vocabularies and prompt + answer within its positions; returns the baseline
    token."""
    check_vocabulary(inputs.prompt, inputs.prompt_mask, io.vocab_in, "prompt_ids")
    check_vocabulary(inputs.answer, inputs.answer_mask, min(io.vocab_in, io.vocab_out), "answer_ids")
    lengths = inputs.prompt_mask.sum(-1) + inputs.answer_mask.sum(-1)
    limit = max_positions(model)
    if limit is not None and int(lengths.max()) > limit:
        row = int(lengths.argmax())
        raise ValueError(
            f"prompt + answer is {int(lengths[row])} tokens (row {row}: {int(inputs.prompt_mask[row].sum())} + "
            f"{int(inputs.answer_mask[row].sum())}) but the model's positions end at {limit} "
            "(max_position_embeddings); shorten the prompt or the answer")
    baseline = resolve_baseline(baseline_token_id, tokenizer)
    if not 0 <= baseline < io.vocab_in:
        raise ValueError(f"baseline_token_id {baseline} is outside the vocabulary [0, {io.vocab_in})")
    return baseline


@dataclass
class _Layout:
    """What the model sees: each row's prompt left-padded (a stable sort puts the padding first) against its
    answer, so that prompt and answer are contiguous — a sliding window counts columns, and a gap of padding
    would shorten it. ``order`` maps these prompt columns back to the caller's."""

    ids: torch.Tensor          # [B, P + M], padding holding the baseline token
    mask: torch.Tensor         # [B, P + M]
    targets: torch.Tensor      # [B, M], 0 at padded answer positions
    positions: torch.Tensor    # [B, M]: answer token m is predicted at P + m − 1
    order: torch.Tensor        # [B, P]

    @classmethod
    def of(cls, inputs: _Inputs, baseline: int) -> "_Layout":
        prompt_len, count = inputs.prompt.shape[1], inputs.answer.shape[1]
        order = torch.sort(inputs.prompt_mask, dim=-1, stable=True).indices
        ids = torch.cat([inputs.prompt.gather(1, order), inputs.answer], 1)
        mask = torch.cat([inputs.prompt_mask.gather(1, order), inputs.answer_mask], 1)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, baseline))  # padding may hold any id
        targets = torch.where(inputs.answer_mask.bool(), inputs.answer, torch.zeros_like(inputs.answer))
        positions = (prompt_len - 1 + torch.arange(count))[None].repeat(inputs.prompt.shape[0], 1)
        return cls(ids, mask, targets, positions, order)


def _in_caller_columns(result: AnswerScores, inputs: _Inputs, layout: _Layout, tokenizer, target: str,
                       total: bool, device) -> AnswerAttribution:
    """The engine's scores moved back to the caller's columns, with the tokens and the 1-D squeeze."""
    batch, prompt_len = inputs.prompt.shape
    count = inputs.answer.shape[1]
    columns = torch.cat([layout.order, torch.arange(prompt_len, prompt_len + count).expand(batch, -1)], 1)
    columns = columns.to(device)
    scores = torch.zeros_like(result.scores).scatter_(
        2, columns[:, None].expand(-1, result.scores.shape[1], -1), result.scores)
    # in the caller's columns, answer token 0 is predicted at the last real prompt token
    positions = layout.positions.clone()
    positions[:, 0] = prompt_len - 1 - inputs.prompt_mask.flip(-1).argmax(-1)
    mask = torch.cat([inputs.prompt_mask, inputs.answer_mask], 1)
    ids = torch.cat([inputs.prompt, inputs.answer], 1)
    tokens = None
    if tokenizer is not None:
        tokens = [[tokenizer.decode([int(i)]) if real else "" for i, real in zip(row, row_mask)]
                  for row, row_mask in zip(ids.tolist(), mask.tolist())]
    out = AnswerAttribution(
        scores=scores, target_ids=inputs.answer.to(device).clone(),
        target_logits=result.target_logits, target_logprobs=result.target_logprobs,
        target_positions=positions.to(device), attention_mask=mask.to(device),
        answer_mask=inputs.answer_mask.to(device), prompt_length=prompt_len, tokens=tokens, target=target,
        total=total, chunk=result.chunk, checkpointing=result.checkpointing)
    if inputs.squeeze:
        for name in ("scores", "target_ids", "target_logits", "target_logprobs", "target_positions",
                     "attention_mask", "answer_mask"):
            setattr(out, name, getattr(out, name)[0])
        out.tokens = None if tokens is None else tokens[0]
    return out


def explain_generation(model, tokenizer, prompt, max_new_tokens=32, *, target="logit", total=False,
                       baseline_token_id=None, freeze_norm=DEFAULTS.freeze_norm,
                       softmax_temperature=DEFAULTS.softmax_temperature, q_scale=DEFAULTS.q_scale,
                       k_scale=DEFAULTS.k_scale, v_scale=DEFAULTS.v_scale, gate_scale=DEFAULTS.gate_scale,
                       up_scale=DEFAULTS.up_scale, backend=DEFAULTS.backend, chunk=None, checkpointing="auto",
                       chat=False, **generate_kwargs) -> AnswerAttribution:
    """Generate an answer with the model's own ``generate`` (greedy unless ``generate_kwargs`` say otherwise),
    then attribute it with ``explain_answer``.

    ``prompt``: a string, tokenized with ``tokenizer`` as it tokenizes by default (special tokens included);
    ``chat=True`` puts it in the tokenizer's chat template as the user's message (with the generation prompt) and
    scores the message's tokens only (see ``explain_answer``). Generation stops at ``max_new_tokens`` or at the
    end-of-sequence token; the answer is what was generated before that token (an answer that is only EOS is an
    error). Every other keyword goes to ``model.generate``. The answer's text is ``tokenizer.decode`` of
    ``result.target_ids``.
    """
    settings = GIMSettings(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
                           k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
                           backend=backend)
    return explain_generation_with(model, tokenizer, prompt, settings, max_new_tokens, target=target, total=total,
                                   baseline_token_id=baseline_token_id, chunk=chunk, checkpointing=checkpointing,
                                   chat=chat, **generate_kwargs)


def explain_generation_with(model, tokenizer, prompt, settings: GIMSettings, max_new_tokens=32, *, target="logit",
                            total=False, baseline_token_id=None, chunk=None, checkpointing="auto", chat=False,
                            **generate_kwargs) -> AnswerAttribution:
    """:func:`explain_generation` with the GIM settings as one :class:`~gim_fast.settings.GIMSettings`."""
    check_call(model, settings, checkpointing)  # before generating
    options = dict(target=target, total=total, baseline_token_id=baseline_token_id, chunk=chunk,
                   checkpointing=checkpointing)
    if tlens.is_transformer_lens_model(model):
        raise TypeError("explain_generation generates with a Hugging Face model's generate(); for a TransformerLens "
                        "model, generate the answer yourself and call explain_answer(model, prompt_ids, answer_ids)")
    if not isinstance(prompt, str) or not prompt:
        raise TypeError(f"prompt must be a non-empty string, got {prompt!r}")
    max_new_tokens = _as_positive_int(max_new_tokens, "max_new_tokens")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {target!r}")
    template = None
    if chat is not False:
        prompt_ids, template = _chat_ids(tokenizer, prompt, chat)
    else:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    limit = max_positions(model)
    if limit is not None and len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's positions ({limit}); shorten the prompt or lower max_new_tokens")

    device = model.get_input_embeddings().weight.device
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set() if eos is None else set([eos] if isinstance(eos, int) else eos)
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is None and eos:
        kwargs["pad_token_id"] = min(eos)
    kwargs.update(generate_kwargs)
    with eval_mode(model), torch.no_grad():
        out = model.generate(prompt_ids[None].to(device), attention_mask=torch.ones_like(prompt_ids)[None].to(device),
                             **kwargs)
    generated = out[0, len(prompt_ids):].tolist()
    stop = next((i for i, t in enumerate(generated) if t in eos), len(generated))
    answer = generated[:stop]
    if not answer:
        raise ValueError("the model generated no answer tokens (its first token was the end-of-sequence token); "
                         "nothing to attribute")
    return explain_answer_with(model, prompt_ids, torch.tensor(answer), settings, tokenizer=tokenizer,
                               chat_template=template, **options)
