"""Process rewards in the online loop: split each response into steps, score every step with the
recipe's step-reward function, refine (Clip / Delta), and place the rewards on step-end tokens.

Step rewards come from a function named by dotted path (``roles.reward.process.fn``), called as
``fn(prompt=..., steps=[...], row=...)`` and returning one float per step (a rule, or a PRM served
elsewhere), or from a model in its own actor (:mod:`prefopt.roles.reward_model`) that scores every
step of a response in one forward: a process reward model trained on step labels (its score head at
the end of each step), or an implicit PRM (``reference`` set: ``beta`` times the step's summed
log-ratio of a causal LM to its reference). The model reads the prompt row's own prompt (chat
messages through its chat template) and the steps, each followed by the delimiter.
"""
from __future__ import annotations

import torch

from prefopt.config_schema import ProcessRewardConfig
from prefopt.rewards.process import place_step_rewards, refine_process_rewards
from prefopt.rewards.sources import import_reward_fn, row_prompts
from prefopt.rewards.steps import split_steps


class ProcessRewards:
    def __init__(self, cfg: ProcessRewardConfig, tokenizer, model_actor=None, timeout_s: float = 1800.0,
                 prompt_field: str = "prompt"):
        self.cfg, self.tokenizer, self.prompt_field = cfg, tokenizer, prompt_field
        self.fn = import_reward_fn(cfg.fn) if cfg.fn else None
        self.model_actor, self.timeout_s = model_actor, timeout_s
        if self.fn is None and model_actor is None:
            raise ValueError("process rewards need a step function or a PRM actor")

    def _score_with_model(self, prompts: list, all_steps: list[list[str]]) -> list[list[float]]:
        from prefopt.cluster import remote_get
        ref = self.model_actor.score_steps.remote(prompts, all_steps, self.cfg.delimiter)
        return remote_get(ref, self.timeout_s, "process reward model")[0]

    def __call__(self, prompts: list[str], response_ids: list[list[int]], rows: list[dict]):
        """Per sample, a list of token-level process rewards (one per response token), and stats."""
        split = [split_steps(ids, self.tokenizer, self.cfg.delimiter) for ids in response_ids]
        structured = row_prompts(prompts, rows, self.prompt_field)
        scored = self._score_with_model(structured, [steps for steps, _ in split]) if self.fn is None else None
        raw = []
        for i, ((steps, _), prompt, row) in enumerate(zip(split, prompts, rows)):
            if scored is not None:
                values = [float(v) for v in scored[i]]
            else:
                values = [float(v) for v in self.fn(prompt=prompt, steps=steps, row=row)] if steps else []
            if len(values) != len(steps):
                raise ValueError(f"process reward fn '{self.cfg.fn}' returned {len(values)} rewards for "
                                 f"{len(steps)} steps (sample {i})")
            raw.append(values)
        n, k = len(raw), max(1, max(len(v) for v in raw))
        step_rewards = torch.zeros(n, k, dtype=torch.float64)
        step_mask = torch.zeros(n, k, dtype=torch.bool)
        ends = torch.zeros(n, k, dtype=torch.long)
        for i, (values, (_, positions)) in enumerate(zip(raw, split)):
            step_rewards[i, :len(values)] = torch.tensor(values, dtype=torch.float64)
            step_mask[i, :len(values)] = True
            ends[i, :len(positions)] = torch.tensor(positions, dtype=torch.long)
        refined = refine_process_rewards(step_rewards, step_mask, clip_eta=self.cfg.clip_eta, delta=self.cfg.delta)
        width = max(len(ids) for ids in response_ids)
        tokens = place_step_rewards(refined, ends, step_mask, width, alpha=self.cfg.alpha)
        per_sample = [tokens[i, :len(ids)].tolist() for i, ids in enumerate(response_ids)]
        num_steps = step_mask.sum(-1).double()
        stats = {"reward/steps_per_response": float(num_steps.mean()),
                 "reward/process_raw_sum": float((step_rewards * step_mask).sum(-1).mean()),
                 "reward/process_refined_sum": float((refined * step_mask).sum(-1).mean() * self.cfg.alpha)}
        return per_sample, stats
