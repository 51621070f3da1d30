"""What an online run shows of its policy while it trains: held-out evaluations and sampled completions.

* :func:`evaluate_held_out` (``train.eval_every``): the engines answer the held-out prompts greedily
  with the current weights; the run's reward sources score the answers. Recorded in the eval split.
* :func:`sample_records` (``train.sample_log_every``): a few groups of this iteration's samples, as
  text with their rewards, for ``samples.jsonl`` and the loggers, so a collapse (every answer the same
  rewarded word at the length cap) is visible without writing a script.
"""
from __future__ import annotations

import dataclasses

SAMPLE_GROUPS = 4           # groups (prompts) per logged iteration


def evaluate_held_out(roles, prompts: list[dict], sampling, rewards, tokenizer, *, seed: int) -> dict[str, float]:
    """Greedy answers to ``prompts`` scored by ``rewards`` (``rewards.sources.SequenceRewards``): the
    metrics of ``prefopt eval`` (:func:`prefopt.evaluation.report.summarize`): ``reward/mean``,
    ``reward/std``, each named component, ``length/mean`` (tokens) and ``length/max_tokens_fraction``."""
    from prefopt.evaluation.report import summarize
    from prefopt.evaluation.scoring import score_generations
    generations = roles.generate([p["prompt_ids"] for p in prompts], dataclasses.replace(sampling, n=1),
                                 seed=seed, greedy=True)
    texts, scored = score_generations(rewards, tokenizer, prompts, generations)
    metrics, _ = summarize(texts, scored.responses, scored.rewards, scored.components, scored.lengths,
                           sampling.max_tokens)
    return metrics


def sample_records(samples: list, tokenizer, group_size: int, groups: int = SAMPLE_GROUPS) -> list[dict]:
    """The first ``groups`` groups of ``samples`` as ``{prompt, response, reward, components, length}``."""
    shown = samples[:groups * group_size]
    texts = tokenizer.batch_decode([s.response_ids for s in shown], skip_special_tokens=True)
    return [{"prompt": s.prompt_text, "response": text, "reward": s.reward, "components": dict(s.reward_components),
             "length": len(s.response_ids)} for s, text in zip(shown, texts)]
