"""``prefopt.train(recipe)``: run any recipe on the shared lifecycle (:mod:`prefopt.run`) with the
algorithm its objective names (:mod:`prefopt.algorithms`)."""
from __future__ import annotations

from prefopt.config_schema import Recipe


def train(recipe: Recipe, *, quiet: bool = False):
    from prefopt import console
    from prefopt.run import run

    console.configure(recipe.output.log_level)
    console.status("checking the recipe, models and data")
    return run(recipe, quiet=quiet)
