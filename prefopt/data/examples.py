"""Validate and tokenize preference rows into examples (one per row).

Rows are pairs ``{prompt, chosen, rejected}`` (optionally with a ``margin`` and a ``weight``,
:mod:`prefopt.data.reward_rows`), lists ``{prompt, responses: [...], scores: [...]}``, SFT rows
``{prompt, response}`` / ``{messages: [...]}``, or the reward-model kinds ``attributes`` and ``steps``
(:mod:`prefopt.data.reward_rows`) (field names from ``DataConfig.*_field``); the kind is detected from
the first row. Prompts and responses are strings or chat messages (lists of ``{"role", "content"}``).

Implicit prompts: a pair without a prompt field (Anthropic HH ``{"chosen": "\n\nHuman: ...
\n\nAssistant: ...", "rejected": ...}``, or two whole conversations) takes as its prompt the start
chosen and rejected share, as TRL's ``extract_prompt`` does (:func:`split_implicit_prompt`); the prompt
and the two rests then render like an explicit prompt and responses (text stays plain text).

Tokenization:

* plain prompt: ``tokenizer(prompt)`` (special tokens, i.e. bos); plain response: tokenized
  without special tokens, then eos appended;
* chat: when the prompt or a response is a message list, the row is a conversation (a string
  prompt becomes a user message, a string response an assistant message; a response that repeats
  the prompt messages first has them stripped). The prompt is
  ``apply_chat_template(prompt, add_generation_prompt=True)``; a response is the text the template
  renders for ``prompt + response`` beyond the prompt's rendering (it must be a prefix). Both are
  tokenized without special tokens (the template writes bos/eos itself).

Truncation, per row: a prompt longer than ``max_prompt_length`` keeps its *last* tokens (the
question at its end stays); if it started with bos, bos is re-added at its start, so it keeps bos
plus its last ``max_prompt_length - 1`` tokens. Each response then keeps its *first*
``max_length - len(prompt)`` tokens (>= 1, since ``max_prompt_length < max_length``); a truncated
response loses its eos.

An example is an :class:`Example`: pairs have two responses, chosen first, scores ``[1.0, 0.0]``;
an SFT example one response. ``row`` is the 0-based index of the row in its source, as in error
messages ("row 12").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from prefopt.config_schema import DataConfig
from prefopt.errors import DataError

MAX_SKIP_MESSAGES = 5


@dataclass
class Example:
    """One tokenized row: a prompt and its K responses (pairs: chosen then rejected, K = 2; lists: K
    graded responses; SFT: K = 1)."""
    prompt_ids: list[int]                     # [P]
    response_ids: list[list[int]]             # K x [T_k]
    scores: list[float]                       # [K] (pairs: [1.0, 0.0])
    row: int = -1                             # 0-based index of the row in its source
    ref_logps: list[float] | None = None      # [K] summed reference log-probs, cached before training
    margin: float | None = None               # pairs: by how much r(chosen) should exceed r(rejected)
    weight: float | None = None               # pairs: the factor (>= 0) on the row's loss (None: 1)
    targets: list[float] | None = None        # attributes: [A] ratings (NaN: not rated)
    step_ends: list[int] | None = None        # steps: [S] index in the response of each step's last token
    step_labels: list[float] | None = None    # steps: [S] labels in [0, 1]


def detect_kind(row, cfg: DataConfig, *, source: str, row_index: int, preferred: tuple[str, ...] = ()) -> str:
    """The row kind (pairs, lists, steps, attributes, sft) from the (non-null) fields of ``row``; when
    the fields fit several kinds (SFT rows that also carry ``attributes``), the first of ``preferred``
    (the kinds the objective trains on) that fits, else the first in that order."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object with fields, got {type(row).__name__}",
                        source=source, row=row_index)
    present = [k for k, v in row.items() if v is not None]
    fits = [kind for kind, fields in (("pairs", (cfg.chosen_field, cfg.rejected_field)),
                                      ("lists", (cfg.responses_field, cfg.scores_field)),
                                      ("steps", (cfg.steps_field,)), ("attributes", (cfg.attributes_field,)),
                                      ("sft", (cfg.response_field, cfg.messages_field)))
            if any(f in present for f in fields)]
    if fits:
        return next((kind for kind in preferred if kind in fits), fits[0])
    raise DataError(
        f"cannot tell the row kind: expected fields '{cfg.prompt_field}' (optional), '{cfg.chosen_field}', "
        f"'{cfg.rejected_field}' (pairs), '{cfg.prompt_field}', '{cfg.responses_field}', "
        f"'{cfg.scores_field}' (lists), '{cfg.prompt_field}', '{cfg.response_field}' / "
        f"'{cfg.messages_field}' (sft), with '{cfg.attributes_field}' (attributes), or '{cfg.prompt_field}', "
        f"'{cfg.steps_field}', '{cfg.labels_field}' (steps); found {present}", source=source, row=row_index)


