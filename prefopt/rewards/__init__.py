"""Rewards for online RLHF: refinement and placement of process (step) rewards.

Reward *sources* (reward models, PRMs, verifiers) live in other modules of this package.
"""
from prefopt.rewards.process import (clip_process_rewards, delta_process_rewards,
                                     place_step_rewards, refine_process_rewards)

__all__ = ["clip_process_rewards", "delta_process_rewards", "place_step_rewards",
           "refine_process_rewards"]
