"""Reward-model over-optimization and its ensemble fix, short version (docs/reward_models.md has the
3-seed run and its plot): proxy reward models trained on gold-labelled pairs; GRPO against one proxy
drives the proxy reward up while the gold reward rises, then falls; against the uncertainty-weighted
ensemble of the proxies the gold reward falls less and ends higher."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent.parent / "docs" / "experiments" / "overoptimization.py"


def experiment():
    spec = importlib.util.spec_from_file_location("overoptimization", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_proxy_overoptimizes_and_the_uwo_ensemble_holds_the_gold_reward(ray_cluster, tmp_path):
    exp = experiment()
    pairs = tmp_path / "gold_pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in exp.gold_pairs(256, seed=1234)))
    proxies = exp.train_proxies(tmp_path, pairs, 3, 0)
    runs = {name: exp.run_policy(tmp_path, name, source, seed=0, iterations=40, kl_coef=0.001)
            for name, source in exp.objectives(proxies, uwo_coef=1.0).items() if name in ("single proxy", "uwo")}
    summary = exp.summarize({name: [history] for name, history in runs.items()})
    single, uwo = summary["single proxy"], summary["uwo"]
    proxy = [h["proxy"] for h in runs["single proxy"]]
    assert single["proxy_final"] > proxy[0] + 1.0                    # the proxy keeps (or stays) high
    assert single["gold_drop"] > 0.08, single                        # gold rose, then fell as KL grew
    assert uwo["gold_drop"] < single["gold_drop"] and uwo["gold_final"] > single["gold_final"] + 0.1, summary
