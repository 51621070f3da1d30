"""Serving reward models: each model renders samples with its own tokenizer and chat template, batches
by tokens, weighs attribute heads, combines ensemble members (mean / min / uwo) and transforms; a
process reward model scores every step in one forward (equal to scoring each prefix); an implicit
PRM's step rewards come from one forward of it and of its reference."""
import json
import shutil

import pytest
import torch

from prefopt.config_schema import ProcessRewardConfig, RewardRoleConfig, RewardSourceConfig
from prefopt.rewards.scorer import RewardScorer, render, render_steps, token_batches
from prefopt.rewards.sources import SequenceRewards

OTHER_TEMPLATE = ("{% for message in messages %}[{{ message['role'] | upper }}] {{ message['content'] }}"
                  "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


@pytest.fixture(scope="module")
def rm_paths(tmp_path_factory, tok):
    """The builtin tiny reward model, a copy with its own chat template, and a copy with other weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.models.tiny import resolve_model_path
    base = resolve_model_path("builtin:tiny-reward")
    root = tmp_path_factory.mktemp("rms")
    templated = shutil.copytree(base, root / "templated")
    t = AutoTokenizer.from_pretrained(templated)
    t.chat_template = OTHER_TEMPLATE
    t.save_pretrained(templated)
    other = root / "other"
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        model.score.weight.normal_()
    model.save_pretrained(other, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(other)
    return {"base": base, "templated": str(templated), "other": str(other)}


def hf_scores(path, id_rows):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].tolist() for ids in id_rows]


def test_render_matches_the_training_rows(tok):
    """A sample is tokenized exactly as a training row with the same prompt and response."""
    from prefopt.config_schema import DataConfig
    from prefopt.data import build_examples
    chat = [{"role": "user", "content": "Describe the river."}]
    rows = [{"prompt": "Describe the river.", "response": "kind clear."}, {"prompt": chat, "response": "calm warm."}]
    for row in rows:
        _, (ex,), _, _ = build_examples([row], tok, DataConfig(path="x"), source="x")
        assert render(tok, row["prompt"], row["response"]) == ex.prompt_ids + ex.response_ids[0]
    step_row = {"prompt": "Describe the river.", "steps": ["kind clear", "rude"], "labels": [1.0, 0.0]}
    _, (ex,), _, _ = build_examples([step_row], tok, DataConfig(path="x", step_delimiter="."), source="x")
    ids, ends, start = render_steps(tok, "Describe the river.", ["kind clear", "rude"], ".")
    assert ids == ex.prompt_ids + ex.response_ids[0] and start == len(ex.prompt_ids)
    assert ends == [start + e for e in ex.step_ends]


def test_source_checks_name_the_key(rm_paths, tmp_path):
    from prefopt.errors import ConfigError
    from prefopt.rewards.sources import check_sources
    fn = "prefopt.rewards.builtin:good_word_fraction"
    with pytest.raises(ConfigError, match=r"sources\[0\].normalize applies to reward models"):
        check_sources(RewardRoleConfig(sources=[RewardSourceConfig(fn=fn, normalize=True)]))
    with pytest.raises(ConfigError, match=r"the name\(s\) rm label more than one source"):
        check_sources(RewardRoleConfig(sources=[RewardSourceConfig(fn=fn, name="rm"),
                                                RewardSourceConfig(model=rm_paths["base"], name="rm")]))
    prm = shutil.copytree(rm_paths["base"], tmp_path / "prm")
    config = json.loads((prm / "config.json").read_text())
    config["prefopt_reward"] = {"kind": "process", "heads": ["step_correct"], "step_delimiter": "."}
    (prm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="trained with steps ending in '.': set roles.reward.process.delimiter"):
        check_sources(RewardRoleConfig(process=ProcessRewardConfig(model=str(prm))))
    with pytest.raises(ConfigError, match="is a process reward model .* serve it as roles.reward.process.model"):
        check_sources(RewardRoleConfig(sources=[RewardSourceConfig(model=str(prm))]))
    check_sources(RewardRoleConfig(process=ProcessRewardConfig(model=str(prm), delimiter=".")))


def test_an_overlong_sample_keeps_its_end(rm_paths, tok):
    """A sample longer than the model's positions loses tokens from its start (after bos), as training
    truncates prompts; the score at the response's end is read on what remains."""
    scorer = RewardScorer([rm_paths["base"]])
    member = scorer.members[0]
    member.model.config.max_position_embeddings = 12
    ids = render(tok, "Describe the river and the mountain and the city.", "kind clear honest calm.")
    assert len(ids) > 12
    (scores,) = scorer.score(["Describe the river and the mountain and the city."], ["kind clear honest calm."])
    (expected,) = hf_scores(rm_paths["base"], [ids[:1] + ids[len(ids) - 11:]])
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_log_sigmoid_reference_per_prompt_from_reference_samples():
    from prefopt.rewards.sources import ModelSource
    src = RewardSourceConfig(model="m", transform="log_sigmoid", reference_from="reference_samples")
    source = ModelSource(src, [["reward"]], "roles.reward.sources[0]")
    source.set_references([[[0.5], [-1.0]]], ["p1", "p2"])               # one reference sample per prompt
    got = source([[[2.0], [0.0], [-3.0]]], ["p1", "p2", "p1"])
    expected = torch.nn.functional.logsigmoid(torch.tensor([2.0 - 0.5, 0.0 + 1.0, -3.0 - 0.5], dtype=torch.float64))
    assert got == pytest.approx(expected.tolist(), abs=1e-12)


@pytest.mark.slow
def test_reference_samples_give_each_prompt_its_r_ref_and_are_checkpointed(ray_cluster, tmp_path, rm_paths):
    from prefopt.config import load_recipe
    from prefopt.io.checkpoint import list_checkpoints, read_state
    from prefopt.train import train
    sources = [{"fn": "prefopt.rewards.builtin:good_word_fraction", "weight": 1.0, "name": "good"},
               {"model": rm_paths["base"], "transform": "log_sigmoid", "reference_from": "reference_samples",
                "name": "ls", "weight": 0.0}]
    recipe = load_recipe("tiny_grpo", [f"output.root={tmp_path}", f"roles.reward.sources={json.dumps(sources)}",
                                       "data.synthetic.num_rows=32", "train.iterations=2", "output.checkpoint_every=2",
                                       "output.save_model=false", "output.progress_bar=false"])
    result = train(recipe, quiet=True)
    state = read_state(list_checkpoints(result.run_dir)[-1])["reward_sources"]["ls"]
    assert 1 < len(state["reference_by_prompt"]) <= 32                 # one per distinct prompt text
    assert all(h["reward/ls"] < 0 for h in result.train_history)        # log-sigmoid rewards are negative
    refs = list(state["reference_by_prompt"].values())
    assert max(refs) > min(refs)                                        # per prompt, not one constant


def test_token_batches_bound_the_padded_tokens():
    lengths = [5, 30, 12, 30, 7, 1]
    batches = token_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1 for b in batches)
    assert batches[0][0] in (1, 3)        # longest first


