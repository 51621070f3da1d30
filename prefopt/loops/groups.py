"""Groups of samples of one prompt: which carry a learning signal, dynamic sampling, and the pairs
or lists that online preference optimization trains on.

A rollout batch holds ``n`` consecutive samples per prompt (a *group*). A group whose rewards all
tie teaches nothing: its GRPO advantages are 0 and it has no best-vs-worst pair.

* :func:`informative` marks the groups whose best and worst rewards differ by more than a gap.
* :func:`fill_groups` is DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, Alg. 1): drop
  uninformative groups and sample more prompts until the batch holds the groups it asked for, at
  most ``max_rounds`` generations.
* :func:`preference_examples` turns groups into the examples of the offline objectives: a pair
  (best, worst) per group, or the whole group as a graded list.
"""
from __future__ import annotations

import math
from typing import Callable

from prefopt.data.examples import Example
from prefopt.data.rollouts import RolloutSample


def groups_of(samples: list, n: int) -> list[list]:
    """Consecutive groups of ``n`` samples (the rollout order: prompt by prompt)."""
    if len(samples) % n:
        raise ValueError(f"{len(samples)} samples are not groups of {n}")
    return [samples[i:i + n] for i in range(0, len(samples), n)]


def task_reward(sample: RolloutSample) -> float:
    """What the groups are judged on: the reward sources' weighted sum before clipping, normalisation
    and penalties (DAPO filters on accuracy, not on its shaped reward), else the reward."""
    return sample.task_reward if sample.task_reward is not None else sample.reward


def informative(groups: list[list[RolloutSample]], min_gap: float = 0.0) -> list[bool]:
    """Per group: whether the task rewards' range max - min exceeds ``min_gap`` (0: they do not all tie)."""
    return [max(map(task_reward, g)) - min(map(task_reward, g)) > min_gap for g in groups]


def fill_groups(first: list[RolloutSample], n: int, *, want: int, max_rounds: int, min_gap: float,
                sample_more: Callable[[int, int], list[RolloutSample]]) -> tuple[list[RolloutSample], dict]:
    """Dynamic sampling: keep the informative groups of ``first`` and call ``sample_more(k, round)``
    (k prompts, scored samples back) until ``want`` groups are kept or ``max_rounds`` generations ran.

    Each further round asks for the missing groups divided by the fraction kept so far (at least a
    quarter, at most ``want`` prompts), so a batch where most groups tie fills in few rounds.
    Returns the kept samples (at most ``want`` groups, in the order drawn) and metrics:
    ``sampling/rounds``, ``sampling/dropped_groups``, ``sampling/missing_groups`` (groups short of
    ``want`` when the rounds ran out).
    """
    kept, drawn, dropped, rounds, batch = [], 0, 0, 1, first
    while True:
        groups = groups_of(batch, n)
        for group, ok in zip(groups, informative(groups, min_gap)):
            if ok:
                kept.append(group)
            else:
                dropped += 1
        drawn += len(groups)
        if len(kept) >= want or rounds >= max_rounds:
            break
        rate = max(len(kept) / drawn, 0.25)
        rounds += 1
        batch = sample_more(min(want, math.ceil((want - len(kept)) / rate)), rounds)
    kept = kept[:want]
    return [s for g in kept for s in g], {"sampling/rounds": rounds, "sampling/dropped_groups": dropped,
                                          "sampling/missing_groups": want - len(kept)}


def preference_examples(groups: list[list[RolloutSample]], kind: str, min_gap: float = 0.0) -> list[Example]:
    """Online preference data from groups of scored samples.

    ``kind="pairs"``: per informative group, the first best and the first worst sample by reward
    (chosen, rejected). ``kind="lists"``: the whole group, graded by the dense rank of each reward in
    its group (:func:`dense_ranks`: the order of the rewards, not their scale, which LiPO-λ's gain
    2^grade - 1 would otherwise blow up on a reward model's logits).
    Uninformative groups (:func:`informative`) give no example.
    """
    out = []
    for group, ok in zip(groups, informative(groups, min_gap)):
        if not ok:
            continue
        rewards = [s.reward for s in group]
        if kind == "pairs":
            best, worst = group[rewards.index(max(rewards))], group[rewards.index(min(rewards))]
            out.append(Example(prompt_ids=list(best.prompt_ids),
                               response_ids=[list(best.response_ids), list(worst.response_ids)], scores=[1.0, 0.0]))
        elif kind == "lists":
            out.append(Example(prompt_ids=list(group[0].prompt_ids),
                               response_ids=[list(s.response_ids) for s in group], scores=dense_ranks(rewards)))
        else:
            raise ValueError(f"online preference data are pairs or lists, not '{kind}'")
    return out


def dense_ranks(values: list[float]) -> list[float]:
    """Grades 0, 1, ... by value: equal values share a grade, the lowest is 0 (``[0.2, 0.9, 0.2, 5]`` ->
    ``[0, 1, 0, 2]``)."""
    order = {v: i for i, v in enumerate(sorted(set(values)))}
    return [float(order[v]) for v in values]
