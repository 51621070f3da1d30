"""prefopt: preference optimization of language models on Ray + DeepSpeed (+ vLLM).

Python API (mirrors the CLI)::

    import prefopt
    recipe = prefopt.load_recipe("recipes/tiny_dpo.yaml", ["train.lr=1e-4"])
    result = prefopt.train(recipe)
    records = prefopt.read_metrics(result.run_dir)
    run = prefopt.read_run(result.run_dir)          # config, metrics, final numbers, summary
    job_id = prefopt.submit(recipe, address="http://HEAD:8265")   # the same recipe as a Ray job

See docs/python_api.md.
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


def read_run(run_dir):
    """A run directory as a :class:`prefopt.io.run_dir.Run` (config, metrics, final metrics, summary)."""
    from prefopt.io.run_dir import read_run as _read_run
    return _read_run(run_dir)


def submit(recipe, overrides=(), *, address=None, **kwargs):
    """Submit a recipe (path + overrides, or a Recipe) as a Ray job; returns the job id."""
    from prefopt.jobs import submit as _submit
    return _submit(recipe, overrides, address=address, **kwargs)
