"""Score engine generations with a run's reward sources: the step between generating and
:func:`prefopt.evaluation.report.summarize`, shared by ``prefopt eval`` and a training loop's periodic
evaluation (which has the engines, the tokenizer and the ``SequenceRewards`` already)::

    generations = roles.generate([p["prompt_ids"] for p in held_out], sampling, seed=0, greedy=True)
    prompts, scored = score_generations(rewards, tokenizer, held_out, generations)
    metrics, records = summarize(prompts, scored.responses, scored.rewards, scored.components,
                                 scored.lengths, sampling.max_tokens)
"""
from __future__ import annotations

from prefopt.evaluation.report import Responses


def score_generations(rewards, tokenizer, prompts: list[dict],
                      generations: list[list[dict]]) -> tuple[list[str], Responses]:
    """Decode (special tokens skipped, as in training) and score every sample.

    ``rewards``: a :class:`prefopt.rewards.sources.SequenceRewards`; ``prompts``: prompt rows
    (``{"prompt_text", "row", ...}``, :func:`prefopt.data.prompts.load_prompts`); ``generations``: per
    prompt, its samples as the engines return them (``{"response_ids", ...}``). Returns the prompt text
    of each sample and the scored samples (lengths: response token ids, EOS included), flattened in
    prompt order. A non-finite reward raises ``NonFiniteReward``."""
    if len(prompts) != len(generations):
        raise ValueError(f"{len(prompts)} prompts but generations for {len(generations)}")
    samples = [(p, s) for p, gens in zip(prompts, generations) for s in gens]
    texts = tokenizer.batch_decode([s["response_ids"] for _, s in samples], skip_special_tokens=True)
    prompt_texts = [p["prompt_text"] for p, _ in samples]
    totals, components = rewards(prompt_texts, texts, [p["row"] for p, _ in samples])
    return prompt_texts, Responses(responses=list(texts), rewards=list(totals),
                                   lengths=[len(s["response_ids"]) for _, s in samples], components=components)
