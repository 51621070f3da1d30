"""The online algorithm's orchestration, fast: PPO's iteration and OnlineRoles' engine recovery driven
by in-process stand-in roles that record what is called, in which order (no Ray, no model). The
end-to-end tests run the same code on real Ray, vLLM and DeepSpeed."""
import pytest

from prefopt.config import load_recipe

EVENTS: list[str] = []


class Future:
    def __init__(self, who: str, method: str, samples: list):
        self.who, self.method, self.samples = who, method, samples


class StandInLearners:
    """A policy learner group: no-grad passes return one value per response token; a train step
    returns one learner's summary."""

    def __init__(self, value: float):
        self.value, self.steps = value, 0

    def __len__(self):
        return 1

    def submit(self, method, samples, micro):
        EVENTS.append(f"submit policy.{method}")
        return Future("policy", method, samples), None

    def train_step(self, batch, micro, what, inject_nan=False):
        assert all(s.advantages is not None and s.old_logps is not None for s in batch)
        EVENTS.append("learn")
        self.steps += 1
        return [{"loss": (0.5 * len(batch), float(len(batch))), "grad_norm": 1.0, "lr": 1e-3, "skipped": 0,
                 "time_s": 0.01}]


class StandInEngines:
    def __init__(self, fail_times: int = 0):
        self.restarts, self.fail_times = 0, fail_times

    def generate(self, prompt_ids, sampling, seed, greedy=False):
        from prefopt.cluster import ActorDiedError
        EVENTS.append("generate")
        if self.fail_times:
            self.fail_times -= 1
            raise ActorDiedError("generate failed: an actor died (test)")
        # response i of prompt p: tokens 5..5+len, different lengths so advantages differ
        return [[{"response_ids": [5 + (j + k) % 7 for k in range(2 + j)], "logprobs": [-1.0] * (2 + j)}
                 for j in range(sampling.n)] for _ in prompt_ids]

    def replace_dead(self) -> bool:
        EVENTS.append("replace engine")
        self.restarts += 1
        return True


class StandInRoles:
    """What PPO.step needs of ``roles.online.OnlineRoles``."""
    critic = None
    timeout = 60.0
    reference_on_policy = False

    def __init__(self):
        self.policy, self.engines, self.references = StandInLearners(-1.0), StandInEngines(), ["reference"]

    def generate(self, prompt_ids, sampling, seed, greedy=False):
        return self.engines.generate(prompt_ids, sampling, seed, greedy)

    def submit_generate(self, prompt_ids, sampling, seed):
        EVENTS.append("submit generate (next iteration)")
        return prompt_ids, sampling, seed, None

    def collect_generate(self, pending):
        prompt_ids, sampling, seed, _ = pending
        EVENTS.append("collect generate")
        return self.engines.generate(prompt_ids, sampling, seed)

    def sync_weights(self, version, wait=True):
        EVENTS.append(f"sync v{version}" + ("" if wait else " (not awaited)"))
        return 0.0


@pytest.fixture
def stand_ins(monkeypatch):
    """Route the stages' sharded-call helpers to the stand-ins."""
    import prefopt.roles.group as group
    EVENTS.clear()

    def submit_sharded(workers, method, items, micro):
        EVENTS.append(f"submit reference.{method}")
        return Future("reference", method, items), None

    def collect_sharded(pending, timeout_s, what):
        future, _ = pending
        EVENTS.append(f"collect {future.who}.{future.method}")
        value = -1.0 if future.who == "policy" else -1.2
        return [[[value] * len(s.response_ids) for s in future.samples]]

    monkeypatch.setattr(group, "submit_sharded", submit_sharded)
    monkeypatch.setattr(group, "collect_sharded", collect_sharded)
    return EVENTS


