"""`prefopt eval`: win rates (raw, length-controlled), the report of scored responses, the checks before
Ray starts, and (slow) real vLLM generation on the tiny model against a baseline."""
import json
import math
import shutil

import numpy as np
import pytest

from prefopt.cli import main
from prefopt.errors import ConfigError
from prefopt.evaluation.report import Responses, format_table, summarize
from prefopt.evaluation.winrate import (fit_length_glm, length_controlled_win_rate, length_feature, win_indicators,
                                        win_rate)

GOOD_FN = "prefopt.rewards.builtin:good_word_fraction"


def constant_word_model(out_dir, word: str = " kind"):
    """A copy of builtin:tiny-llama that answers every prompt with ``word`` repeated (greedy).

    Every token gets the same input embedding, so every position's hidden state is the same vector h
    whatever the context (attention averages identical values); the output row of ``word``'s token
    is then raised along h until it leads every other logit by 5. Built in about a second, no
    training: a model that a good-word reward prefers to the random tiny policy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.models.tiny import resolve_model_path
    base = resolve_model_path("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(base)
    (token,) = tok(word, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[0].expand_as(emb).clone())
        out = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
        h = out.hidden_states[-1][0, -1]                  # after the final norm: what lm_head reads
        logits = out.logits[0, -1]
        lead = (logits.max() - logits[token] + 5.0).item()
        model.lm_head.weight[token] += lead * h / h.dot(h)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


# ------------------------------------------------------------------------------------------- win rates


def test_win_rate_counts_ties_half():
    assert win_indicators([1.0, 0.5, 0.2, 0.3], [0.5, 0.5, 0.4, 0.3]) == [1.0, 0.5, 0.0, 0.5]
    assert win_rate([1.0, 0.5, 0.2, 0.3], [0.5, 0.5, 0.4, 0.3]) == pytest.approx(0.5)
    assert win_rate([2.0, 2.0], [1.0, 1.0]) == 1.0
    # a sample marked as a tie (the same response) is one whatever its rewards
    assert win_indicators([1.0, 1.0], [0.0, 0.0], ties=[True, False]) == [0.5, 1.0]
    with pytest.raises(ValueError, match="one value per sample"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="not finite"):
        win_rate([math.nan], [1.0])


def _noisy(seed: int, n: int, slope: float, mean_diff: float):
    """Length differences (tokens) and win indicators drawn with logit P(win) = slope * tanh(d / sd)."""
    rng = np.random.default_rng(seed)
    diff = rng.normal(mean_diff, 30.0, n).round()
    p = 1 / (1 + np.exp(-slope * length_feature(diff)))
    return diff.tolist(), (rng.random(n) < p).astype(float).tolist()


def test_length_controlled_win_rate_equals_raw_without_length_differences():
    wins = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0]
    assert length_controlled_win_rate(wins, [0] * 7) == pytest.approx(sum(wins) / 7, abs=1e-12)
    assert length_controlled_win_rate(wins, [12] * 7) == pytest.approx(sum(wins) / 7, abs=1e-12)   # sd 0
    assert length_controlled_win_rate([0.5] * 4, [3, -1, 8, 0]) == pytest.approx(0.5, abs=1e-9)   # all ties
    assert length_controlled_win_rate([1.0, 1.0, 1.0], [5, -3, 2]) == 1.0            # every sample a win
    assert length_controlled_win_rate([0.0, 0.0], [5, -3]) == 0.0


def test_length_controlled_win_rate_uncorrelated_lengths_keep_the_raw_rate():
    rng = np.random.default_rng(1)
    diff = rng.normal(25.0, 30.0, 4000).round().tolist()                # the model is longer, but ...
    wins = (rng.random(4000) < 0.7).astype(float).tolist()              # ... its wins do not depend on it
    raw = sum(wins) / len(wins)
    assert length_controlled_win_rate(wins, diff) == pytest.approx(raw, abs=0.02)


def test_length_controlled_win_rate_moves_to_half_when_length_explains_the_wins():
    diff, wins = _noisy(seed=0, n=4000, slope=2.0, mean_diff=20.0)      # longer wins; otherwise a coin flip
    raw, lc = sum(wins) / len(wins), length_controlled_win_rate(wins, diff)
    assert raw > 0.62
    assert abs(lc - 0.5) < 0.04 and abs(lc - 0.5) < abs(raw - 0.5) / 3
    # a real quality edge survives length control: logit = 1 + 2 x
    rng = np.random.default_rng(3)
    x = length_feature(diff)
    wins = (rng.random(4000) < 1 / (1 + np.exp(-(1.0 + 2.0 * x)))).astype(float).tolist()
    assert length_controlled_win_rate(wins, diff) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.03)


def test_logistic_fit_matches_a_reference_optimizer():
    from scipy.optimize import minimize
    diff, wins = _noisy(seed=2, n=300, slope=1.5, mean_diff=10.0)
    wins[:20] = [0.5] * 20                                               # ties are soft labels
    y, x = np.array(wins), length_feature(diff)
    for ridge in (1e-4, 1.0):
        def loss(beta):
            z = beta[0] + beta[1] * x
            return -(y * -np.logaddexp(0, -z) + (1 - y) * -np.logaddexp(0, z)).sum() + 0.5 * ridge * beta[1] ** 2
        ref = minimize(loss, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10})
        assert fit_length_glm(wins, x, ridge) == pytest.approx(tuple(ref.x), abs=1e-6)
    # the feature: tanh of the standardised difference (sample sd, ddof 1), as AlpacaEval's
    d = np.array(diff)
    assert np.allclose(length_feature(diff), np.tanh(d / d.std(ddof=1)))
    # complete separation by length: the ridge keeps the fit finite
    theta, phi = fit_length_glm([float(v > 0) for v in diff], x)
    assert math.isfinite(theta) and math.isfinite(phi) and phi > 10
    with pytest.raises(ValueError, match="unbounded"):
        fit_length_glm([1.0, 1.0], [0.1, -0.2])


# ------------------------------------------------------------------------------------------- report


def test_summarize_fields_and_records():
    prompts = ["p0", "p0", "p1", "p1"]                                   # n = 2 per prompt
    metrics, records = summarize(prompts, ["a", "bb", "c", "d"], [1.0, 0.0, 2.0, 1.0],
                                 {"fn": [1.0, 0.0, 1.0, 0.5], "model0": [0.0, 0.0, 2.0, 1.0]}, [3, 8, 8, 5],
                                 max_tokens=8)
    assert metrics["samples"] == 4 and metrics["reward/mean"] == pytest.approx(1.0)
    assert metrics["reward/std"] == pytest.approx(np.std([1.0, 0.0, 2.0, 1.0], ddof=1))
    assert metrics["reward/fn"] == pytest.approx(0.625) and metrics["reward/model0"] == pytest.approx(0.75)
    assert metrics["length/mean"] == pytest.approx(6.0) and metrics["length/max_tokens_fraction"] == 0.5
    assert "win_rate" not in metrics and not any(k.startswith("baseline/") for k in metrics)
    assert records[1] == {"prompt": "p0", "response": "bb", "reward": 0.0, "components": {"fn": 0.0, "model0": 0.0},
                          "length": 8}

    base = Responses(responses=["a", "x", "y", "z"], rewards=[1.5, 0.0, 1.0, 1.0], lengths=[3, 2, 8, 1],
                     components={"fn": [0.0] * 4, "model0": [1.5, 0.0, 1.0, 1.0]})
    metrics, records = summarize(prompts, ["a", "bb", "c", "d"], [1.0, 0.0, 2.0, 1.0],
                                 {"fn": [1.0, 0.0, 1.0, 0.5], "model0": [0.0, 0.0, 2.0, 1.0]}, [3, 8, 8, 5],
                                 max_tokens=8, baseline=base)
    # sample 0: the same response "a" is a tie although its rewards differ; 1: tie; 2: win; 3: tie
    assert [r["win"] for r in records] == [0.5, 0.5, 1.0, 0.5]
    assert (metrics["wins"], metrics["ties"], metrics["losses"]) == (1, 3, 0)
    assert metrics["win_rate"] == pytest.approx(0.625)
    assert metrics["lc_win_rate"] == pytest.approx(length_controlled_win_rate([0.5, 0.5, 1.0, 0.5], [0, 6, 0, 4]))
    assert metrics["length/mean_diff"] == pytest.approx(2.5)
    assert metrics["baseline/reward/mean"] == pytest.approx(0.875) and metrics["baseline/reward/fn"] == 0.0
    assert metrics["baseline/length/max_tokens_fraction"] == 0.25
    assert records[2]["baseline_response"] == "y" and records[2]["baseline_length"] == 8
    assert records[2]["baseline_components"] == {"fn": 0.0, "model0": 1.0} and records[2]["baseline_reward"] == 1.0
    json.dumps(metrics), json.dumps(records)                              # plain JSON
    table = format_table(metrics, "title", "base")
    assert "win rate (ties count half) | 0.625" in table and "| base" in table and "1 / 3 / 0" in table

    with pytest.raises(ValueError, match="one value per sample"):
        summarize(prompts, ["a"], [1.0], {}, [1], max_tokens=8)
    with pytest.raises(ValueError, match=r"baseline: expected one value per sample \(4\), got lengths: 1"):
        summarize(prompts, ["a"] * 4, [1.0] * 4, {}, [1] * 4, 8, baseline=Responses(["a"] * 4, [0.0] * 4, [1]))
    with pytest.raises(ValueError, match="reward/mean"):
        summarize(["p"], ["a"], [1.0], {"mean": [1.0]}, [1], max_tokens=8)


# ------------------------------------------------------------------------------------------- checks before Ray


@pytest.fixture
def no_ray(monkeypatch):
    import prefopt.cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the arguments were checked")
    monkeypatch.setattr(prefopt.cluster, "init_ray", refuse)
    monkeypatch.setattr(prefopt.cluster, "init_ray_for", refuse)


def _eval(*args):
    return main(["eval", *args])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished run's folder (marker, model/, summary.json) holding the tiny model."""
    from prefopt.io.run_dir import MARKER
    from prefopt.models.tiny import resolve_model_path
    run = tmp_path_factory.mktemp("runs") / "tiny-grpo-20260101-000000"
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), run / "model")
    (run / MARKER).write_text("{}")
    (run / "summary.json").write_text("{}")
    return run