def test_scorer_uses_each_models_own_chat_template(rm_paths):
    """A reward model whose chat template differs from the policy's sees its own template."""
    from transformers import AutoTokenizer
    policy_tok = AutoTokenizer.from_pretrained(rm_paths["base"])
    rm_tok = AutoTokenizer.from_pretrained(rm_paths["templated"])
    chat = [{"role": "user", "content": "Describe the river."}]
    scorer = RewardScorer([rm_paths["templated"]], batch_tokens=64)
    (got,) = scorer.score([chat, "Describe the city."], ["kind clear.", "rude vague."])
    own = rm_tok.apply_chat_template(chat + [{"role": "assistant", "content": "kind clear."}], tokenize=False)
    own_prompt = rm_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert own.startswith(own_prompt) and own_prompt == "[USER] Describe the river.</s>[ASSISTANT] "
    own_ids = (rm_tok(own_prompt, add_special_tokens=False)["input_ids"]        # prompt and response tokenized
               + rm_tok(own[len(own_prompt):], add_special_tokens=False)["input_ids"])   # apart, as training rows
    expected = hf_scores(rm_paths["templated"], [own_ids,
                                                 render(rm_tok, "Describe the city.", "rude vague.")])
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)
    policy_text = policy_tok.apply_chat_template(chat + [{"role": "assistant", "content": "kind clear."}],
                                                 tokenize=False)
    (wrong,) = hf_scores(rm_paths["templated"], [rm_tok(policy_text, add_special_tokens=False)["input_ids"]])
    assert got[0] != pytest.approx(wrong, abs=1e-4)


def test_process_scores_from_one_forward_equal_per_prefix_scores(rm_paths, tok):
    scorer = RewardScorer([rm_paths["base"]])
    steps = [["kind clear", "rude", "calm"], ["wrong"], ["kind", "warm", "bright", "calm"]]
    (got,) = scorer.score_steps(["Describe the river.", "Q", "Tell me about the city."], steps, ".")
    for prompt, sample_steps, scores in zip(["Describe the river.", "Q", "Tell me about the city."], steps, got):
        ids = tok(prompt)["input_ids"]
        prefixes = []
        for step in sample_steps:
            ids = ids + tok(step + ".", add_special_tokens=False)["input_ids"]
            prefixes.append(ids)
        assert scores == pytest.approx([s[0] for s in hf_scores(rm_paths["base"], prefixes)], abs=1e-5)