@dataclass
class _Rendered:
    row: int
    prompt: str
    prompt_special: bool           # tokenize the prompt with special tokens (plain text: bos)
    responses: list[str]
    response_fields: list[str]
    append_eos: bool
    scores: list[float]
    margin: float | None = None
    weight: float | None = None
    targets: list[float] | None = None
    step_labels: list[float] | None = None     # steps rows: the responses are the step pieces


def build_examples(rows: list, tokenizer, cfg: DataConfig, *, source: str, attributes: list[str] | None = None,
                   kinds: tuple[str, ...] = ()) -> tuple[str, list[Example], int, list[str]]:
    """Validate and tokenize ``rows``: ``(kind, examples, num_skipped, first_skip_messages)``.

    With ``cfg.on_error == "skip"`` malformed rows are dropped and counted; if none is left, the
    first error is raised anyway. ``attributes``: the order of an attributes row's ratings
    (default: first seen in ``rows``). ``kinds``: the row kinds the caller trains on, preferred when
    a row's fields fit several (:func:`detect_kind`).
    """
    from prefopt.data.reward_rows import attribute_names
    names = list(attributes or attribute_names(rows, cfg.attributes_field))
    return _build_examples(rows, tokenizer, cfg, source, names, tuple(kinds))


def _build_examples(rows: list, tokenizer, cfg: DataConfig, source: str, names: list[str], kinds: tuple[str, ...]
                    ) -> tuple[str, list[Example], int, list[str]]:
    skip = cfg.on_error == "skip"
    errors: list[DataError] = []
    kind: str | None = None
    rendered: list[_Rendered] = []
    for i, row in enumerate(rows):
        try:
            if kind is None:
                kind = detect_kind(row, cfg, source=source, row_index=i, preferred=kinds)
            rendered.append(_render_row(row, i, kind, tokenizer, cfg, source, names))
        except DataError as e:
            if not skip:
                raise
            errors.append(e)

    plain = _tokenize([r.prompt for r in rendered if r.prompt_special], tokenizer, True)
    chat = _tokenize([r.prompt for r in rendered if not r.prompt_special], tokenizer, False)
    responses = iter(_tokenize([t for r in rendered for t in r.responses], tokenizer, False))
    plain, chat = iter(plain), iter(chat)
    examples = []
    for r in rendered:
        prompt_ids = next(plain) if r.prompt_special else next(chat)
        response_ids = [next(responses) for _ in r.responses]
        try:
            examples.append(_make_example(r, prompt_ids, response_ids, tokenizer, cfg, source))
        except DataError as e:
            if not skip:
                raise
            errors.append(e)
    if not examples:
        if errors:
            raise DataError(f"all {len(errors)} rows are malformed; the first: {errors[0]}", source=source)
        raise DataError("no rows", source=source)
    return kind, examples, len(errors), [str(e) for e in errors[:MAX_SKIP_MESSAGES]]


