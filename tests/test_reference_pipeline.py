"""The pipelined reference pass (async rollouts) scores engine output exactly as the usual pass."""
import pytest
import torch

from prefopt.config import load_recipe
from prefopt.data.batching import Budget
from prefopt.data.rollouts import RolloutSample
from prefopt.roles.reference import ReferenceWorker


@pytest.mark.parametrize("micro", [4, Budget(tokens=20)], ids=["4-samples", "20-tokens"])
def test_generation_logps_equal_token_logps(cache, micro):
    recipe = load_recipe("recipes/tiny_grpo.yaml")
    from prefopt.models.tiny import resolve_model_path
    recipe.model.path = resolve_model_path(recipe.model.path)
    worker = ReferenceWorker(recipe, pad_id=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 7)]
    generations = [[{"response_ids": torch.randint(3, 500, (m,), generator=g).tolist(), "logprobs": None}
                    for m in lens] for lens in ((4, 11), (1, 6), (8, 3))]
    generations[1][0]["response_ids"] = []          # an empty response is scored as [eos], as the loop does
    got = worker.compute_generation_logps(prompts, generations, micro=micro, eos_id=2)
    samples = [RolloutSample(prompt_ids=p, response_ids=x["response_ids"] or [2])
               for p, gens in zip(prompts, generations) for x in gens]
    want = [x for part in worker.compute_token_logps([samples[:3], samples[3:]]) for x in part]
    assert [len(x) for x in got] == [4, 11, 1, 6, 8, 3]
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)
