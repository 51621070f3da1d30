"""The reward role's model actors.

* :class:`RewardModelWorker`: one or more trained reward models (an ensemble's members share the
  actor), served by :class:`prefopt.rewards.scorer.RewardScorer`: each renders samples with its own
  tokenizer and chat template; outcome heads at the last token, process heads at every step end.
* :class:`ImplicitPRMWorker`: an implicit process reward model (Yuan et al. 2024, "Free Process
  Rewards without Process Labels"): a causal LM and its reference; the reward of step k is
  ``beta * sum over the step's tokens of (log pi - log pi_ref)``, all steps from one forward of each.

``trust_remote_code`` follows the recipe's model setting.
"""
from __future__ import annotations


class RewardModelWorker:
    def __init__(self, paths: list[str], *, trust_remote_code: bool = False, batch_tokens: int = 8192):
        from prefopt.rewards.scorer import RewardScorer
        self.scorer = RewardScorer(list(paths), trust_remote_code=trust_remote_code, batch_tokens=batch_tokens)

    def heads(self) -> list[list[str]]:
        return self.scorer.heads()

    def node_info(self) -> dict:
        from prefopt.roles.common import actor_info
        return actor_info("reward_model")

    def score(self, prompts: list, responses: list[str]) -> list[list[list[float]]]:
        """``[M][N][H]``: per member, per sample, every head at the response's last token."""
        return self.scorer.score(prompts, responses)

    def score_steps(self, prompts: list, steps: list[list[str]], delimiter: str | None = None) -> list:
        """``[M][N][K_n]``: per member, per sample, the score at the end of every step (one forward)."""
        return self.scorer.score_steps(prompts, steps, delimiter)


class ImplicitPRMWorker:
    def __init__(self, model: str, reference: str, *, beta: float, trust_remote_code: bool = False,
                 batch_tokens: int = 8192):
        import torch

        from prefopt.models.load import load_causal_lm, load_tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.reference = load_causal_lm(reference, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.beta, self.batch_tokens = beta, batch_tokens

    def node_info(self) -> dict:
        from prefopt.roles.common import actor_info
        return actor_info("process_reward_model")

    def score_steps(self, prompts: list, steps: list[list[str]], delimiter: str | None = None) -> list:
        """``[1][N][K_n]``: the implicit step rewards of every sample (a one-member ensemble)."""
        import torch

        from prefopt.models.logprobs import forward_logps
        from prefopt.rewards.implicit_prm import step_rewards
        from prefopt.rewards.scorer import render_steps, token_batches
        rendered = [render_steps(self.tokenizer, p, s, delimiter or "\n") for p, s in zip(prompts, steps)]
        out: list = [None] * len(rendered)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for batch in token_batches([len(ids) for ids, _, _ in rendered], self.batch_tokens):
                rows = [rendered[i] for i in batch]
                width = max(len(ids) for ids, _, _ in rows)
                ids = torch.tensor([r + [pad] * (width - len(r)) for r, _, _ in rows], device=self.device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _, _ in rows], device=self.device)
                # each token's step: step k covers the tokens after step k-1's end up to its own end
                index = torch.full((len(rows), width), -1, dtype=torch.long, device=self.device)
                for j, (_, ends, start) in enumerate(rows):
                    for k, end in enumerate(ends):
                        index[j, start:end + 1] = k
                        start = end + 1
                batch_in = {"input_ids": ids, "attention_mask": mask, "loss_mask": index >= 0}
                policy = forward_logps(self.model, batch_in)
                ref = forward_logps(self.reference, batch_in)
                rewards = step_rewards(policy.token_logps.double(), ref.token_logps.double(),
                                       index[:, 1:], beta=self.beta).cpu()
                for j, i in enumerate(batch):
                    out[i] = rewards[j, :len(rows[j][1])].tolist()
        return [out]
