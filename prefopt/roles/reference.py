"""The reference role as separate actors: a frozen copy of the initial policy.

Used when ``roles.reference.placement: actor``. With ``placement: learner`` (the default) the
learner group computes the same log-probs before its first update and no extra model is loaded.
Either way reference log-probs are computed once and cached with the examples.
"""
from __future__ import annotations

from prefopt.config_schema import Recipe


class ReferenceWorker:
    def __init__(self, recipe: Recipe, pad_id: int):
        import torch

        from prefopt.models.load import load_causal_lm
        from prefopt.roles.common import use_actor_cpus

        use_actor_cpus(recipe.roles.reference.num_cpus, recipe.ray.env)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(recipe.model.path, precision="fp32",
                                    trust_remote_code=recipe.model.trust_remote_code,
                                    attn_implementation=recipe.model.attn_implementation,
                                    padding_free=recipe.model.padding_free).to(self.device)
        self.model.eval().requires_grad_(False)
        self.pad_id = pad_id
        from prefopt.models.packing import packing_mode
        self.packing = packing_mode(recipe.model)
        from prefopt.objectives import get_objective
        objective = get_objective(recipe.objective.name)(recipe.objective)
        self.temperature, self.batch_kind = objective.temperature, objective.batch_kind

    def node_info(self) -> dict:
        from prefopt.roles.common import actor_info
        return actor_info("reference")

    def compute_logps(self, micro_batches: list[list[dict]]) -> list[list[list[float]]]:
        from prefopt.roles.common import response_logps
        return response_logps(self.model, micro_batches, self.pad_id, self.device, self.batch_kind,
                              packing=self.packing)

    def compute_token_logps(self, micro_batches: list[list[dict]]) -> list[list[list[float]]]:
        """Per-token log-probs of rollout samples' responses (the KL penalty's reference)."""
        from prefopt.roles.common import sample_token_logps
        return sample_token_logps(self.model, micro_batches, self.pad_id, self.device, self.temperature,
                           packing=self.packing)

    def compute_generation_logps(self, prompt_ids: list[list[int]], generations: list[list[dict]],
                                 micro, eos_id: int) -> list[list[float]]:
        """Per-token log-probs of a rollout engine's output (``RolloutWorker.generate``), flattened
        prompt by prompt; Ray passes ``generations`` in once that engine is done (pipelined reference)."""
        from prefopt.data.rollouts import RolloutSample
        samples = [RolloutSample(prompt_ids=p, response_ids=g["response_ids"] or [eos_id])
                   for p, gens in zip(prompt_ids, generations) for g in gens]
        from prefopt.data.batching import chunk
        return [x for part in self.compute_token_logps(chunk(samples, micro)) for x in part]
