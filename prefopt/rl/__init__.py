"""Pure-tensor math of the online RLHF loop (torch only, no ray/deepspeed/vllm imports).

* :mod:`prefopt.rl.advantages` -- GAE, group baselines (GRPO, RLOO), the ``ADVANTAGES``
  registry, masked statistics and advantage whitening;
* :mod:`prefopt.rl.ppo` -- clipped PPO policy / value losses, entropy, per-token KL estimators,
  explained variance.

Reward *shaping* of process rewards (Clip / Delta of Gao et al. 2024) lives in
:mod:`prefopt.rewards.process`.
"""