def test_argument_errors_come_before_ray(tmp_path, no_ray, capsys, run_folder):
    base = ["builtin:tiny-llama", "--prompts", "synthetic:pairs", "--reward", GOOD_FN]
    cases = [
        (["--out", str(tmp_path / "o"), "--n", "2"], "--n 2 with --temperature 0"),
        (["--out", str(tmp_path / "o"), "--max-tokens", "0"], "--max-tokens must be >= 1"),
        ([], "--out DIR is needed: builtin:tiny-llama is not a run folder"),
        (["--out", str(tmp_path / "o"), "--reward", "prefopt.rewards.builtin:nope"], "has no function 'nope'"),
        (["--out", str(tmp_path / "o"), "--reward", "no_such_pkg.mod:fn"], "cannot import module 'no_such_pkg.mod'"),
        (["--out", str(tmp_path / "o"), "--reward", str(tmp_path / "missing-rm")], "does not exist"),
        (["--out", str(tmp_path / "o"), "--baseline", "builtin:tiny-lama"], "did you mean"),
        (["--out", str(tmp_path / "o"), "--max-prompt-length", "1000", "--max-tokens", "100"], "1024 positions"),
    ]
    for extra, message in cases:
        assert _eval(*base, *extra) == 2, extra
        assert message in capsys.readouterr().err, extra

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the river."}) + "\n" + json.dumps({"question": "x"}) + "\n")
    assert _eval("builtin:tiny-llama", "--prompts", str(prompts), "--reward", GOOD_FN,
                 "--out", str(tmp_path / "o")) == 2
    assert f"file {prompts}, row 1, field 'prompt': missing prompt field" in capsys.readouterr().err

    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    assert _eval(*base, "--out", str(done)) == 2
    assert "already holds results (summary.json)" in capsys.readouterr().err
    assert (done / "summary.json").read_text() == "{}"

    # a run folder: its model, results in RUN_DIR/eval, which is refused once it holds results
    (run_folder / "eval").mkdir(exist_ok=True)
    (run_folder / "eval" / "samples.jsonl").write_text("")
    assert _eval(str(run_folder), "--prompts", "synthetic:pairs", "--reward", GOOD_FN) == 2
    assert f"--out {run_folder / 'eval'} already holds results (samples.jsonl)" in capsys.readouterr().err
    shutil.rmtree(run_folder / "eval")
    no_model = tmp_path / "failed-run"
    (no_model / "model").mkdir(parents=True)
    (no_model / ".prefopt-run").write_text("{}")
    assert _eval(str(no_model), "--prompts", "synthetic:pairs", "--reward", GOOD_FN) == 2
    assert "is a run folder without a saved model" in capsys.readouterr().err


