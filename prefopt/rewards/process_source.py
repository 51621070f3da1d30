"""Process rewards in the online loop: split each response into steps, score every step with the
recipe's step-reward function, refine (Clip / Delta), and place the rewards on step-end tokens.

The step-reward function is named by dotted path (``roles.reward.process.fn``) and called as
``fn(prompt=..., steps=[...], row=...)``; it returns one float per step (a process reward model as
a function; e.g. a PRM served elsewhere, or a rule).
"""
from __future__ import annotations

import torch

from prefopt.config_schema import ProcessRewardConfig
from prefopt.rewards.process import place_step_rewards, refine_process_rewards
from prefopt.rewards.sources import import_reward_fn
from prefopt.rewards.steps import split_steps


class ProcessRewards:
    def __init__(self, cfg: ProcessRewardConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.fn = import_reward_fn(cfg.fn)

    def __call__(self, prompts: list[str], response_ids: list[list[int]], rows: list[dict]):
        """Per sample, a list of token-level process rewards (one per response token), and stats."""
        split = [split_steps(ids, self.tokenizer, self.cfg.delimiter) for ids in response_ids]
        raw = []
        for i, ((steps, _), prompt, row) in enumerate(zip(split, prompts, rows)):
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