def _render_row(row, i: int, kind: str, tokenizer, cfg: DataConfig, source: str, names: list[str]) -> _Rendered:
    if not isinstance(row, dict):
        raise DataError(f"expected an object with fields, got {type(row).__name__}", source=source, row=i)

    def get(name: str):
        value = row.get(name)
        if value is None:
            raise DataError(f"missing field (found fields {[k for k, v in row.items() if v is not None]})",
                            source=source, row=i, field=name)
        return value

    from prefopt.data import reward_rows
    if kind == "sft":
        return _render_sft_row(row, i, get, tokenizer, cfg, source)
    if kind == "attributes":
        rendered = _render_sft_row(row, i, get, tokenizer, cfg, source)
        rendered.targets = reward_rows.row_targets(row, cfg.attributes_field, names, source, i)
        return rendered
    if kind == "pairs":
        return _render_pair_row(row, i, get, tokenizer, cfg, source)
    prompt = parse_text(get(cfg.prompt_field), source, i, cfg.prompt_field)
    if kind == "steps":
        steps, labels = reward_rows.row_steps(row, cfg.steps_field, cfg.labels_field, source, i)
        pieces = reward_rows.step_pieces(steps, cfg.step_delimiter)
        if isinstance(prompt, list):   # the prompt in the chat template; the steps as the assistant's raw text
            prompt = _apply_template(tokenizer, prompt, True, source, i, cfg.prompt_field)
            return _Rendered(i, prompt, False, pieces, [cfg.steps_field] * len(pieces), True, [1.0],
                             step_labels=labels)
        return _Rendered(i, prompt, True, pieces, [cfg.steps_field] * len(pieces), True, [1.0], step_labels=labels)
    raw, raw_scores = get(cfg.responses_field), get(cfg.scores_field)
    rf, sf = cfg.responses_field, cfg.scores_field
    if not isinstance(raw, list):
        raise DataError(f"expected a list of responses, got {_describe(raw)}", source=source, row=i, field=rf)
    if len(raw) < 2:
        raise DataError(f"needs at least 2 responses, got {len(raw)}", source=source, row=i, field=rf)
    if not isinstance(raw_scores, list):
        raise DataError(f"expected a list of numbers, got {_describe(raw_scores)}",
                        source=source, row=i, field=sf)
    if len(raw_scores) != len(raw):
        raise DataError(f"{len(raw_scores)} scores for {len(raw)} responses ('{rf}')",
                        source=source, row=i, field=sf)
    scores = []
    for j, s in enumerate(raw_scores):
        value = _finite_float(s)
        if value is None:
            raise DataError(f"score {j} must be a finite number, got {_describe(s)}",
                            source=source, row=i, field=sf)
        scores.append(value)
    if len(set(scores)) == 1:
        raise DataError(f"all scores are equal ({scores[0]}): no preference signal",
                        source=source, row=i, field=sf)
    fields = [f"{rf}[{j}]" for j in range(len(raw))]
    responses = [parse_text(r, source, i, f) for r, f in zip(raw, fields)]
    return _render(prompt, responses, fields, scores, tokenizer, cfg, source, i)


def _render_pair_row(row: dict, i: int, get, tokenizer, cfg: DataConfig, source: str) -> _Rendered:
    """``{prompt, chosen, rejected}``, or ``{chosen, rejected}`` whose prompt is their shared start
    (:func:`implicit_prompt`); with the row's margin and weight (None where it has none)."""
    from prefopt.data import reward_rows
    fields = [cfg.chosen_field, cfg.rejected_field]
    if row.get(cfg.prompt_field) is None and all(row.get(f) is not None for f in fields):
        chosen, rejected = (parse_text(row[f], source, i, f) for f in fields)
        prompt, responses = implicit_prompt(chosen, rejected, cfg, source, i,
                                            found=[k for k, v in row.items() if v is not None])
    else:
        prompt = parse_text(get(cfg.prompt_field), source, i, cfg.prompt_field)
        responses = [parse_text(get(f), source, i, f) for f in fields]
        if responses[0] == responses[1]:
            raise _identical(cfg, source, i)
    margin = reward_rows.row_margin(row, cfg.margin_field, source, i)
    weight = reward_rows.row_weight(row, cfg.weight_field, source, i)
    rendered = _render(prompt, responses, fields, [1.0, 0.0], tokenizer, cfg, source, i)
    rendered.margin, rendered.weight = margin, weight
    return rendered


def _identical(cfg: DataConfig, source: str, i: int) -> DataError:
    return DataError(f"'{cfg.chosen_field}' and '{cfg.rejected_field}' are identical (no preference signal)",
                     source=source, row=i, field=cfg.rejected_field)