def test_implicit_prm_step_rewards_are_beta_times_each_steps_log_ratio(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefopt.models.tiny import build_model, resolve_model_path
    from prefopt.roles.reward_model import ImplicitPRMWorker
    policy, ref = resolve_model_path("builtin:tiny-llama"), str(build_model("tiny-llama", tmp_path / "ref", seed=1))
    worker = ImplicitPRMWorker(policy, ref, beta=0.5)
    steps = [["kind clear", "rude"], ["calm", "warm", "bright"]]
    (got,) = worker.score_steps(["Describe the river.", "Q"], steps, ".")
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (policy, ref)]
    for prompt, sample_steps, rewards in zip(["Describe the river.", "Q"], steps, got):
        ids, ends, start = render_steps(tok, prompt, sample_steps, ".")
        with torch.no_grad():
            logps = [torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].double(), -1) for m in models]
        ratio = [float(logps[0][t - 1, ids[t]] - logps[1][t - 1, ids[t]]) for t in range(len(ids))]
        bounds = [start] + [e + 1 for e in ends]
        expected = [0.5 * sum(ratio[a:b]) for a, b in zip(bounds, bounds[1:])]
        assert rewards == pytest.approx(expected, abs=1e-6)


def test_multi_head_model_weighs_its_heads(tmp_path, rm_paths):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = tmp_path / "attrs"
    model = AutoModelForSequenceClassification.from_pretrained(
        rm_paths["base"], num_labels=2, id2label={0: "helpfulness", 1: "verbosity"},
        label2id={"helpfulness": 0, "verbosity": 1}, ignore_mismatched_sizes=True)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(rm_paths["base"]).save_pretrained(folder)
    scorer = RewardScorer([str(folder)])
    assert scorer.heads() == [["helpfulness", "verbosity"]]
    (scores,) = scorer.score(["Q", "Q"], ["kind.", "rude vague wrong."])
    from prefopt.rewards.sources import ModelSource
    src = RewardSourceConfig(model=str(folder), attribute_weights={"helpfulness": 1.0, "verbosity": -0.5})
    combined = ModelSource(src, scorer.heads(), "roles.reward.sources[0]")([scores], ["Q", "Q"])
    assert combined == pytest.approx([h - 0.5 * v for h, v in scores], abs=1e-9)


@pytest.mark.slow
def test_ensemble_actor_members_aggregate_and_transform(ray_cluster, rm_paths):
    """One actor holds both members; min / uwo / log-sigmoid apply per sample; normalisation state is
    part of the source's state dict."""
    from prefopt.roles.reward_model import RewardModelWorker
    members = [rm_paths["base"], rm_paths["other"]]
    actor = ray_cluster.remote(num_cpus=1)(RewardModelWorker).remote(members)
    prompts, responses = ["Describe the river.", "Describe the city."], ["kind clear.", "rude vague wrong sloppy."]
    per_member = torch.tensor([[s[0] for s in m] for m in RewardScorer(members).score(prompts, responses)],
                              dtype=torch.float64)
    sources = [RewardSourceConfig(models=members, aggregate="min", name="wco"),
               RewardSourceConfig(models=members, aggregate="uwo", uwo_coef=2.0, name="uwo", weight=0.5),
               RewardSourceConfig(models=members, transform="log_sigmoid", reference_reward=0.1, name="ls",
                                  normalize=True, weight=0.0)]
    rewards = SequenceRewards(RewardRoleConfig(sources=sources), {0: actor, 1: actor, 2: actor})
    rows = [{"prompt": p} for p in prompts]
    totals, parts = rewards(prompts, responses, rows)
    mean, var = per_member.mean(0), per_member.var(0, unbiased=False)
    assert parts["wco"] == pytest.approx(per_member.min(0).values.tolist(), abs=1e-6)
    assert parts["uwo"] == pytest.approx((mean - 2.0 * var).tolist(), abs=1e-6)
    ls = torch.nn.functional.logsigmoid(mean - 0.1)
    assert parts["ls"] == pytest.approx(((ls - ls.mean()) / (ls.std() + 1e-8)).tolist(), abs=1e-6)
    assert totals == pytest.approx([w + 0.5 * u for w, u in zip(parts["wco"], parts["uwo"])], abs=1e-9)
    assert rewards.state_dict()["ls"]["normalizer"]["count"] == 2
    ray_cluster.kill(actor)


@pytest.mark.slow
def test_process_reward_actor_places_one_forward_step_scores(ray_cluster, tok, rm_paths):
    from prefopt.rewards.process_source import ProcessRewards
    from prefopt.rewards.steps import split_steps
    from prefopt.roles.reward_model import RewardModelWorker
    actor = ray_cluster.remote(num_cpus=1)(RewardModelWorker).remote([rm_paths["base"]])
    ids = tok("kind clear. rude. calm", add_special_tokens=False)["input_ids"]
    per_token, stats = ProcessRewards(ProcessRewardConfig(model=rm_paths["base"], delimiter="."), tok, actor)(
        ["Q: "], [ids], [{"prompt": "Q:"}])
    steps, ends = split_steps(ids, tok, ".")
    (expected,) = RewardScorer([rm_paths["base"]]).score_steps(["Q:"], [steps], ".")
    assert [per_token[0][e] for e in ends] == pytest.approx(expected[0], abs=1e-6)
    assert stats["reward/steps_per_response"] == 3
    ray_cluster.kill(actor)