def make_ppo(tmp_path, *overrides):
    from prefopt.algorithms.ppo import PPO
    from prefopt.loops.guards import SkipGuard
    from prefopt.preflight import prepare
    from prefopt.rewards.sources import SequenceRewards
    from prefopt.run import Run, RunResult
    recipe = load_recipe("tiny_grpo", [f"output.root={tmp_path}", "train.prompts_per_iteration=4",
                                       "train.batch_size=8", "train.micro_batch_size=8", *overrides])
    pre = prepare(recipe)
    run = Run(recipe=recipe, pre=pre, run_dir=tmp_path, logger=None, spec=pre.spec,
              result=RunResult(run_dir=tmp_path, steps=0, final_train={}))
    algorithm = PPO(run)
    algorithm.roles = StandInRoles()
    algorithm.rewards, algorithm.process_rewards = SequenceRewards(recipe.roles.reward), None
    algorithm.guard = SkipGuard(recipe.train.max_skipped_steps)
    if recipe.train.async_rollouts:
        from prefopt.loops.prefetch import Prefetch
        algorithm.prefetch = Prefetch(algorithm.roles)
    return algorithm


def test_an_iteration_runs_the_stages_in_the_algorithms_order(tmp_path, stand_ins):
    ppo = make_ppo(tmp_path)
    stats, steps = ppo.step(1, next_follows=True)
    assert stand_ins == [
        "generate",                                                   # 1. rollouts
        "submit policy.compute_token_logps",                          # old log-probs start ...
        "submit reference.compute_token_logps",                       # ... with the reference pass,
        "collect reference.compute_token_logps",                      # which is awaited first
        "collect policy.compute_token_logps",
        "learn", "learn",                                             # 16 samples / batch 8 x 1 epoch
        "sync v1",                                                    # weights to the engines
    ]
    assert steps == 2 and stats["rollout/logp_abs_diff"] == 0.0
    assert stats["kl"] > 0                                            # reference -1.2 vs policy -1.0
    assert {"time/generate", "time/reward", "time/reference", "time/old_logps", "time/learn",
            "time/sync"} <= set(stats)


def test_async_rollouts_sample_the_next_batch_before_learning(tmp_path, stand_ins):
    ppo = make_ppo(tmp_path, "train.async_rollouts=true", "objective.kl_coef=0")
    ppo.roles.references = []                     # (a pipelined reference pass needs real engine results)
    ppo.step(1, next_follows=True)
    first = list(stand_ins)
    assert first.index("submit generate (next iteration)") < first.index("learn")
    assert first[-1] == "sync v1 (not awaited)"
    stand_ins.clear()
    ppo.step(2, next_follows=True)
    assert stand_ins[0] == "collect generate"                        # iteration 2 uses the prefetched batch
    assert "generate" not in stand_ins[:1]


def test_dynamic_sampling_that_finds_no_signal_samples_again_then_skips_the_update(tmp_path, stand_ins):
    """The stand-in engines' responses all score 0 (no good word): every group ties, so each of the
    3 rounds generates again; nothing is left to learn from, the weights still sync."""
    ppo = make_ppo(tmp_path, "train.dynamic_sampling=true", "train.max_sampling_rounds=3")
    stats, steps = ppo.step(1, next_follows=True)
    assert stand_ins == ["generate", "generate", "generate", "sync v1"] and steps == 0
    assert stats["sampling/rounds"] == 3 and stats["sampling/missing_groups"] == 4
    assert stats["sampling/dropped_groups"] == 4 + 4 + 4 and stats["reward/mean"] == 0.0


def test_a_dead_engine_is_replaced_resynced_and_the_call_retried(stand_ins):
    from prefopt.cluster import ActorDiedError
    from prefopt.roles.online import OnlineRoles

    class Roles(OnlineRoles):
        def _sync(self, version):
            EVENTS.append(f"sync v{version}")

    roles = object.__new__(Roles)
    roles.engines, roles.max_engine_restarts, roles.transport, roles.version = StandInEngines(fail_times=1), 2, \
        "object_store", 3
    roles._pending_sync = None
    sampling = load_recipe("tiny_grpo").roles.rollout.sampling
    out = roles.generate([[1, 2]], sampling, seed=0)
    assert len(out) == 1 and len(out[0]) == sampling.n
    assert stand_ins == ["generate", "replace engine", "sync v3", "generate"]    # the current weights first
    roles.engines.fail_times = 5
    with pytest.raises(ActorDiedError):                                  # past roles.rollout.max_restarts
        roles.generate([[1, 2]], sampling, seed=0)
    assert roles.engines.restarts == 2
