"""``prefopt.train(recipe)``: run any recipe with the loop its objective needs."""
from __future__ import annotations

from prefopt.config_schema import Recipe


def train(recipe: Recipe, **kwargs):
    from prefopt import console
    from prefopt.objectives import get_objective

    console.configure(recipe.output.log_level)
    console.status("checking the recipe, models and data")

    kind = get_objective(recipe.objective.name).batch_kind
    if kind in ("pairs", "lists"):
        from prefopt.loops.offline import train as offline_train
        return offline_train(recipe, **kwargs)
    if kind == "rollouts":
        from prefopt.loops.online import train as online_train
        return online_train(recipe, **kwargs)
    raise NotImplementedError(f"no training loop for batch kind '{kind}'")