def test_inputs_resolve_models_rewards_and_the_output_folder(tmp_path, run_folder):
    from prefopt.evaluation import inputs
    model = inputs.resolve_model(str(run_folder), "runs", "MODEL")
    assert model.path == str(run_folder.resolve() / "model") and model.run_dir == run_folder.resolve()
    assert inputs.out_dir(None, model, force=False) == run_folder.resolve() / "eval"
    by_name = inputs.resolve_model("run:tiny-grpo", str(run_folder.parent), "MODEL")    # run:NAME: the same model
    assert by_name.path == model.path and by_name.run_dir is None
    assert inputs.split_weight("a.b:c@0.5") == ("a.b:c", 0.5) and inputs.split_weight("org/rm") == ("org/rm", 1.0)
    assert inputs.is_reward_fn(GOOD_FN) and not inputs.is_reward_fn("builtin:tiny-reward")
    assert not inputs.is_reward_fn("run:rm") and not inputs.is_reward_fn("org/name")
    cfg = inputs.reward_role([GOOD_FN, "builtin:tiny-reward@0.25"], "runs")
    fn, rm = cfg.sources
    assert (fn.fn, fn.weight, rm.fn, rm.weight) == (GOOD_FN, 1.0, None, 0.25)
    assert rm.model.startswith("/") and "tiny-reward" in rm.model
    with pytest.raises(ConfigError, match="at least one reward source"):
        inputs.reward_role([], "runs")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        inputs.out_dir(str(tmp_path / "file" / "out"), model, force=False)
    assert inputs.out_dir(str(tmp_path / "new"), model, force=False) == tmp_path / "new"