def split_implicit_prompt(chosen, rejected) -> tuple:
    """``(prompt, chosen_rest, rejected_rest)``: the longest common prefix of ``chosen`` and
    ``rejected`` (characters of two texts, whole messages of two message lists), and what follows it.

    This is TRL's ``extract_prompt`` wherever the two differ after a shared start: text is cut at the
    first differing character, moved back by one when the character before it is a space, so that
    ``"...\n\nAssistant: Yes"`` / ``"...\n\nAssistant: No"`` give the prompt ``"...\n\nAssistant:"`` and
    the responses ``" Yes"`` / ``" No"`` (a cut may fall inside a word: ``"...: Sure"`` / ``"...: Sorry"``
    give ``"...: S"``, ``"ure"``, ``"orry"``, as in TRL). Where the two are equal, one is a prefix of the
    other or nothing is shared, the prompt or a rest is empty here (TRL returns other, arbitrary cuts);
    :func:`implicit_prompt` refuses those rows.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def implicit_prompt(chosen, rejected, cfg: DataConfig, source: str, i: int, *, found: list | None = None
                    ) -> tuple[object, list]:
    """``(prompt, [chosen_rest, rejected_rest])`` of a pair without a prompt field
    (:func:`split_implicit_prompt`), validated: both texts or both message lists, a shared start
    that is not blank, two different non-blank rests, and (messages) each rest opening with an
    assistant message. ``found``: the row's fields, for the error when nothing is shared."""
    c, r = cfg.chosen_field, cfg.rejected_field
    if isinstance(chosen, list) != isinstance(rejected, list):
        kinds = {True: "chat messages", False: "text"}
        raise DataError(f"'{c}' is {kinds[isinstance(chosen, list)]} and '{r}' {kinds[isinstance(rejected, list)]}: "
                        f"without a '{cfg.prompt_field}' field, the prompt is their shared start, so both must be "
                        f"text or both chat messages", source=source, row=i, field=r)
    if chosen == rejected:
        raise _identical(cfg, source, i)
    prompt, chosen_rest, rejected_rest = split_implicit_prompt(chosen, rejected)
    unit = "messages" if isinstance(chosen, list) else "text"
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(f"missing field (found fields {found if found is not None else [c, r]}), and '{c}' and "
                        f"'{r}' share no leading {unit} to take the prompt from", source=source, row=i,
                        field=cfg.prompt_field)
    for rest, name, other in ((chosen_rest, c, r), (rejected_rest, r, c)):
        if not rest or (isinstance(rest, str) and not rest.strip()):
            raise DataError(f"nothing {'but blank text ' if rest else ''}is left of it after the prompt it shares "
                            f"with '{other}' (no '{cfg.prompt_field}' field: the prompt is their shared start)",
                            source=source, row=i, field=name)
        if isinstance(rest, list) and rest[0]["role"] != "assistant":
            raise DataError(f"after the prompt it shares with '{other}' (no '{cfg.prompt_field}' field), the response "
                            f"must open with an assistant message, got role '{rest[0]['role']}'",
                            source=source, row=i, field=name)
    return prompt, [chosen_rest, rejected_rest]


def _render_sft_row(row: dict, i: int, get, tokenizer, cfg: DataConfig, source: str) -> _Rendered:
    """``{prompt, response}``, or ``{messages}``: the conversation up to its last message is the
    prompt, the last message (an assistant's) the response."""
    if row.get(cfg.messages_field) is not None and row.get(cfg.response_field) is None:
        name = cfg.messages_field
        messages = parse_text(get(name), source, i, name)
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError("expected a conversation of at least 2 chat messages (the last one is the response)",
                            source=source, row=i, field=name)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"the last message is the response and must be the assistant's, got role "
                            f"'{messages[-1]['role']}'", source=source, row=i, field=name)
        prompt, response, field = messages[:-1], [messages[-1]], f"{name}[{len(messages) - 1}]"
    else:
        prompt = parse_text(get(cfg.prompt_field), source, i, cfg.prompt_field)
        response, field = parse_text(get(cfg.response_field), source, i, cfg.response_field), cfg.response_field
    return _render(prompt, [response], [field], [1.0], tokenizer, cfg, source, i)


