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
    """Greedy answers to ``prompts`` scored by ``rewards`` (``rewards.sources.SequenceRewards``):
    ``reward/mean``, each named component, ``response_length`` (tokens) and ``truncated`` (the
    fraction that stopped at ``sampling.max_tokens``)."""
    generations = roles.generate([p["prompt_ids"] for p in prompts], dataclasses.replace(sampling, n=1),
                                 seed=seed, greedy=True)
    answers = [g[0] for g in generations]
    texts = tokenizer.batch_decode([a["response_ids"] for a in answers], skip_special_tokens=True)
    totals, components = rewards([p["prompt_text"] for p in prompts], texts, [p["row"] for p in prompts])
    lengths = [len(a["response_ids"]) for a in answers]
    out = {"reward/mean": sum(totals) / len(totals),
           "response_length": sum(lengths) / len(lengths),
           "truncated": sum(a.get("finish_reason") == "length" for a in answers) / len(answers)}
    out.update({f"reward/{name}": sum(v) / len(v) for name, v in components.items()})
    return out


def sample_records(samples: list, tokenizer, group_size: int, groups: int = SAMPLE_GROUPS) -> list[dict]:
    """The first ``groups`` groups of ``samples`` as ``{prompt, response, reward, components, length}``."""
    shown = samples[:groups * group_size]
    texts = tokenizer.batch_decode([s.response_ids for s in shown], skip_special_tokens=True)
    return [{"prompt": s.prompt_text, "response": text, "reward": s.reward, "components": dict(s.reward_components),
             "length": len(s.response_ids)} for s, text in zip(shown, texts)]
