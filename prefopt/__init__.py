"""prefopt: preference optimization of language models on Ray + DeepSpeed (+ vLLM).

Python API (mirrors the CLI)::

    import prefopt
    recipe = prefopt.load_recipe("recipes/tiny_dpo.yaml", ["train.lr=1e-4"])
    result = prefopt.train(recipe)
    records = prefopt.read_metrics(result.run_dir)
"""
__version__ = "0.1.0"


def load_recipe(path, overrides=()):
    from prefopt.config import load_recipe as _load
    return _load(path, overrides)


def train(recipe, **kwargs):
    from prefopt.train import train as _train
    return _train(recipe, **kwargs)


def read_metrics(run_dir, split=None):
    from prefopt.io.run_dir import read_metrics as _read
    return _read(run_dir, split)
