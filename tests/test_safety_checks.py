"""Safe defaults and fail-fast checks: secrets never reach logged configs; impossible resource
requests fail before any actor starts (against the real local Ray cluster)."""
import pytest

from prefopt.config import load_recipe
from prefopt.errors import ConfigError


def test_logged_config_redacts_secrets(tmp_path):
    from prefopt.io.run_dir import write_config
    recipe = load_recipe("recipes/tiny_dpo.yaml", ["ray.env.HF_TOKEN=hf_abc123", "ray.env.WANDB_API_KEY=k",
                                                   "ray.env.MY_PASSWORD=p", "ray.env.OMP_NUM_THREADS=1"])
    write_config(tmp_path, recipe)
    text = (tmp_path / "config.yaml").read_text()
    assert "hf_abc123" not in text and "MY_PASSWORD: '***redacted***'" in text
    assert "WANDB_API_KEY: '***redacted***'" in text and "OMP_NUM_THREADS: '1'" in text
    assert recipe.ray.env["HF_TOKEN"] == "hf_abc123"        # the run itself still gets it


@pytest.mark.parametrize("override,message", [
    ("roles.learner.num_gpus=1", r"roles.learner asks for GPU=1 per actor, but no node of the cluster has that much"),
    ("roles.learner.num_cpus=3", r"the run needs CPU=6 \(roles.learner 2 x 3\), but the cluster has CPU=4"),
    ("roles.learner.resources.node_x=1", r"roles.learner asks for node_x=1 per actor"),
])
def test_impossible_resource_requests_fail_before_any_actor_starts(ray_cluster, override, message):
    from prefopt.algorithms import role_spec
    from prefopt.cluster import check_cluster_resources
    recipe = load_recipe("recipes/tiny_dpo.yaml", [override])
    with pytest.raises(ConfigError, match=message):
        check_cluster_resources(recipe, role_spec(recipe))
    fits = load_recipe("recipes/tiny_dpo.yaml")
    check_cluster_resources(fits, role_spec(fits))     # the shipped recipe fits