def parse_text(value, source: str, row: int, name: str):
    """A non-empty string or a validated list of chat messages (None-valued keys dropped)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty text", source=source, row=row, field=name)
        _check_unicode(value, source, row, name)
        return value
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of chat messages, got {_describe(value)}",
                        source=source, row=row, field=name)
    if not value:
        raise DataError("empty list of chat messages", source=source, row=row, field=name)
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"chat message {j} must be an object with 'role' and 'content', "
                            f"got {_describe(m)}", source=source, row=row, field=name)
        for key in ("role", "content"):
            if not isinstance(m.get(key), str) or (key == "role" and not m[key].strip()):
                raise DataError(f"chat message {j} needs a string '{key}' (got {_describe(m.get(key))})",
                                source=source, row=row, field=name)
            _check_unicode(m[key], source, row, name)
        messages.append({k: v for k, v in m.items() if v is not None})
    if not any(m["content"].strip() for m in messages):
        raise DataError("chat messages with empty content", source=source, row=row, field=name)
    return messages


def _render(prompt, responses, fields, scores, tokenizer, cfg, source, row) -> _Rendered:
    if not isinstance(prompt, list) and not any(isinstance(r, list) for r in responses):
        return _Rendered(row, prompt, True, responses, fields, True, scores)
    prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = _apply_template(tokenizer, prompt_messages, True, source, row, cfg.prompt_field)
    texts = []
    for response, name in zip(responses, fields):
        if isinstance(response, str):
            messages = [{"role": "assistant", "content": response}]
        else:
            messages = strip_prompt(response, prompt_messages)
            if not messages:
                raise DataError("the response only repeats the prompt messages", source=source,
                                row=row, field=name)
        full = _apply_template(tokenizer, prompt_messages + messages, False, source, row, name)
        if not full.startswith(prompt_text):
            raise DataError("the chat template's rendering of prompt + response does not start with its "
                            "rendering of the prompt (add_generation_prompt=True), so the response "
                            "cannot be separated", source=source, row=row, field=name)
        text = full[len(prompt_text):]
        if not text.strip():
            raise DataError("the response renders to empty text", source=source, row=row, field=name)
        texts.append(text)
    return _Rendered(row, prompt_text, False, texts, fields, False, scores)


def strip_prompt(messages: list[dict], prompt_messages: list[dict]) -> list[dict]:
    """Drop a leading copy of the prompt messages (responses stored as whole conversations)."""
    def key(m):
        return m.get("role"), m.get("content")
    n = len(prompt_messages)
    if len(messages) >= n and [key(m) for m in messages[:n]] == [key(m) for m in prompt_messages]:
        return messages[n:]
    return messages


def _apply_template(tokenizer, messages, add_generation_prompt, source, row, name) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except Exception as e:
        raise DataError(f"the chat template failed: {type(e).__name__}: {e}", source=source,
                        row=row, field=name) from e
    if not isinstance(text, str):
        raise DataError(f"the chat template returned {type(text).__name__}, not text",
                        source=source, row=row, field=name)
    return text


def _tokenize(texts: list[str], tokenizer, add_special_tokens: bool) -> list:
    """Token ids per text (batched); an exception instead of ids for a text that fails alone."""
    if not texts:
        return []
    kwargs = dict(add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False)
    try:
        return [list(ids) for ids in tokenizer(texts, **kwargs)["input_ids"]]
    except Exception:
        out = []
        for text in texts:
            try:
                out.append(list(tokenizer(text, **kwargs)["input_ids"]))
            except Exception as e:
                out.append(e)
        return out


def _make_example(r: _Rendered, prompt_ids, response_ids, tokenizer, cfg, source) -> Example:
    for ids, name in [(prompt_ids, cfg.prompt_field)] + list(zip(response_ids, r.response_fields)):
        if isinstance(ids, Exception):
            raise DataError(f"tokenization failed: {type(ids).__name__}: {ids}", source=source,
                            row=r.row, field=name)
    eos = tokenizer.eos_token_id
    step_ends = None
    if r.step_labels is not None:
        from prefopt.data.reward_rows import join_steps
        joined, step_ends = join_steps(response_ids)
        response_ids = [joined]
    if r.append_eos and eos is not None:
        response_ids = [ids + [eos] for ids in response_ids]
    if not prompt_ids:
        raise DataError("the prompt has no tokens", source=source, row=r.row, field=cfg.prompt_field)
    for ids, name in zip(response_ids, r.response_fields):
        if not ids:
            raise DataError("the response has no tokens", source=source, row=r.row, field=name)
    prompt_ids, response_ids = truncate(prompt_ids, response_ids, max_prompt_length=cfg.max_prompt_length,
                                        max_length=cfg.max_length, bos_id=tokenizer.bos_token_id)
    example = Example(prompt_ids=prompt_ids, response_ids=response_ids, scores=list(r.scores), row=r.row,
                      margin=r.margin, weight=r.weight, targets=r.targets)
    if step_ends is not None:   # steps cut off by truncation are dropped with their labels
        kept = [k for k, end in enumerate(step_ends) if end < len(response_ids[0])]
        if not kept:
            raise DataError(f"no step survives truncation to data.max_length={cfg.max_length} tokens",
                            source=source, row=r.row, field=cfg.steps_field)
        example.step_ends = [step_ends[k] for k in kept]
        example.step_labels = [r.step_labels[k] for k in kept]
    return example


def truncate(prompt_ids: list[int], response_ids: list[list[int]], *, max_prompt_length: int,
             max_length: int, bos_id: int | None = None) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation policy of the module docstring."""
    if len(prompt_ids) > max_prompt_length:
        if bos_id is not None and prompt_ids[0] == bos_id and max_prompt_length >= 2:
            prompt_ids = [bos_id] + prompt_ids[len(prompt_ids) - (max_prompt_length - 1):]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    budget = max(1, max_length - len(prompt_ids))
    return list(prompt_ids), [list(ids[:budget]) for ids in response_ids]


def _check_unicode(text: str, source, row, name) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"invalid unicode text: {e.reason}", source=source, row=row, field=name) from None


def _finite_float(value) -> float | None:
    if not isinstance(value, Real) or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