# ------------------------------------------------------------------------------------------- end to end (vLLM)


@pytest.mark.slow
def test_eval_model_against_itself_is_all_ties(ray_cluster, tmp_path, capsys):
    """The model as its own baseline ties every prompt (the same checkpoint shares its samples)."""
    pytest.importorskip("vllm")
    out = tmp_path / "self"
    assert main(["eval", "builtin:tiny-llama", "--prompts", "synthetic:pairs", "--max-prompts", "8",
                 "--max-tokens", "8", "--reward", GOOD_FN, "--baseline", "builtin:tiny-llama", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "win rate (ties count half) | 0.5" in printed and f"written: {out}" in printed
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert (m["win_rate"], m["lc_win_rate"], m["ties"], m["samples"]) == (0.5, 0.5, 8, 8)
    assert m["reward/mean"] == m["baseline/reward/mean"] and m["length/mean_diff"] == 0
    assert 0 < m["length/mean"] <= 8 and summary["num_prompts"] == 8 and summary["time_s"]["generate"] > 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["response"] == r["baseline_response"] and r["win"] == 0.5 for r in records)
    assert [r["prompt_index"] for r in records] == list(range(8))
    # the output folder now holds results: refused without --force
    assert main(["eval", "builtin:tiny-llama", "--prompts", "synthetic:pairs", "--reward", GOOD_FN,
                 "--out", str(out)]) == 2


@pytest.mark.slow
def test_eval_better_model_wins(ray_cluster, tmp_path):
    """A model that always answers with a good word beats the random tiny model on the good-word reward
    (a reward model source too, with a small weight)."""
    pytest.importorskip("vllm")
    from prefopt.evaluation.cli_eval import evaluate
    good = constant_word_model(tmp_path / "kind-model")
    result = evaluate(good, "synthetic:pairs", [GOOD_FN, "builtin:tiny-reward@0.01"], baseline="builtin:tiny-llama",
                      max_prompts=8, max_tokens=8, out=str(tmp_path / "out"))
    m = result.metrics
    assert m["reward/good_word_fraction"] == 1.0 and m["baseline/reward/good_word_fraction"] < 0.5
    assert (m["win_rate"], m["wins"]) == (1.0, 8) and m["lc_win_rate"] == 1.0
    assert m["length/mean"] == 8 and m["length/max_tokens_fraction"] == 1.0          # never stops by itself
    assert "reward/model1" in m and "baseline/reward/model1" in m
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert records == result.records and all(r["response"] == " kind" * 8 for r in records)
    assert set(records[0]["components"]) == {"good_word_fraction", "model1"}
